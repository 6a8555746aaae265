"""The ``harmon`` command, run in-process on the tiny reference model."""
from __future__ import annotations

import io
import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cli_helpers import assert_user_error
from conftest import TINY_FIXTURE
import harmon.cli.models
from harmon import __version__
from harmon.checkpoint import load_model
from harmon.saving import save_original
from harmon.cli import build_parser, main
from harmon.errors import InputError
from harmon.pipelines import ChatSession, ImageToTextPipeline
from harmon.settings import DecodingSettings
from harmon.tokenizer import build_byte_tokenizer

FAST = ["--num-iter", "2", "--num-steps", "2", "--size", "64", "-q"]


@pytest.fixture()
def photo(tmp_path):
    path = tmp_path / "photo.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 72, 3), dtype=np.uint8)).save(path)
    return path


def test_generate_metadata_seeds_and_grid(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["generate", "a red circle", "--model", str(tiny_model_dir), "--out-dir", str(out), "--seed", "7",
                 "--num-images", "2", "--grid", *FAST])
    assert code == 0
    written = [Path(line) for line in capsys.readouterr().out.split()]
    assert len(written) == 3 and all(p.is_file() for p in written)
    seeds = []
    for path in written[:2]:
        with Image.open(path) as im:
            assert im.format == "PNG" and im.size == (64, 64)
            meta = im.text
        assert meta["prompt"] == "a red circle" and meta["model"] == "tiny" and meta["harmon_version"] == __version__
        assert meta["num_iter"] == "2" and meta["num_steps"] == "2" and meta["guidance_scale"] == "3.0"
        assert meta["height"] == meta["width"] == "64" and meta["cfg_schedule"] == "constant"
        seeds.append(int(meta["seed"]))
    assert seeds == [7, 8]
    with Image.open(written[2]) as grid:
        assert grid.size == (128, 64)
    assert not list(out.glob("*.tmp")) and not list(out.glob(".*"))


def test_generate_same_seed_same_pixels(tiny_model_dir, tmp_path, capsys):
    a, b, c = tmp_path / "a.png", tmp_path / "b.png", tmp_path / "c.png"
    for path, seed in ((a, "3"), (b, "3"), (c, "4")):
        assert main(["generate", "a blue square", "--model", str(tiny_model_dir), "--out", str(path),
                     "--seed", seed, *FAST]) == 0
    pixels = [np.asarray(Image.open(p)) for p in (a, b, c)]
    assert np.array_equal(pixels[0], pixels[1])
    assert not np.array_equal(pixels[0], pixels[2])


def test_describe_streams_the_greedy_answer(tiny_model_dir, reference_model, photo, capsys):
    assert main(["describe", str(photo), "What is it?", "--model", str(tiny_model_dir), "--image-size", "64",
                 "--max-new-tokens", "12"]) == 0
    out = capsys.readouterr().out
    pipe = ImageToTextPipeline(reference_model, build_byte_tokenizer(), image_size=64)
    expected = pipe(str(photo), "What is it?", DecodingSettings(max_new_tokens=12))
    assert expected and out == expected + "\n"  # the tiny model's greedy answer: 12 newlines


def test_chat_answers_each_line(tiny_model_dir, reference_model, photo, capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO("q1\nq2\n"))
    assert main(["chat", str(photo), "--model", str(tiny_model_dir), "--image-size", "64",
                 "--max-new-tokens", "5"]) == 0
    out = capsys.readouterr().out
    session = ChatSession(ImageToTextPipeline(reference_model, build_byte_tokenizer(), image_size=64), str(photo))
    # the second answer sees the first turn
    answers = [session.ask(q, DecodingSettings(max_new_tokens=5)) for q in ("q1", "q2")]
    assert all(answers) and out == answers[0] + "\n" + answers[1] + "\n"


