"""One training step: the step's batches (chosen by the step alone, prepared one step ahead) and the update.

Each step takes ``t2i_batch_size`` caption examples and ``i2t_batch_size`` conversation examples from
deterministic per-epoch permutations, split evenly over the processes, and minimises ``t2i_weight * L_t2i +
i2t_weight * L_i2t`` (plus ``latent_readout * L_readout`` when that auxiliary loss is switched on).
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import nn

from ..errors import InputError
from ..models.harmon import Harmon
from ..processing import pad_right
from ..rng import TrainingRNG, derive_seed
from .config import TrainConfig
from .data import Batcher, CaptionExample, ConversationExample
from .distributed import World, all_reduce_sum
from .fsdp import full_norm, shard_model
from .losses import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from .model import HarmonForTraining, build_optimizer, lr_factor


def batch_positions(step: int, batch_size: int, world: World) -> list[int]:
    """Global stream positions of this process's share of step ``step``."""
    if batch_size % world.size:
        raise InputError(f"batch size {batch_size} does not split over {world.size} processes")
    share = batch_size // world.size
    start = step * batch_size + world.rank * share
    return list(range(start, start + share))


def example_index(position: int, n: int, seed: int, task: int, cache: dict) -> int:
    """The example at a global stream position: epoch-wise permutations from (seed, task, epoch)."""
    epoch, offset = divmod(position, n)
    if (task, epoch) not in cache:
        g = torch.Generator().manual_seed(derive_seed(seed, task, epoch))
        cache[(task, epoch)] = torch.randperm(n, generator=g).tolist()
    return cache[(task, epoch)][offset]


class StepBatches:
    """``batches(step)``: this process's (text-to-image, image-to-text) batches of a step, None for a task
    without examples. They depend on the step alone, so a resumed run reads what the whole run would."""

    def __init__(self, batcher: Batcher, captions: Sequence[CaptionExample],
                 conversations: Sequence[ConversationExample], cfg: TrainConfig, world: World):
        self.batcher, self.captions, self.conversations = batcher, captions, conversations
        self.cfg, self.world = cfg, world
        self._permutations: dict = {}  # (task, epoch) -> order of the examples

    def __call__(self, step: int) -> tuple[dict | None, dict | None]:
        cfg, world = self.cfg, self.world
        t2i = i2t = None
        if self.captions:
            pos = batch_positions(step, cfg.data.t2i_batch_size, world)
            idx = [example_index(p, len(self.captions), cfg.seed, 0, self._permutations) for p in pos]
            t2i = self.batcher.text_to_image([self.captions[i] for i in idx], pos, step)
        if self.conversations:
            pos = batch_positions(step, cfg.data.i2t_batch_size, world)
            idx = [example_index(p, len(self.conversations), cfg.seed, 1, self._permutations) for p in pos]
            i2t = self.batcher.image_to_text([self.conversations[i] for i in idx], pos)
        if world.size > 1:
            t2i, i2t = self._stand_ins(t2i, i2t)
        return t2i, i2t

    def _stand_ins(self, t2i: dict | None, i2t: dict | None) -> tuple[dict | None, dict | None]:
        """Every process must run the same blocks (a sharded model gathers each block's parameters from all)
        and reduce the same losses (the step's log): a task whose examples in this process's share were all
        unreadable gets a stand-in, a blank image that weighs nothing (``stand_in``)."""
        b = self.batcher
        blank = torch.zeros(1, 3, b.image_size, b.image_size)  # (1, 3, S, S): mid-grey
        if self.captions and t2i is None:
            ids, mask = pad_right([[b.pad_id]], b.pad_id)  # (1, 1)
            t2i = {"pixel_values": blank, "input_ids": ids, "attention_mask": mask, "sample_ids": [0],
                   "stand_in": True}
        if self.conversations and i2t is None:
            ids, mask = pad_right([[IMAGE_TOKEN_INDEX] * b.num_image_tokens + [b.pad_id]], b.pad_id)  # (1, T)
            i2t = {"pixel_values": blank, "input_ids": ids, "attention_mask": mask,
                   "labels": torch.full_like(ids, IGNORE_INDEX), "sample_ids": [], "stand_in": True}
        return t2i, i2t


