"""Sharded training (``parallel: fsdp``): the model split over the processes with FSDP2 (``fully_shard``), and
its checkpoints written by every process with ``torch.distributed.checkpoint`` (DCP).

Each transformer block (the LLM's decoder layers, MAR's encoder and decoder blocks) and the diffusion head's
MLP is one FSDP unit, gathered for its forward and backward and sharded again after them; the rest (embeddings,
LM head, projections, MAR's small parts, the latent readout) forms the root unit. The frozen VAE stays whole on
every process. With bfloat16 precision the units gather their parameters in bfloat16 and reduce gradients in
float32; the optimiser keeps float32 shards.

A sharded checkpoint is a folder of safetensors files, one per process that held a shard, each with DCP's
offsets in its header: DCP's safetensors storage, chosen because its reader takes every fact from those headers
and the default one unpickles a ``.metadata`` file (nothing of a checkpoint is unpickled here). Keys: the
trained tensors' names in :class:`~harmon.train.model.HarmonForTraining` (``model.<name>``, ``readout.<name>``),
``optim.<those>.<exp_avg|exp_avg_sq|step>`` for AdamW's state.
"""
from __future__ import annotations

import warnings
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                     set_state_dict)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor
from transformers.models.qwen2.modeling_qwen2 import Qwen2DecoderLayer

from ..errors import InputError
from .distributed import World
from .model import HarmonForTraining

# the trained tensors only (frozen ones are the starting model's); frozen keys are absent when loading
_TRAINED = StateDictOptions(ignore_frozen_params=True, strict=False)


def shard_model(module: HarmonForTraining, world: World, bf16: bool) -> None:
    """Apply ``fully_shard`` over ``world``'s processes: one unit per transformer block and for the diffusion
    head's MLP, then the root (``module`` itself, everything else but the frozen VAE, which every process keeps
    whole). ``bf16``: parameters gathered in bfloat16, gradients reduced in float32 (autocast still chooses the
    precision of each operation, as without sharding)."""
    mesh = init_device_mesh(world.device.type, (world.size,))
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32,
                                  cast_forward_inputs=False) if bf16 else MixedPrecisionPolicy()
    model = module.model
    units = [m for m in model.llm.modules() if isinstance(m, Qwen2DecoderLayer)]
    units += [*model.mar.encoder_blocks, *model.mar.decoder_blocks, model.mar.diffloss.net]
    for unit in units:
        fully_shard(unit, mesh=mesh, mp_policy=policy)
    fully_shard(module, mesh=mesh, mp_policy=policy, ignored_params=set(model.vae.parameters()))


def is_sharded(module: torch.nn.Module) -> bool:
    """Whether ``module`` was split over the processes by :func:`shard_model`."""
    return isinstance(module, FSDPModule)


def full_norm(norm: torch.Tensor) -> torch.Tensor:
    """A gradient norm as a plain tensor (that of sharded gradients is a DTensor)."""
    return norm.full_tensor() if isinstance(norm, DTensor) else norm


def gather_trained(module: HarmonForTraining, world: World) -> dict[str, torch.Tensor]:
    """The model's trained tensors, whole and on the CPU, on the main process (``{}`` on the others); every
    process must call it."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
    state = get_model_state_dict(module, options=options)
    return {k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")} if world.main else {}


def _state(module: HarmonForTraining, optimizer: torch.optim.Optimizer) -> tuple[dict, list]:
    """The tensors a checkpoint holds (the trained ones by name, AdamW's state under ``optim``; each process
    its shards) and the optimiser's parameter groups (settings, not saved: the run's config makes them)."""
    model_state, optim_state = get_state_dict(module, optimizer, options=_TRAINED)
    trained = {n for n, p in module.named_parameters() if p.requires_grad}  # a tied weight under its first name
    return ({k: v for k, v in model_state.items() if k in trained} | {"optim": optim_state["state"]},
            optim_state["param_groups"])


def save_shards(folder: Path, module: HarmonForTraining, optimizer: torch.optim.Optimizer) -> None:
    """Every process writes its shards of the trained tensors and of the optimiser's state into ``folder``
    (safetensors, synced); every process must call it."""
    tensors, _ = _state(module, optimizer)
    with _one_process_meant():
        dcp.save(tensors, storage_writer=dcp.HuggingFaceStorageWriter(str(folder), save_distributed=True),
                 no_dist=not dist.is_initialized())


def load_shards(folder: Path, module: HarmonForTraining, optimizer: torch.optim.Optimizer) -> None:
    """Restore what :func:`save_shards` wrote (by any number of processes) into ``module`` and ``optimizer``,
    refusing a checkpoint that lacks any trained tensor; every process must call it."""
    tensors, groups = _state(module, optimizer)
    saved = shard_keys(folder)
    missing = sorted(k for k in tensors if k != "optim" and k not in saved)
    if missing:
        raise InputError(f"{folder} lacks trainable tensors {missing[:5]}: was the freeze/LoRA/latent_readout "
                         "setting changed?")
    # AdamW has no state for a parameter that never had a gradient (as in the run that wrote the checkpoint)
    tensors["optim"] = {name: state for name, state in tensors["optim"].items()
                        if all(f"optim.{name}.{key}" in saved for key in state)}
    with _one_process_meant():
        dcp.load(tensors, storage_reader=dcp.HuggingFaceStorageReader(str(folder)), no_dist=not dist.is_initialized())
    model_state = {k: v for k, v in tensors.items() if k != "optim"}
    set_state_dict(module, optimizer, model_state_dict=model_state,
                   optim_state_dict={"state": tensors["optim"], "param_groups": groups}, options=_TRAINED)


def shard_keys(folder: Path) -> set[str]:
    """The names of the tensors a sharded checkpoint holds (read from the files' headers)."""
    return set(dcp.HuggingFaceStorageReader(str(folder)).read_metadata().state_dict_metadata)


def read_shards(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a sharded checkpoint, whole, in this one process (to export or edit it)."""
    metadata = dcp.HuggingFaceStorageReader(str(folder)).read_metadata().state_dict_metadata
    tensors = {k: torch.empty(m.size, dtype=m.properties.dtype) for k, m in metadata.items()}
    with _one_process_meant():
        dcp.load(tensors, storage_reader=dcp.HuggingFaceStorageReader(str(folder)), no_dist=True)
    return tensors


def write_shards(folder: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Write whole tensors as a sharded checkpoint of one file (any number of processes can load it)."""
    with _one_process_meant():
        dcp.save(tensors, storage_writer=dcp.HuggingFaceStorageWriter(str(folder), save_distributed=True),
                 no_dist=True)


@contextmanager
def _one_process_meant():
    """DCP warns whenever it reads or writes without a process group; here one process is what is meant."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield
