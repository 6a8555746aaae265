"""Scoring images of the shapes world without any learned model, GenEval style.

The analyser (:func:`analyze`):

1. background: the median colour of the image's border (falls back to the
   world's background when the border is not light and uniform);
2. colour of each pixel: for every palette colour ``c`` the pixel ``p`` is
   projected on the segment background -> ``c`` (``alpha``, the coverage of an
   anti-aliased edge pixel); the colour whose segment passes closest wins, and
   the pixel is foreground when that colour's ``alpha >= 0.5`` and the distance
   to the segment is below ``max_residual`` (so blended edges go to the right
   colour or to the background, never to a third colour);
3. blobs: 8-connected components of each colour's mask (holes filled);
   blobs smaller than ``min_area_frac`` of the canvas are ignored;
4. shape from geometry: the blob's mask against the ideal square, circle and
   up-pointing triangle filling its bounding box (fill ratios ~1.0, ~0.785,
   ~0.5), best intersection-over-union wins; blobs with extreme aspect ratios
   or no good match are ``unknown`` (still counted as objects);
5. bounding-box centres and sizes for GenEval's relative-position rule.

Prompts are then checked per category (:func:`check`) and scores averaged per
category, with GenEval's overall score the mean of the category scores.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import numpy as np
from PIL import Image
from scipy import ndimage

from . import world

PALETTE_ARRAY = np.array([world.PALETTE[c] for c in world.COLORS], dtype=np.float32)  # (6, 3)


@dataclass(frozen=True)
class Detection:
    """One blob: colour, shape, bounding box (x0, y0, x1, y1 exclusive), area, centroid, fill ratio."""

    color: str
    shape: str
    x0: int
    y0: int
    x1: int
    y1: int
    area: int
    centroid: tuple[float, float]
    fill: float

    @property
    def cx(self) -> float:
        return (self.x0 + self.x1) / 2

    @property
    def cy(self) -> float:
        return (self.y0 + self.y1) / 2

    @property
    def width(self) -> float:
        return float(self.x1 - self.x0)

    @property
    def height(self) -> float:
        return float(self.y1 - self.y0)

    def to_dict(self) -> dict[str, Any]:
        return {"color": self.color, "shape": self.shape, "box": [self.x0, self.y0, self.x1, self.y1],
                "area": self.area, "centroid": [round(self.centroid[0], 2), round(self.centroid[1], 2)],
                "fill": round(self.fill, 3)}


def estimate_background(pixels: np.ndarray) -> np.ndarray:
    """Median colour of the border pixels, or the world's background when the border is not plain and light."""
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]]).astype(np.float32)
    median = np.median(border, axis=0)
    spread = np.median(np.abs(border - median).sum(axis=1))
    if median.min() < 150 or spread > 40:
        return np.array(world.BACKGROUND, dtype=np.float32)
    return median


def color_map(pixels: np.ndarray, background: np.ndarray | None = None, *, min_alpha: float = 0.5,
              max_residual: float = 70.0) -> np.ndarray:
    """(H, W) int8: index into :data:`world.COLORS` of each pixel's colour, -1 for background / no colour."""
    h, w = pixels.shape[:2]
    bg = estimate_background(pixels) if background is None else np.asarray(background, dtype=np.float32)
    d = pixels.reshape(-1, 3).astype(np.float32) - bg  # (N, 3)
    directions = PALETTE_ARRAY - bg  # (6, 3)
    norms2 = (directions ** 2).sum(axis=1)  # (6,)
    out = np.full(h * w, -1, dtype=np.int8)
    # a pixel closer to the background than min_alpha of the nearest colour's distance cannot be foreground
    d2 = (d ** 2).sum(axis=1)
    candidates = np.nonzero(d2 >= (min_alpha * np.sqrt(norms2.min())) ** 2 * 0.99)[0]
    if candidates.size == 0:
        return out.reshape(h, w)
    dc, d2c = d[candidates], d2[candidates]
    alpha = np.clip((dc @ directions.T) / norms2, 0.0, 1.25)  # (M, 6) coverage along each colour
    # squared distance to the point bg + alpha * direction, expanded: |d|^2 - 2 a d.dir + a^2 |dir|^2
    residual2 = d2c[:, None] - 2 * alpha * (dc @ directions.T) + alpha ** 2 * norms2
    best = residual2.argmin(axis=1)
    rows = np.arange(candidates.size)
    keep = (alpha[rows, best] >= min_alpha) & (residual2[rows, best] <= max_residual ** 2)
    out[candidates[keep]] = best[keep].astype(np.int8)
    return out.reshape(h, w)