def test_info_counts_parameters(tiny_model_dir, reference_model, capsys):
    assert main(["info", str(tiny_model_dir)]) == 0
    out = capsys.readouterr().out
    counts = {m[1]: int(m[2].replace(",", "")) for m in re.finditer(r"^\s+(\w+)\s+([\d,]+)$", out, re.M)}
    for part in ("vae", "llm", "mar", "proj_in", "proj_out"):
        expected = sum(p.numel() for p in getattr(reference_model, part).parameters())
        assert counts[part] == expected, (part, out)
    assert counts["total"] == sum(p.numel() for p in reference_model.parameters())
    assert "config:    tiny" in out and "ours" in out and "float32" in out and "tokenizer: present" in out
    assert main(["info", str(TINY_FIXTURE)]) == 0
    out = capsys.readouterr().out
    assert "reference fixture" in out and "tokenizer: absent" in out


def test_convert_then_generate(reference_model, tmp_path, capsys):
    pth, ckpt = tmp_path / "harmon_tiny.pth", tmp_path / "kl16.ckpt"
    save_original(reference_model, pth, ckpt)
    out = tmp_path / "converted"
    assert main(["convert", "--pth", str(pth), "--vae", str(ckpt), "--out", str(out),
                 "--config", str(TINY_FIXTURE / "config.json")]) == 0
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in out.iterdir()}
    converted = load_model(out)
    for (k, v), (k2, v2) in zip(converted.state_dict().items(), reference_model.state_dict().items()):
        assert k == k2 and torch.equal(v, v2)
    png = tmp_path / "x.png"
    assert main(["generate", "a cat", "--model", str(out), "--out", str(png), "--seed", "1", *FAST]) == 0
    assert png.is_file()
    capsys.readouterr()
    # without --config the tiny model matches no released preset: a clear error
    assert main(["convert", "--pth", str(pth), "--vae", str(ckpt), "--out", str(tmp_path / "x")]) == 2
    assert_user_error(2, capsys, "preset")


@pytest.mark.parametrize("case", ["missing image", "size 50", "empty prompt", "no model dir",
                                  "model is a file"])
def test_user_errors(case, tiny_model_dir, tmp_path, capsys):
    gen = ["generate", "a cat", "--model", str(tiny_model_dir), "--out-dir", str(tmp_path), *FAST]
    argv, words = {
        "missing image": (["describe", str(tmp_path / "nope.png"), "--model", str(tiny_model_dir)], ["nope.png"]),
        "size 50": (gen + ["--size", "50"], ["50"]),
        "empty prompt": (["generate", "  ", "--model", str(tiny_model_dir)], ["empty"]),
        "no model dir": (["generate", "a cat", "--model", str(tmp_path / "missing")], ["missing", "convert"]),
        "model is a file": (["describe", str(tiny_model_dir / "config.json"),
                             "--model", str(tiny_model_dir / "config.json")], ["folder"]),
    }[case]
    assert_user_error(main(argv), capsys, *words)
    assert not list(tmp_path.glob("*.png"))


def test_edit_inpaints_outpaints_and_varies(tiny_model_dir, photo, tmp_path, capsys):
    common = ["--model", str(tiny_model_dir), "--num-iter", "2", "--num-steps", "2", "--seed", "3"]
    out = tmp_path / "boxed.png"
    assert main(["edit", str(photo), "a red circle", "--box", "0,0,32,32", "--out", str(out), *common]) == 0
    image = Image.open(out)
    assert image.size == (64, 32) and image.text["edit_mode"] == "inpaint"  # 72x40 rounded down to multiples of 16
    assert image.text["source_image"] == str(photo)
    assert image.text["generated_tokens"] == "4" and image.text["seed"] == "3"
    wide = tmp_path / "wide.png"
    assert main(["edit", str(photo), "a beach", "--extend", "16,0,16,0", "--out", str(wide), *common]) == 0
    assert Image.open(wide).size == (96, 32) and Image.open(wide).text["edit_mode"] == "outpaint"
    varied = tmp_path / "varied.png"
    assert main(["edit", str(photo), "a red circle", "--strength", "0.5", "--out", str(varied), *common]) == 0
    again = tmp_path / "again.png"
    assert main(["edit", str(photo), "a red circle", "--strength", "0.5", "--out", str(again), *common]) == 0
    assert np.array_equal(np.asarray(Image.open(varied)), np.asarray(Image.open(again)))
    assert Image.open(varied).text["edit_mode"] == "variation"
    capsys.readouterr()
    assert_user_error(main(["edit", str(photo), "x", "--box", "1,2", "--out", str(out), *common]), capsys,
                      "four integers")
    assert_user_error(main(["edit", str(photo), "x", "--out", str(out), *common]), capsys, "exactly one of")
    assert_user_error(main(["edit", str(photo), "x", "--extend", "8,0,0,0", "--out", str(out), *common]), capsys,
                      "multiple of 16")