def prefetched(make: Callable[[int], Any], steps: range) -> Iterator[tuple[int, Any]]:
    """Yield ``(step, make(step))`` for each step, computing the next step's value in a thread meanwhile.

    The trainer's batches (image decoding, tokenising) depend on the step alone, so preparing
    them one step ahead changes nothing but the time the loop waits for them.
    """
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="harmon-batches") as pool:
        upcoming = pool.submit(make, steps[0]) if steps else None
        for step in steps:
            value = upcoming.result()
            if step + 1 < steps.stop:
                upcoming = pool.submit(make, step + 1)
            yield step, value


@dataclass
class StepResult:
    """What one step computed: this process's losses (see :class:`HarmonForTraining`), the answer tokens of
    the whole global batch, the gradient norm before clipping and the examples this process read."""

    losses: dict[str, torch.Tensor]
    i2t_tokens: float
    grad_norm: torch.Tensor
    samples: int


def combined_loss(losses: dict[str, torch.Tensor], i2t_tokens: float, cfg: TrainConfig, world: World) -> torch.Tensor:
    """The weighted sum the step minimises; the image-to-text term is the token-weighted mean over the whole
    global batch (``i2t_tokens`` answer tokens), whatever its split over the processes."""
    total = losses.get("empty", torch.zeros((), device=world.device))
    if "t2i" in losses:
        total = total + cfg.t2i_weight * losses["t2i"]
    if "t2i_readout" in losses:
        total = total + cfg.latent_readout * losses["t2i_readout"]
    if "i2t_sum" in losses and i2t_tokens > 0:
        total = total + cfg.i2t_weight * (losses["i2t_sum"] * world.size / i2t_tokens + losses["i2t_null"])
    return total


@dataclass
class Learner:
    """What a step updates and how: the module (with several processes ``wrapped`` in DistributedDataParallel,
    or sharded in place with ``parallel: fsdp``), its optimiser, the run's config and processes, and whether the
    forward pass runs in bfloat16 autocast."""

    module: HarmonForTraining
    wrapped: nn.Module
    optimizer: torch.optim.Optimizer
    cfg: TrainConfig
    world: World
    use_bf16: bool

    @classmethod
    def build(cls, model: Harmon, cfg: TrainConfig, world: World) -> "Learner":
        """Both objectives over a prepared ``model`` (with the latent readout when the config weighs it), and
        the optimiser of their trainable parameters."""
        module = HarmonForTraining(model, latent_readout=cfg.latent_readout > 0)
        use_bf16 = cfg.precision == "bfloat16" or (cfg.precision == "auto" and world.device.type == "cuda")
        wrapped: nn.Module = module
        if world.size > 1 and cfg.parallel == "fsdp":
            shard_model(module, world, use_bf16)  # before the optimiser: it holds the shards
        elif world.size > 1:
            wrapped = nn.parallel.DistributedDataParallel(module, find_unused_parameters=True)
        optimizer = build_optimizer(model, cfg, module.readout)
        return cls(module, wrapped, optimizer, cfg, world, use_bf16)

    def step(self, step: int, t2i: dict | None, i2t: dict | None) -> StepResult:
        """One update on the step's batches: the scheduled learning rate, the losses (their randomness keyed by
        (seed, step, sample)), the backward pass, gradient clipping and the optimiser step."""
        cfg, world, optimizer = self.cfg, self.world, self.optimizer
        for group in optimizer.param_groups:
            group["lr"] = cfg.optim.lr * lr_factor(step, cfg)
        rng = TrainingRNG(cfg.seed, step, t2i["sample_ids"]) if t2i is not None else None
        with torch.autocast(world.device.type, dtype=torch.bfloat16, enabled=self.use_bf16):
            losses = self.wrapped(t2i, i2t, rng)
        if t2i is not None and t2i.get("stand_in"):  # a blank image weighs nothing (an answer-less one neither)
            losses = {k: v * 0.0 if k.startswith("t2i") else v for k, v in losses.items()}
        i2t_tokens = all_reduce_sum(torch.tensor(float(losses.get("i2t_count", 0))), world).item()
        total = combined_loss(losses, i2t_tokens, cfg, world)
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_([p for p in self.module.parameters() if p.requires_grad],
                                                   cfg.optim.grad_clip)
        optimizer.step()
        grad_norm = full_norm(grad_norm)
        samples = sum(len(b["sample_ids"]) for b in (t2i, i2t) if b is not None and not b.get("stand_in"))
        return StepResult(losses, i2t_tokens, grad_norm, samples)
