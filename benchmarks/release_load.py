"""Loading the Hugging Face release layout against loading our own model folder: time and peak memory.

Writes one random full-size model twice, in our layout (the tied LM head stored once) and in the
release's (its config.json; the head stored beside the embedding, as the release does), then loads each
with ``harmon.checkpoint.load_model`` in a fresh process and prints the load time and the peak resident
memory against the loaded weights' size, and the release's figures over ours.

    .venv/bin/python benchmarks/release_load.py [--config harmon-0.5b|harmon-1.5b] [--dtype bfloat16|float32]
        [--cache-dir DIR]

Checkpoints are written under --cache-dir (reused when present; 2 x 1.8 GB for 0.5B in bfloat16).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import subprocess_json  # noqa: E402  (run.py --write-checkpoint, --load-check in a fresh process)

GIB = 1024 ** 3


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", choices=["harmon-0.5b", "harmon-1.5b"], default="harmon-0.5b")
    p.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16",
                   help="stored and loaded dtype (loading casts to it while reading)")
    p.add_argument("--cache-dir", default=os.path.join(tempfile.gettempdir(), "harmon-bench"))
    args = p.parse_args(argv)
    rows = {}
    for layout in ("ours", "release"):
        folder = Path(args.cache_dir) / f"{args.config}-random-{args.dtype}-{layout}"
        if not (folder / "model.safetensors").is_file():
            print(f"writing {folder} ...", file=sys.stderr, flush=True)
            written = subprocess_json(["--write-checkpoint", args.config, str(folder), args.dtype, layout], 900)
            if "error" in written:
                print(written["error"], file=sys.stderr)
                return 1
        print(f"loading {layout} ...", file=sys.stderr, flush=True)
        rows[layout] = subprocess_json(["--load-check", str(folder), args.dtype], 900)
        if "error" in rows[layout]:
            print(rows[layout]["error"], file=sys.stderr)
            return 1
        rows[layout]["file_bytes"] = (folder / "model.safetensors").stat().st_size
    print(f"{args.config}, {args.dtype}, load_model in a fresh process")
    print(f"{'layout':<8} {'file GiB':>9} {'weights GiB':>12} {'load s':>7} {'peak RSS GiB':>13} {'peak/weights':>13}")
    for layout, r in rows.items():
        print(f"{layout:<8} {r['file_bytes'] / GIB:>9.2f} {r['weights_bytes'] / GIB:>12.2f} {r['load_s']:>7.1f} "
              f"{r['peak_rss_bytes'] / GIB:>13.2f} {r['peak_over_weights']:>13.2f}")
    ours, release = rows["ours"], rows["release"]
    print(f"release / ours: load time {release['load_s'] / ours['load_s']:.2f}x, "
          f"peak RSS {release['peak_rss_bytes'] / ours['peak_rss_bytes']:.2f}x")
    print(json.dumps({"config": args.config, "dtype": args.dtype, "rows": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
