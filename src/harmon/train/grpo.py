"""Reward fine-tuning of image generation with GRPO (group-relative policy optimisation).

The policy is Harmon's sampler: given a prompt, MAR draws a token order, and at each of its iterations the
diffusion head draws every new token by a chain of Gaussian reverse steps x_t -> x_{t-1} whose mean and
variance the model predicts (under classifier-free guidance, as at inference). Those reverse steps are the
policy's actions, their Gaussian densities its probabilities; the order is part of the sampled trajectory
(kept as drawn, so an update changes what the model does at the same places).

One step: ``prompts_per_step`` prompts, ``group_size`` images each, drawn by the current model with their
trajectory kept (:class:`~harmon.sampling.IterationTrace`); each image scored by the reward (a
:class:`~harmon.train.rewards.Reward`); advantages A = (r - mean) / (std + 1e-4) within each prompt's group;
then ``updates`` optimiser steps on

    L = -mean[min(rho A, clip(rho, 1 - clip, 1 + clip) A)] + kl * mean[KL(pi || pi_ref)]

with rho = pi(x_{t-1} | x_t) / pi_old(x_{t-1} | x_t) (densities averaged over the token's channels and the
iteration's tokens, in log space), over ``reverse_steps`` reverse steps per MAR iteration drawn at random
from the ``noisiest`` share of the head's chain, and KL the k3 estimate against the starting model (kept
frozen when ``kl`` > 0).

Why only the noisiest steps: the gradient of a step's log-density with respect to its mean is
noise / (its standard deviation), so the last, nearly noiseless steps give the largest gradients (measured
on the shipped shapes model at 20 steps: 10-30x those of the steps before, at t = 1) while their draws
hardly change the image and so carry no information about the reward. Drawn from the whole chain, they
swamped each update with noise; the image's content is decided in the noisy first part. Even so, a step's
gradient is mostly noise until it averages thousands of images (measured: docs/shapes.md, "Reward
fine-tuning"): size ``prompts_per_step`` x ``group_size`` by the agreement of independent steps' gradients.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from ..errors import InputError
from ..models.harmon import Harmon
from ..pipelines.text_to_image import generation_prompts
from ..processing import tensor_to_pil
from ..rng import SeededRNG, derive_seed
from ..sampling import IterationTrace, generate_latents, take_rows
from ..settings import GenerationSettings
from .checkpoints import load_checkpoint, save_checkpoint
from .config import GRPOConfig, TrainConfig
from .distributed import World, all_reduce_sum, gather_lists
from .loop import batch_positions, example_index
from .metrics import RunLog
from .model import build_optimizer, lr_factor
from .rewards import load_reward, read_prompt_records

# Log-density ratios are clamped to +-LOG_RATIO_LIMIT before exp: the late reverse steps have tiny variances,
# so one large update can move their densities by orders of magnitude, and an infinite ratio times a zero
# advantage would make the loss NaN. Past the limit the clipped objective has no gradient anyway.
LOG_RATIO_LIMIT = 10.0


@dataclass
class Rollout:
    """What one process drew in a step: the prompts' token ids (with guidance, [cond; uncond]), the trajectory,
    the images' rewards and advantages (B,), and the reverse steps trained at each MAR iteration."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    trace: list[IterationTrace]
    rewards: torch.Tensor
    advantages: torch.Tensor
    trained_steps: list[list[int]]


