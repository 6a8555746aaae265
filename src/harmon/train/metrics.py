"""What a run reports: a record per step, ``log.jsonl`` (one JSON object per logged step), TensorBoard
scalars and the progress bar. Losses are averaged over the processes; only the main process writes."""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..errors import InputError
from ..files import write_atomically
from .config import TrainConfig
from .distributed import World, all_reduce_sum
from .loop import StepResult

LOG = "log.jsonl"
SHOWN = ("t2i", "i2t", "reward", "lr", "samples_per_s")  # beside the progress bar


def step_record(step: int, done: StepResult, world: World, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The metrics of step ``step`` (numbered from 1 in the record): learning rate, gradient norm, the
    text-to-image losses averaged over the processes, the image-to-text loss per answer token of the whole
    global batch."""
    losses = done.losses
    record: dict[str, Any] = {"step": step + 1, "lr": optimizer.param_groups[0]["lr"],
                              "grad_norm": float(done.grad_norm)}
    for key in ("t2i", "t2i_readout"):
        if key in losses:
            record[key] = all_reduce_sum(losses[key].detach().float().cpu(), world).item() / world.size
    if "i2t_sum" in losses and done.i2t_tokens > 0:
        record["i2t"] = all_reduce_sum(losses["i2t_sum"].detach().float().cpu(), world).item() / done.i2t_tokens
    return record


def truncate_log(path: Path, step: int) -> None:
    """Drop log records after ``step``: a killed run may have logged steps its last checkpoint lacks."""
    if path.is_file():
        kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
        write_atomically(path, "".join(line + "\n" for line in kept))


class RunLog:
    """The reports of one run from step ``start`` to ``end``: :meth:`record` after every step, :meth:`close`
    at the end. Records are written every ``log_every`` steps and at step ``end`` (with the samples per
    second since the last written one); a resumed run first drops what was logged after its checkpoint."""

    def __init__(self, out: Path, cfg: TrainConfig, world: World, start: int, end: int):
        self.cfg, self.world, self.end = cfg, world, end
        self.file = self.writer = None
        if world.main:
            if start > 0:
                truncate_log(out / LOG, start)
            self.file = open(out / LOG, "a")
            self.writer = _tensorboard(out) if cfg.tensorboard else None
        self.bar = tqdm(total=cfg.max_steps, initial=start, disable=not (cfg.progress and world.main), desc="training")
        self.tick, self.samples = time.perf_counter(), 0

    def record(self, step: int, done: StepResult, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """The record of step ``step`` (see :func:`step_record`), written when it is a logged step."""
        return self.log(step, step_record(step, done, self.world, optimizer), done.samples)

    def log(self, step: int, record: dict[str, Any], samples: int) -> dict[str, Any]:
        """Report step ``step``'s ``record`` (which this process computed on ``samples`` examples): written, with
        the samples per second since the last written one, when it is a logged step."""
        self.samples += samples
        if (step + 1) % self.cfg.log_every == 0 or step + 1 == self.end:
            elapsed = time.perf_counter() - self.tick
            record["samples_per_s"] = all_reduce_sum(torch.tensor(float(self.samples)), self.world).item() / elapsed
            self.tick, self.samples = time.perf_counter(), 0
            self._write(record, step + 1)
        self.bar.set_postfix({k: f"{v:.4g}" for k, v in record.items() if k in SHOWN})
        self.bar.update(1)
        return record

    def _write(self, record: dict[str, Any], step: int) -> None:
        if self.file is not None:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()
        if self.writer is not None:
            for key, value in record.items():
                self.writer.add_scalar(key, value, step)

    def close(self) -> None:
        """Close the progress bar, the log file and TensorBoard's writer."""
        self.bar.close()
        if self.file is not None:
            self.file.close()
        if self.writer is not None:
            self.writer.close()


def _tensorboard(out: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as err:
        raise InputError("tensorboard: true needs the tensorboard package (pip install tensorboard)") from err
    return SummaryWriter(str(out / "tensorboard"))