def test_generate_fast_mode(tiny_model_dir, tmp_path):
    out = tmp_path / "fast.png"
    assert main(["generate", "a red circle", "--model", str(tiny_model_dir), "--out", str(out), "--seed", "1",
                 "--size", "64", "--fast", "-q"]) == 0
    text = Image.open(out).text
    steps = json.loads(text["num_steps"])  # one respacing per MAR iteration, annealed 50 -> 5
    assert text["fast"] == "True" and text["num_iter"] == "32" and len(steps) == 32
    assert steps[0] == "50" and steps[-1] == "5"


def test_edit_fast_mode(tiny_model_dir, photo, tmp_path):
    out = tmp_path / "fast_edit.png"
    assert main(["edit", str(photo), "a red circle", "--box", "0,0,32,32", "--model", str(tiny_model_dir), "--out",
                 str(out), "--seed", "2", "--fast", "--num-iter", "3"]) == 0
    text = Image.open(out).text  # --num-iter given: only the steps come from the fast mode, annealed over 3
    assert text["fast"] == "True" and text["num_iter"] == "3" and len(json.loads(text["num_steps"])) == 3


def test_one_flag_per_setting_with_the_old_spellings_as_aliases():
    parser = build_parser()
    for flag in ("--guidance-scale", "--cfg"):
        args = parser.parse_args(["generate", "x", flag, "2.5", "--cfg-schedule", "linear", "--num-steps", "ddim25"])
        assert args.guidance_scale == 2.5 and args.cfg_schedule == "linear" and args.num_steps == "ddim25"
    assert parser.parse_args(["generate", "x", "--num-steps", "7"]).num_steps == 7
    for flag in ("--do-sample", "--sample"):
        args = parser.parse_args(["describe", "x.png", flag, "--top-p", "0.5", "--max-new-tokens", "3"])
        assert args.do_sample and args.top_p == 0.5 and args.max_new_tokens == 3
    assert not parser.parse_args(["chat", "x.png"]).do_sample


def test_settings_are_checked_once_where_they_are_built(tiny_model_dir, photo, capsys):
    for argv, words in ((["generate", "x", "--vae-tile", "1"], "vae_tile must be None or at least 2"),
                        (["generate", "x", "--num-iter", "0"], "num_iter must be >= 1"),
                        (["describe", str(photo), "--top-p", "1.5"], "top_p must be in (0, 1]"),
                        (["chat", str(photo), "--max-new-tokens", "0"], "max_new_tokens must be >= 1")):
        assert_user_error(main([*argv, "--model", str(tiny_model_dir)]), capsys, words)


def test_only_input_errors_become_one_line(tiny_model_dir, monkeypatch, capsys):
    def fails(error):
        def folder_info(folder):
            raise error
        return folder_info

    monkeypatch.setattr(harmon.cli.models, "folder_info", fails(InputError("a value to fix")))
    assert_user_error(main(["info", str(tiny_model_dir)]), capsys, "a value to fix")
    monkeypatch.setattr(harmon.cli.models, "folder_info", fails(ValueError("a bug")))
    with pytest.raises(ValueError, match="a bug"):  # anything else keeps its traceback
        main(["info", str(tiny_model_dir)])