def shape_templates(h: int, w: int) -> dict[str, np.ndarray]:
    """Ideal masks filling an h x w box (sampled at pixel centres): square, circle, up-pointing triangle."""
    y = (np.arange(h) + 0.5)[:, None] / h  # 0..1 downwards
    x = (np.arange(w) + 0.5)[None, :] / w
    return {"square": np.ones((h, w), dtype=bool),
            "circle": (2 * x - 1) ** 2 + (2 * y - 1) ** 2 <= 1.0,
            "triangle": np.abs(2 * x - 1) <= y}


def classify_shape(mask: np.ndarray, min_iou: float = 0.6) -> tuple[str, float]:
    """Shape of one blob (a tight boolean mask of its bounding box) and its fill ratio.

    The blob is compared with the ideal square, circle and up-pointing triangle filling the
    same box; the best intersection-over-union wins (square ~ fill 1.0, circle ~ 0.785,
    triangle ~ 0.5, but using where the pixels are, not only how many). Blobs with an aspect
    ratio beyond 2:1, or matching no template with IoU >= ``min_iou``, are ``unknown``.
    """
    h, w = mask.shape
    fill = float(mask.sum()) / float(h * w)
    if not 0.5 <= w / h <= 2.0:
        return "unknown", fill
    best, best_iou = "unknown", 0.0
    for name, template in shape_templates(h, w).items():
        iou = float((mask & template).sum()) / float((mask | template).sum())
        if iou > best_iou:
            best, best_iou = name, iou
    return (best if best_iou >= min_iou else "unknown"), fill


def analyze(image: Image.Image | np.ndarray, *, min_area_frac: float = 0.006, min_alpha: float = 0.5,
            max_residual: float = 70.0) -> list[Detection]:
    """Objects found in an image, ordered left to right (then top to bottom)."""
    pixels = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image)
    if pixels.ndim != 3 or pixels.shape[2] != 3:
        raise ValueError(f"expected an RGB image, got an array of shape {pixels.shape}")
    labels = color_map(pixels, min_alpha=min_alpha, max_residual=max_residual)
    min_area = max(4, int(round(min_area_frac * pixels.shape[0] * pixels.shape[1])))
    found = []
    structure = np.ones((3, 3), dtype=bool)
    for k, color in enumerate(world.COLORS):
        mask = labels == k
        if mask.sum() < min_area:
            continue
        comp, n = ndimage.label(mask, structure=structure)
        for index, sl in enumerate(ndimage.find_objects(comp), start=1):
            if sl is None:
                continue
            blob = ndimage.binary_fill_holes(comp[sl] == index)
            area = int(blob.sum())
            if area < min_area:
                continue
            shape, fill = classify_shape(blob)
            ys, xs = np.nonzero(blob)
            found.append(Detection(color, shape, sl[1].start, sl[0].start, sl[1].stop, sl[0].stop, area,
                                   (float(xs.mean() + sl[1].start + 0.5), float(ys.mean() + sl[0].start + 0.5)),
                                   fill))
    found.sort(key=lambda d: (d.cx, d.cy))
    return found


