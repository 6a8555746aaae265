"""The MAR generation loop of Harmon: text prompts -> latent tokens.

Follows the original ``Harmon.sample`` step by step (see SPEC.md). Exact
shortcuts: the MAR encoder runs once for a conditional/unconditional pair
(their inputs are identical), identical prompts (the unconditional one) are
prefilled once, and the diffusion sampler keeps only the conditional rows (the
original samples the unconditional twins too and then overwrites them with the
conditional ones). The prompts' KV cache is allocated once with room for an
iteration's image tokens, and nothing in the loop reads values back from the
device. Known tokens (editing) are kept and never re-sampled. An image drawn in a
batch is bit-identical to the same image drawn alone (:mod:`harmon.batch_invariance`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Literal, Protocol

import numpy as np
import torch
from transformers import DynamicCache

from .errors import InputError
from .diffusion import ReverseStep
from .batch_invariance import StableRows
from .models.harmon import Harmon, crop_cache, reserve_room
from .settings import GenerationSettings


class TokenRNG(Protocol):
    """What the loop needs from a source of randomness (see :mod:`harmon.rng`)."""

    def orders(self, num_images: int, seq_len: int, guided: bool) -> torch.Tensor: ...
    def start_noise(self, num_images: int, rows: int, channels: int, guided: bool) -> torch.Tensor: ...
    def step_noise(self, num_images: int, rows: int, channels: int, guided: bool) -> torch.Tensor: ...


@dataclass
class StepInfo:
    """What one MAR iteration did, passed to the ``callback`` of :func:`generate_latents`."""

    step: int
    num_iter: int
    mask_to_pred: torch.Tensor  # (B, L) bool: tokens sampled at this step
    mask_len: int               # tokens still masked after this step (before the last-step override)
    cfg: float                  # guidance scale used at this step
    z: torch.Tensor             # (N, D_dec) conditions of the sampled tokens; [cond; uncond] with guidance
    sampled: torch.Tensor       # (N_cond, C) sampled token latents
    tokens: torch.Tensor        # (B, L, C) all tokens after this step


@dataclass
class IterationTrace:
    """What one MAR iteration of :func:`generate_latents` sampled, enough to recompute its log-probability
    under other weights (reward fine-tuning): the tokens and mask it started from, the positions it sampled,
    its guidance and diffusion steps, and the noisy reverse steps of its diffusion head."""

    step: int
    tokens: torch.Tensor     # (B, L, C) tokens before this iteration
    mask: torch.Tensor       # (B, L) float, 1 = still to generate, before this iteration
    masked: int              # tokens still masked before this iteration, per image
    positions: torch.Tensor  # (B, n) positions this iteration sampled, ascending per image
    cfg: float
    num_steps: str           # the respacing its diffusion head sampled with
    steps: list[ReverseStep]  # rows image-major: image i's tokens at rows i*n .. i*n+n-1


def next_mask_len(seq_len: int, step: int, num_iter: int, num_masked: int) -> int:
    """Tokens left masked after ``step``: floor(L cos(pi/2 (step+1)/K)), clamped to [1, masked - 1]."""
    target = np.floor(seq_len * np.cos(math.pi / 2.0 * (step + 1) / num_iter))  # numpy float64, as the original
    return int(max(1, min(num_masked - 1, int(target))))


def cfg_at_step(cfg: float, schedule: Literal["constant", "linear"], seq_len: int, mask_len: int) -> float:
    """Guidance of one step: constant, or linear in the fraction of tokens known after it (computed in float32)."""
    if schedule == "constant":
        return float(cfg)
    if schedule == "linear":
        ml = torch.tensor(float(mask_len), dtype=torch.float32)
        return float(1 + (cfg - 1) * (seq_len - ml) / seq_len)
    raise InputError(f"cfg_schedule must be 'constant' or 'linear', got {schedule!r}")


def prefill_shared(model: Harmon, input_ids: torch.Tensor) -> DynamicCache:
    """KV cache of the prompts, running each distinct row once (the unconditional prompt repeats B times)."""
    unique, inverse = torch.unique(input_ids, dim=0, return_inverse=True)
    if unique.shape[0] == input_ids.shape[0]:
        return model.prefill(input_ids)
    cache = model.prefill(unique)
    for layer in cache.layers:
        layer.keys, layer.values = layer.keys[inverse], layer.values[inverse]
    return cache


class PromptCaches:
    """The prompts' KV caches of a generation loop, one per prompt width, and the LLM pass over them.

    ``input_ids`` / ``attention_mask`` (rows, T): right-padded prompts, with guidance B conditional rows then
    B unconditional ones. Image i alone is padded to its own width (the longer of its two rows), and attention
    over a longer run of masked keys rounds differently; so here it joins the group of that width, whose rows
    are cut to it, prefilled together (each distinct row once) and given ``room`` free positions. With one
    group (an image alone, or prompts of one width) this is the single cache of all rows.
    """

    def __init__(self, model: Harmon, input_ids: torch.Tensor, attention_mask: torch.Tensor, guided: bool,
                 room: int):
        self.model = model
        rows = input_ids.shape[0]
        b = rows // 2 if guided else rows
        lengths = attention_mask.to(torch.long).sum(dim=1)  # (rows,)
        widths = (torch.maximum(lengths[:b], lengths[b:]) if guided else lengths).tolist()  # (B,)
        self.groups: list[tuple[torch.Tensor | None, int, torch.Tensor, DynamicCache]] = []
        for width in sorted(set(widths)):
            images = [i for i, w in enumerate(widths) if w == width]
            index = torch.tensor(images + [b + i for i in images] if guided else images, device=input_ids.device)
            ids, mask = input_ids[index, :width], attention_mask[index, :width]  # (r, width)
            cache = reserve_room(prefill_shared(model, ids), room)
            self.groups.append((None if len(images) == b else index, width, mask, cache))

    def residual(self, x_enc: torch.Tensor, z_enc: torch.Tensor) -> torch.Tensor:
        """:meth:`Harmon.llm_residual` of x_enc (rows, K + visible, D_enc) and z_enc (rows, visible + K, H) after
        the prompts, group by group; each cache is cut back to its prompts afterwards."""
        out = x_enc if len(self.groups) == 1 else torch.empty_like(x_enc)
        for index, width, mask, cache in self.groups:
            if index is None:  # the one group, of every row
                out = self.model.llm_residual(x_enc, z_enc, mask, cache=cache)
            else:
                out[index] = self.model.llm_residual(x_enc[index], z_enc[index], mask, cache=cache)
            crop_cache(cache, width)
        return out


@torch.no_grad()
def generate_latents(model: Harmon, input_ids: torch.Tensor, attention_mask: torch.Tensor, rng: TokenRNG,
                     settings: GenerationSettings | None = None, *,
                     known: tuple[torch.Tensor, torch.Tensor] | None = None,
                     callback: Callable[[StepInfo], None] | None = None,
                     trace: list[IterationTrace] | None = None) -> torch.Tensor:
    """Generate latent tokens (B, h, w, C) for B prompts with ``settings`` (resolved for the model here;
    the latent grid (h, w) is their image size over the VAE stride).

    input_ids / attention_mask: right-padded chat prompts; with guidance (``guidance_scale != 1``) they
    hold B conditional rows followed by B unconditional rows (2B in all). ``known`` = (tokens (B, h, w, C),
    mask (B, h*w) bool, True = known) gives tokens that are kept as they are (inpainting, outpainting,
    variations): only the others are generated, in the same loop, with the mask schedule over the unknown
    tokens. Every image must have the same number of unknown tokens. ``trace`` receives an
    :class:`IterationTrace` per iteration (it keeps every reverse step's states: memory grows with them).
    """
    settings = (settings or GenerationSettings()).resolve(model.config)
    num_iter, cfg, temperature = settings.num_iter, settings.guidance_scale, settings.temperature
    guided = cfg != 1.0
    rows = input_ids.shape[0]
    if guided and rows % 2:
        raise InputError(f"with guidance the batch is [cond; uncond] and must be even, got {rows} rows")
    b = rows // 2 if guided else rows
    h, w = settings.grid(model.config.mar.vae_stride)
    seq_len, c = h * w, model.token_dim
    device, dtype = model.device, model.dtype
    input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
    steps = settings.num_steps if isinstance(settings.num_steps, tuple) else (settings.num_steps,) * num_iter

    orders = rng.orders(b, seq_len, guided).to(device)               # (B, L)
    tokens = torch.zeros(b, seq_len, c, device=device, dtype=dtype)  # (B, L, C)
    mask = torch.ones(b, seq_len, device=device)                     # float32, 1 = still to generate
    to_generate = seq_len if known is None else _keep_known(known, tokens, mask, orders)
    # the prompts' caches (one per prompt width), with room for one iteration's image tokens (buffer + visible);
    # StableRows: products of few rows computed as in many, alone or in a batch (the head pads its own rows)
    with StableRows():
        caches = PromptCaches(model, input_ids, attention_mask, guided, room=model.buffer_size + seq_len)
    pair = (lambda t: torch.cat([t, t])) if guided else (lambda t: t)

    masked = to_generate  # tracked on the host: no device synchronisation per step
    for step in range(num_iter):
        with StableRows():
            x_enc, z_enc = model.extract_visual_feature(tokens.view(b, h, w, c), mask, num_masked=masked)
            x_enc = caches.residual(pair(x_enc), pair(z_enc))
            z = model.mar.forward_mae_decoder(x_enc, pair(mask), image_shape=(h, w))  # (rows, L, D_dec)

        mask_len = next_mask_len(to_generate, step, num_iter, masked)
        mask_next = torch.zeros_like(mask).scatter_(1, orders[:, :mask_len], 1.0)
        # the masked tokens are orders[:, :masked]; this step samples orders[:, first:masked] (all that
        # are left at the last step), each image's in ascending position, the order a boolean index gives
        first = 0 if step == num_iter - 1 else mask_len
        positions = orders[:, first:masked].sort(dim=1).values  # (B, per_image)
        per_image = masked - first
        z_pred = take_rows(z[:b], positions)  # (B * per_image, D_dec)
        if guided:
            z_pred = torch.cat([z_pred, take_rows(z[b:], positions)])
        cfg_iter = cfg_at_step(cfg, settings.cfg_schedule, to_generate, mask_len)
        # the diffusion state stays float32 whatever the model's dtype
        x_T = rng.start_noise(b, per_image, c, guided).to(device=device, dtype=torch.float32)
        reverse_steps = None
        if trace is not None:
            reverse_steps = []
            trace.append(IterationTrace(step, tokens.clone(), mask.clone(), masked, positions, cfg_iter, steps[step],
                                        reverse_steps))
        sampled = model.mar.diffloss.sample(
            z_pred, x_T, lambda: rng.step_noise(b, per_image, c, guided).to(device=device, dtype=torch.float32),
            temperature=temperature, cfg=cfg_iter, num_steps=steps[step], trace=reverse_steps)
        tokens.scatter_(1, positions.unsqueeze(-1).expand(-1, -1, c), sampled.to(dtype).view(b, per_image, c))
        if callback is not None:
            to_pred = torch.zeros_like(mask, dtype=torch.bool).scatter_(1, positions, True)
            callback(StepInfo(step, num_iter, to_pred, mask_len, cfg_iter, z_pred, sampled, tokens))
        mask, masked = mask_next, mask_len
    return tokens.view(b, h, w, c)


def _keep_known(known: tuple[torch.Tensor, torch.Tensor], tokens: torch.Tensor, mask: torch.Tensor,
                orders: torch.Tensor) -> int:
    """Write the known tokens into ``tokens`` (B, L, C), mark them done in ``mask`` (B, L) and move them to the
    end of each image's ``orders`` (B, L), in place; returns how many tokens each image has left to generate.

    ``known`` = (tokens (B, h, w, C), mask (B, h*w) bool, True = known), as :func:`generate_latents` takes it.
    """
    b, seq_len, c = tokens.shape
    known_tokens, known_mask = known
    known_mask = known_mask.to(device=tokens.device, dtype=torch.bool).reshape(b, seq_len)
    unknown = (~known_mask).sum(dim=1).tolist()
    if len(set(unknown)) != 1 or unknown[0] == 0:
        raise InputError("every image needs the same, non-zero number of tokens to generate")
    tokens[known_mask] = known_tokens.to(device=tokens.device, dtype=tokens.dtype).reshape(b, seq_len, c)[known_mask]
    mask[known_mask] = 0.0
    # unknown positions first, each image keeping its random order among them
    orders.copy_(torch.gather(orders, 1, torch.argsort(known_mask.gather(1, orders).to(torch.int8), dim=1,
                                                       stable=True)))
    return unknown[0]


def take_rows(rows: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """rows (B, L, D), positions (B, n) -> (B * n, D): rows[i, positions[i]] for each image, image after image."""
    return rows.gather(1, positions.unsqueeze(-1).expand(-1, -1, rows.shape[-1])).flatten(0, 1)
