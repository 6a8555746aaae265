"""Scoring a model on the shapes world without any learned judge, GenEval style: the entry points.

:func:`evaluate_model` runs the generation half (:mod:`.eval_generation`: prompts drawn and read back by
:mod:`.detect`) and the understanding half (:mod:`.eval_understanding`: questions answered about rendered
scenes) of a :class:`ShapesEval` plan, with images drawn as a :class:`~harmon.settings.GenerationSettings`
says; :func:`evaluate_inpainting` measures inpainting. :mod:`.report` averages, prints and writes.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from ..errors import InputError
from ..pipelines import EditPipeline, TextToImagePipeline
from ..settings import GenerationSettings
from . import world
from .eval_generation import generation_results, inpaint_scene, inpainting_scenes
from .eval_plan import DEFAULT_EVAL_SEED, INPAINT_CATEGORIES, ShapesEval
from .eval_understanding import understanding_results
from .report import format_table, inpainting_table, summarize, write_json, write_png

__all__ = ["DEFAULT_EVAL_SEED", "ShapesEval", "evaluate_inpainting", "evaluate_model", "shapes_settings"]


def shapes_settings(settings: GenerationSettings | None) -> GenerationSettings:
    """``settings`` (default: the original's) at the shapes world's square image size: ``height`` /
    ``width`` default to :data:`world.DEFAULT_SIZE`, and must be equal when both are given."""
    settings = settings or GenerationSettings()
    given = {settings.height, settings.width} - {None}
    if len(given) > 1:
        raise InputError(f"the shapes world's images are square: height ({settings.height}) and width "
                         f"({settings.width}) must be equal")
    size = given.pop() if given else world.DEFAULT_SIZE
    return settings.replace(height=size, width=size)


def _folder(out_dir) -> Path | None:
    if out_dir is None:
        return None
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    return out


def _finish(results: dict[str, Any], table: str, path: Path | None, echo: Callable[[str], Any] | None) -> None:
    """Add the printed ``table`` to ``results``, print it with ``echo`` and write ``results`` to ``path``."""
    results["table"] = table
    if echo is not None:
        echo(table)
    if path is not None:
        write_json(path, results)


def evaluate_model(model, tokenizer, plan: ShapesEval | None = None, settings: GenerationSettings | None = None,
                   out_dir=None, *, progress: bool = False, echo: Callable[[str], Any] | None = print
                   ) -> dict[str, Any]:
    """Score a model on the shapes world: generation (GenEval-style) and understanding (exact match).

    Generation: ``plan.n_prompts`` fresh prompts (:func:`world.make_prompts` with ``plan.seed``, the
    ``eval_prompts`` stream, never the training one), ``plan.images_per_prompt`` images each with seeds
    drawn from the ``eval_seeds`` stream, drawn with ``settings`` and scored by :func:`~.detect.analyze` +
    :func:`~.detect.check`. Understanding: ``plan.scenes`` freshly rendered scenes from the ``eval_scenes``
    stream, one question of each applicable type per scene, greedy answers of
    :class:`~harmon.pipelines.ImageToTextPipeline` compared after :func:`world.normalize_answer`, also split
    by the kind of scene asked about (``by_scene_kind``; :func:`world.scene_kind`).

    ``settings`` (default: the original's) are the model's own where None, but for the image size:
    :data:`world.DEFAULT_SIZE` (see :func:`shapes_settings`); scenes and questions are made at that size too.
    Prints the table with ``echo`` (None: silent). With ``out_dir``: writes ``results.json`` (``settings``:
    the model's name, the plan and the resolved settings; the scores; every item) and GenEval's layout
    ``<out>/<index:05d>/metadata.jsonl`` + ``samples/<k:04d>.png`` for the generated images. Returns the
    results dict.
    """
    plan = plan or ShapesEval()
    settings = shapes_settings(settings)
    resolved = settings.resolve(model.config)
    out = _folder(out_dir)
    results: dict[str, Any] = {"settings": {"model": getattr(model.config, "name", "?"), **plan.to_dict(),
                                            **resolved.to_dict()}}
    if plan.generation:
        results["generation"] = generation_results(model, tokenizer, plan, settings, out, progress)
    if plan.understanding:
        results["understanding"] = understanding_results(model, tokenizer, plan, resolved.height)
    _finish(results, format_table(results), None if out is None else out / "results.json", echo)
    return results


def evaluate_inpainting(model, tokenizer, n_scenes: int = 120, seed: int = DEFAULT_EVAL_SEED,
                        settings: GenerationSettings | None = None, out_dir=None, *,
                        echo: Callable[[str], Any] | None = print) -> dict[str, Any]:
    """Inpainting on the shapes world, against the same model's text-only generation.

    For ``n_scenes`` fresh scenes with two objects (categories :data:`INPAINT_CATEGORIES` in turn, the
    ``eval_inpaint`` stream of ``seed``), one object is chosen and the tokens covering its box are
    regenerated by :class:`~harmon.pipelines.EditPipeline` under the scene's prompt, which names it. The
    completed scene, the text-only image for the same prompt and seed, and the scene with the object's box
    painted over with background (the baseline that must fail) are scored by :func:`~.detect.score_image`.
    ``settings`` as for :func:`evaluate_model`. Writes ``inpainting.json`` (and the images) to ``out_dir``.
    """
    if n_scenes < 1:
        raise InputError(f"n_scenes must be >= 1, got {n_scenes}")
    settings = shapes_settings(settings)
    resolved = settings.resolve(model.config)
    out = _folder(out_dir)
    if out is not None:
        (out / "inpainting").mkdir(exist_ok=True)
    edit, t2i = EditPipeline(model, tokenizer), TextToImagePipeline(model, tokenizer)
    items, cats = [], []
    scores: dict[str, list[bool]] = {"inpainted": [], "text_only": [], "object_erased": []}
    for j, scene, target, image_seed in inpainting_scenes(n_scenes, seed, resolved.height):
        item, images = inpaint_scene(edit, t2i, scene, target, image_seed, settings)
        items.append({"index": j, **item})
        cats.append(scene.category)
        for name, image in images.items():
            scores[name].append(item[name]["correct"])
            if out is not None:
                write_png(out / "inpainting" / f"{j:04d}_{name}.png", image)
    results: dict[str, Any] = {"settings": {"model": getattr(model.config, "name", "?"), "seed": int(seed),
                                            "n_scenes": int(n_scenes), **resolved.to_dict()}, "items": items}
    for name, oks in scores.items():
        results[name] = summarize(cats, oks, INPAINT_CATEGORIES)
    _finish(results, inpainting_table(results), None if out is None else out / "inpainting.json", echo)
    return results
