"""What harmon writes for a user, in one place and one schema: the PNG metadata of every generated image
(``harmon generate``, ``edit``, ``batch`` and the server write the same keys), PNG encoding, grids, and
the folder layouts that the benchmarks' scorers read.

PNG metadata (text chunks, readable by any PNG tool):
    ``prompt``, ``seed``, the resolved :class:`~harmon.settings.GenerationSettings` under their own names
    (``guidance_scale``, ``cfg_schedule``, ``temperature``, ``num_iter``, ``num_steps``, ``fast``,
    ``height``, ``width``, ``vae_tile``), ``model``, ``model_path``, ``dtype``, ``quantization`` (``int8``
    for int8 weights, else None), ``harmon_version``,
    ``software``; for edits also :data:`EDIT_KEYS`; for batch runs :data:`BATCH_KEYS`; for images chosen by
    self-check (``self_check`` > 1) :data:`SELF_CHECK_KEYS`; and ``parameters``:
    all of it as one JSON string. A key whose value is None is left out of the text chunks (``parameters``
    keeps the null). Grids of several images carry :func:`grid_metadata`.
"""
from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

from PIL import Image
from PIL.PngImagePlugin import PngInfo

from .settings import GenerationSettings

EDIT_KEYS = ("edit_mode", "source_image", "known_tokens", "generated_tokens")
BATCH_KEYS = ("index", "sample")
# which candidate self-check kept, the seed that draws it alone, and every candidate's score
SELF_CHECK_KEYS = ("chosen_candidate", "candidate_seed", "self_check_scores")
_PNG_END = b"\x00\x00\x00\x00IEND\xaeB`\x82"  # the last 12 bytes of every complete PNG file


def image_metadata(prompt: str, seed: int | None, settings: GenerationSettings, model,
                   model_path: str | os.PathLike, extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The metadata of one generated image (see the module docstring): ``settings`` as resolved by the
    pipeline, ``model`` the :class:`~harmon.models.harmon.Harmon` that drew it, ``extra`` the edit's, the
    batch item's or the self-check's keys (:data:`EDIT_KEYS`, :data:`BATCH_KEYS`, :data:`SELF_CHECK_KEYS`)."""
    from . import __version__

    extra = dict(extra or {})
    unknown = set(extra) - set(EDIT_KEYS) - set(BATCH_KEYS) - set(SELF_CHECK_KEYS)
    if unknown:
        raise ValueError(f"not keys of the image metadata: {sorted(unknown)}")
    meta = {"prompt": prompt, "seed": seed, **settings.to_dict(), **extra, "model": model.config.name,
            "model_path": str(model_path), "dtype": str(model.dtype).split(".")[-1],
            "quantization": model.quantization,
            "harmon_version": __version__, "software": f"harmon {__version__}"}
    meta["parameters"] = json.dumps(meta, sort_keys=True, default=str)
    return meta


def grid_metadata(prompt: str, seeds, model_name: str) -> dict[str, Any]:
    """The metadata of a grid of one prompt's images (``harmon generate --grid``, DPG-Bench's 2x2 grids): the
    prompt, the images' seeds in grid order (comma-separated), the model's name and the software."""
    from . import __version__

    return {"prompt": prompt, "seeds": ",".join(str(seed) for seed in seeds), "model": model_name,
            "harmon_version": __version__, "software": f"harmon {__version__}"}


def edit_details(mode: str, region, source_image: str | None = None) -> dict[str, Any]:
    """The :data:`EDIT_KEYS` of an edit: its mode (inpaint, outpaint, variation, ...), the source image's
    name, and how many of the :class:`~harmon.pipelines.KnownRegion`'s tokens were kept and drawn."""
    known = int(region.known.sum())
    return {"edit_mode": mode, "source_image": source_image, "known_tokens": known,
            "generated_tokens": int(region.known.numel()) - known}


def png_bytes(image: Image.Image, text: Mapping[str, Any]) -> bytes:
    """The PNG encoding of ``image`` with ``text`` as text chunks (None values left out)."""
    info = PngInfo()
    for key, value in text.items():
        if value is not None:
            info.add_text(key, json.dumps(value) if isinstance(value, (list, dict)) else str(value))
    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


def png_complete(path: Path) -> bool:
    """Whether ``path`` is a whole PNG file (signature and the final IEND chunk), without decoding it."""
    try:
        with open(path, "rb") as fh:
            if fh.read(8) != b"\x89PNG\r\n\x1a\n":
                return False
            fh.seek(-len(_PNG_END), os.SEEK_END)
            return fh.read() == _PNG_END
    except OSError:
        return False


def make_grid(images: Sequence[Image.Image], columns: int | None = None) -> Image.Image:
    """All images on one canvas, image k at column k % columns, row k // columns (default columns:
    ceil(sqrt(n)))."""
    n = len(images)
    if columns is None:
        columns = 1
        while columns * columns < n:
            columns += 1
    rows = (n + columns - 1) // columns
    w, h = max(im.width for im in images), max(im.height for im in images)
    grid = Image.new("RGB", (columns * w, rows * h), (0, 0, 0))
    for k, im in enumerate(images):
        grid.paste(im.convert("RGB"), ((k % columns) * w, (k // columns) * h))
    return grid


# -- benchmark layouts ------------------------------------------------------------------------------
BENCHMARKS = ("geneval", "dpg", "wise")


def item_paths(out_dir: Path, index: int, name: str | None, k: int, benchmark: str | None) -> tuple[Path, Path]:
    """(png, sidecar json) of image ``k`` of prompt ``index`` (the benchmark's ``name`` of it: DPG-Bench's
    item id, WISE's prompt_id) in the layout of ``benchmark`` (None: ours):

    default   ``OUT/<i:05d>_<k:02d>.png`` + ``.json``
    geneval   ``OUT/<i:05d>/samples/<k:04d>.png`` + ``OUT/<i:05d>/meta/<k:04d>.json`` (and
              :func:`geneval_metadata_path`)
    dpg       ``OUT/samples/<name>_<k>.png`` + ``OUT/meta/<name>_<k>.json`` (and :func:`dpg_grid_path`)
    wise      ``OUT/images/<name>.png`` + ``OUT/meta/<name>.json``
    """
    if benchmark == "geneval":
        folder = out_dir / f"{index:05d}"
        return folder / "samples" / f"{k:04d}.png", folder / "meta" / f"{k:04d}.json"
    if benchmark == "dpg":
        return out_dir / "samples" / f"{name}_{k}.png", out_dir / "meta" / f"{name}_{k}.json"
    if benchmark == "wise":
        return out_dir / "images" / f"{name}.png", out_dir / "meta" / f"{name}.json"
    return out_dir / f"{index:05d}_{k:02d}.png", out_dir / f"{index:05d}_{k:02d}.json"


def geneval_metadata_path(out_dir: Path, index: int) -> Path:
    """GenEval's ``OUT/<i:05d>/metadata.jsonl``: the prompt's JSON object, one line."""
    return out_dir / f"{index:05d}" / "metadata.jsonl"


def dpg_grid_path(out_dir: Path, name: str) -> Path:
    """Where DPG-Bench's scorer reads the 2x2 grid of a prompt's four images: ``OUT/images/<name>.png``."""
    return out_dir / "images" / f"{name}.png"
