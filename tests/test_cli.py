"""The ``harmon`` command, run in-process on the tiny reference model."""
from __future__ import annotations

import io
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cli_helpers import assert_user_error
from harmon import __version__
from harmon.checkpoint import load_model, save_model, save_original
from harmon.cli import main
from harmon.pipelines import ChatSession, ImageToTextPipeline
from harmon.tokenizer import build_byte_tokenizer

TINY = Path(__file__).resolve().parents[1].parent / "shared" / "reference" / "tiny"
FAST = ["--num-iter", "2", "--num-steps", "2", "--size", "64", "-q"]


@pytest.fixture(scope="module")
def tiny_model():
    return load_model(TINY)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tiny_model):
    folder = tmp_path_factory.mktemp("model")
    save_model(tiny_model, folder)
    build_byte_tokenizer().save_pretrained(str(folder))
    return folder


@pytest.fixture()
def photo(tmp_path):
    path = tmp_path / "photo.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 72, 3), dtype=np.uint8)).save(path)
    return path


def test_generate_metadata_seeds_and_grid(model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["generate", "a red circle", "--model", str(model_dir), "--out-dir", str(out), "--seed", "7",
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
        assert meta["num_iter"] == "2" and meta["num_steps"] == "2" and meta["cfg"] == "3.0"
        assert meta["height"] == meta["width"] == "64" and meta["cfg_schedule"] == "constant"
        seeds.append(int(meta["seed"]))
    assert seeds == [7, 8]
    with Image.open(written[2]) as grid:
        assert grid.size == (128, 64)
    assert not list(out.glob("*.tmp")) and not list(out.glob(".*"))


def test_generate_same_seed_same_pixels(model_dir, tmp_path, capsys):
    a, b, c = tmp_path / "a.png", tmp_path / "b.png", tmp_path / "c.png"
    for path, seed in ((a, "3"), (b, "3"), (c, "4")):
        assert main(["generate", "a blue square", "--model", str(model_dir), "--out", str(path),
                     "--seed", seed, *FAST]) == 0
    pixels = [np.asarray(Image.open(p)) for p in (a, b, c)]
    assert np.array_equal(pixels[0], pixels[1])
    assert not np.array_equal(pixels[0], pixels[2])


def test_describe_streams_the_greedy_answer(model_dir, tiny_model, photo, capsys):
    assert main(["describe", str(photo), "What is it?", "--model", str(model_dir), "--image-size", "64",
                 "--max-new-tokens", "12"]) == 0
    out = capsys.readouterr().out
    pipe = ImageToTextPipeline(tiny_model, build_byte_tokenizer(), image_size=64)
    expected = pipe(str(photo), "What is it?", max_new_tokens=12)
    assert expected and out == expected + "\n"  # the tiny model's greedy answer: 12 newlines


def test_chat_answers_each_line(model_dir, tiny_model, photo, capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO("q1\nq2\n"))
    assert main(["chat", str(photo), "--model", str(model_dir), "--image-size", "64", "--max-new-tokens", "5"]) == 0
    out = capsys.readouterr().out
    session = ChatSession(ImageToTextPipeline(tiny_model, build_byte_tokenizer(), image_size=64), str(photo))
    answers = [session.ask(q, max_new_tokens=5) for q in ("q1", "q2")]  # the second sees the first turn
    assert all(answers) and out == answers[0] + "\n" + answers[1] + "\n"


def test_info_counts_parameters(model_dir, tiny_model, capsys):
    assert main(["info", str(model_dir)]) == 0
    out = capsys.readouterr().out
    counts = {m[1]: int(m[2].replace(",", "")) for m in re.finditer(r"^\s+(\w+)\s+([\d,]+)$", out, re.M)}
    for part in ("vae", "llm", "mar", "proj_in", "proj_out"):
        expected = sum(p.numel() for p in getattr(tiny_model, part).parameters())
        assert counts[part] == expected, (part, out)
    assert counts["total"] == sum(p.numel() for p in tiny_model.parameters())
    assert "config:    tiny" in out and "ours" in out and "float32" in out and "tokenizer: present" in out
    assert main(["info", str(TINY)]) == 0
    out = capsys.readouterr().out
    assert "reference fixture" in out and "tokenizer: absent" in out


def test_convert_then_generate(tiny_model, tmp_path, capsys):
    pth, ckpt = tmp_path / "harmon_tiny.pth", tmp_path / "kl16.ckpt"
    save_original(tiny_model, pth, ckpt)
    out = tmp_path / "converted"
    assert main(["convert", "--pth", str(pth), "--vae", str(ckpt), "--out", str(out),
                 "--config", str(TINY / "config.json")]) == 0
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in out.iterdir()}
    converted = load_model(out)
    for (k, v), (k2, v2) in zip(converted.state_dict().items(), tiny_model.state_dict().items()):
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
def test_user_errors(case, model_dir, tmp_path, capsys):
    gen = ["generate", "a cat", "--model", str(model_dir), "--out-dir", str(tmp_path), *FAST]
    argv, words = {
        "missing image": (["describe", str(tmp_path / "nope.png"), "--model", str(model_dir)], ["nope.png"]),
        "size 50": (gen + ["--size", "50"], ["50"]),
        "empty prompt": (["generate", "  ", "--model", str(model_dir)], ["empty"]),
        "no model dir": (["generate", "a cat", "--model", str(tmp_path / "missing")], ["missing", "convert"]),
        "model is a file": (["describe", str(model_dir / "config.json"), "--model", str(model_dir / "config.json")],
                            ["folder"]),
    }[case]
    assert_user_error(main(argv), capsys, *words)
    assert not list(tmp_path.glob("*.png"))


def test_edit_inpaints_outpaints_and_varies(model_dir, photo, tmp_path, capsys):
    common = ["--model", str(model_dir), "--num-iter", "2", "--num-steps", "2", "--seed", "3"]
    out = tmp_path / "boxed.png"
    assert main(["edit", str(photo), "a red circle", "--box", "0,0,32,32", "--out", str(out), *common]) == 0
    image = Image.open(out)
    assert image.size == (64, 32) and image.text["edit"] == "box"  # 72x40 rounded down to multiples of 16
    assert image.text["generated_tokens"] == "4" and image.text["seed"] == "3"
    wide = tmp_path / "wide.png"
    assert main(["edit", str(photo), "a beach", "--extend", "16,0,16,0", "--out", str(wide), *common]) == 0
    assert Image.open(wide).size == (96, 32)
    varied = tmp_path / "varied.png"
    assert main(["edit", str(photo), "a red circle", "--strength", "0.5", "--out", str(varied), *common]) == 0
    again = tmp_path / "again.png"
    assert main(["edit", str(photo), "a red circle", "--strength", "0.5", "--out", str(again), *common]) == 0
    assert np.array_equal(np.asarray(Image.open(varied)), np.asarray(Image.open(again)))
    capsys.readouterr()
    assert_user_error(main(["edit", str(photo), "x", "--box", "1,2", "--out", str(out), *common]), capsys,
                      "four integers")
    assert_user_error(main(["edit", str(photo), "x", "--out", str(out), *common]), capsys, "exactly one of")
    assert_user_error(main(["edit", str(photo), "x", "--extend", "8,0,0,0", "--out", str(out), *common]), capsys,
                      "multiple of 16")


def test_generate_fast_mode(model_dir, tmp_path):
    out = tmp_path / "fast.png"
    assert main(["generate", "a red circle", "--model", str(model_dir), "--out", str(out), "--seed", "1",
                 "--size", "64", "--fast", "-q"]) == 0
    text = Image.open(out).text
    assert text["fast"] == "True" and text["num_iter"] == "32" and text["num_steps"].startswith("50,")


def test_edit_fast_mode(model_dir, photo, tmp_path):
    out = tmp_path / "fast_edit.png"
    assert main(["edit", str(photo), "a red circle", "--box", "0,0,32,32", "--model", str(model_dir), "--out",
                 str(out), "--seed", "2", "--fast", "--num-iter", "3"]) == 0
    text = Image.open(out).text  # --num-iter given: only the steps come from the fast mode, annealed over 3
    assert text["fast"] == "True" and text["num_iter"] == "3" and text["num_steps"].count(",") == 2
