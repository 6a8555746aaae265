"""A run's work: its items (one image each) and their files, the blocks each rank draws, which items are
done, and the files around the images (folders, GenEval's ``metadata.jsonl``, DPG-Bench's grids)."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from ..files import remove_stale_temps, write_atomically
from ..outputs import (dpg_grid_path, geneval_metadata_path, grid_metadata, item_paths, make_grid, png_bytes,
                       png_complete)
from .options import Shard
from .prompts import PromptRecord


@dataclass(frozen=True)
class Item:
    """Image ``k`` of prompt ``index``; ``number`` = index * K + k; seed = S + number."""

    index: int
    k: int
    number: int
    seed: int
    png: Path
    meta: Path


def work_items(prompts: Sequence[PromptRecord], out_dir: Path, *, seed: int, num_images: int,
               benchmark: str | None = None) -> list[Item]:
    """Every image of the run in order (prompt by prompt), with its seed and files in ``benchmark``'s layout."""
    items = []
    for p in prompts:
        for k in range(num_images):
            number = p.index * num_images + k
            items.append(Item(p.index, k, number, seed + number, *item_paths(out_dir, p.index, p.name, k, benchmark)))
    return items


def blocks_for_rank(items: Sequence[Item], batch_size: int, shard: Shard) -> list[list[Item]]:
    """This rank's blocks: block b = items[b*B:(b+1)*B] belongs to rank b % world_size."""
    blocks = [list(items[s:s + batch_size]) for s in range(0, len(items), batch_size)]
    return [block for b, block in enumerate(blocks) if b % shard.world_size == shard.rank]


def read_json(path: Path) -> Any:
    """The JSON value in ``path``, or None when it is missing or not JSON."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def item_done(item: Item, prompt: str, settings: Mapping[str, Any] | None = None) -> bool:
    """Whether the image of ``item`` was finished: its sidecar names this prompt, seed (and ``settings``, if
    given), and its PNG is whole."""
    meta = read_json(item.meta)
    return (isinstance(meta, dict) and meta.get("seed") == item.seed and meta.get("prompt") == prompt
            and meta.get("index") == item.index and meta.get("sample") == item.k
            and (settings is None or meta.get("settings") == settings) and png_complete(item.png))


def prepare_folders(out: Path, records: Sequence[PromptRecord], mine: list[list[Item]],
                    benchmark: str | None) -> None:
    """Create this rank's folders, remove stale temporary files of its items (and DPG-Bench grids), write
    GenEval's metadata.jsonl (by the owner of each prompt's first image)."""
    owned: dict[Path, set[str]] = {}

    def own(path: Path) -> None:
        owned.setdefault(path.parent, set()).add(path.name)

    for block in mine:
        for it in block:
            own(it.png)
            own(it.meta)
            if benchmark == "dpg":
                own(dpg_grid_path(out, records[it.index].name))
            if benchmark == "geneval" and it.k == 0:
                own(geneval_metadata_path(out, it.index))
    for folder, names in owned.items():
        folder.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(folder, names)
    if benchmark == "geneval":
        for index in sorted({it.index for block in mine for it in block if it.k == 0}):
            _write_geneval_metadata(geneval_metadata_path(out, index), records[index].record)


def _write_geneval_metadata(path: Path, record: dict[str, Any]) -> None:
    """GenEval's ``metadata.jsonl``: the prompt's JSON object on one line (rewritten only when it differs)."""
    data = (json.dumps(record) + "\n").encode()
    try:
        same = path.read_bytes() == data
    except OSError:
        same = False
    if not same:
        write_atomically(path, data)


def write_dpg_grids(out: Path, records: Sequence[PromptRecord], mine: list[list[Item]], settings: Mapping[str, Any],
                    fresh: set[Path], emit: Callable[[str], None]) -> None:
    """DPG-Bench's 2x2 grid of each of this rank's prompts whose four images are done (image k at column
    k % 2, row k // 2), written when missing or when one of its images is in ``fresh`` (drawn in this run)."""
    from PIL import Image

    by_prompt: dict[int, list[Item]] = {}
    for block in mine:  # a batch size that is a multiple of 4 keeps a prompt's images in one block
        for it in block:
            by_prompt.setdefault(it.index, []).append(it)
    for index, items in by_prompt.items():
        prompt = records[index]
        grid = dpg_grid_path(out, prompt.name)
        if not all(item_done(it, prompt.prompt, settings) for it in items):
            continue
        if png_complete(grid) and not fresh & {it.png for it in items}:
            continue
        tiles = []
        for it in sorted(items, key=lambda it: it.k):
            with Image.open(it.png) as tile:
                tiles.append(tile.convert("RGB"))
        text = grid_metadata(prompt.prompt, [it.seed for it in sorted(items, key=lambda it: it.k)], settings["model"])
        write_atomically(grid, png_bytes(make_grid(tiles, columns=2), text))
        emit(str(grid))
