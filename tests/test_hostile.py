"""A hostile but fair user's inputs: each ends in one clear error (exit 2, nothing half-written) or is made right.

The corpus of issue 24, kept so that it stays fixed: text that is not UTF-8, outputs under a file, deep JSON,
sizes that would exhaust memory, model folders and training configs with values of the wrong type, sampling
settings that would give a black image, a corrected batch into the folder of a failed one, a training run
resumed with other settings, and weights that are corrupt.
"""
from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from cli_helpers import assert_user_error
from harmon.checkpoint import CheckpointError, load_model
from harmon.cli import main
from harmon.pipelines import EditPipeline, inpaint_region
from harmon.train.config import TrainConfig
from harmon.train.trainer import check_resume_config

FAST = ["--num-iter", "2", "--num-steps", "2", "--size", "64", "-q"]
NOT_UTF8 = "a red \udcff circle"  # what Python makes of the argument bytes b"a red \xff circle"


@pytest.fixture()
def photo(tmp_path):
    path = tmp_path / "photo.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(path)
    return path


def _listing(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


# -- text that is not UTF-8 ---------------------------------------------------------------------------------
def test_generate_and_describe_refuse_text_that_is_not_utf8(tiny_model_dir, photo, tmp_path, capsys):
    code = main(["generate", NOT_UTF8, "--model", str(tiny_model_dir), "--out-dir", str(tmp_path / "out"), *FAST])
    assert_user_error(code, capsys, "the prompt is not valid UTF-8", "'\\udcff'")
    assert not (tmp_path / "out").exists()
    code = main(["describe", str(photo), "What \udcff is it?", "--model", str(tiny_model_dir), "--image-size", "64"])
    assert_user_error(code, capsys, "the question is not valid UTF-8")
    code = main(["edit", str(photo), NOT_UTF8, "--box", "0,0,32,32", "--model", str(tiny_model_dir),
                 "--out", str(tmp_path / "e.png")])
    assert_user_error(code, capsys, "the prompt is not valid UTF-8")


def test_chat_line_that_is_not_utf8(tiny_model_dir, photo, monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"what is \xff this?\n"), encoding="utf-8"))
    code = main(["chat", str(photo), "--model", str(tiny_model_dir), "--image-size", "64", "--max-new-tokens", "2"])
    assert_user_error(code, capsys, "the question is not valid UTF-8")


def test_batch_prompt_with_a_lone_surrogate_writes_nothing(tiny_model_dir, tmp_path, capsys):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "a \\ud800 circle"}\n')
    out = tmp_path / "out"
    code = main(["batch", str(prompts), "--model", str(tiny_model_dir), "--out-dir", str(out), *FAST])
    assert_user_error(code, capsys, "prompt 0 (line 1) is not valid UTF-8")
    assert not out.exists()


# -- outputs and files ---------------------------------------------------------------------------------------
def test_outputs_under_a_regular_file(tiny_model_dir, photo, tmp_path, capsys):
    blocker, prompts = tmp_path / "file", tmp_path / "prompts.txt"
    blocker.write_text("not a folder")
    prompts.write_text("a red circle\n")
    runs = [
        ["generate", "a red circle", "--model", str(tiny_model_dir), "--out", str(blocker / "x.png"), *FAST],
        ["generate", "a red circle", "--model", str(tiny_model_dir), "--out-dir", str(blocker / "sub"), *FAST],
        ["edit", str(photo), "a red circle", "--box", "0,0,32,32", "--model", str(tiny_model_dir),
         "--out", str(blocker / "e.png")],
        ["batch", str(prompts), "--model", str(tiny_model_dir), "--out-dir", str(blocker / "b")],
        ["eval", "shapes", "--model", str(tiny_model_dir), "--out", str(blocker / "ev")],
        ["export", str(tiny_model_dir), "--layout", "ours", "--out", str(blocker / "exp")],
    ]
    for argv in runs:
        assert_user_error(main(argv), capsys, f"{blocker} is a file")
    assert _listing(tmp_path) == ["file", "photo.png", "prompts.txt"]


def test_deeply_nested_prompts_file(tiny_model_dir, tmp_path, capsys):
    prompts = tmp_path / "prompts.json"
    prompts.write_text("[" * 100_000 + "]" * 100_000)
    out = tmp_path / "out"
    assert_user_error(main(["batch", str(prompts), "--model", str(tiny_model_dir), "--out-dir", str(out)]), capsys,
                      "nested too deeply")
    assert not out.exists()


