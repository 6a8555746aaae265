"""Probe (issue 26, item 3): how often does the shipped shapes model draw a washed-out noisy frame?

A frame is counted as noisy when the standard deviation of its outer 4-pixel ring exceeds a threshold (a clean
scene has a plain background there: about 1 on the 0-255 scale; the noisy frames seen were 17-24). Prompts
are world.make_prompts(N, 777); image i gets seed 1000 + i; the model's default settings unless given as JSON
(GenerationSettings' fields).

    .venv/bin/python scripts/probes/noisy_frames.py N ['{"temperature": 0.7}']
"""
from __future__ import annotations

import json
import sys
import time

import numpy as np

from harmon.pipelines import TextToImagePipeline
from harmon.settings import GenerationSettings
from harmon.shapes import world


def border_std(image) -> float:
    """Mean over channels of the pixel standard deviation in the outer 4-pixel ring."""
    a = np.asarray(image, dtype=np.float32)
    ring = np.concatenate([a[:4].reshape(-1, 3), a[-4:].reshape(-1, 3), a[:, :4].reshape(-1, 3),
                           a[:, -4:].reshape(-1, 3)])
    return float(ring.std(0).mean())


def main() -> None:
    n = int(sys.argv[1])
    chosen = json.loads(sys.argv[2]) if len(sys.argv) > 2 else {}
    settings = GenerationSettings(**chosen)
    pipe = TextToImagePipeline.from_pretrained(None)
    prompts = [p["prompt"] for p in world.make_prompts(n, 777, 64)]
    start, stds = time.perf_counter(), []
    for first in range(0, n, 8):
        batch = prompts[first:first + 8]
        out = pipe(batch, settings, seeds=list(range(1000 + first, 1000 + first + len(batch))), progress=False)
        stds += [border_std(image) for image in out.images]
    stds = np.array(stds)
    for threshold in (8, 12, 16):
        share = float((stds > threshold).mean())
        print(f"{chosen or 'defaults'}: n={n}, border std > {threshold}: {share:.3f} "
              f"+- {np.sqrt(share * (1 - share) / n):.3f}")
    print(f"{time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