# -- checking prompts ----------------------------------------------------------------------------------
def _matches(dets: Sequence[Detection], item: dict[str, Any]) -> list[Detection]:
    return [d for d in dets if d.shape == item["class"] and ("color" not in item or d.color == item["color"])]


def check(prompt: dict[str, Any], dets: Sequence[Detection]) -> tuple[bool, str]:
    """Whether detections satisfy a prompt (a :func:`world.make_prompts` item), and why not."""
    tag = prompt.get("category") or prompt["tag"]
    include = prompt["include"]
    if tag == "single_object":
        item = include[0]
        if len(dets) != 1:
            return False, f"{len(dets)} objects, expected exactly 1"
        if not _matches(dets, item):
            return False, f"found {dets[0].color} {dets[0].shape}, expected {item.get('color', '')} {item['class']}"
        return True, "ok"
    if tag == "counting":
        item = include[0]
        of_shape = [d for d in dets if d.shape == item["class"]]
        if len(of_shape) != item["count"]:
            return False, f"{len(of_shape)} {item['class']}s, expected {item['count']}"
        if "color" in item and any(d.color != item["color"] for d in of_shape):
            return False, f"not all {item['class']}s are {item['color']}"
        return True, "ok"
    if tag in ("two_object", "colors", "color_attr"):
        for item in include:
            if len(_matches(dets, item)) < item.get("count", 1):
                return False, f"no {item.get('color', '')} {item['class']}".replace("  ", " ")
        return True, "ok"
    if tag == "position":
        for item in include:
            if not _matches(dets, item):
                return False, f"no {item.get('color', '')} {item['class']}".replace("  ", " ")
        for item in include:
            if "position" not in item:
                continue
            relation, ref = item["position"]
            movers, refs = _matches(dets, item), _matches(dets, include[ref])
            if not any(relation in world.relations(a, b) for a in movers for b in refs if a is not b):
                return False, f"the {item.get('color', '')} {item['class']} is not {relation} the reference"
        return True, "ok"
    raise ValueError(f"unknown category {tag!r}")


def score_image(prompt: dict[str, Any], image: Image.Image, **analyze_kwargs) -> dict[str, Any]:
    dets = analyze(image, **analyze_kwargs)
    ok, reason = check(prompt, dets)
    return {"correct": ok, "reason": reason, "detections": [d.to_dict() for d in dets]}


def _grouped_accuracy(groups: Iterable[str], correct: Iterable[bool], order: Sequence[str]
                      ) -> tuple[dict[str, float], dict[str, int], float]:
    """Accuracy per group (known groups in ``order`` first), counts, and the mean of the group scores."""
    per: dict[str, list[bool]] = {}
    for g, ok in zip(groups, correct):
        per.setdefault(g, []).append(bool(ok))
    ordered = [g for g in order if g in per] + sorted(g for g in per if g not in order)
    scores = {g: sum(per[g]) / len(per[g]) for g in ordered}
    overall = float(np.mean(list(scores.values()))) if scores else 0.0
    return scores, {g: len(per[g]) for g in ordered}, overall


def summarize(categories: Iterable[str], correct: Iterable[bool]) -> dict[str, Any]:
    """Per-category accuracy and GenEval's overall score (mean of the category scores)."""
    scores, counts, overall = _grouped_accuracy(categories, correct, world.CATEGORIES)
    return {"per_category": scores, "counts": counts, "overall": overall}


# -- understanding ---------------------------------------------------------------------------------------
def answer_correct(predicted: str, expected: str) -> bool:
    return world.normalize_answer(predicted) == world.normalize_answer(expected)


def summarize_answers(types: Iterable[str], correct: Iterable[bool]) -> dict[str, Any]:
    """Exact-match accuracy per question type, and the mean of the type scores."""
    scores, counts, overall = _grouped_accuracy(types, correct, world.QUESTION_TYPES)
    return {"per_type": scores, "counts": counts, "overall": overall}


