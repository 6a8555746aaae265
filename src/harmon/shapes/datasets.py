"""Training data for the shapes world, in the formats the trainer reads, all from the same scenes.

``write_datasets(out_dir, n_images, seed, size)`` writes::

    out_dir/
      images/000000/0000000.png ...      the rendered scenes (PNG: no compression artefacts)
      annotations/000000/0000000.json    {"caption": "..."}              (original FINETUNE layout)
      data_info.json                     [{"image": "000000/0000000.png",  (relative to images/)
                                           "annotation": "000000/0000000.json"}, ...]  (relative to annotations/)
      t2i.jsonl                          {"image": "images/000000/0000000.png", "caption": "..."} per line
      llava.json                         [{"id", "image": "images/...png", "conversations": [
                                            {"from": "human", "value": "<image>\\nQUESTION"},
                                            {"from": "gpt", "value": "ANSWER"}, ...]}, ...]
      scenes.jsonl                       ground truth per image: objects, category, prompt, questions
      manifest.json                      how the folder was made (seed, size, counts, file names)

Paths in t2i.jsonl and llava.json are relative to ``out_dir``. Scene ``i`` depends
only on (seed, i): the same seed gives byte-identical files, and a larger
``n_images`` starts with the same scenes.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Sequence

from ..errors import InputError
from . import world

PER_FOLDER = 1000
IMAGE_TOKEN = "<image>"


def relative_name(index: int, suffix: str) -> str:
    """``000000/0000001.png``: one folder per thousand files."""
    return f"{index // PER_FOLDER:06d}/{index:07d}{suffix}"


def scene_for_index(seed: int, index: int, size: int = world.DEFAULT_SIZE,
                    categories: Sequence[str] = world.CATEGORIES):
    """Scene ``index`` of a training set (category ``index mod len(categories)``) and its question generator."""
    rng = world.make_rng(seed, "train", index)
    return world.sample_scene(categories[index % len(categories)], rng, size), rng


def conversation(qas: Sequence[dict[str, Any]]) -> list[dict[str, str]]:
    """LLaVA turns: the image placeholder before the first question only."""
    turns = []
    for k, qa in enumerate(qas):
        turns.append({"from": "human", "value": (f"{IMAGE_TOKEN}\n" if k == 0 else "") + qa["question"]})
        turns.append({"from": "gpt", "value": qa["answer"]})
    return turns


def _dump(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(", ", ": "))


def _write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="\n") as fh:
        fh.write(text)


def write_datasets(out_dir: str | os.PathLike, n_images: int, seed: int, size: int = world.DEFAULT_SIZE, *,
                   antialias: bool = True, categories: Sequence[str] = world.CATEGORIES) -> dict[str, Path]:
    """Render ``n_images`` scenes and write the three training formats (see the module doc); returns their paths."""
    if n_images < 1:
        raise InputError(f"n_images must be >= 1, got {n_images}")
    if size < 16:
        raise InputError(f"size must be at least 16 px, got {size}")
    for c in categories:
        if c not in world.CATEGORIES:
            raise InputError(f"unknown category {c!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data_info, t2i, llava, scenes = [], [], [], []
    for i in range(n_images):
        scene, rng = scene_for_index(seed, i, size, categories)
        image_name = relative_name(i, ".png")
        ann_name = relative_name(i, ".json")
        image_path = out / "images" / image_name
        image_path.parent.mkdir(parents=True, exist_ok=True)
        world.render(scene, antialias=antialias).save(image_path, format="PNG")
        _write_text(out / "annotations" / ann_name, _dump({"caption": scene.prompt}) + "\n")
        data_info.append({"image": image_name, "annotation": ann_name})
        t2i.append({"image": f"images/{image_name}", "caption": scene.prompt})
        qas = world.questions(scene.objects, rng)
        # every question type comes first sometimes: users ask any question as the first turn
        qas = [qas[int(k)] for k in rng.permutation(len(qas))]
        llava.append({"id": f"{i:07d}", "image": f"images/{image_name}", "conversations": conversation(qas)})
        record = scene.to_dict()
        record.update({"index": i, "image": f"images/{image_name}",
                       "questions": [{"type": q["type"], "question": q["question"], "answer": q["answer"]}
                                     for q in qas]})
        scenes.append(record)
    paths = {"data_info": out / "data_info.json", "t2i": out / "t2i.jsonl", "llava": out / "llava.json",
             "scenes": out / "scenes.jsonl", "manifest": out / "manifest.json", "images": out / "images",
             "annotations": out / "annotations"}
    _write_text(paths["data_info"], json.dumps(data_info, indent=1) + "\n")
    _write_text(paths["t2i"], "".join(_dump(r) + "\n" for r in t2i))
    _write_text(paths["llava"], json.dumps(llava, indent=1, ensure_ascii=False) + "\n")
    _write_text(paths["scenes"], "".join(_dump(r) + "\n" for r in scenes))
    manifest = {"world": "harmon shapes (SHAPES.md)", "seed": int(seed), "n_images": int(n_images),
                "size": int(size), "antialias": bool(antialias), "categories": list(categories),
                "palette": {c: list(v) for c, v in world.PALETTE.items()}, "background": list(world.BACKGROUND),
                "files": {"finetune": {"data_info": "data_info.json", "images": "images",
                                       "annotations": "annotations"},
                          "t2i_jsonl": "t2i.jsonl", "llava": "llava.json", "scenes": "scenes.jsonl"}}
    _write_text(paths["manifest"], json.dumps(manifest, indent=1) + "\n")
    return paths
