"""Eager against ``torch.compile`` (``Harmon.compile_for_sampling``) on the shipped shapes model.

Times batches of 8 images at the default settings and in the fast mode, eager then compiled, in
one process (best of ``--repeats`` batches each, the same seeds for both), and reports the
speed-ups, the cold compilation time (a fresh inductor cache, so nothing is reused from earlier
runs) and the largest pixel difference between the eager and compiled images.

    .venv/bin/python benchmarks/compile.py [--repeats 3] [--out compile.json]

About 2 minutes on the 2-core CPU machine when nothing else runs.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

PROMPTS = ["a red circle to the left of a blue square", "two green triangles", "a purple square",
           "a yellow circle and an orange triangle"] * 2


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=3, help="timed batches per setting (the fastest counts)")
    p.add_argument("--out", default=None, metavar="FILE.json", help="also write the results here")
    args = p.parse_args(argv)
    if args.repeats < 1:
        p.error(f"--repeats must be >= 1, got {args.repeats}")
    cache = tempfile.TemporaryDirectory(prefix="harmon-inductor-")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache.name  # before torch is imported: a cold compilation

    import torch

    from harmon.pipelines import TextToImagePipeline
    from harmon.settings import GenerationSettings

    pipe = TextToImagePipeline.from_pretrained(None, dtype=torch.float32)
    model = pipe.model

    def batch(fast: bool, first_seed: int) -> tuple[float, torch.Tensor]:
        start = time.perf_counter()
        out = pipe(PROMPTS, GenerationSettings(fast=fast), seeds=range(first_seed, first_seed + len(PROMPTS)),
                   progress=False, output_type="pt")
        return time.perf_counter() - start, out.images

    settings = {"default": False, "fast": True}
    seeds = [8 * k for k in range(args.repeats)]
    for fast in settings.values():
        batch(fast, 1000)  # warm-up
    eager = {name: [batch(fast, s) for s in seeds] for name, fast in settings.items()}
    model.compile_for_sampling()
    compile_s = {}
    for name, fast in settings.items():  # the first compiled batches compile (the fast mode: new step counts)
        compile_s[name] = batch(fast, 1000)[0]
    compiled = {name: [batch(fast, s) for s in seeds] for name, fast in settings.items()}

    rows = {}
    for name in settings:
        t_eager = min(t for t, _ in eager[name])
        t_compiled = min(t for t, _ in compiled[name])
        diff = max((a - b).abs().max().item() for (_, a), (_, b) in zip(eager[name], compiled[name]))
        rows[name] = {"eager_s": t_eager, "compiled_s": t_compiled, "speedup": t_eager / t_compiled,
                      "first_compiled_batch_s": compile_s[name], "max_pixel_diff": diff}
    base = rows["default"]["eager_s"]
    result = {"model": model.config.name, "images_per_batch": len(PROMPTS), "threads": torch.get_num_threads(),
              "torch": torch.__version__, "loadavg": os.getloadavg(), "settings": rows,
              "fast_compiled_vs_default_eager": base / rows["fast"]["compiled_s"]}

    print(f"{'settings':<10} {'eager s':>8} {'compiled s':>11} {'speed-up':>9} {'first compiled s':>17} "
          f"{'max pixel diff':>15}")
    for name, r in rows.items():
        print(f"{name:<10} {r['eager_s']:>8.3f} {r['compiled_s']:>11.3f} {r['speedup']:>8.2f}x "
              f"{r['first_compiled_batch_s']:>17.1f} {r['max_pixel_diff']:>15.1e}")
    print(f"fast + compiled against default eager: {result['fast_compiled_vs_default_eager']:.2f}x "
          f"(batches of {len(PROMPTS)} 64-px images, {torch.get_num_threads()} threads)")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
    cache.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