def summarize_by_scene_kind(kinds: Sequence[str], types: Sequence[str], correct: Sequence[bool]
                            ) -> dict[str, dict[str, Any]]:
    """:func:`summarize_answers` of the answers about each kind of scene (:data:`world.SCENE_KINDS`)."""
    present = [k for k in world.SCENE_KINDS if k in kinds]
    return {kind: summarize_answers([t for t, k in zip(types, kinds) if k == kind],
                                    [ok for ok, k in zip(correct, kinds) if k == kind]) for kind in present}


# -- evaluating a model ------------------------------------------------------------------------------------
DEFAULT_EVAL_SEED = 20_250_001  # evaluation streams differ from the training stream whatever the seed


def _table_section(title: str, column: str, scores: dict[str, float], counts: dict[str, int], overall: float,
                   overall_label: str) -> list[str]:
    lines = [f"{title:<34}{column:>8}{'n':>7}"]
    lines += [f"  {name:<32}{value:>8.3f}{counts[name]:>7d}" for name, value in scores.items()]
    lines.append(f"  {overall_label:<32}{overall:>8.3f}{sum(counts.values()):>7d}")
    return lines


def format_table(results: dict[str, Any]) -> str:
    """The printed summary of :func:`evaluate_model`'s results."""
    s = results["settings"]
    lines = [f"shapes evaluation: model {s['model']}, {s['image_size']} px, seed {s['seed']}"]
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


def write_geneval_sample(out_dir, index: int, metadata: dict[str, Any], images: Sequence[Image.Image]) -> None:
    """GenEval's layout: ``<out>/<index:05d>/metadata.jsonl`` + ``samples/<k:04d>.png``."""
    import json
    from pathlib import Path

    folder = Path(out_dir) / f"{index:05d}"
    (folder / "samples").mkdir(parents=True, exist_ok=True)
    with open(folder / "metadata.jsonl", "w", encoding="utf-8") as fh:
        fh.write(json.dumps(metadata) + "\n")
    for k, image in enumerate(images):
        image.save(folder / "samples" / f"{k:04d}.png", format="PNG")


