"""Harmon CPU benchmarks: text-to-image, image-to-text, achieved GFLOP/s against the measured
matmul peak, peak memory, and the loading-memory check. One command:

    .venv/bin/python benchmarks/run.py [--quick] [--out benchmarks/results.json]

Every model has random weights drawn from a seeded ``torch.Generator`` (never the global RNG)
and loaded with ``harmon.checkpoint.load_state_dict``. Each (model, dtype) runs in its own
subprocess, so its peak resident memory (``ru_maxrss``) is its own and every ratio
(component / total, achieved / peak GFLOP/s) is measured inside one process within seconds.
What is measured lives beside this driver: generation.py (text-to-image, VAE decoding),
understanding.py (image-to-text), loading.py (loading memory), with harness.py, timers.py and
report.py. See benchmarks/README.md for what each number means.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from generation import text_to_image, vae_decode_check
from harness import (HERE, build_model, machine_info, measure_matmul_peak, rss_now, rss_peak, subprocess_json,
                     weights_bytes)
from loading import load_check, write_checkpoint
from report import print_report
from timers import Timers, install_timers
from understanding import image_to_text

VAE_CHECK_SIZE, VAE_CHECK_TILE = 1024, 32  # one large image, decoded whole and in 512-px tiles


def jobs(quick: bool) -> list[dict]:
    """The (model, dtype) runs: tiny at its full settings, Harmon-0.5B (and 1.5B) at reduced ones."""
    red = {"image_px": 256, "num_iter": 2, "num_steps": "10", "decode_tokens": 16, "extrapolate": True}
    out = [{"config": "tiny", "dtype": "float32", "image_px": 64, "num_iter": 64, "num_steps": "10",
            "decode_tokens": 16, "extrapolate": False},
           {"config": "harmon-0.5b", "dtype": "bfloat16", **red},
           {"config": "harmon-0.5b", "dtype": "float32", **red, "extrapolate": False}]
    if not quick:
        out.append({"config": "harmon-1.5b", "dtype": "bfloat16", **red})
    return out


def run_worker(spec: dict) -> dict:
    """One (config, dtype) in this process: build the random model, time text-to-image and image-to-text,
    and the matmul peak and load average at the start and end."""
    import torch

    from harmon.config import PRESETS

    torch.manual_seed(12345)  # nothing here uses the global RNG; set only so a stray use would be repeatable
    dtype = getattr(torch, spec["dtype"])
    res: dict = {"config": spec["config"], "dtype": spec["dtype"], "threads": torch.get_num_threads(),
                 "rss_after_import_bytes": rss_now(), "loadavg_start": os.getloadavg()}
    res["matmul_peak_gflops"] = measure_matmul_peak()
    peak = res["matmul_peak_gflops"][spec["dtype"]]

    config = PRESETS[spec["config"]]()
    t0 = time.perf_counter()
    model = build_model(config, dtype)
    res["build_s"] = time.perf_counter() - t0
    res["params"] = sum(p.numel() for p in model.parameters())
    res["weights_bytes"] = weights_bytes(model)
    res["rss_after_build_bytes"] = rss_now()
    parts = {"llm": model.llm, "mar_encoder": model.mar.encoder_blocks, "mar_decoder": model.mar.decoder_blocks,
             "diffusion_head": model.mar.diffloss.net, "vae": model.vae}
    res["params_by_part"] = {k: sum(p.numel() for p in m.parameters()) for k, m in parts.items()}

    timers = Timers()
    install_timers(model, timers)
    res.update(text_to_image(model, timers, spec, peak))
    res["i2t"] = image_to_text(model, timers, spec, peak)
    res["peak_rss_bytes"] = rss_peak()
    res["loadavg_end"] = os.getloadavg()
    res["matmul_peak_gflops_end"] = measure_matmul_peak()
    res["matmul_peak_gflops_best"] = {k: max(v, res["matmul_peak_gflops_end"][k])
                                      for k, v in res["matmul_peak_gflops"].items()}
    # "% peak" against the best peak this process saw (start or end): the hardware limit, not a busy moment
    ref = res["matmul_peak_gflops_best"][spec["dtype"]]
    for c in list(res["t2i"]["components"].values()) + [res["t2i"]["transformer_parts"]]:
        if c.get("gflops"):
            c["pct_of_peak"] = 100 * c["gflops"] / ref
    res["i2t"]["prefill_pct_of_peak"] = 100 * res["i2t"]["prefill_gflops"] / ref
    return res


def run_all(args: argparse.Namespace) -> dict:
    """Every job in its own subprocess, then the loading check and the VAE decoding check."""
    t_start = time.perf_counter()
    r = {"machine": machine_info(), "command": " ".join([Path(sys.executable).name] + sys.argv),
         "matmul_peak_gflops": measure_matmul_peak(), "runs": []}
    for spec in jobs(args.quick):
        print(f"running {spec['config']} {spec['dtype']} ...", file=sys.stderr, flush=True)
        out = subprocess_json(["--worker", json.dumps(spec)], timeout=args.timeout)
        out["spec"] = spec
        r["runs"].append(out)
    if not args.no_load_check:
        name = "harmon-0.5b" if args.quick else "harmon-1.5b"
        folder = Path(args.cache_dir) / f"{name}-random-bfloat16"
        print(f"loading check {name} bfloat16 ({folder}) ...", file=sys.stderr, flush=True)
        lc = {"config": name, "dtype": "bfloat16", "folder": str(folder)}
        if not (folder / "model.safetensors").is_file():
            lc["writer"] = subprocess_json(["--write-checkpoint", name, str(folder), "bfloat16"], timeout=600)
        lc.update(subprocess_json(["--load-check", str(folder), "bfloat16"], timeout=600))
        r["load_check"] = lc
    r["vae_decode"] = []
    for tile in (0, VAE_CHECK_TILE):
        print(f"VAE decoding {VAE_CHECK_SIZE} px, {'whole' if tile == 0 else f'tiles of {tile} cells'} ...",
              file=sys.stderr, flush=True)
        r["vae_decode"].append(subprocess_json(["--vae-check", str(VAE_CHECK_SIZE), str(tile), "float32"],
                                               timeout=600))
    r["matmul_peak_gflops_end"] = measure_matmul_peak()
    r["wall_s"] = time.perf_counter() - t_start
    return r


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny + Harmon-0.5B only (load check on 0.5B)")
    p.add_argument("--out", default=str(HERE / "results.json"), help="JSON results file")
    p.add_argument("--cache-dir", default=os.path.join(tempfile.gettempdir(), "harmon-bench"),
                   help="where the random-weight checkpoint for the loading check is written (reused if present)")
    p.add_argument("--no-load-check", action="store_true")
    p.add_argument("--timeout", type=float, default=900, help="seconds allowed per model subprocess")
    # one measurement in this (fresh) process, printed as one JSON line: how run_all runs each part
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--write-checkpoint", nargs="+", help=argparse.SUPPRESS)  # NAME DIR DTYPE [LAYOUT]
    p.add_argument("--load-check", nargs=2, help=argparse.SUPPRESS)
    p.add_argument("--vae-check", nargs=3, help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.worker:
        print(json.dumps(run_worker(json.loads(args.worker))))
        return 0
    if args.write_checkpoint:
        name, folder, *rest = args.write_checkpoint
        print(json.dumps(write_checkpoint(name, Path(folder), *rest)))
        return 0
    if args.load_check:
        print(json.dumps(load_check(*args.load_check)))
        return 0
    if args.vae_check:
        size, tile, dtype_name = args.vae_check
        print(json.dumps(vae_decode_check(int(size), int(tile), dtype_name)))
        return 0

    r = run_all(args)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(r, indent=1, default=str) + "\n")
    print_report(r)
    print(f"results written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
