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
from harmon.settings import DecodingSettings
from harmon.shapes.evaluate import ShapesEval, evaluate_model
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
    plan = ShapesEval(n_scenes=SCENES, generation=False)
    ours = evaluate_model(model, tokenizer, plan, echo=None)["understanding"]["items"]
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


# a POPE task pointed at local files in POPE's own format (the dataset's columns, its images as an Image
# feature, lmms-eval's own pope.yaml and utils included): the harness's prompt, parsing and metrics, not ours
BUILD_PARQUET = r"""
import json, sys
from datasets import Dataset, Features, Image, Value
rows = json.loads(sys.stdin.read())
columns = ["question_id", "question", "answer", "image", "image_source", "category"]
features = Features({c: Image() if c == "image" else Value("string") for c in columns})
Dataset.from_dict({c: [r[c] for r in rows] for c in columns}, features=features).to_parquet(sys.argv[1])
import lmms_eval, pathlib
print(pathlib.Path(lmms_eval.__file__).parent / "tasks" / "pope" / "pope.yaml")
"""


def test_pope_in_its_own_format_through_lmms_eval(tmp_path):
    from harmon.pipelines import ImageToTextPipeline
    from harmon.shapes.eval_understanding import understanding_scenes

    rows, images = [], tmp_path / "images"
    images.mkdir()
    for j, image, questions in understanding_scenes(40):
        for q in questions:
            if q["type"] == "position":  # the shapes world's yes/no questions
                image.save(images / f"{j}.png")
                rows.append({"question_id": str(len(rows)), "question": q["question"], "answer": q["expected"],
                             "image": str(images / f"{j}.png"), "image_source": f"shapes_{j}", "category": "shapes"})
    assert {r["answer"] for r in rows} == {"yes", "no"}
    python = LMMS_EVAL.parent / "python"
    built = subprocess.run([str(python), "-c", BUILD_PARQUET, str(tmp_path / "pope.parquet")], input=json.dumps(rows),
                           capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr[-3000:]
    pope_yaml = built.stdout.strip().splitlines()[-1]
    task = tmp_path / "task"
    task.mkdir()
    (task / "harmon_local_pope.yaml").write_text(
        f"include: {pope_yaml}\ntask: harmon_local_pope\noutput_type: generate_until\ndataset_path: parquet\n"
        f"dataset_kwargs:\n  data_files:\n    test: {tmp_path / 'pope.parquet'}\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_DATASETS_CACHE": str(tmp_path / "hf")}
    done = subprocess.run([str(LMMS_EVAL), "--model", "harmon", "--model_args", "device=cpu,dtype=float32,image_size=64",
                           "--tasks", "harmon_local_pope", "--include_path", str(task), "--batch_size", "4",
                           "--output_path",
                           str(tmp_path / "out"), "--log_samples"], capture_output=True, text=True, timeout=900, env=env)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    results = json.loads(next((tmp_path / "out").rglob("*_results.json")).read_text())["results"]["harmon_local_pope"]
    samples = [json.loads(line) for line in
               next((tmp_path / "out").rglob("*_samples_harmon_local_pope.jsonl")).read_text().splitlines()]

    # the answers (drawn 4 at a time) are the pipeline's to POPE's prompt (its post_prompt appended), each asked
    # alone; the accuracy is POPE's
    pipe = ImageToTextPipeline.from_pretrained(None, image_size=64)
    correct = 0
    for sample in sorted(samples, key=lambda s: s["doc_id"]):
        row = rows[sample["doc_id"]]
        assert sample["input"] == row["question"] + "\nAnswer the question using a single word or phrase."
        answer = pipe(row["image"], sample["input"], DecodingSettings(max_new_tokens=128))
        assert sample["filtered_resps"] == answer.strip()  # lmms-eval strips the response
        correct += answer.lower().strip() == row["answer"]
    assert len(samples) == len(rows) >= 10
    assert results["pope_accuracy,none"] == pytest.approx(correct / len(rows))
    assert {"pope_precision,none", "pope_recall,none", "pope_f1_score,none"} <= set(results)
