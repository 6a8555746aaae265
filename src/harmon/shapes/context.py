"""How much a model's MAR decoder uses the tokens already drawn: the paired context measure.

MAR draws an image over several iterations, and the image is coherent only if each token
it draws depends on the tokens drawn before it. This measures that dependence directly,
on fresh shapes-world scenes: in every scene a fixed tenth of the latent tokens is scored
with the diffusion training loss (mse + vb, with the same timesteps and noise in every
column) while 0%, 30%, 60% and 90% of the other tokens are visible. Only the amount of the
image the model sees changes between the columns. A model that uses its context scores
lower as more becomes visible; flat columns mean that every token is predicted from what
the prompt alone says about its position. One more column scores the same tokens with
nothing visible and the prompt of another scene (the next one of the stream) in place of
their own: the prompt's use, as the other columns are the context's. A model that reads
its prompt scores lower with its own. Scored tokens are split into object tokens (more than
half of their pixels away from the background colour) and background tokens.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import InputError
from ..files import write_atomically
from ..processing import GENERATION_PREFIX, chat_prompt, image_to_tensor, tokenize_prompts
from ..rng import derive_seed
from . import world
from .eval_plan import DEFAULT_EVAL_SEED

VISIBLE_FRACTIONS = (0.0, 0.3, 0.6, 0.9)
KINDS = ("object", "background")


def object_tokens(image, stride: int) -> torch.Tensor:
    """(h*w,) bool, row-major: the stride x stride cells of a rendered scene whose pixels are mostly not background."""
    pixels = np.asarray(image, dtype=np.float32)  # (H, W, 3)
    away = np.abs(pixels - np.array(world.BACKGROUND, dtype=np.float32)).sum(axis=-1) > 60.0
    cells = F.avg_pool2d(torch.from_numpy(away.astype(np.float32))[None, None], stride)  # (1, 1, h, w)
    return (cells > 0.5).flatten()


@torch.no_grad()
def context_use(model, tokenizer, n_scenes: int = 128, seed: int = DEFAULT_EVAL_SEED, out_dir=None, *,
                fractions=VISIBLE_FRACTIONS, batch_size: int = 32, echo=print) -> dict[str, Any]:
    """The paired context measure on ``n_scenes`` fresh scenes (categories in turn, the ``eval_context`` stream).

    Returns (and, with ``out_dir``, writes to ``context.json``) the mean loss of the scored object and
    background tokens for each visible fraction in ``fractions`` (``{kind}_loss``) and with nothing
    visible under another scene's prompt (``{kind}_other_prompt_loss``), their counts, and a printable table.
    Each scene's token order, timesteps and noise are drawn from its own generator, so more scenes
    extend a shorter run. Puts ``model`` in eval mode (dropout off), as a measurement needs.
    """
    if n_scenes < 1:
        raise InputError(f"n_scenes must be >= 1, got {n_scenes}")
    if not fractions or any(not 0.0 <= f < 1.0 for f in fractions):
        raise InputError(f"visible fractions must lie in [0, 1), got {list(fractions)}")
    model.eval()
    sums = {kind: [0.0] * (len(fractions) + 1) for kind in KINDS}  # the last: nothing visible, another prompt
    counts = dict.fromkeys(KINDS, 0)
    for start in range(0, n_scenes, batch_size):
        index = range(start, min(n_scenes, start + batch_size))
        batch_sums, batch_counts, scored_count, length = _batch_losses(model, tokenizer, seed, index, fractions)
        for kind in KINDS:
            counts[kind] += batch_counts[kind]
            for i, value in enumerate(batch_sums[kind]):
                sums[kind][i] += value
    results = {
        "settings": {"model": getattr(model.config, "name", "?"), "seed": int(seed), "n_scenes": int(n_scenes),
                     "scored_per_scene": scored_count, "tokens_per_scene": length},
        "visible_fractions": [float(f) for f in fractions],
        "counts": counts,
        **{f"{kind}_loss": [s / max(1, counts[kind]) for s in sums[kind][:-1]] for kind in KINDS},
        **{f"{kind}_other_prompt_loss": sums[kind][-1] / max(1, counts[kind]) for kind in KINDS},
    }
    results["table"] = _table(results, n_scenes)
    if echo is not None:
        echo(results["table"])
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        write_atomically(out / "context.json", json.dumps(results, indent=1) + "\n")
    return results


def _scene(seed: int, j: int, size: int) -> world.Scene:
    """Scene j of the ``eval_context`` stream (categories in turn)."""
    return world.sample_scene(world.CATEGORIES[j % len(world.CATEGORIES)], world.make_rng(seed, "eval_context", j),
                              size)


def _prompt_ids(model, tokenizer, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) (B, T) of the generation prompts, on the model's device."""
    ids, text_mask = tokenize_prompts(tokenizer, [chat_prompt(GENERATION_PREFIX + p) for p in prompts],
                                      tokenizer.eos_token_id)
    return ids.to(model.device), text_mask.to(model.device)