def evaluate_model(model, tokenizer, n_prompts: int = 200, seed: int = DEFAULT_EVAL_SEED, out_dir=None, *,
                   image_size: int = world.DEFAULT_SIZE, images_per_prompt: int = 1, num_iter: int | None = None,
                   num_steps: int | None = None, fast: bool = False, guidance_scale: float = 3.0,
                   temperature: float = 1.0,
                   batch_size: int = 8, n_scenes: int | None = None, max_new_tokens: int = 48,
                   generation: bool = True, understanding: bool = True, progress: bool = False,
                   echo=print) -> dict[str, Any]:
    """Score a model on the shapes world: generation (GenEval-style) and understanding (exact match).

    Generation: ``n_prompts`` fresh prompts (:func:`world.make_prompts` with ``seed``, the
    ``eval_prompts`` stream, never the training one), ``images_per_prompt`` images each with
    seeds drawn from the ``eval_seeds`` stream, scored by :func:`analyze` + :func:`check`.
    Understanding: ``n_scenes`` (default ``n_prompts``) freshly rendered scenes from the
    ``eval_scenes`` stream, one question of each applicable type per scene, greedy answers of
    :class:`~harmon.pipelines.ImageToTextPipeline` compared after :func:`world.normalize_answer`,
    also split by the kind of scene asked about (``by_scene_kind``: one object, different objects,
    several alike; :func:`world.scene_kind`).

    ``num_iter`` / ``num_steps`` default to the model's; ``fast`` selects the pipeline's fast mode for
    whichever of them is not given. Prints the table with ``echo`` (None: silent). With ``out_dir``: writes ``results.json``
    (settings, scores, every item) and GenEval's layout ``<out>/<index:05d>/metadata.jsonl`` +
    ``samples/<k:04d>.png`` for the generated images. Returns the results dict.
    """
    import json
    from pathlib import Path

    from ..pipelines import ImageToTextPipeline, TextToImagePipeline

    if n_prompts < 1 and generation:
        raise ValueError(f"n_prompts must be >= 1, got {n_prompts}")
    if images_per_prompt < 1 or batch_size < 1:
        raise ValueError("images_per_prompt and batch_size must be >= 1")
    out = Path(out_dir) if out_dir is not None else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    settings = {"model": getattr(model.config, "name", "?"), "seed": int(seed), "n_prompts": int(n_prompts),
                "images_per_prompt": images_per_prompt, "image_size": image_size, "fast": fast,
                "num_iter": model.config.num_iter if num_iter is None and not fast else num_iter,
                "num_steps": None if num_steps is None else str(num_steps), "guidance_scale": guidance_scale,
                "temperature": temperature, "max_new_tokens": max_new_tokens}
    results: dict[str, Any] = {"settings": settings}

    if generation:
        prompts = make_prompts_for_eval(n_prompts, seed, image_size)
        seed_rng = world.make_rng(seed, "eval_seeds")
        image_seeds = [[int(s) for s in seed_rng.integers(0, 2**31 - 1, size=images_per_prompt)] for _ in prompts]
        pipe = TextToImagePipeline(model, tokenizer)
        jobs = [(i, k) for i in range(len(prompts)) for k in range(images_per_prompt)]
        images: dict[tuple[int, int], Image.Image] = {}
        started = time.perf_counter()
        for first in range(0, len(jobs), batch_size):
            batch = jobs[first:first + batch_size]
            res = pipe([prompts[i]["prompt"] for i, _ in batch], seeds=[image_seeds[i][k] for i, k in batch],
                       guidance_scale=guidance_scale, temperature=temperature, num_iter=num_iter,
                       num_steps=num_steps, fast=fast, height=image_size, progress=progress)
            images.update(zip(batch, res.images))
        seconds = time.perf_counter() - started
        settings["num_iter"], settings["num_steps"] = res.settings["num_iter"], res.settings["num_steps"]
        items, cats, oks = [], [], []
        for i, p in enumerate(prompts):
            samples = []
            for k in range(images_per_prompt):
                scored = score_image(p, images[(i, k)])
                scored["seed"] = image_seeds[i][k]
                samples.append(scored)
                cats.append(p["category"])
                oks.append(scored["correct"])
            items.append({"index": i, "prompt": p["prompt"], "category": p["category"], "samples": samples})
            if out is not None:
                meta = {"tag": p["tag"], "include": p["include"]}
                if "exclude" in p:
                    meta["exclude"] = p["exclude"]
                meta["prompt"] = p["prompt"]
                write_geneval_sample(out, i, meta, [images[(i, k)] for k in range(images_per_prompt)])
        gen = summarize(cats, oks)
        gen["seconds"] = round(seconds, 2)  # wall time of drawing the images (model already loaded)
        gen["items"] = items
        results["generation"] = gen

    if understanding:
        n_scenes = n_prompts if n_scenes is None else n_scenes
        describe_pipe = ImageToTextPipeline(model, tokenizer, image_size=image_size)
        items = []
        for j, image, scene_questions in understanding_scenes(n_scenes, seed, image_size):
            embeds = describe_pipe.image_embeds(image)  # encoded once, shared by the scene's questions
            for q in scene_questions:
                predicted = _answer(describe_pipe, embeds, q["question"], max_new_tokens)
                items.append({**q, "predicted": predicted, "correct": answer_correct(predicted, q["expected"])})
        types, oks = [i["type"] for i in items], [i["correct"] for i in items]
        und = summarize_answers(types, oks)
        und["by_scene_kind"] = summarize_by_scene_kind([i["scene_kind"] for i in items], types, oks)
        und["items"] = items
        results["understanding"] = und

    table = format_table(results)
    results["table"] = table
    if echo is not None:
        echo(table)
    if out is not None:
        with open(out / "results.json", "w", encoding="utf-8") as fh:
            json.dump(results, fh, indent=1)
            fh.write("\n")
    return results


