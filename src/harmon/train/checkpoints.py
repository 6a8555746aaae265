"""A run's checkpoints: written atomically, resumed exactly, checked against the run's settings, and turned
into model folders for the pipelines (at the end of a run or from any checkpoint midway).

Layout under the run's ``output_dir``: ``checkpoints/step_XXXXXXX/`` holds ``rng_rank{R}.pt`` (each
process's global RNG state) and, from a ``parallel: ddp`` run, ``state.pt`` (step, trained tensors, optimiser,
config, process count, the latent readout when on); from a ``parallel: fsdp`` run, ``meta.json`` (step, process
count, the folder of the tensors) and that folder of safetensors shards, written by every process
(:mod:`~harmon.train.fsdp`). ``checkpoints/latest`` names the newest; a checkpoint is written in a temporary
folder and renamed whole, so a partial one is never taken for one.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from ..checkpoint import read_json
from ..saving import save_model
from ..errors import InputError
from ..files import write_atomically
from ..hub import load_pretrained, load_tokenizer, resolve_model_folder
from ..models.harmon import Harmon
from ..tokenizer import save_tokenizer
from .config import TrainConfig
from .distributed import World, barrier
from .fsdp import gather_trained, is_sharded, load_shards, read_shards, save_shards, write_shards
from .model import HarmonForTraining, prepare_model

CHECKPOINTS = "checkpoints"
META = "meta.json"  # in the checkpoints of fsdp runs (state.pt in those of ddp runs)
SHARDS = ("shards", "shards_edited")  # the folder of a sharded checkpoint's tensors, as meta.json names it

# settings a resumed run may change: when to stop, to save and to log, where to run, compiling (which changes
# losses by float rounding at most); any other change would make the run something else than it says
RESUMABLE_CHANGES = ("max_steps", "save_every", "keep_checkpoints", "log_every", "tensorboard", "progress", "device",
                     "compile")


def trainable_state(model: Harmon) -> dict[str, torch.Tensor]:
    """The model's trained tensors (those that require gradients), on the CPU."""
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    return {k: v.detach().cpu() for k, v in model.state_dict().items() if k in names}


def save_checkpoint(out: Path, step: int, module: HarmonForTraining, optimizer, world: World, cfg: TrainConfig
                    ) -> None:
    """Write ``checkpoints/step_XXXXXXX`` atomically (temp folder, then rename) and point ``latest`` at it;
    every process must call it."""
    root = out / CHECKPOINTS
    final = root / f"step_{step:07d}"
    tmp = root / f".step_{step:07d}.tmp"
    if world.main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier(world)
    rng_state = torch.get_rng_state()
    write_atomically(tmp / f"rng_rank{world.rank}.pt", lambda path: torch.save(rng_state, path))
    if cfg.parallel == "fsdp":
        save_shards(tmp / SHARDS[0], module, optimizer)
        if world.main:
            write_atomically(tmp / META, json.dumps({"step": step, "world_size": world.size, "shards": SHARDS[0]}))
    elif world.main:
        state = {"step": step, "model": trainable_state(module.model), "optimizer": optimizer.state_dict(),
                 "config": cfg.to_dict(), "world_size": world.size}
        if module.readout is not None:
            state["readout"] = {k: v.detach().cpu() for k, v in module.readout.state_dict().items()}
        write_atomically(tmp / "state.pt", lambda path: torch.save(state, path))
    barrier(world)
    if world.main:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        write_atomically(root / "latest", final.name)
        for old in sorted(root.glob("step_*"))[: -cfg.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)
    barrier(world)


def load_checkpoint(out: Path, module: HarmonForTraining, optimizer, world: World) -> int:
    """Restore the latest checkpoint (of either layout); returns the step to continue from (0 when there is
    none). Every process must call it."""
    name = latest_name(out)
    if name is None:
        return 0
    folder = out / CHECKPOINTS / name
    if (folder / META).is_file():
        meta = _read_meta(folder)
        _check_world_size(folder, meta["world_size"], world)
        load_shards(folder / meta["shards"], module, optimizer)
        torch.set_rng_state(torch.load(folder / f"rng_rank{world.rank}.pt", weights_only=True))
        return meta["step"]
    state = torch.load(folder / "state.pt", map_location="cpu", weights_only=True)
    _check_world_size(folder, state["world_size"], world)
    if (module.readout is None) != ("readout" not in state):
        raise InputError(f"{folder} was written with latent_readout {'off' if module.readout is not None else 'on'}; "
                         "resume with the same setting")
    restore_trainable(module.model, state["model"], folder)
    if module.readout is not None:
        module.readout.load_state_dict(state["readout"])
    optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(torch.load(folder / f"rng_rank{world.rank}.pt", weights_only=True))
    return int(state["step"])


