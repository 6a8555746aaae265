"""``lmms-eval --model harmon``: the adapter, run by lmms-eval itself on a local task, gives the answers and the
accuracy ``harmon eval shapes`` gives on the same questions (the shipped shapes model, which answers most of
them correctly, so that a wrong prompt format, image size or stop rule would show).

Runs in the environment ``scripts/setup_lmms_eval.sh`` makes (``.venv-lmms-eval``; ``.ci/run`` makes it),
offline; skipped where that environment is absent.
"""
from __future__ import annotations

import json
import os
import subprocess

import pytest

from conftest import REPO
from harmon.hub import load_pretrained
from harmon.shapes.evaluate import evaluate_model
from harmon.shapes.lmms_task import TASK_NAME, write_task

LMMS_EVAL = REPO / ".venv-lmms-eval" / "bin" / "lmms-eval"
pytestmark = pytest.mark.skipif(not LMMS_EVAL.is_file(),
                                reason="no lmms-eval environment (bash scripts/setup_lmms_eval.sh)")
SCENES = 12


def _lmms_eval(task_dir, out_dir, model_args: str) -> tuple[dict, list[dict]]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_DATASETS_CACHE": str(out_dir / "hf")}
    done = subprocess.run([str(LMMS_EVAL), "--model", "harmon", "--model_args", model_args, "--tasks", TASK_NAME,
                           "--include_path", str(task_dir), "--batch_size", "1", "--output_path", str(out_dir),
                           "--log_samples"], capture_output=True, text=True, timeout=900, env=env)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    results = json.loads(next(out_dir.rglob("*_results.json")).read_text())["results"][TASK_NAME]
    samples = [json.loads(line) for line in next(out_dir.rglob(f"*_samples_{TASK_NAME}.jsonl")).read_text().splitlines()]
    return results, sorted(samples, key=lambda s: s["doc_id"])


def test_lmms_eval_scores_the_shapes_questions_as_harmon_eval_does(tmp_path):
    task = write_task(tmp_path / "task", n_scenes=SCENES)
    results, samples = _lmms_eval(task, tmp_path / "out", "device=cpu,dtype=float32,image_size=64")

    model, tokenizer = load_pretrained(None)
    ours = evaluate_model(model, tokenizer, n_scenes=SCENES, generation=False, echo=None)["understanding"]["items"]
    assert len(samples) == len(ours) > 3 * SCENES
    for sample, item in zip(samples, ours):
        assert sample["input"] == item["question"] and sample["target"] == item["expected"]
        assert sample["filtered_resps"] == item["predicted"], (sample, item)
        assert sample["exact_match"] == float(item["correct"])
    accuracy = sum(item["correct"] for item in ours) / len(ours)
    assert results["exact_match,none"] == pytest.approx(accuracy, abs=1e-12)
    assert 0.5 < accuracy < 1.0  # a model that answers most, not all: agreement is not a coincidence


def test_unknown_model_args_are_refused(tmp_path):
    task = write_task(tmp_path / "task", n_scenes=1)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    done = subprocess.run([str(LMMS_EVAL), "--model", "harmon", "--model_args", "pretrainde=x", "--tasks", TASK_NAME,
                           "--include_path", str(task), "--output_path", str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=600, env=env)
    assert "model_args not understood: ['pretrainde']" in done.stdout + done.stderr