def understanding_scenes(n_scenes: int, seed: int = DEFAULT_EVAL_SEED, image_size: int = world.DEFAULT_SIZE):
    """The understanding evaluation's scenes: ``(j, image, questions)`` for scene j of the ``eval_scenes``
    stream, with one question of each applicable type (dicts of ``scene``, ``scene_kind``, ``type``,
    ``question``, ``expected``). The same stream feeds ``harmon eval shapes`` and the lmms-eval task
    :func:`harmon.evals.shapes_task.write_task` writes."""
    for j in range(n_scenes):
        rng = world.make_rng(seed, "eval_scenes", j)
        scene = world.sample_scene(world.CATEGORIES[j % len(world.CATEGORIES)], rng, image_size)
        image = world.render(scene)
        kind = world.scene_kind(scene.objects)
        by_type: dict[str, list[dict[str, Any]]] = {}
        for q in world.questions(scene.objects, rng):
            by_type.setdefault(q["type"], []).append(q)
        chosen = []
        for qtype in world.QUESTION_TYPES:
            if qtype in by_type:
                q = by_type[qtype][int(rng.integers(len(by_type[qtype])))]
                chosen.append({"scene": j, "scene_kind": kind, "type": qtype, "question": q["question"],
                               "expected": q["answer"]})
        yield j, image, chosen


def _answer(pipe, image_embeds, question: str, max_new_tokens: int) -> str:
    """Greedy answer to one question about an already encoded image (as ``pipe(image, question)``)."""
    from ..processing import IMAGE_TOKEN, chat_prompt

    embeds = pipe.prompt_embeds(chat_prompt(f"{IMAGE_TOKEN}\n{question}"), image_embeds)
    ids = list(pipe.generate_ids(embeds, max_new_tokens=max_new_tokens))
    return pipe.tokenizer.decode(ids, skip_special_tokens=True)


def make_prompts_for_eval(n: int, seed: int, size: int = world.DEFAULT_SIZE) -> list[dict[str, Any]]:
    """:func:`world.make_prompts` (kept separate so the evaluation's prompt source is explicit)."""
    return world.make_prompts(n, seed, size)


# -- inpainting ------------------------------------------------------------------------------------------
INPAINT_CATEGORIES = ("two_object", "position", "color_attr")


def masked_object_box(obj, canvas: int, margin: int = 1) -> tuple[int, int, int, int]:
    """The pixel box (left, top, right, bottom) covering ``obj`` with ``margin`` px to spare, inside the canvas."""
    x0, y0, x1, y1 = obj.box
    return (max(0, int(np.floor(x0)) - margin), max(0, int(np.floor(y0)) - margin),
            min(canvas, int(np.ceil(x1)) + margin), min(canvas, int(np.ceil(y1)) + margin))


