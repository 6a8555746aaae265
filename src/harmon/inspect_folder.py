"""What a model folder holds, read from its config.json and the weights' headers, without building the model
(``harmon info``)."""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

from .checkpoint import (EMBED_KEY, LAYOUTS, TIED_KEY, config_layout, folder_weights_path, read_config, read_json,
                         weight_headers)
from .errors import InputError
from .hub import TOKENIZER_FILES, has_tokenizer

PARTS = ("vae", "llm", "mar", "proj_in", "proj_out")


def folder_info(folder: str | os.PathLike) -> dict[str, Any]:
    """The facts of a local model folder as JSON values: ``folder``, ``config`` (its name), ``layout``,
    ``weights`` (file name) and their stored ``dtypes``, ``parameters`` per part of :data:`PARTS` (a tied
    output head counted once), ``other`` (parameters outside those parts), ``total``, ``tokenizer`` (the
    file of a saved tokenizer, None when the built-in one is used) and the LLM's ``vocab_size``."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"not a folder: {folder}")
    if not (folder / "config.json").is_file():
        raise InputError(f"{folder} is not a model folder: it has no config.json")
    raw = read_json(folder / "config.json")
    config = read_config(folder)
    weights = folder_weights_path(folder)
    shapes, dtypes = weight_headers(weights)
    tied = bool(config.llm.get("tie_word_embeddings", False))
    counts = {part: 0 for part in PARTS}
    other = 0
    for key, shape in shapes.items():
        if tied and key == TIED_KEY and EMBED_KEY in shapes:
            continue  # one tensor serves both
        part = key.split(".", 1)[0]
        if part in counts:
            counts[part] += math.prod(shape)
        else:
            other += math.prod(shape)
    tokenizer = next((name for name in TOKENIZER_FILES if (folder / name).is_file()), None)
    return {"folder": str(folder), "config": config.name, "layout": LAYOUTS[config_layout(raw)],
            "weights": weights.name, "dtypes": sorted(set(dtypes.values())), "parameters": counts, "other": other,
            "total": sum(counts.values()) + other, "tokenizer": tokenizer if has_tokenizer(folder) else None,
            "vocab_size": int(config.llm["vocab_size"])}
