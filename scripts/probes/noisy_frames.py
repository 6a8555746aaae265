"""Probe (issue 26, item 3): how often does a shapes model draw a washed-out noisy frame?

A frame is counted as noisy when more than a quarter of its pixels are "pale": off the background colour by
more than 12 but less than 80 (RGB distance). A clean scene is background and solid colours, pale only at
object edges (at most 1.5% of the pixels of 48 rendered scenes); the washed-out frames seen are 60-90% pale.
(An earlier version counted frames whose outer 4-pixel ring varied (std > 12): that also counts every
object touching the border, 8% of rendered truth, and overstated the share several-fold.)

Prompts are world.make_prompts(N, 777); image i gets seed 1000 + i; the model's default settings unless given
as JSON (GenerationSettings' fields); MODEL a model folder (default: the shipped model).

    .venv/bin/python scripts/probes/noisy_frames.py N ['{"temperature": 0.7}'] [MODEL]
"""
from __future__ import annotations

import json
import sys
import time

import numpy as np

from harmon.pipelines import TextToImagePipeline
from harmon.settings import GenerationSettings
from harmon.shapes import world

PALE_BAND = (12, 80)
NOISY_SHARE = 0.25


def pale_share(image) -> float:
    """The share of pixels whose RGB distance to the world's background lies inside PALE_BAND."""
    a = np.asarray(image, dtype=np.float32)
    distance = np.linalg.norm(a - np.array(world.BACKGROUND, dtype=np.float32), axis=-1)
    return float(((distance > PALE_BAND[0]) & (distance < PALE_BAND[1])).mean())


def main() -> None:
    n = int(sys.argv[1])
    chosen = json.loads(sys.argv[2]) if len(sys.argv) > 2 else {}
    model = sys.argv[3] if len(sys.argv) > 3 else None
    settings = GenerationSettings(**chosen)
    pipe = TextToImagePipeline.from_pretrained(model)
    prompts = [p["prompt"] for p in world.make_prompts(n, 777, 64)]
    start, shares = time.perf_counter(), []
    for first in range(0, n, 8):
        batch = prompts[first:first + 8]
        out = pipe(batch, settings, seeds=list(range(1000 + first, 1000 + first + len(batch))), progress=False)
        shares += [pale_share(image) for image in out.images]
    shares = np.array(shares)
    noisy = shares > NOISY_SHARE
    share = float(noisy.mean())
    print(f"{model or 'shipped model'} {chosen or 'defaults'}: n={n}, noisy frames (pale share > {NOISY_SHARE}): "
          f"{int(noisy.sum())} = {share:.3f} +- {np.sqrt(share * (1 - share) / n):.3f}; mean pale share "
          f"{shares.mean():.4f}; noisy prompts (seed): "
          + ", ".join(f"{prompts[i]!r} ({1000 + i})" for i in np.flatnonzero(noisy)))
    print(f"{time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
