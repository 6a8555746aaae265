"""Probe (issue 26, item 3): where a shapes model's washed-out noisy frames come from (docs/shapes.md, "Noisy
frames").

Draws the prompts of ``noisy_frames.py`` (world.make_prompts(N, 777), seed 1000 + i, default settings) with MODEL
(default: the shipped model) and prints:
- how far the latent tokens of noisy and clean frames lie from the nearest token of the rendered truth of the
  same prompts (and the truth's own tokens from their nearest other), and from the token of an empty canvas at
  the same position;
- what the VAE makes of an empty canvas (its latent decoded: share of pale pixels) and of rendered scenes whose
  latents get Gaussian noise added, and the smallest group variance entering the decoder's first GroupNorms for
  an empty canvas against a scene.

    .venv/bin/python scripts/probes/noisy_latents.py N [MODEL]
"""
from __future__ import annotations

import sys

import numpy as np
import torch
from PIL import Image

from harmon.pipelines import TextToImagePipeline
from harmon.processing import image_to_tensor, tensor_to_pil
from harmon.settings import GenerationSettings
from harmon.shapes import world
from noisy_frames import NOISY_SHARE, pale_share


def group_variances(model, latents: torch.Tensor, layers: int = 4) -> list[float]:
    """The smallest per-group variance entering each of the first ``layers`` GroupNorms of the VAE decoder
    (the middle block's) while decoding ``latents``."""
    found = []

    def hook(module, inputs, output):
        x = inputs[0]
        found.append(float(x.reshape(x.shape[0], module.num_groups, -1).var(-1, unbiased=False).min()))

    norms = [m for m in model.vae.decoder.modules() if isinstance(m, torch.nn.GroupNorm)][:layers]
    handles = [m.register_forward_hook(hook) for m in norms]
    try:
        model.decode(latents)
    finally:
        for handle in handles:
            handle.remove()
    return found


@torch.no_grad()
def main() -> None:
    n = int(sys.argv[1])
    pipe = TextToImagePipeline.from_pretrained(sys.argv[2] if len(sys.argv) > 2 else None)
    model = pipe.model
    scenes = world.sample_scenes(n, world.make_rng(777, "eval_prompts"), 64)  # the scenes of make_prompts(n, 777)
    prompts = [scene.prompt for scene in scenes]
    assert prompts == [p["prompt"] for p in world.make_prompts(n, 777, 64)]

    shares, tokens = [], []
    for start in range(0, n, 8):
        batch = prompts[start:start + 8]
        last = {}
        out = pipe(batch, GenerationSettings(), seeds=list(range(1000 + start, 1000 + start + len(batch))),
                   progress=False, callback=lambda info: last.update(tokens=info.tokens.clone()))
        shares += [pale_share(image) for image in out.images]
        tokens.append(last["tokens"])
    generated = torch.cat(tokens)                                      # (N, L, C)
    noisy = torch.from_numpy(np.array(shares) > NOISY_SHARE)
    truth = model.encode(torch.cat([image_to_tensor(world.render(scene), 64) for scene in scenes]))  # (N, h, w, C)
    empty_canvas = image_to_tensor(Image.new("RGB", (64, 64), world.BACKGROUND), 64)
    empty = model.encode(empty_canvas)[0].flatten(0, 1)                # (L, C)

    bank = truth.flatten(0, 2)
    nearest = torch.cdist(generated.flatten(0, 1), bank).min(1).values.view(n, -1)   # (N, L)
    own = torch.cdist(bank, bank).fill_diagonal_(float("inf")).min(1).values
    same_place = (generated - empty).norm(dim=-1)                      # (N, L): to the empty canvas's token there
    print(f"{int(noisy.sum())}/{n} noisy frames (pale share > {NOISY_SHARE})")
    for name, rows in (("noisy", noisy), ("clean", ~noisy)):
        if rows.any():
            print(f"  {name:<6} frames: distance to the nearest rendered token {nearest[rows].mean():.3f} "
                  f"(per-frame max {nearest[rows].max(1).values.mean():.3f}); to the empty canvas's token at the "
                  f"same position {same_place[rows].mean():.3f}")
    print(f"  rendered tokens to their nearest other: {own.mean():.3f}")

    print(f"empty canvas, its latent decoded: pale share {pale_share(tensor_to_pil(model.decode(empty.view(1, 8, 8, -1)))[0]):.3f}")
    g = torch.Generator().manual_seed(0)
    for std in (0.0, 0.2, 0.5, 0.8):
        images = tensor_to_pil(model.decode(truth + std * torch.randn(truth.shape, generator=g)))
        print(f"rendered latents + noise of std {std}: noisy frames {np.mean([pale_share(im) > NOISY_SHARE for im in images]):.3f}")
    scene = model.encode(image_to_tensor(world.render(scenes[0]), 64))
    empty_v, scene_v = group_variances(model, model.encode(empty_canvas)), group_variances(model, scene)
    print("smallest group variance entering the decoder's first GroupNorms, empty canvas / a scene: "
          + ", ".join(f"{a:.3f} / {b:.3f}" for a, b in zip(empty_v, scene_v)))

if __name__ == "__main__":
    main()