def _batch_losses(model, tokenizer, seed: int, index: range, fractions) -> tuple[dict, dict, int, int]:
    """The scenes of ``index``: per kind the summed loss of its scored tokens in each column (the visible
    fractions, then nothing visible under the next scene's prompt), per kind the count of scored tokens,
    and the scored and total tokens per scene."""
    stride, size = model.config.mar.vae_stride, model.config.image_size
    head = model.mar.diffloss
    scenes = [_scene(seed, j, size) for j in index]
    images = [world.render(s) for s in scenes]
    pixels = torch.cat([image_to_tensor(image, size) for image in images])  # (B, 3, S, S)
    own = _prompt_ids(model, tokenizer, [s.prompt for s in scenes])
    other = _prompt_ids(model, tokenizer, [s.prompt for s in scenes[1:]] + [_scene(seed, index[-1] + 1, size).prompt])
    tokens = model.encode(pixels.to(device=model.device, dtype=model.dtype))  # (B, h, w, C)
    b, h, w, c = tokens.shape
    length, scored_count = h * w, max(1, h * w // 10)
    draws = [_scene_draws(seed, j, length, c, head.train_diffusion.num_timesteps) for j in index]
    orders = torch.stack([d[0] for d in draws]).to(model.device)                # (B, L)
    timesteps = torch.cat([d[1] for d in draws]).to(model.device)               # (B*L,)
    noise = torch.cat([d[2] for d in draws]).to(model.device, model.dtype)      # (B*L, C)
    scored = torch.zeros(b, length, dtype=torch.bool, device=model.device)
    scored.scatter_(1, orders[:, :scored_count], True)
    is_object = torch.stack([object_tokens(image, stride) for image in images]).to(model.device)
    picks = {"object": scored & is_object, "background": scored & ~is_object}
    target = tokens.reshape(b * length, c)
    sums = {kind: [] for kind in KINDS}
    for fraction, (ids, text_mask) in [(fraction, own) for fraction in fractions] + [(0.0, other)]:
        visible = int(round(fraction * (length - scored_count)))
        mask = torch.ones(b, length, device=model.device)  # 1 = masked
        mask.scatter_(1, orders[:, length - visible:], 0.0)  # the last tokens of each order are visible
        x_enc = model.forward_mae_encoder(tokens, mask, text_mask, input_ids=ids, num_masked=length - visible)
        z = model.mar.forward_mae_decoder(x_enc, mask, image_shape=(h, w)).reshape(b * length, -1)
        terms = head.train_diffusion.training_losses(lambda x, t: head.net(x, t, z), target, timesteps, noise)
        loss = terms["loss"].float().reshape(b, length)
        for kind in KINDS:
            sums[kind].append(float(loss[picks[kind]].sum()))
    return sums, {kind: int(picks[kind].sum()) for kind in KINDS}, scored_count, length


def _table(results: dict[str, Any], n_scenes: int) -> str:
    """The printed table of :func:`context_use`'s results."""
    counts = results["counts"]
    header = "".join(f"{f'{f:.0%} visible':>13}" for f in results["visible_fractions"]) + f"{'0%, other prompt':>18}"
    return "\n".join(
        [f"context use: model {results['settings']['model']}, {n_scenes} scenes, loss of the same scored tokens",
         f"{'tokens':<22}{header}"]
        + [f"  {kind + f' ({counts[kind]})':<20}" + "".join(f"{v:>13.3f}" for v in results[f"{kind}_loss"])
           + f"{results[f'{kind}_other_prompt_loss']:>18.3f}" for kind in KINDS])


def _scene_draws(seed: int, index: int, length: int, channels: int, num_timesteps: int
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One scene's token order (L,), timesteps (L,) and noise (L, C), from its own generator."""
    generator = torch.Generator().manual_seed(derive_seed(seed, world.STREAMS["eval_context"], index))
    order = torch.randperm(length, generator=generator)
    timesteps = torch.randint(0, num_timesteps, (length,), generator=generator)
    return order, timesteps, torch.randn(length, channels, generator=generator)
