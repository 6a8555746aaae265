"""``harmon batch``: prompt files, layouts, seeds, resume, settings checks, torchrun sharding, kill and resume."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cli_helpers import assert_user_error
from harmon.batch import (BatchError, BatchOptions, PromptFileError, RunMismatchError, Shard, blocks_for_rank,
                          load_prompts, parse_prompts, run_batch, shard_from_env, work_items)
from harmon.cli import main
from harmon.outputs import png_complete
from harmon.pipelines import TextToImagePipeline
from harmon.settings import FAST_STEPS, GenerationSettings, annealed_steps
from harmon.tokenizer import build_byte_tokenizer

FAST = ["--num-iter", "2", "--num-steps", "2", "--size", "64", "-q"]
GEN = GenerationSettings(num_iter=2, num_steps=2, height=64)
GENEVAL = [
    {"tag": "single_object", "include": [{"class": "bench", "count": 1}], "prompt": "a photo of a bench"},
    {"tag": "color_attr", "include": [{"class": "car", "count": 1, "color": "red"}], "exclude": [],
     "prompt": "a photo of a red car"},
]


@pytest.fixture(scope="module")
def pipe(reference_model):
    return TextToImagePipeline(reference_model, build_byte_tokenizer())


def pixels(path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB")).copy()


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def batch(tiny_model_dir, prompts, out, *extra) -> list[str]:
    return ["batch", str(prompts), "--model", str(tiny_model_dir), "--out-dir", str(out), *FAST, *extra]


def mtimes(out: Path) -> dict[str, int]:
    return {str(p.relative_to(out)): p.stat().st_mtime_ns for p in sorted(out.rglob("*")) if p.is_file()}


def temp_files(out: Path) -> list[Path]:
    return [p for p in out.rglob("*") if p.name.endswith(".tmp") or p.name.startswith(".")]


# -- prompt files and work split (no model) ---------------------------------------------------------
def test_prompt_formats(tmp_path):
    strings = load_prompts(write(tmp_path / "a.json", json.dumps(["a cat", " a dog "])))
    assert [(p.index, p.prompt, p.record) for p in strings] == [(0, "a cat", {"prompt": "a cat"}),
                                                                (1, " a dog ", {"prompt": " a dog "})]
    objects = load_prompts(write(tmp_path / "b.json", json.dumps(GENEVAL, indent=2)))
    assert [p.record for p in objects] == GENEVAL and objects[1].prompt == "a photo of a red car"
    jsonl = load_prompts(write(tmp_path / "c.jsonl", "\n" + json.dumps(GENEVAL[0]) + "\n\n  \n\"a cat\"\n"))
    assert [(p.index, p.line, p.record) for p in jsonl] == [(0, 2, GENEVAL[0]), (1, 5, {"prompt": "a cat"})]
    sniffed = load_prompts(write(tmp_path / "d.prompts", json.dumps(["x", {"prompt": "y", "id": 3}])))
    assert [p.record for p in sniffed] == [{"prompt": "x"}, {"prompt": "y", "id": 3}]
    assert [p.prompt for p in load_prompts(write(tmp_path / "e.txt", "one\n\n two \n"))] == ["one", "two"]


@pytest.mark.parametrize("case", ["bad jsonl line", "json syntax", "not a list", "empty prompt", "empty jsonl prompt",
                                  "no prompt key", "number", "empty file", "missing file"])
def test_malformed_prompt_files(case, tiny_model_dir, tmp_path, capsys):
    name, text, words = {
        "bad jsonl line": ("p.jsonl", '{"prompt": "a"}\n\n{"prompt": "b",}\n', ["line 3", "not valid JSON"]),
        "json syntax": ("p.json", '[\n "a",\n "b" "c"\n]', ["line 3", "column", "not valid JSON"]),
        "not a list": ("p.json", '{"prompt": "a cat"}', ["JSON list", "an object"]),
        "empty prompt": ("p.json", '["a cat", "  "]', ["prompt 1", "empty"]),
        "empty jsonl prompt": ("p.jsonl", '"a"\n\n{"prompt": "b"}\n{"prompt": ""}\n', ["prompt 2", "line 4", "empty"]),
        "no prompt key": ("p.jsonl", '{"text": "a cat"}\n', ["prompt 0", "line 1", '"prompt"', "text"]),
        "number": ("p.json", '["a", 3]', ["prompt 1", "a number"]),
        "empty file": ("p.jsonl", "\n\n", ["no prompts"]),
        "missing file": ("p.json", None, ["not found", "p.json"]),
    }[case]
    path = tmp_path / name
    if text is not None:
        write(path, text)
    out = tmp_path / "out"
    assert_user_error(main(batch(tiny_model_dir, path, out)), capsys, *words)
    assert not out.exists()
    if text is not None:
        with pytest.raises(PromptFileError):
            parse_prompts(text, fmt=name.rsplit(".", 1)[1])


@pytest.mark.parametrize("case", ["batch size 0", "images 0", "size 50", "vae tile 1", "missing model",
                                  "out-dir is a file"])
def test_bad_options(case, tiny_model_dir, tmp_path, capsys):
    prompts = write(tmp_path / "p.json", '["a cat"]')
    out = tmp_path / "out"
    argv, words = {
        "batch size 0": (batch(tiny_model_dir, prompts, out, "--batch-size", "0"), ["batch_size must be >= 1"]),
        "images 0": (batch(tiny_model_dir, prompts, out, "--num-images", "0"), ["num_images must be >= 1"]),
        "size 50": (batch(tiny_model_dir, prompts, out, "--size", "50"), ["50"]),
        "vae tile 1": (batch(tiny_model_dir, prompts, out, "--vae-tile", "1"), ["vae_tile", "at least 2"]),
        "missing model": (["batch", str(prompts), "--out-dir", str(out), "--model", str(tmp_path / "nothing")],
                          ["model folder not found"]),
        "out-dir is a file": (batch(tiny_model_dir, prompts, prompts), ["cannot be made a folder", "is a file"]),
    }[case]
    assert_user_error(main(argv), capsys, *words)
    assert not out.exists()


def test_work_split_seeds_and_env(tmp_path):
    prompts = parse_prompts('["a", "b", "c"]')
    items = work_items(prompts, tmp_path, seed=10, num_images=4)
    assert [(it.index, it.k, it.seed) for it in items[:6]] == [(0, 0, 10), (0, 1, 11), (0, 2, 12), (0, 3, 13),
                                                             (1, 0, 14), (1, 1, 15)]
    assert items[7].png.name == "00001_03.png" and items[7].meta.name == "00001_03.json"
    geneval = work_items(prompts, tmp_path, seed=0, num_images=4, benchmark="geneval")
    assert geneval[5].png == tmp_path / "00001" / "samples" / "0001.png"
    for world in (1, 2, 3, 5):
        for size in (1, 3, 4):
            shares = [[it.number for b in blocks_for_rank(items, size, Shard(r, world)) for it in b]
                      for r in range(world)]
            flat = sorted(n for share in shares for n in share)
            assert flat == list(range(12)), (world, size, shares)
    assert shard_from_env({}) == Shard(0, 1, 0)
    assert shard_from_env({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"}) == Shard(3, 4, 1)
    with pytest.raises(ValueError, match="RANK"):
        shard_from_env({"RANK": "2", "WORLD_SIZE": "2"})


@pytest.mark.parametrize("changes, words", [
    (dict(num_images=0), "num_images must be >= 1, got 0"),
    (dict(batch_size=0), "batch_size must be >= 1, got 0"),
    (dict(seed=-1), "seed must be >= 0, got -1"),
    (dict(seed=1.5), "seed must be an integer"),
    (dict(compile="yes"), "compile must be true or false"),
    (dict(benchmark="coco"), "benchmark must be one of geneval, dpg, wise"),
    (dict(benchmark="dpg", num_images=2), "num_images must be 4"),
    (dict(benchmark="dpg", num_images=4, batch_size=6), "batch_size a multiple of 4"),
    (dict(benchmark="wise", num_images=2), "num_images must be 1"),
])
def test_batch_options_check_themselves(changes, words):
    with pytest.raises(BatchError, match=re.escape(words)) as err:
        BatchOptions(**changes)
    assert "--" not in str(err.value)  # the library names its fields, never the command line's flags
    assert BatchOptions(benchmark="dpg", num_images=4, batch_size=8).batch_size == 8


# -- in-process runs --------------------------------------------------------------------------------
def test_json_batch_files_metadata_and_pixels(tiny_model_dir, pipe, tmp_path, capsys):
    prompts = write(tmp_path / "prompts.json", json.dumps(["a red circle", {"prompt": "a blue square", "id": 7}]))
    out = tmp_path / "out"
    assert main(batch(tiny_model_dir, prompts, out, "--num-images", "2", "--seed", "5", "--batch-size", "3")) == 0
    lines = capsys.readouterr().out.splitlines()
    names = ["00000_00", "00000_01", "00001_00", "00001_01"]
    assert lines[:4] == [str(out / f"{n}.png") for n in names]
    assert lines[4].startswith("rank 0/1: 4 done, 0 skipped, 4 total")
    assert sorted(p.name for p in out.iterdir()) == sorted([f"{n}.png" for n in names] + [f"{n}.json" for n in names]
                                                           + ["run.json"])
    expected = [("a red circle", 5), ("a red circle", 6), ("a blue square", 7), ("a blue square", 8)]
    for name, (prompt, seed) in zip(names, expected):
        meta = json.loads((out / f"{name}.json").read_text())
        assert (meta["prompt"], meta["seed"], meta["file"]) == (prompt, seed, f"{name}.png")
        assert meta["metadata"] == ({"prompt": prompt, "id": 7} if seed > 6 else {"prompt": prompt})
        with Image.open(out / f"{name}.png") as im:
            text = im.text
            assert im.size == (64, 64)
        assert text["prompt"] == prompt and text["seed"] == str(seed) and text["model"] == "tiny"
        assert text["num_iter"] == "2" and text["num_steps"] == "2" and text["guidance_scale"] == "3.0"
        assert (text["index"], text["sample"]) == (str(names.index(name) // 2), str(names.index(name) % 2))
        assert json.loads(text["parameters"])["seed"] == seed
        assert "vae_tile" not in text and json.loads(text["parameters"])["vae_tile"] is None  # no text "None"
    run = json.loads((out / "run.json").read_text())["settings"]
    assert (run["seed"], run["num_images"], run["num_steps"], run["height"], run["layout"]) == (5, 2, "2", 64, "default")
    assert run["guidance_scale"] == 3.0 and "cfg" not in run  # the settings under their own names, resolved
    # seeds: blocks of 3 items are generated together; each equals the pipeline with the same seeds, bit for bit
    blocks = [expected[:3], expected[3:]]
    made = [img for block in blocks
            for img in pipe([p for p, _ in block], GEN, seeds=[s for _, s in block], progress=False).images]
    for name, img in zip(names, made):
        assert np.array_equal(pixels(out / f"{name}.png"), np.asarray(img))
    # and alone (batch of one) up to float rounding of batch-shaped kernels
    alone = pipe(["a blue square"], GEN, seeds=[8], progress=False).images[0]
    assert np.abs(pixels(out / "00001_01.png").astype(int) - np.asarray(alone)).max() <= 2

    # other settings into the same folder are refused, before anything is written
    before = mtimes(out)
    other = write(tmp_path / "other.json", json.dumps(["a red circle", "a green square"]))
    for argv, word in ((batch(tiny_model_dir, prompts, out, "--num-images", "2", "--seed", "6"), "seed: 5 -> 6"),
                       (batch(tiny_model_dir, prompts, out, "--num-images", "2", "--seed", "5", "--num-steps", "3"),
                        "num_steps: 2 -> 3"),
                       (batch(tiny_model_dir, prompts, out, "--num-images", "3", "--seed", "5"), "num_images"),
                       (batch(tiny_model_dir, other, out, "--num-images", "2", "--seed", "5"), "prompts_sha256"),
                       (batch(tiny_model_dir, prompts, out, "--num-images", "2", "--seed", "5", "--benchmark", "geneval"), "layout"),
                       (batch(tiny_model_dir, prompts, out, "--num-images", "2", "--seed", "5", "--fast"),
                        "fast: false -> true"),
                       (batch(tiny_model_dir, prompts, out, "--num-images", "2", "--seed", "5", "--vae-tile", "2"),
                        "vae_tile: null -> 2")):
        assert_user_error(main(argv), capsys, "other settings", word)
    assert mtimes(out) == before
    # the same settings with another batch size: all skipped, nothing rewritten
    assert main(batch(tiny_model_dir, prompts, out, "--num-images", "2", "--seed", "5", "--batch-size", "1")) == 0
    assert capsys.readouterr().out.splitlines() == ["rank 0/1: 0 done, 4 skipped, 4 total for this rank "
                                                    f"(4 images in the run) in {out}"]
    assert mtimes(out) == before


def test_run_batch_library_call(tiny_model_dir, pipe, tmp_path):
    """The library's door: records, settings and options objects, one rank's share, lines to a callback."""
    records = parse_prompts('["a red circle", "a blue square"]')
    out, lines = tmp_path / "out", []
    options = BatchOptions(seed=2, num_images=2, batch_size=2, device="cpu", progress=False)
    summary = run_batch(records, tiny_model_dir, out, GEN, options, shard=Shard(1, 2), log=lines.append)
    written = [out / "00001_00.png", out / "00001_01.png"]  # block 1 of 2 (items 2 and 3) is rank 1's
    assert summary.written == written and summary.skipped == [] and (summary.mine, summary.total) == (2, 4)
    assert lines == [str(p) for p in written] + [summary.line()]
    for path, image in zip(written, pipe(["a blue square"] * 2, GEN, seeds=[4, 5], progress=False).images):
        assert np.array_equal(pixels(path), np.asarray(image))
    with pytest.raises(RunMismatchError, match=r"guidance_scale: 3.0 -> 2.0") as err:
        run_batch(records, tiny_model_dir, out, GEN.replace(guidance_scale=2.0), options, shard=Shard(1, 2), log=lines.append)
    assert "--" not in str(err.value)


def test_fast_mode_and_vae_tiles_are_run_settings(tiny_model_dir, pipe, tmp_path):
    prompts = write(tmp_path / "p.json", '["a red circle"]')
    out = tmp_path / "out"
    assert main(["batch", str(prompts), "--model", str(tiny_model_dir), "--out-dir", str(out), "--size", "64", "-q",
                 "--fast", "--vae-tile", "2", "--seed", "3"]) == 0
    run = json.loads((out / "run.json").read_text())["settings"]
    half = pipe.model.config.num_iter // 2
    annealed = [str(s) for s in annealed_steps(*FAST_STEPS, half)]  # resolved: one respacing per iteration
    assert (run["fast"], run["vae_tile"], run["num_iter"], run["num_steps"]) == (True, 2, half, annealed)
    with Image.open(out / "00000_00.png") as im:
        text = im.text
    assert (text["fast"], text["vae_tile"], text["num_iter"]) == ("True", "2", str(half))
    assert json.loads(text["num_steps"]) == annealed
    expected = pipe(["a red circle"], GenerationSettings(fast=True, vae_tile=2, height=64), seeds=[3],
                    progress=False).images[0]
    assert np.array_equal(pixels(out / "00000_00.png"), np.asarray(expected))
    # --fast fills in only what is not given: here the steps, annealed over the 2 iterations asked for
    assert main(["batch", str(prompts), "--model", str(tiny_model_dir), "--out-dir", str(tmp_path / "two"), "--size", "64",
                 "-q", "--fast", "--num-iter", "2"]) == 0
    with Image.open(tmp_path / "two" / "00000_00.png") as im:
        assert (im.text["num_iter"], json.loads(im.text["num_steps"])) == ("2", ["50", "5"])


def test_geneval_layout_and_resume(tiny_model_dir, tmp_path, capsys):
    prompts = write(tmp_path / "evaluation_metadata.jsonl", "".join(json.dumps(r) + "\n" for r in GENEVAL))
    out = tmp_path / "geneval"
    argv = batch(tiny_model_dir, prompts, out, "--benchmark", "geneval", "--num-images", "3", "--batch-size", "2")
    assert main(argv) == 0
    assert capsys.readouterr().out.splitlines()[-1].startswith("rank 0/1: 6 done, 0 skipped, 6 total")
    assert sorted(p.name for p in out.iterdir()) == ["00000", "00001", "run.json"]
    for i, record in enumerate(GENEVAL):
        folder = out / f"{i:05d}"
        text = (folder / "metadata.jsonl").read_text()
        assert text.count("\n") == 1 and text.endswith("\n")
        with open(folder / "metadata.jsonl") as fh:
            assert json.load(fh) == record  # GenEval reads it with json.load
        assert sorted(p.name for p in (folder / "samples").iterdir()) == ["0000.png", "0001.png", "0002.png"]
        for k in range(3):
            meta = json.loads((folder / "meta" / f"{k:04d}.json").read_text())
            assert meta["seed"] == i * 3 + k and meta["metadata"] == record and meta["prompt"] == record["prompt"]
            assert meta["file"] == f"../samples/{k:04d}.png" and meta["rank"] == 0
            with Image.open(folder / "samples" / f"{k:04d}.png") as im:
                assert im.text["seed"] == str(i * 3 + k) and im.text["prompt"] == record["prompt"]

    # resume: a missing image, a truncated image and a missing sidecar are made again; nothing else is touched
    sample = lambda i, k: out / f"{i:05d}" / "samples" / f"{k:04d}.png"  # noqa: E731
    originals = {(i, k): pixels(sample(i, k)) for i in range(2) for k in range(3)}
    sample(1, 2).unlink()
    data = sample(0, 1).read_bytes()
    sample(0, 1).write_bytes(data[:len(data) // 2])
    assert not png_complete(sample(0, 1))
    (out / "00001" / "meta" / "0000.json").unlink()
    (out / "00001" / "samples" / ".0001.png.x1y2z3.tmp").write_bytes(b"left by a killed run")
    before = mtimes(out)
    assert main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[:-1] == [str(sample(0, 1)), str(sample(1, 0)), str(sample(1, 2))]
    assert lines[-1].startswith("rank 0/1: 3 done, 3 skipped, 6 total")
    after = mtimes(out)
    changed = {name for name in after if after[name] != before.get(name)}
    assert changed == {"00000/samples/0001.png", "00000/meta/0001.json", "00001/samples/0000.png",
                       "00001/meta/0000.json", "00001/samples/0002.png", "00001/meta/0002.json"}
    for key, old in originals.items():  # same blocks -> the same bits as the first run
        assert np.array_equal(pixels(sample(*key)), old), key
    assert not temp_files(out)


# -- subprocesses: torchrun with 2 ranks, kill and resume -------------------------------------------
def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    return env


def test_torchrun_two_ranks_share_the_work(tiny_model_dir, pipe, tmp_path):
    prompts = write(tmp_path / "p.jsonl", '"a red circle"\n{"prompt": "a blue square"}\n"a cat"\n')
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "harmon.cli",
           *batch(tiny_model_dir, prompts, out, "--num-images", "2", "--batch-size", "1", "--device", "cpu")]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = [line.strip() for line in proc.stdout.splitlines() if line.strip()]
    summaries = sorted(line for line in lines if line.startswith("rank "))
    assert len(summaries) == 2, proc.stdout
    assert summaries[0].startswith("rank 0/2: 3 done, 0 skipped, 3 total for this rank (6 images in the run)")
    assert summaries[1].startswith("rank 1/2: 3 done, 0 skipped, 3 total for this rank (6 images in the run)")
    written = [line for line in lines if line.endswith(".png")]
    expected = [str(out / f"{i:05d}_{k:02d}.png") for i in range(3) for k in range(2)]
    assert sorted(written) == expected  # every image once, none twice
    texts = ["a red circle", "a blue square", "a cat"]
    for number, path in enumerate(expected):
        meta = json.loads(Path(path).with_suffix(".json").read_text())
        assert meta["rank"] == number % 2 and meta["world_size"] == 2 and meta["seed"] == number
        # the image of that seed, computed single-threaded like the ranks (thread counts change float rounding)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            alone = pipe([texts[number // 2]], GEN, seeds=[number], progress=False).images[0]
        finally:
            torch.set_num_threads(threads)
        diff = np.abs(pixels(path).astype(int) - np.asarray(alone))
        assert diff.max() <= 2 and (diff > 0).mean() < 0.01, (path, diff.max(), (diff > 0).mean())
    assert not temp_files(out)


def kill_tree(pid: int) -> None:
    """SIGKILL a process and all its descendants (torchrun starts its ranks in sessions of their own)."""
    tree, todo = [], [pid]
    while todo:
        parent = todo.pop()
        tree.append(parent)
        children = subprocess.run(["ps", "-o", "pid=", "--ppid", str(parent)], capture_output=True, text=True)
        todo += [int(c) for c in children.stdout.split()]
    for member in tree:
        try:
            os.kill(member, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.mark.parametrize("ranks", [1, 2])
def test_kill_and_resume(tiny_model_dir, tmp_path, ranks):
    """SIGKILL mid-run (the launcher and every rank at once), then the same command finishes the job."""
    prompts = write(tmp_path / "p.json", json.dumps(["a red circle", "a blue square"]))
    out = tmp_path / "out"
    n = 24
    launcher = [sys.executable] if ranks == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks)]
    cmd = [*launcher, "-m", "harmon.cli",
           *batch(tiny_model_dir, prompts, out, "--num-images", str(n // 2), "--batch-size", "1", "--device", "cpu")]
    log = tmp_path / "first_run.log"
    with open(log, "wb") as fh:
        proc = subprocess.Popen(cmd, env=_env(), stdout=fh, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        # the first image files: a PNG and its sidecar (written after the PNG)
        while not list(out.glob("*_*.json")) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        kill_tree(proc.pid)
    finally:
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL, f"not killed mid-run (exit {proc.returncode}): {log.read_text()}"
    finished = [p for p in out.glob("*.json") if p.name != "run.json"]
    assert 1 <= len(finished) < n
    (out / ".00001_11.png.abc123.tmp").write_bytes(b"\x89PNG half")  # as a kill mid-write leaves

    again = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=240)
    assert again.returncode == 0, again.stdout + again.stderr
    summaries = [line for line in again.stdout.splitlines() if line.startswith("rank ")]
    assert len(summaries) == ranks, again.stdout
    counts = [re.match(r"rank \d+/\d+: (\d+) done, (\d+) skipped", line).groups() for line in summaries]
    assert sum(int(d) for d, _ in counts) == n - len(finished) and sum(int(k) for _, k in counts) == len(finished)
    for i in range(2):
        for k in range(n // 2):
            png = out / f"{i:05d}_{k:02d}.png"
            with Image.open(png) as im:
                im.load()
                assert im.size == (64, 64) and im.text["seed"] == str(i * (n // 2) + k)
            assert json.loads(png.with_suffix(".json").read_text())["seed"] == i * (n // 2) + k
    assert len(list(out.glob("*.png"))) == n and not temp_files(out)


# -- DPG-Bench and WISE: the layouts their official scorers read ---------------------------------------------
def test_dpg_bench_grids_resume_and_refusals(tiny_model_dir, tmp_path, capsys, pipe):
    prompts = tmp_path / "prompts"  # DPG-Bench's dpg_bench/prompts/: one <item_id>.txt per prompt
    prompts.mkdir()
    write(prompts / "partiprompts7.txt", "A red circle next to a blue square.\n")
    write(prompts / "countbench3.txt", "Three green triangles.")
    out = tmp_path / "dpg"
    argv = batch(tiny_model_dir, prompts, out, "--benchmark", "dpg", "--num-images", "4", "--seed", "10")
    assert main(argv) == 0
    assert capsys.readouterr().out.splitlines()[-1].startswith("rank 0/1: 8 done, 0 skipped, 8 total")
    # the scorer lists every file of its --image-root-path and takes the name before '.' as the item id
    assert sorted(p.name for p in (out / "images").iterdir()) == ["countbench3.png", "partiprompts7.png"]
    for i, name, text in ((0, "countbench3", "Three green triangles."),
                          (1, "partiprompts7", "A red circle next to a blue square.")):
        grid = pixels(out / "images" / f"{name}.png")
        assert grid.shape == (128, 128, 3)  # --resolution 64 --pic-num 4: crops (0,0), (64,0), (0,64), (64,64)
        expected = pipe(text, GEN, num_images_per_prompt=4, seeds=[10 + 4 * i + k for k in range(4)],
                        progress=False).images
        for k, image in enumerate(expected):
            col, row = k % 2, k // 2
            crop = grid[row * 64:(row + 1) * 64, col * 64:(col + 1) * 64]
            assert np.array_equal(crop, np.asarray(image)), (name, k)
            assert np.array_equal(crop, pixels(out / "samples" / f"{name}_{k}.png"))

    # a lost grid is made again from the finished images; an image drawn again remakes its grid
    (out / "images" / "countbench3.png").unlink()
    (out / "samples" / "partiprompts7_2.png").unlink()
    assert main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[-1].startswith("rank 0/1: 1 done, 7 skipped")
    assert sorted(Path(line).name for line in lines[:-1]) == ["countbench3.png", "partiprompts7.png",
                                                              "partiprompts7_2.png"]

    for extra, words in ((["--num-images", "2"], "4 images per prompt"), (["--batch-size", "6"], "multiple of 4")):
        assert_user_error(main(batch(tiny_model_dir, prompts, tmp_path / "x", "--benchmark", "dpg", "--num-images", "4",
                                     *extra)), capsys, "DPG-Bench", words)
    assert_user_error(main(batch(tiny_model_dir, prompts / "countbench3.txt", tmp_path / "x", "--benchmark", "dpg",
                                 "--num-images", "4")), capsys, "folder of <item_id>.txt files")
    assert not (tmp_path / "x").exists()


def test_wise_layout_and_refusals(tiny_model_dir, tmp_path, capsys, pipe):
    items = [{"prompt_id": 1, "Prompt": "A traditional food of Japan", "Explanation": "sushi",
              "Category": "Cultural knowledge", "Subcategory": "Festival"},
             {"prompt_id": 2, "Prompt": "The animal that symbolises peace", "Explanation": "a dove",
              "Category": "Cultural knowledge", "Subcategory": "Symbol"}]
    prompts = write(tmp_path / "cultural_common_sense.json", json.dumps(items))
    out = tmp_path / "wise"
    assert main(batch(tiny_model_dir, prompts, out, "--benchmark", "wise", "--seed", "3", "--batch-size", "1")) == 0
    capsys.readouterr()
    assert sorted(p.name for p in (out / "images").iterdir()) == ["1.png", "2.png"]  # gpt_eval.py: f"{prompt_id}.png"
    for i, item in enumerate(items):
        assert np.array_equal(pixels(out / "images" / f"{item['prompt_id']}.png"),
                              np.asarray(pipe(item["Prompt"], GEN, seeds=[3 + i], progress=False).images[0]))
        assert json.loads((out / "meta" / f"{item['prompt_id']}.json").read_text())["metadata"] == item

    assert_user_error(main(batch(tiny_model_dir, prompts, tmp_path / "x", "--benchmark", "wise", "--num-images", "2")),
                      capsys, "WISE scores one image per prompt")
    for bad, words in (([{"prompt_id": 1, "prompt": "x"}], 'no "Prompt" key'),
                       ([{"Prompt": "x"}], 'no "prompt_id" key'),
                       ([{"prompt_id": "../up", "Prompt": "x"}], "cannot be a file name"),
                       ([{"prompt_id": 4, "Prompt": "x"}, {"prompt_id": 4, "Prompt": "y"}], "both named '4'")):
        write(prompts, json.dumps(bad))
        assert_user_error(main(batch(tiny_model_dir, prompts, tmp_path / "x", "--benchmark", "wise")), capsys, words)
    assert not (tmp_path / "x").exists()