def _read_meta(folder: Path) -> dict:
    """A sharded checkpoint's ``meta.json``, checked: integer step and process count, a known tensor folder."""
    meta = read_json(folder / META)
    ok = meta.get("shards") in SHARDS and all(
        type(meta.get(key)) is int and meta[key] >= 0 for key in ("step", "world_size"))
    if not ok:
        raise InputError(f"{folder / META} is not a checkpoint's: it needs integer step and world_size and "
                         f"shards one of {list(SHARDS)}")
    return meta


def _check_world_size(folder: Path, saved: int, world: World) -> None:
    """Each process resumes its own random stream, so a run resumes with the processes that wrote it."""
    if saved != world.size:
        raise InputError(f"{folder} was written by {saved} processes; resume with the same number")


def restore_trainable(model: nn.Module, saved: dict[str, torch.Tensor], folder: Path) -> None:
    """Load a checkpoint's trained tensors into ``model``, refusing one that lacks any of them."""
    missing = set(trainable_state(model)) - set(saved)
    if missing:
        raise InputError(f"{folder} lacks trainable tensors {sorted(missing)[:5]}: "
                         "was the freeze/LoRA setting changed?")
    model.load_state_dict(saved, strict=False)


def check_resume_config(out: Path, cfg: TrainConfig) -> None:
    """A run with a checkpoint in ``out`` resumes only with its own settings (but :data:`RESUMABLE_CHANGES`):
    :class:`~harmon.errors.InputError` naming every setting that changed."""
    saved_path = out / "train_config.json"
    if latest_name(out) is None or not saved_path.is_file():
        return
    saved = TrainConfig.from_dict(read_json(saved_path)).to_dict()  # settings added since: their defaults
    changed = setting_changes(saved, cfg.to_dict(), RESUMABLE_CHANGES)
    if changed:
        raise InputError(f"{out} holds a run with other settings ({'; '.join(changed)}): resume it with its own "
                         f"({saved_path}), or train into a new output_dir")


def setting_changes(saved: dict, now: dict, ignore=()) -> list[str]:
    """``"key: old -> new"`` for every setting of two nested settings dicts that differs (nested keys joined
    with dots, tuples compared as JSON holds them), but those named in ``ignore``."""
    def flat(d, prefix=""):
        return {k2: v2 for k, v in d.items()
                for k2, v2 in (flat(v, f"{prefix}{k}.").items() if isinstance(v, dict) else [(prefix + k, v)])}
    old, new = flat(json.loads(json.dumps(saved))), flat(json.loads(json.dumps(now)))
    return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new))
            if old.get(k) != new.get(k) and k not in ignore]


def latest_name(run: Path) -> str | None:
    """The folder name (``step_XXXXXXX``) the run's ``latest`` pointer names; None without one."""
    pointer = run / CHECKPOINTS / "latest"
    return pointer.read_text().strip() if pointer.is_file() else None


def latest_step(run_dir: str | Path) -> int:
    """The step of a run's latest checkpoint; 0 when it has none."""
    name = latest_name(Path(run_dir))
    return int(name.removeprefix("step_")) if name is not None else 0


def export(model: Harmon, tokenizer, folder: Path) -> Path:
    """A model folder for the pipelines (LoRA merged into the LLM), with the tokenizer."""
    if hasattr(model.llm.model, "merge_and_unload"):
        model.llm.model = model.llm.model.merge_and_unload()
    model.eval()
    save_model(model, folder)
    save_tokenizer(tokenizer, folder)
    return folder


def export_checkpoint(run_dir: str | Path, folder: str | Path, step: int | None = None) -> Path:
    """A model folder from a run's checkpoint (the latest, or that of ``step``): to evaluate a run midway.

    The run's ``train_config.json`` names the model folder it started from (as the run saw the path);
    that model, the checkpoint's trained tensors (LoRA merged, as at the end of a run) and its
    tokenizer make the folder.
    """
    checkpoint, cfg = _checkpoint_folder(Path(run_dir), step)
    model, _ = _checkpoint_model(checkpoint, cfg)
    tokenizer = load_tokenizer(resolve_model_folder(cfg.model), int(model.config.llm["vocab_size"]))
    return export(model, tokenizer, Path(folder))


