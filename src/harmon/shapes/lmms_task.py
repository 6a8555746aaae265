"""The shapes world's understanding questions as a local lmms-eval task (``harmon eval shapes-task``).

The task holds exactly the questions ``harmon eval shapes`` asks
(:func:`~.eval_understanding.understanding_scenes`, same seed and scenes) and scores them with the same exact
match (:func:`~.eval_understanding.answer_correct`), so that ``lmms-eval --model harmon --tasks
harmon_shapes_qa --include_path DIR`` must give the accuracy ``harmon eval shapes`` reports: a check of the
lmms-eval adapter on a model that answers correctly.

Written: ``DIR/harmon_shapes_qa.yaml`` (the task), ``DIR/utils.py`` (lmms-eval's ``!function`` hooks, taken
from this module), ``DIR/data.jsonl`` (one document per question) and ``DIR/images/<scene:05d>.png``.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from PIL import Image

from ..errors import InputError
from ..files import check_folder_path
from . import world
from .eval_plan import DEFAULT_EVAL_SEED, ShapesEval
from .eval_understanding import answer_correct, understanding_scenes

TASK_NAME = "harmon_shapes_qa"
MAX_NEW_TOKENS = ShapesEval().max_new_tokens  # as harmon eval shapes

TASK_YAML = f"""task: {TASK_NAME}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {{data}}
test_split: test
output_type: generate_until
doc_to_visual: !function utils.doc_to_visual
doc_to_text: !function utils.doc_to_text
doc_to_target: answer
generation_kwargs:
  max_new_tokens: {MAX_NEW_TOKENS}
  temperature: 0
  do_sample: false
  until: []
process_results: !function utils.process_results
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
metadata:
  - version: 1
"""
UTILS = "from harmon.shapes.lmms_task import doc_to_text, doc_to_visual, process_results  # noqa: F401\n"


def write_task(folder: str | Path, n_scenes: int = 200, seed: int = DEFAULT_EVAL_SEED,
               image_size: int = world.DEFAULT_SIZE) -> Path:
    """Write the task folder for the first ``n_scenes`` scenes of the understanding evaluation."""
    if n_scenes < 1:
        raise InputError(f"n_scenes must be >= 1, got {n_scenes}")
    folder = check_folder_path(folder, "the task folder").resolve()
    (folder / "images").mkdir(parents=True, exist_ok=True)
    docs = []
    for j, image, questions in understanding_scenes(n_scenes, seed, image_size):
        path = folder / "images" / f"{j:05d}.png"
        image.save(path)  # PNG: the rendered pixels exactly
        for q in questions:
            docs.append({"id": len(docs), "image": str(path), "question": q["question"], "answer": q["expected"],
                         "type": q["type"], "scene": j, "scene_kind": q["scene_kind"]})
    (folder / "data.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs), encoding="utf-8")
    (folder / f"{TASK_NAME}.yaml").write_text(TASK_YAML.replace("{data}", json.dumps(str(folder / "data.jsonl"))))
    (folder / "utils.py").write_text(UTILS)
    return folder


def doc_to_visual(doc: dict[str, Any]) -> list[Image.Image]:
    with Image.open(doc["image"]) as image:
        return [image.convert("RGB")]


def doc_to_text(doc: dict[str, Any], lmms_eval_specific_kwargs: dict[str, Any] | None = None) -> str:
    return doc["question"]


def process_results(doc: dict[str, Any], results: list[str]) -> dict[str, float]:
    return {"exact_match": float(answer_correct(results[0], doc["answer"]))}
