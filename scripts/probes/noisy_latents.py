"""Probe (issue 26, item 3): what the shipped model's noisy frames look like in latent space.

Draws the prompts of ``noisy_frames.py`` (world.make_prompts(N, 777), seed 1000 + i, the model's defaults unless
given as JSON) and, for each image, records its border standard deviation (the noisy-frame measure) and the
latent tokens it was decoded from; the same statistics are taken of the rendered truth of the same prompts
(VAE-encoded). Prints, for noisy and clean images apart: token norms (mean, max), the spread of the background
tokens (the outer ring of latent cells) and the tokens sampled at the first MAR iteration.

    .venv/bin/python scripts/probes/noisy_latents.py N ['{"guidance_scale": 1.0}']
"""
from __future__ import annotations

import json
import sys

import numpy as np
import torch

from harmon.pipelines import TextToImagePipeline
from harmon.processing import image_to_tensor
from harmon.settings import GenerationSettings
from harmon.shapes import world
from noisy_frames import border_std

THRESHOLD = 12  # border std above which a frame counts as noisy (noisy_frames.py)


def ring(tokens: torch.Tensor) -> torch.Tensor:
    """tokens (B, h, w, C) -> (B, n_ring, C): the outer ring of latent cells (the background in this world)."""
    b, h, w, c = tokens.shape
    keep = torch.zeros(h, w, dtype=torch.bool)
    keep[0], keep[-1], keep[:, 0], keep[:, -1] = True, True, True, True
    return tokens[:, keep]


def stats(name: str, tokens: torch.Tensor, first: torch.Tensor | None = None) -> None:
    norms = tokens.norm(dim=-1).flatten(1)                      # (B, L)
    bg = ring(tokens)
    bg_spread = (bg - bg.mean(dim=1, keepdim=True)).norm(dim=-1).mean(dim=1)  # (B,)
    line = (f"{name:<16} n={tokens.shape[0]:<3} token norm mean {norms.mean():.2f} max {norms.max(1).values.mean():.2f}"
            f" | background spread {bg_spread.mean():.2f} (per image min {bg_spread.min():.2f}"
            f" max {bg_spread.max():.2f})")
    if first is not None:
        line += f" | first-step tokens norm {first.norm(dim=-1).mean():.2f}"
    print(line)


def main() -> None:
    n = int(sys.argv[1])
    chosen = json.loads(sys.argv[2]) if len(sys.argv) > 2 else {}
    pipe = TextToImagePipeline.from_pretrained(None)
    model = pipe.model
    scenes = world.sample_scenes(n, world.make_rng(777, "eval_prompts"), 64)  # the scenes of make_prompts(n, 777)
    prompts = [scene.prompt for scene in scenes]
    assert prompts == [p["prompt"] for p in world.make_prompts(n, 777, 64)]
    stds, finals, firsts = [], [], []
    for start in range(0, n, 8):
        batch = prompts[start:start + 8]
        captured = {}

        def keep(info, captured=captured):
            if info.step == 0:
                captured["first"] = info.sampled.view(len(batch), -1, info.sampled.shape[-1]).clone()
            captured["tokens"] = info.tokens.clone()

        out = pipe(batch, GenerationSettings(**chosen), seeds=list(range(1000 + start, 1000 + start + len(batch))),
                   progress=False, callback=keep)
        stds += [border_std(image) for image in out.images]
        h = w = int(captured["tokens"].shape[1] ** 0.5)
        finals.append(captured["tokens"].view(len(batch), h, w, -1))
        firsts.append(captured["first"])
    stds, finals, firsts = np.array(stds), torch.cat(finals), torch.cat(firsts)
    noisy = torch.from_numpy(stds > THRESHOLD)
    print(f"{chosen or 'defaults'}: {int(noisy.sum())}/{n} noisy (border std > {THRESHOLD})")
    stats("noisy", finals[noisy], firsts[noisy])
    stats("clean", finals[~noisy], firsts[~noisy])
    with torch.no_grad():
        truth = model.encode(torch.cat([image_to_tensor(world.render(scene), 64) for scene in scenes]))
    stats("rendered truth", truth)


if __name__ == "__main__":
    main()
