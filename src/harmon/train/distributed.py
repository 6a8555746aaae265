"""The processes of a run: one, or many under ``torchrun`` (gloo on CPU, nccl on CUDA), and what they share."""
from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class World:
    """This process's place in the run: its rank among ``size`` processes and the device it computes on."""

    rank: int
    size: int
    device: torch.device

    @property
    def main(self) -> bool:
        """Whether this is the process that writes the run's files (rank 0)."""
        return self.rank == 0


@contextmanager
def joined_world(device: str) -> Iterator[World]:
    """This process's :class:`World`: under ``torchrun`` it joins the process group (gloo on CPU, nccl on
    CUDA) and leaves it on the way out, since a process that exits with a gloo group alive can die in its
    teardown ("terminate called without an active exception") after its work is done."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    dev = torch.device(f"cuda:{local}") if use_cuda else torch.device("cpu")
    joins = size > 1 and not dist.is_initialized()
    if joins:
        if use_cuda:
            torch.cuda.set_device(dev)
        dist.init_process_group("nccl" if use_cuda else "gloo")
    try:
        yield World(rank, size, dev)
    finally:
        if joins:
            dist.destroy_process_group()


def all_reduce_sum(values: torch.Tensor, world: World) -> torch.Tensor:
    """``values`` summed over the processes (``values`` itself when there is one)."""
    if world.size > 1:
        values = values.clone()
        dist.all_reduce(values)
    return values


def barrier(world: World) -> None:
    """Wait for every process (nothing to wait for alone)."""
    if world.size > 1:
        dist.barrier()


def gather_lists(items: list[str], world: World) -> list[str]:
    """Every process's ``items``, rank after rank."""
    if world.size == 1:
        return list(items)
    gathered: list = [None] * world.size
    dist.all_gather_object(gathered, list(items))
    return [s for part in gathered for s in part]