# -- sizes bounded before any work ------------------------------------------------------------------------------
def test_huge_edit_and_understanding_sizes_are_refused_before_the_vae(tiny_model_dir, tmp_path, capsys, monkeypatch):
    big = tmp_path / "big.png"
    Image.new("RGB", (4096, 4096), (10, 200, 30)).save(big)
    from harmon.models.harmon import Harmon

    def no_encode(*args, **kwargs):
        raise AssertionError("the VAE was asked to encode an image whose tokens cannot fit the LLM")
    monkeypatch.setattr(Harmon, "encode", no_encode)
    code = main(["edit", str(big), "a red circle", "--box", "0,0,64,64", "--model", str(tiny_model_dir),
                 "--out", str(tmp_path / "e.png")])
    assert_user_error(code, capsys, "exceeds the LLM's 2048 positions")
    code = main(["describe", str(big), "What?", "--model", str(tiny_model_dir), "--image-size", "4096"])
    assert_user_error(code, capsys, "image_size 4096 makes 65540 image tokens")
    assert not (tmp_path / "e.png").exists()


def test_edits_of_the_shipped_model_keep_to_its_positions():
    """The shapes model has 1024 positions and stride 8: a 256 px edit would need 1032 with the buffer."""
    edit = EditPipeline.from_pretrained(None)
    canvas = Image.new("RGB", (256, 256), (127, 127, 127))
    with pytest.raises(ValueError, match="exceeds the LLM's 1024 positions"):
        edit(inpaint_region(canvas, (0, 0, 64, 64), stride=8), "a red circle")


# -- model folders with values of the wrong type ------------------------------------------------------------------
@pytest.mark.parametrize("edit, words", [
    (lambda c: c["llm"].update(hidden_size="256"), ["llm.hidden_size must be a positive integer", "'256'"]),
    (lambda c: c["mar"].update(vae_stride=8.0), ["mar.vae_stride must be an integer, got 8.0"]),
    (lambda c: c["mar"].update(vae_stride=0), ["mar.vae_stride must be >= 1, got 0"]),
    (lambda c: c.update(vae_scale="x"), ["vae_scale must be a finite number, got 'x'"]),
    (lambda c: c.update(vae_scale=float("nan")), ["vae_scale must be a finite number"]),
    (lambda c: c["vae"].update(ch_mult=[1, "2"]), ["vae.ch_mult must be tuple[int, ...]"]),
])
def test_model_folder_with_bad_config_values(tiny_model_dir, tmp_path, capsys, edit, words):
    folder = tmp_path / "bad"
    folder.mkdir()
    config = json.loads((tiny_model_dir / "config.json").read_text())
    edit(config)
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "model.safetensors").symlink_to(tiny_model_dir / "model.safetensors")
    assert_user_error(main(["info", str(folder)]), capsys, *words)
    assert_user_error(main(["generate", "a red circle", "--model", str(folder), *FAST,
                            "--out-dir", str(tmp_path / "o")]), capsys, *words)
    assert not (tmp_path / "o").exists()


