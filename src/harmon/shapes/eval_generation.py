"""The generation half of the shapes evaluation, and inpainting.

Generation: fresh prompts (:func:`world.make_prompts` on the ``eval_prompts`` stream), images drawn by
:class:`~harmon.pipelines.TextToImagePipeline` with seeds from the ``eval_seeds`` stream, each read by
:func:`~.detect.analyze` and judged by :func:`~.detect.check`. Inpainting: in scenes of two objects (the
``eval_inpaint`` stream) one object's tokens are redrawn by :class:`~harmon.pipelines.EditPipeline`, and the
result is judged beside the text-only image and the scene with the object painted over.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
from PIL import Image

from ..pipelines import EditPipeline, TextToImagePipeline, inpaint_region
from ..settings import GenerationSettings
from . import world
from .detect import score_image
from .eval_plan import INPAINT_CATEGORIES, ShapesEval
from .report import summarize, write_geneval_sample

SEED_LIMIT = 2**31 - 1  # image seeds are drawn below this


def make_prompts_for_eval(n: int, seed: int, size: int = world.DEFAULT_SIZE) -> list[dict[str, Any]]:
    """:func:`world.make_prompts` (kept separate so the evaluation's prompt source is explicit)."""
    return world.make_prompts(n, seed, size)


def image_seeds(seed: int, n_prompts: int, images_per_prompt: int) -> list[list[int]]:
    """The seeds of each prompt's images, from the ``eval_seeds`` stream of ``seed``."""
    rng = world.make_rng(seed, "eval_seeds")
    return [[int(s) for s in rng.integers(0, SEED_LIMIT, size=images_per_prompt)] for _ in range(n_prompts)]


def draw(pipe: TextToImagePipeline, prompts: Sequence[str], seeds: Sequence[int], settings: GenerationSettings,
         batch_size: int, progress: bool) -> tuple[list[Image.Image], float]:
    """Image i for ``prompts[i]`` with ``seeds[i]``, drawn ``batch_size`` at a time, and the seconds it took."""
    started = time.perf_counter()
    images: list[Image.Image] = []
    for first in range(0, len(prompts), batch_size):
        last = first + batch_size
        images += pipe(list(prompts[first:last]), settings, seeds=list(seeds[first:last]), progress=progress).images
    return images, time.perf_counter() - started


def generation_results(model, tokenizer, plan: ShapesEval, settings: GenerationSettings, out: Path | None,
                       progress: bool) -> dict[str, Any]:
    """Draw and judge ``plan.n_prompts`` x ``plan.images_per_prompt`` images of ``settings``' size: scores per
    category, their mean, the drawing's wall time and every item (with ``out``: the images in GenEval's
    layout)."""
    per = plan.images_per_prompt
    prompts = make_prompts_for_eval(plan.n_prompts, plan.seed, settings.height)
    seeds = image_seeds(plan.seed, len(prompts), per)
    images, seconds = draw(TextToImagePipeline(model, tokenizer), [p["prompt"] for p in prompts for _ in range(per)],
                           [s for row in seeds for s in row], settings, plan.batch_size, progress)
    items, cats, oks = [], [], []
    for i, p in enumerate(prompts):
        samples = []
        for k in range(per):
            scored = score_image(p, images[i * per + k])
            scored["seed"] = seeds[i][k]
            samples.append(scored)
            cats.append(p["category"])
            oks.append(scored["correct"])
        items.append({"index": i, "prompt": p["prompt"], "category": p["category"], "samples": samples})
        if out is not None:
            write_geneval_sample(out, i, p, images[i * per:(i + 1) * per])
    gen = summarize(cats, oks)
    gen["seconds"] = round(seconds, 2)  # wall time of drawing the images (model already loaded)
    gen["items"] = items
    return gen


# -- inpainting ------------------------------------------------------------------------------------------
def masked_object_box(obj, canvas: int, margin: int = 1) -> tuple[int, int, int, int]:
    """The pixel box (left, top, right, bottom) covering ``obj`` with ``margin`` px to spare, inside the canvas."""
    x0, y0, x1, y1 = obj.box
    return (max(0, int(np.floor(x0)) - margin), max(0, int(np.floor(y0)) - margin),
            min(canvas, int(np.ceil(x1)) + margin), min(canvas, int(np.ceil(y1)) + margin))


def inpainting_scenes(n_scenes: int, seed: int, image_size: int) -> Iterator[tuple[int, world.Scene, world.Obj, int]]:
    """``(j, scene, masked object, image seed)`` for scene j of the ``eval_inpaint`` stream (categories
    :data:`INPAINT_CATEGORIES` in turn)."""
    for j in range(n_scenes):
        rng = world.make_rng(seed, "eval_inpaint", j)
        scene = world.sample_scene(INPAINT_CATEGORIES[j % len(INPAINT_CATEGORIES)], rng, image_size)
        target = scene.objects[int(rng.integers(len(scene.objects)))]
        yield j, scene, target, int(rng.integers(0, SEED_LIMIT))


def inpaint_scene(edit: EditPipeline, t2i: TextToImagePipeline, scene: world.Scene, target: world.Obj,
                  image_seed: int, settings: GenerationSettings) -> tuple[dict[str, Any], dict[str, Image.Image]]:
    """One inpainting item: ``target``'s box redrawn under the scene's prompt, the text-only image of the same
    prompt and seed, and the scene with the box painted over, each judged. Returns the item (without its
    index) and the three images by name."""
    box = masked_object_box(target, settings.height)
    original = world.render(scene)
    erased = original.copy()
    erased.paste(world.BACKGROUND, box)
    region = inpaint_region(original, box, stride=edit.model.config.mar.vae_stride)
    images = {"inpainted": edit(region, scene.prompt, settings, seed=image_seed).images[0],
              "text_only": t2i(scene.prompt, settings, seeds=[image_seed], progress=False).images[0],
              "object_erased": erased}
    prompt = world.prompt_item(scene)
    item = {"prompt": scene.prompt, "category": scene.category, "masked_object": target.to_dict(), "box": list(box),
            "seed": image_seed, "regenerated_tokens": int((~region.known).sum()), "tokens": int(region.known.numel())}
    for name, image in images.items():
        scored = score_image(prompt, image)
        item[name] = {"correct": scored["correct"], "reason": scored["reason"]}
    return item, images
