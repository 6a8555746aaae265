"""Loading memory: stream a random checkpoint to disk (one tensor in memory at a time), in our layout or the
Hugging Face release's, then load it in a fresh process and compare the peak memory with the weights."""
from __future__ import annotations

import json
import math
import os
import struct
import time
from pathlib import Path

from harness import init_tensor, rss_now, rss_peak, weights_bytes

SAFETENSORS_DTYPES = {"bfloat16": "BF16", "float32": "F32"}
TARGET_MAX_RATIO = 1.2  # peak resident memory over the weights' size that loading may reach


def write_checkpoint(config_name: str, folder: Path, dtype_name: str, layout: str = "ours", seed: int = 0) -> dict:
    """Write config.json + model.safetensors tensor by tensor (one tensor in memory at a time), in our layout
    (the tied head stored once) or the Hugging Face release's (its config.json, the head beside the embedding)."""
    import torch
    from harmon.checkpoint import EMBED_KEY, TIED_KEY, expected_keys
    from harmon.config import PRESETS
    from harmon.release import release_config

    config = PRESETS[config_name]()
    dtype = getattr(torch, dtype_name)
    shapes = {k: s for k, s in expected_keys(config).items()
              if layout == "release" or not (config.llm.get("tie_word_embeddings") and k == TIED_KEY)}
    blob, offset = _safetensors_header(shapes, dtype_name, dtype.itemsize)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / "model.safetensors.tmp"
    g = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        embedding = None
        for k, s in shapes.items():
            tied = k == TIED_KEY and embedding is not None
            t = embedding if tied else init_tensor(k, tuple(s), g, dtype).contiguous()
            f.write(t.view(torch.uint8).numpy().data if t.numel() else b"")
            if k == EMBED_KEY and TIED_KEY in shapes:
                embedding = t  # the release stores the tied head: the same values again
            del t
    os.replace(tmp, folder / "model.safetensors")
    written = release_config(config, dtype_name) if layout == "release" else config.to_dict()
    (folder / "config.json").write_text(json.dumps(written, indent=1) + "\n")
    return {"write_s": time.perf_counter() - t0, "file_bytes": (folder / "model.safetensors").stat().st_size,
            "data_bytes": offset, "writer_peak_rss_bytes": rss_peak()}


def _safetensors_header(shapes: dict, dtype_name: str, itemsize: int) -> tuple[bytes, int]:
    """The safetensors JSON header (padded to 8 bytes) of tensors stored back to back, and their bytes."""
    header, offset = {"__metadata__": {"format": "pt", "model_type": "harmon"}}, 0
    for k, s in shapes.items():
        nbytes = math.prod(s) * itemsize
        header[k] = {"dtype": SAFETENSORS_DTYPES[dtype_name], "shape": list(s),
                     "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    return blob + b" " * (-len(blob) % 8), offset


def _rss_split() -> dict:
    """This process's resident memory split into anonymous and file-backed bytes."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.split(":")[0] in ("RssAnon", "RssFile"):
            out[line.split(":")[0]] = int(line.split()[1]) * 1024
    return out


def load_check(folder: str, dtype_name: str) -> dict:
    """In a fresh process: load_model(folder, dtype) and report peak RSS against the weights' size."""
    import torch

    import harmon.checkpoint as ckpt

    base = rss_now()
    t0 = time.perf_counter()
    model = ckpt.load_model(folder, dtype=getattr(torch, dtype_name))
    dt = time.perf_counter() - t0
    wb = weights_bytes(model)
    peak_load, split_load = rss_peak(), _rss_split()
    # load_model may leave the tensors memory-mapped from the file and not yet read: touch every
    # byte (as the first forward pass would) and measure again
    t0 = time.perf_counter()
    with torch.no_grad():
        for t in list(model.parameters()) + list(model.buffers()):
            float(t.sum())
    touch = time.perf_counter() - t0
    peak = rss_peak()
    return {"load_s": dt, "touch_all_weights_s": touch, "weights_bytes": wb, "rss_before_load_bytes": base,
            "peak_rss_after_load_bytes": peak_load, "rss_split_after_load_bytes": split_load,
            "peak_rss_bytes": peak, "rss_after_touch_bytes": rss_now(), "rss_split_after_touch_bytes": _rss_split(),
            "peak_over_weights": peak / wb, "peak_minus_base_over_weights": (peak - base) / wb,
            "target_max_ratio": TARGET_MAX_RATIO}
