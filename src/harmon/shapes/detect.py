"""Reading images of the shapes world without any learned model, GenEval style: what is drawn, and whether
it is what a prompt asked for.

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

Prompts are then checked per category (:func:`check`); :mod:`.report` averages the verdicts per category.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
from PIL import Image
from scipy import ndimage

from ..errors import InputError
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
        """Horizontal centre of the bounding box."""
        return (self.x0 + self.x1) / 2

    @property
    def cy(self) -> float:
        """Vertical centre of the bounding box."""
        return (self.y0 + self.y1) / 2

    @property
    def width(self) -> float:
        """Width of the bounding box in pixels."""
        return float(self.x1 - self.x0)

    @property
    def height(self) -> float:
        """Height of the bounding box in pixels."""
        return float(self.y1 - self.y0)

    def to_dict(self) -> dict[str, Any]:
        """The detection as JSON values (box as a list, centroid and fill rounded)."""
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
        raise InputError(f"expected an RGB image, got an array of shape {pixels.shape}")
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
def matching(dets: Sequence[Detection], item: dict[str, Any]) -> list[Detection]:
    """The detections of an include item's class (and colour, when it names one)."""
    return [d for d in dets if d.shape == item["class"] and ("color" not in item or d.color == item["color"])]


def check(prompt: dict[str, Any], dets: Sequence[Detection]) -> tuple[bool, str]:
    """Whether detections satisfy a prompt (a :func:`world.make_prompts` item), and why not."""
    tag = prompt.get("category") or prompt["tag"]
    include = prompt["include"]
    if tag == "single_object":
        item = include[0]
        if len(dets) != 1:
            return False, f"{len(dets)} objects, expected exactly 1"
        if not matching(dets, item):
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
            if len(matching(dets, item)) < item.get("count", 1):
                return False, f"no {item.get('color', '')} {item['class']}".replace("  ", " ")
        return True, "ok"
    if tag == "position":
        for item in include:
            if not matching(dets, item):
                return False, f"no {item.get('color', '')} {item['class']}".replace("  ", " ")
        for item in include:
            if "position" not in item:
                continue
            relation, ref = item["position"]
            movers, refs = matching(dets, item), matching(dets, include[ref])
            if not any(relation in world.relations(a, b) for a in movers for b in refs if a is not b):
                return False, f"the {item.get('color', '')} {item['class']} is not {relation} the reference"
        return True, "ok"
    raise InputError(f"unknown category {tag!r}")


def score_image(prompt: dict[str, Any], image: Image.Image, **analyze_kwargs) -> dict[str, Any]:
    """The verdict on one image for ``prompt``: ``correct``, the ``reason`` when not, and the detections."""
    dets = analyze(image, **analyze_kwargs)
    ok, reason = check(prompt, dets)
    return {"correct": ok, "reason": reason, "detections": [d.to_dict() for d in dets]}