def group_advantages(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """Rewards (B,) of consecutive groups of ``group_size`` -> (r - group mean) / (group std + 1e-4)."""
    groups = rewards.view(-1, group_size)
    return ((groups - groups.mean(1, keepdim=True)) / (groups.std(1, keepdim=True, unbiased=False) + 1e-4)).flatten()


class GRPOPolicy(nn.Module):
    """The model under reward fine-tuning behind one ``forward`` (so DistributedDataParallel sees the call);
    ``reference`` is a frozen copy of the starting model when the KL term is on. Dropout is switched off, so
    that the updates score the rollouts' actions under the very policy that drew them."""

    readout = None  # the checkpoint layout of HarmonForTraining: no trainer-owned modules

    def __init__(self, model: Harmon, cfg: GRPOConfig):
        super().__init__()
        for module in model.modules():
            if isinstance(module, nn.Dropout):
                module.p = 0.0
            if isinstance(getattr(module, "attn_drop", None), float):
                module.attn_drop = 0.0
        self.model, self.cfg = model, cfg
        self.settings = GenerationSettings(**cfg.generation).resolve(model.config)
        self.reference = copy.deepcopy(model).requires_grad_(False).eval() if cfg.kl > 0 else None

    @torch.no_grad()
    def rollout(self, tokenizer, prompts: Sequence[str], seeds: Sequence[int]) -> tuple[Rollout, list]:
        """Draw one image per (prompt, seed) with the trajectory kept; returns it without rewards, and the images."""
        model = self.model
        was_training = model.training
        model.eval()
        pad = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.pad_token_id
        input_ids, attention_mask = generation_prompts(tokenizer, pad, list(prompts), self.settings, model.config)
        trace: list[IterationTrace] = []
        tokens = generate_latents(model, input_ids, attention_mask, SeededRNG.from_seeds(list(seeds)), self.settings,
                                  trace=trace)
        images = tensor_to_pil(model.decode(tokens, tile=self.settings.vae_tile))
        model.train(was_training)
        empty = torch.zeros(len(prompts))
        return Rollout(input_ids.to(model.device), attention_mask.to(model.device), trace, empty, empty, []), images

    def forward(self, rollout: Rollout) -> dict[str, torch.Tensor]:
        """The surrogate loss of a rollout and what to report of it: ``loss``, ``kl``, ``clip_fraction``."""
        cfg, adv = self.cfg, rollout.advantages.to(self.model.device)
        new = torch.cat([self._log_probs(self.model, rollout, it, steps)
                         for it, steps in zip(rollout.trace, rollout.trained_steps)], dim=1)  # (B, S)
        old = torch.cat([torch.stack([it.steps[s].log_prob.view(len(adv), -1).mean(1) for s in steps], 1)
                         for it, steps in zip(rollout.trace, rollout.trained_steps)], dim=1).to(new)  # (B, S)
        ratio = torch.exp((new - old).clamp(-LOG_RATIO_LIMIT, LOG_RATIO_LIMIT))
        clipped = ratio.clamp(1 - cfg.clip, 1 + cfg.clip)
        loss = -torch.minimum(ratio * adv[:, None], clipped * adv[:, None]).mean()
        kl = new.new_zeros(())
        if self.reference is not None:
            with torch.no_grad():
                ref = torch.cat([self._log_probs(self.reference, rollout, it, steps)
                                 for it, steps in zip(rollout.trace, rollout.trained_steps)], dim=1)
            log_ref = (ref - new).clamp(-LOG_RATIO_LIMIT, LOG_RATIO_LIMIT)
            kl = (torch.exp(log_ref) - log_ref - 1).mean()
            loss = loss + cfg.kl * kl
        clip_fraction = ((ratio - 1).abs() > cfg.clip).float().mean()
        return {"loss": loss, "kl": kl.detach(), "clip_fraction": clip_fraction.detach()}

    def _log_probs(self, model: Harmon, rollout: Rollout, it: IterationTrace, steps: list[int]) -> torch.Tensor:
        """Log-densities (B, len(steps)) of the chosen reverse steps of one MAR iteration under ``model``: the
        iteration's conditions recomputed from the tokens it started from, then one head pass per step."""
        b, seq_len, c = it.tokens.shape
        h, w = self.settings.grid(model.config.mar.vae_stride)
        guided = self.settings.guidance_scale != 1.0  # the rows are [cond; uncond] as in the rollout
        pair = (lambda t: torch.cat([t, t])) if guided else (lambda t: t)
        tokens, mask = pair(it.tokens.view(b, h, w, c)), pair(it.mask)
        x_enc = model.forward_mae_encoder(tokens, mask, rollout.attention_mask, input_ids=rollout.input_ids,
                                          num_masked=it.masked)
        z = model.mar.forward_mae_decoder(x_enc, mask, image_shape=(h, w))  # (rows, L, D_dec)
        z_pred = take_rows(z[:b], it.positions)  # (B * n, D_dec)
        if guided:
            z_pred = torch.cat([z_pred, take_rows(z[b:], it.positions)])
        head = model.mar.diffloss
        return torch.stack([head.step_log_prob(z_pred, it.steps[s], self.settings.temperature, it.cfg,
                                               it.num_steps)[0].view(b, -1).mean(1) for s in steps], dim=1)


def choose_reverse_steps(trace: Sequence[IterationTrace], count: int, seed: int,
                         noisiest: float = 1.0) -> list[list[int]]:
    """``count`` of each iteration's noisy reverse steps (all when there are fewer), drawn from ``seed`` among
    the first ceil(``noisiest`` x their number), i.e. the noisiest (the chain runs from high t to low)."""
    g = torch.Generator().manual_seed(seed)
    chosen = []
    for it in trace:
        n = math.ceil(noisiest * len(it.steps))
        chosen.append(sorted(torch.randperm(n, generator=g)[:count].tolist()) if n > count else list(range(n)))
    return chosen


def step_samples(step: int, cfg: GRPOConfig, n_prompts: int, seed: int, world: World,
                 permutations: dict) -> tuple[list[int], list[int]]:
    """This process's share of step ``step``: the prompt index of each of its images (whole groups, in a
    per-epoch permutation of the prompts) and each image's seed (from (seed, step, global image index))."""
    positions = batch_positions(step, cfg.prompts_per_step, world)
    prompt_ids = [example_index(p, n_prompts, seed, 2, permutations) for p in positions]
    per_image = [i for i in prompt_ids for _ in range(cfg.group_size)]
    first = positions[0] * cfg.group_size if positions else 0
    seeds = [derive_seed(seed, 2, step, first + k) for k in range(len(per_image))]
    return per_image, seeds


def reward_report(rewards: torch.Tensor, categories: Sequence[str], group_size: int,
                  world: World) -> dict[str, Any]:
    """Mean reward of the step over every process, per category (``reward/<category>``), and the share of
    groups whose rewards are all equal (``flat_groups``: their advantages are 0, they teach nothing)."""
    values = gather_lists([f"{c}\t{float(r)!r}" for c, r in zip(categories, rewards.tolist())], world)
    pairs = [(c, float(r)) for c, r in (v.split("\t") for v in values)]
    groups = rewards.view(-1, group_size)
    flat = all_reduce_sum((groups.amax(1) == groups.amin(1)).sum().float(), world).item()
    report: dict[str, Any] = {"reward": sum(r for _, r in pairs) / len(pairs),
                              "flat_groups": flat * group_size / len(pairs)}
    for category in sorted({c for c, _ in pairs}):
        of = [r for c, r in pairs if c == category]
        report[f"reward/{category}"] = sum(of) / len(of)
    return report


def train_grpo(cfg: TrainConfig, world: World, model: Harmon, tokenizer, out: Path,
               stop_after: int | None) -> tuple[int, list[dict[str, Any]]]:
    """Run (or resume) a reward fine-tuning run of a prepared ``model`` into ``out``: rollouts, rewards, updates,
    a log record per step, checkpoints (the supervised trainer's layout); returns the step reached and the
    step records. DDP with several processes; each process draws whole groups."""
    grpo = cfg.grpo
    records = read_prompt_records(grpo.prompts)
    reward = load_reward(grpo.reward)
    if grpo.prompts_per_step % world.size:
        raise InputError(f"grpo.prompts_per_step {grpo.prompts_per_step} does not split over {world.size} processes")
    policy = GRPOPolicy(model, grpo)
    wrapped: nn.Module = nn.parallel.DistributedDataParallel(policy, find_unused_parameters=True) \
        if world.size > 1 else policy
    optimizer = build_optimizer(model, cfg)
    start = load_checkpoint(out, policy, optimizer, world)
    end = cfg.max_steps if stop_after is None else min(cfg.max_steps, start + stop_after)
    log, history, permutations = RunLog(out, cfg, world, start, end), [], {}
    for step in range(start, end):
        for group in optimizer.param_groups:
            group["lr"] = cfg.optim.lr * lr_factor(step, cfg)
        ids, seeds = step_samples(step, grpo, len(records), cfg.seed, world, permutations)
        drawn_for = [records[i] for i in ids]
        rollout, images = policy.rollout(tokenizer, [r["prompt"] for r in drawn_for], seeds)
        rollout.rewards = torch.tensor(reward(images, drawn_for), dtype=torch.float32)
        rollout.advantages = group_advantages(rollout.rewards, grpo.group_size)
        rollout.trained_steps = choose_reverse_steps(rollout.trace, grpo.reverse_steps,
                                                     derive_seed(cfg.seed, 3, step, world.rank), grpo.noisiest)
        for _ in range(grpo.updates):
            losses = wrapped(rollout)
            optimizer.zero_grad(set_to_none=True)
            losses["loss"].backward()
            grad_norm = torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad],
                                                       cfg.optim.grad_clip)
            optimizer.step()
        record = {"step": step + 1, "lr": optimizer.param_groups[0]["lr"], "grad_norm": float(grad_norm),
                  **{k: all_reduce_sum(v.detach().float().cpu(), world).item() / world.size for k, v in losses.items()},
                  **reward_report(rollout.rewards, [reward.category(r) for r in drawn_for], grpo.group_size,
                                 world)}
        history.append(log.log(step, record, len(ids)))
        if (step + 1) % cfg.save_every == 0 or step + 1 == cfg.max_steps:
            save_checkpoint(out, step + 1, policy, optimizer, world, cfg)
    log.close()
    return max(start, end), history
