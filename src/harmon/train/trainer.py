"""The training run: one process or many (``torchrun``; DistributedDataParallel or FSDP), resumable exactly.

:func:`train` reads the data, prepares the model (:mod:`~harmon.train.model`), runs the steps
(:mod:`~harmon.train.loop`), reports them (:mod:`~harmon.train.metrics`), saves checkpoints and resumes
from the latest (:mod:`~harmon.train.checkpoints`), and exports the model at the end.
All randomness of a step is keyed by (seed, step, sample index), so a run on N
processes computes the losses of a one-process run with the same global batch,
and a resumed run continues with exactly the losses it would have had.

This module is the trainer's public face: it also gives the checkpoint helpers that work on a run's folder
(:func:`export_checkpoint`, :func:`edit_checkpoint`, :func:`latest_step`, :func:`check_resume_config`).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..files import check_folder_path
from ..hub import load_pretrained
from ..models.harmon import Harmon
from ..rng import derive_seed
from .checkpoints import (check_resume_config, edit_checkpoint, export, export_checkpoint, final_model,
                          latest_step, load_checkpoint, save_checkpoint)
from .config import TrainConfig
from .data import Batcher, read_finetune, read_jsonl, read_llava
from .distributed import World, barrier, gather_lists, joined_world
from .grpo import train_grpo
from .loop import Learner, StepBatches, prefetched
from .metrics import RunLog
from .model import prepare_model

__all__ = ["TrainResult", "train", "check_resume_config", "edit_checkpoint", "export_checkpoint", "latest_step"]


@dataclass
class TrainResult:
    """A run's outcome: the step it reached, a record per step it ran (see
    :func:`~harmon.train.metrics.step_record`), the images it could not read, and the exported model folder
    (when it reached ``max_steps``)."""

    steps: int
    history: list[dict[str, float]] = field(default_factory=list)  # one record per step run
    skipped_images: list[str] = field(default_factory=list)
    final_dir: Path | None = None


def train(cfg: TrainConfig, stop_after: int | None = None) -> TrainResult:
    """Run (or resume) training; ``stop_after`` ends the run early after that many steps (for tests).

    Dropout draws from torch's global generator: it is seeded here from (seed, rank),
    saved in checkpoints, and the caller's global RNG state is restored afterwards.
    """
    with joined_world(cfg.device) as world:
        devices = [world.device.index or 0] if world.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(derive_seed(cfg.seed, world.rank))
            return _train(cfg, world, stop_after)


def _train(cfg: TrainConfig, world: World, stop_after: int | None) -> TrainResult:
    out = check_folder_path(cfg.output_dir, "output_dir")
    check_resume_config(out, cfg)
    model, tokenizer = load_pretrained(cfg.model, device=world.device)
    model = prepare_model(model, cfg)
    model.train()
    if cfg.grpo is not None:
        return _train_grpo(cfg, world, model, tokenizer, stop_after)
    batches = _step_batches(cfg, model, tokenizer, world)
    learner = Learner.build(model, cfg, world)
    start = load_checkpoint(out, learner.module, learner.optimizer, world)
    if world.main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "train_config.json").write_text(json.dumps(cfg.to_dict(), indent=1))
    end = cfg.max_steps if stop_after is None else min(cfg.max_steps, start + stop_after)
    log = RunLog(out, cfg, world, start, end)
    result = TrainResult(steps=start)
    for step, (t2i, i2t) in prefetched(batches, range(start, end)):
        done = learner.step(step, t2i, i2t)
        result.history.append(log.record(step, done, learner.optimizer))
        if (step + 1) % cfg.save_every == 0 or step + 1 == cfg.max_steps:
            save_checkpoint(out, step + 1, learner.module, learner.optimizer, world, cfg)
        result.steps = step + 1
    log.close()
    result.skipped_images = gather_lists(batches.batcher.skipped, world)
    final = final_model(learner.module, cfg, world) if result.steps == cfg.max_steps else None
    if world.main:
        if result.skipped_images:
            print(f"skipped {len(result.skipped_images)} unreadable images, e.g. {result.skipped_images[0]}")
        if final is not None:
            result.final_dir = export(final, tokenizer, out / "final")
    barrier(world)
    return result


def _train_grpo(cfg: TrainConfig, world: World, model: Harmon, tokenizer, stop_after: int | None) -> TrainResult:
    """A reward fine-tuning run (:mod:`~harmon.train.grpo`), with the supervised run's files and export."""
    out = Path(cfg.output_dir)
    if world.main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "train_config.json").write_text(json.dumps(cfg.to_dict(), indent=1))
    steps, history = train_grpo(cfg, world, model, tokenizer, out, stop_after)
    result = TrainResult(steps=steps, history=history)
    if world.main and steps == cfg.max_steps:
        result.final_dir = export(model, tokenizer, out / "final")
    barrier(world)
    return result


def _step_batches(cfg: TrainConfig, model: Harmon, tokenizer, world: World) -> StepBatches:
    """The run's examples (every configured source) and the batcher that makes them into the model's inputs."""
    captions = [e for root in cfg.data.finetune for e in read_finetune(root)]
    captions += [e for path in cfg.data.jsonl for e in read_jsonl(path)]
    conversations = [e for path in cfg.data.llava for e in read_llava(path)]
    image_tokens = (cfg.data.image_size // model.config.mar.vae_stride) ** 2 + model.buffer_size
    batcher = Batcher(tokenizer, cfg.data.image_size, image_tokens, cfg.data.uncond_prob, cfg.seed,
                      cfg.data.max_length)
    return StepBatches(batcher, captions, conversations, cfg, world)