def evaluate_inpainting(model, tokenizer, n_scenes: int = 120, seed: int = DEFAULT_EVAL_SEED, out_dir=None, *,
                        image_size: int = world.DEFAULT_SIZE, num_iter: int | None = None,
                        num_steps: int | None = None, guidance_scale: float = 3.0, temperature: float = 1.0,
                        progress: bool = False, echo=print) -> dict[str, Any]:
    """Inpainting on the shapes world, against the same model's text-only generation.

    For ``n_scenes`` fresh scenes with two objects (categories :data:`INPAINT_CATEGORIES` in
    turn, the ``eval_inpaint`` stream), one object is chosen and the tokens covering its box
    are regenerated by :class:`~harmon.pipelines.EditPipeline` under the scene's prompt, which
    names it. The completed scene, the text-only image for the same prompt and seed, and the
    scene with the object's box painted over with background (the baseline that must fail)
    are scored by :func:`score_image`. Writes ``inpainting.json`` (and the images) to ``out_dir``.
    """
    import json
    from pathlib import Path

    from ..pipelines import EditPipeline, TextToImagePipeline, inpaint_region

    if n_scenes < 1:
        raise ValueError(f"n_scenes must be >= 1, got {n_scenes}")
    stride = model.config.mar.vae_stride
    num_iter = model.config.num_iter if num_iter is None else num_iter
    edit, t2i = EditPipeline(model, tokenizer), TextToImagePipeline(model, tokenizer)
    settings = {"model": getattr(model.config, "name", "?"), "seed": int(seed), "n_scenes": int(n_scenes),
                "image_size": image_size, "num_iter": num_iter,
                "num_steps": None if num_steps is None else str(num_steps), "guidance_scale": guidance_scale,
                "temperature": temperature}
    out = Path(out_dir) if out_dir is not None else None
    if out is not None:
        (out / "inpainting").mkdir(parents=True, exist_ok=True)
    items, cats = [], []
    scores: dict[str, list[bool]] = {"inpainted": [], "text_only": [], "object_erased": []}
    for j in range(n_scenes):
        rng = world.make_rng(seed, "eval_inpaint", j)
        scene = world.sample_scene(INPAINT_CATEGORIES[j % len(INPAINT_CATEGORIES)], rng, image_size)
        target = scene.objects[int(rng.integers(len(scene.objects)))]
        image_seed = int(rng.integers(0, 2**31 - 1))
        box = masked_object_box(target, image_size)
        original = world.render(scene)
        erased = original.copy()
        erased.paste(world.BACKGROUND, box)
        region = inpaint_region(original, box, stride=stride)
        inpainted = edit(region, scene.prompt, seed=image_seed, guidance_scale=guidance_scale,
                         temperature=temperature, num_iter=num_iter, num_steps=num_steps).images[0]
        text_only = t2i(scene.prompt, seeds=[image_seed], guidance_scale=guidance_scale, temperature=temperature,
                        num_iter=num_iter, num_steps=num_steps, height=image_size, progress=progress).images[0]
        prompt = world.prompt_item(scene)
        item = {"index": j, "prompt": scene.prompt, "category": scene.category, "masked_object": target.to_dict(),
                "box": list(box), "seed": image_seed,
                "regenerated_tokens": int((~region.known).sum()), "tokens": int(region.known.numel())}
        for name, image in (("inpainted", inpainted), ("text_only", text_only), ("object_erased", erased)):
            scored = score_image(prompt, image)
            item[name] = {"correct": scored["correct"], "reason": scored["reason"]}
            scores[name].append(scored["correct"])
            if out is not None:
                image.save(out / "inpainting" / f"{j:04d}_{name}.png", format="PNG")
        items.append(item)
        cats.append(scene.category)
    results = {"settings": settings, "items": items}
    for name, oks in scores.items():
        per, counts, overall = _grouped_accuracy(cats, oks, INPAINT_CATEGORIES)
        results[name] = {"per_category": per, "counts": counts, "overall": overall}
    columns = (("inpainted", 11), ("text_only", 11), ("object_erased", 15))
    lines = [f"inpainting on the shapes world: model {settings['model']}, {n_scenes} scenes, one object masked",
             f"{'category':<24}{'inpainted':>11}{'text only':>11}{'object erased':>15}"]
    for c in [c for c in INPAINT_CATEGORIES if c in results["inpainted"]["per_category"]]:
        lines.append(f"  {c:<22}" + "".join(f"{results[n]['per_category'][c]:>{w}.3f}" for n, w in columns))
    lines.append(f"  {'overall':<22}" + "".join(f"{results[n]['overall']:>{w}.3f}" for n, w in columns))
    results["table"] = "\n".join(lines)
    if echo is not None:
        echo(results["table"])
    if out is not None:
        (out / "inpainting.json").write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")
    return results