def _with_tensors(tiny_model_dir: Path, folder: Path, edit) -> Path:
    folder.mkdir()
    (folder / "config.json").write_text((tiny_model_dir / "config.json").read_text())
    tensors = load_file(str(tiny_model_dir / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder


def test_corrupt_weights_are_refused(tiny_model_dir, photo, tmp_path, capsys):
    as_int = _with_tensors(tiny_model_dir, tmp_path / "int", lambda t: t.update(
        {"proj_in.0.weight": t["proj_in.0.weight"].to(torch.int32)}))
    with pytest.raises(CheckpointError, match="proj_in.0.weight is stored as int32"):
        load_model(as_int)
    nan = _with_tensors(tiny_model_dir, tmp_path / "nan", lambda t: t["mar.mask_token"].fill_(float("nan")))
    with pytest.raises(CheckpointError, match=r"1 tensors hold NaN or infinite values \(mar.mask_token\)"):
        load_model(nan)
    all_nan = _with_tensors(tiny_model_dir, tmp_path / "all", lambda t: [v.fill_(float("nan")) for v in t.values()
                                                                    if v.is_floating_point()])
    code = main(["describe", str(photo), "What?", "--model", str(all_nan), "--image-size", "64"])
    assert_user_error(code, capsys, "NaN or infinite")
    code = main(["generate", "a red circle", "--model", str(all_nan), "--out-dir", str(tmp_path / "o"), *FAST])
    assert_user_error(code, capsys, "NaN or infinite", "corrupt")
    assert not (tmp_path / "o").exists()


# -- sampling settings that would give a black image ----------------------------------------------------------
@pytest.mark.parametrize("flags, words", [
    (["--cfg", "-1"], "guidance_scale must be >= 1"),
    (["--guidance-scale", "inf"], "guidance_scale must be a finite number"),
    (["--cfg", "nan"], "guidance_scale must be a finite number"),
    (["--temperature", "0"], "temperature must be > 0"),
    (["--temperature", "nan"], "temperature must be a finite number"),
    (["--temperature", "inf"], "temperature must be a finite number"),
])
def test_sampling_settings_checked_by_generate_edit_and_batch(tiny_model_dir, photo, tmp_path, capsys, flags, words):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\n")
    runs = [["generate", "a red circle", "--out-dir", str(tmp_path / "g"), *FAST],
            ["edit", str(photo), "a red circle", "--box", "0,0,32,32", "--out", str(tmp_path / "e.png")],
            ["batch", str(prompts), "--out-dir", str(tmp_path / "b"), *FAST]]
    for argv in runs:
        assert_user_error(main([*argv, "--model", str(tiny_model_dir), *flags]), capsys, words)
    assert _listing(tmp_path) == ["photo.png", "prompts.txt"]


def test_corrected_prompts_run_into_the_folder_of_a_failed_batch(tiny_model_dir, tmp_path, capsys):
    prompts, out = tmp_path / "prompts.txt", tmp_path / "out"
    prompts.write_text("a red circle\n" + "a very long prompt " * 200 + "\n")
    code = main(["batch", str(prompts), "--model", str(tiny_model_dir), "--out-dir", str(out), *FAST])
    assert_user_error(code, capsys, "prompt 1:", "exceeds the LLM's 2048 positions")
    assert not (out / "run.json").exists()
    prompts.write_text("a red circle\na blue square\n")
    assert main(["batch", str(prompts), "--model", str(tiny_model_dir), "--out-dir", str(out), *FAST]) == 0
    assert len(list(out.rglob("*.png"))) == 2


# -- training configs ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("yaml_text, words", [
    ("optim: {betas: 0.9}", "optim.betas must be tuple[float, float], got 0.9"),
    ("optim: {lr: fast}", "optim.lr must be a finite number, got 'fast'"),
    ("data: {jsonl: [x.jsonl], t2i_batch_size: four}", "data.t2i_batch_size must be an integer, got 'four'"),
    ("max_steps: 2.5", "max_steps must be an integer, got 2.5"),
    ("gradient_checkpointing: 'no'", "gradient_checkpointing must be true or false, got 'no'"),
    ("precision: float16", "precision must be one of 'auto', 'float32', 'bfloat16'"),
    ("optim: {betas: [0.9, 1.5]}", "optim.betas[1] must be in [0, 1)"),
    ("[[[[[[[[[[" * 10_000, "nested too deeply"),
])
def test_training_config_values_of_the_wrong_type(tiny_model_dir, tmp_path, capsys, yaml_text, words):
    out = tmp_path / "run"
    config = tmp_path / "train.yaml"
    if yaml_text.startswith("["):
        config.write_text(yaml_text)
    else:
        base = f"model: {tiny_model_dir}\noutput_dir: {out}\n"
        config.write_text(base + ("data: {jsonl: [x.jsonl]}\n" if "data:" not in yaml_text else "") + yaml_text + "\n")
    assert_user_error(main(["train", str(config)]), capsys, words)
    assert not out.exists()


def test_a_run_resumes_only_with_its_own_settings(tmp_path):
    base = {"model": "m", "output_dir": str(tmp_path), "data": {"jsonl": ["x.jsonl"]}}
    saved = TrainConfig.from_dict(base)
    (tmp_path / "train_config.json").write_text(json.dumps(saved.to_dict()))
    check_resume_config(tmp_path, TrainConfig.from_dict({**base, "optim": {"lr": 1e-3}}))  # no checkpoint yet
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "latest").write_text("step_0000010")
    check_resume_config(tmp_path, TrainConfig.from_dict({**base, "max_steps": 5000, "save_every": 50}))
    changed = TrainConfig.from_dict({**base, "seed": 3, "optim": {"lr": 1e-3},
                                     "data": {"jsonl": ["x.jsonl"], "t2i_batch_size": 16}})
    with pytest.raises(ValueError) as err:
        check_resume_config(tmp_path, changed)
    for words in ("data.t2i_batch_size: 8 -> 16", "optim.lr: 1e-05 -> 0.001", "seed: 0 -> 3", "new output_dir"):
        assert words in str(err.value), err.value
