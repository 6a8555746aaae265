"""What the shapes evaluation reports: scores averaged GenEval style, the printed tables, and the files.

Scores: accuracy per group (prompt category, question type, kind of scene), and as the overall score the mean
of the group scores, not of the items (GenEval's rule). Files: ``results.json`` / ``inpainting.json``, the
generated images in GenEval's layout (:func:`harmon.outputs.item_paths` with ``benchmark="geneval"``) and the
inpainting images, each written whole (:func:`harmon.files.write_atomically`).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
from PIL import Image

from ..files import write_atomically
from ..outputs import geneval_metadata_path, item_paths
from . import world
from .eval_plan import INPAINT_CATEGORIES

INPAINT_COLUMNS = (("inpainted", 11), ("text_only", 11), ("object_erased", 15))  # (result, column width)


# -- scores ------------------------------------------------------------------------------------------------
def grouped_accuracy(groups: Iterable[str], correct: Iterable[bool], order: Sequence[str]
                     ) -> tuple[dict[str, float], dict[str, int], float]:
    """Accuracy per group (known groups in ``order`` first), counts, and the mean of the group scores."""
    per: dict[str, list[bool]] = {}
    for g, ok in zip(groups, correct):
        per.setdefault(g, []).append(bool(ok))
    ordered = [g for g in order if g in per] + sorted(g for g in per if g not in order)
    scores = {g: sum(per[g]) / len(per[g]) for g in ordered}
    overall = float(np.mean(list(scores.values()))) if scores else 0.0
    return scores, {g: len(per[g]) for g in ordered}, overall


def summarize(categories: Iterable[str], correct: Iterable[bool],
              order: Sequence[str] = world.CATEGORIES) -> dict[str, Any]:
    """Per-category accuracy and GenEval's overall score (mean of the category scores)."""
    scores, counts, overall = grouped_accuracy(categories, correct, order)
    return {"per_category": scores, "counts": counts, "overall": overall}


def summarize_answers(types: Iterable[str], correct: Iterable[bool]) -> dict[str, Any]:
    """Exact-match accuracy per question type, and the mean of the type scores."""
    scores, counts, overall = grouped_accuracy(types, correct, world.QUESTION_TYPES)
    return {"per_type": scores, "counts": counts, "overall": overall}


def summarize_by_scene_kind(kinds: Sequence[str], types: Sequence[str], correct: Sequence[bool]
                            ) -> dict[str, dict[str, Any]]:
    """:func:`summarize_answers` of the answers about each kind of scene (:data:`world.SCENE_KINDS`)."""
    present = [k for k in world.SCENE_KINDS if k in kinds]
    return {kind: summarize_answers([t for t, k in zip(types, kinds) if k == kind],
                                    [ok for ok, k in zip(correct, kinds) if k == kind]) for kind in present}


# -- tables ------------------------------------------------------------------------------------------------
def _table_section(title: str, column: str, scores: dict[str, float], counts: dict[str, int], overall: float,
                   overall_label: str) -> list[str]:
    lines = [f"{title:<34}{column:>8}{'n':>7}"]
    lines += [f"  {name:<32}{value:>8.3f}{counts[name]:>7d}" for name, value in scores.items()]
    lines.append(f"  {overall_label:<32}{overall:>8.3f}{sum(counts.values()):>7d}")
    return lines


def format_table(results: dict[str, Any]) -> str:
    """The printed summary of :func:`~.evaluate.evaluate_model`'s results."""
    s = results["settings"]
    lines = [f"shapes evaluation: model {s['model']}, {s['height']} px, seed {s['seed']}"]
    gen = results.get("generation")
    if gen is not None:
        lines += _table_section("generation (GenEval-style)", "score", gen["per_category"], gen["counts"],
                                gen["overall"], "overall (mean of categories)")
        if "seconds" in gen:
            n = sum(gen["counts"].values())
            lines.append(f"  drawn in {gen['seconds']:.1f} s ({n / max(gen['seconds'], 1e-9):.2f} images/s)")
    und = results.get("understanding")
    if und is not None:
        lines += _table_section("understanding (exact match)", "acc", und["per_type"], und["counts"],
                                und["overall"], "overall (mean of types)")
        types = list(und["per_type"])
        lines.append(f"{'  by scene':<23}" + "".join(f"{t:>9}" for t in types))
        for kind, summary in und["by_scene_kind"].items():
            cells = [f"{summary['per_type'][t]:>9.3f}" if t in summary["per_type"] else f"{'-':>9}" for t in types]
            lines.append(f"  {kind:<21}" + "".join(cells))
    return "\n".join(lines)


def inpainting_table(results: dict[str, Any]) -> str:
    """The printed summary of :func:`~.evaluate.evaluate_inpainting`'s results."""
    s = results["settings"]
    lines = [f"inpainting on the shapes world: model {s['model']}, {s['n_scenes']} scenes, one object masked",
             f"{'category':<24}{'inpainted':>11}{'text only':>11}{'object erased':>15}"]
    for c in [c for c in INPAINT_CATEGORIES if c in results["inpainted"]["per_category"]]:
        lines.append(f"  {c:<22}" + "".join(f"{results[n]['per_category'][c]:>{w}.3f}" for n, w in INPAINT_COLUMNS))
    lines.append(f"  {'overall':<22}" + "".join(f"{results[n]['overall']:>{w}.3f}" for n, w in INPAINT_COLUMNS))
    return "\n".join(lines)


# -- files -------------------------------------------------------------------------------------------------
def write_png(path: Path, image: Image.Image) -> None:
    """``image`` as a PNG file at ``path``, written whole."""
    write_atomically(path, lambda tmp: image.save(tmp, format="PNG"))


def write_json(path: Path, results: dict[str, Any]) -> None:
    """``results`` as indented JSON at ``path``, written whole."""
    write_atomically(path, json.dumps(results, indent=1) + "\n")


def write_geneval_sample(out_dir: Path, index: int, prompt: dict[str, Any], images: Sequence[Image.Image]) -> None:
    """Prompt ``index`` (a :func:`world.make_prompts` item) and its images in GenEval's layout:
    ``<out>/<index:05d>/metadata.jsonl`` (GenEval's keys ``tag``, ``include``, ``exclude``, ``prompt``) and
    ``samples/<k:04d>.png``."""
    metadata = {"tag": prompt["tag"], "include": prompt["include"]}
    if "exclude" in prompt:
        metadata["exclude"] = prompt["exclude"]
    metadata["prompt"] = prompt["prompt"]
    for k, image in enumerate(images):
        png = item_paths(out_dir, index, None, k, "geneval")[0]
        png.parent.mkdir(parents=True, exist_ok=True)
        write_png(png, image)
    write_atomically(geneval_metadata_path(out_dir, index), json.dumps(metadata) + "\n")