def edit_checkpoint(run_dir: str | Path, edit: Callable[[Harmon], None]) -> int:
    """Apply ``edit`` to the model of a run's latest checkpoint and write its trained tensors back.

    Training resumed from it continues from the edited weights, with the optimizer's state and
    the schedule as they were. Returns the checkpoint's step.
    """
    checkpoint, cfg = _checkpoint_folder(Path(run_dir), None)
    model, step = _checkpoint_model(checkpoint, cfg)
    edit(model)
    if (checkpoint / META).is_file():
        _rewrite_shards(checkpoint, trainable_state(model))
    else:
        state = torch.load(checkpoint / "state.pt", map_location="cpu", weights_only=True)
        state["model"] = trainable_state(model)
        write_atomically(checkpoint / "state.pt", lambda path: torch.save(state, path))
    return step


def _rewrite_shards(checkpoint: Path, trained: dict[str, torch.Tensor]) -> None:
    """Replace a sharded checkpoint's trained tensors (its optimiser state kept): the new files go into a
    second folder, which ``meta.json`` then names (rewritten atomically), and the old folder goes."""
    meta = _read_meta(checkpoint)
    old = meta["shards"]
    tensors = read_shards(checkpoint / old)
    tensors.update({f"model.{k}": v for k, v in trained.items()})
    meta["shards"] = SHARDS[1 - SHARDS.index(old)]
    shutil.rmtree(checkpoint / meta["shards"], ignore_errors=True)  # left by an edit that was killed
    write_shards(checkpoint / meta["shards"], tensors)
    write_atomically(checkpoint / META, json.dumps(meta))
    shutil.rmtree(checkpoint / old)


def final_model(module: HarmonForTraining, cfg: TrainConfig, world: World) -> Harmon | None:
    """The trained model, whole, on the main process (None on the others); every process must call it.

    A model sharded over the processes has its trained tensors gathered onto the main process, into the
    run's starting model (loaded again there, on the CPU).
    """
    if not is_sharded(module):
        return module.model if world.main else None
    trained = gather_trained(module, world)
    if not world.main:
        return None
    model = _starting_model(cfg)
    restore_trainable(model, trained, Path(cfg.output_dir))
    return model


def _checkpoint_folder(run: Path, step: int | None) -> tuple[Path, TrainConfig]:
    """The folder of a run's checkpoint (the latest, or that of ``step``) and the run's config."""
    cfg = TrainConfig.from_dict(read_json(run / "train_config.json"))
    root = run / CHECKPOINTS
    name = f"step_{step:07d}" if step is not None else latest_name(run)
    if name is None or not any((root / name / file).is_file() for file in ("state.pt", META)):
        found = sorted(p.name for p in root.glob("step_*")) if root.is_dir() else []
        wanted = f"checkpoint {name}" if name is not None else "'latest' pointer"
        raise InputError(f"no {wanted} in {root}; it holds {found or 'none'} (pass a step)")
    return root / name, cfg


def _starting_model(cfg: TrainConfig) -> Harmon:
    """The model a run started from, on the CPU, prepared as for training (freezing, LoRA)."""
    return prepare_model(load_pretrained(cfg.model)[0],
                         dataclasses.replace(cfg, compile=False, gradient_checkpointing=False))


def _checkpoint_model(checkpoint: Path, cfg: TrainConfig) -> tuple[Harmon, int]:
    """The run's starting model with a checkpoint's trained tensors (of either layout), and its step."""
    if (checkpoint / META).is_file():
        meta = _read_meta(checkpoint)
        tensors = read_shards(checkpoint / meta["shards"])
        trained = {k.removeprefix("model."): v for k, v in tensors.items() if k.startswith("model.")}
        step = meta["step"]
    else:
        state = torch.load(checkpoint / "state.pt", map_location="cpu", weights_only=True)
        trained, step = state["model"], state["step"]
    model = _starting_model(cfg)
    restore_trainable(model, trained, checkpoint)
    return model, int(step)
