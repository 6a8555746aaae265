"""A run's checkpoints: written atomically, resumed exactly, checked against the run's settings, and turned
into model folders for the pipelines (at the end of a run or from any checkpoint midway).

Layout under the run's ``output_dir``: ``checkpoints/step_XXXXXXX/`` holds ``state.pt`` (step, trained
tensors, optimiser, config, process count, the latent readout when on) and ``rng_rank{R}.pt`` (each
process's global RNG state); ``checkpoints/latest`` names the newest.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable

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
from .model import HarmonForTraining, prepare_model

CHECKPOINTS = "checkpoints"

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
    """Write ``checkpoints/step_XXXXXXX`` atomically (temp folder, then rename) and point ``latest`` at it."""
    root = out / CHECKPOINTS
    final = root / f"step_{step:07d}"
    tmp = root / f".step_{step:07d}.tmp"
    if world.main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier(world)
    rng_state = torch.get_rng_state()
    write_atomically(tmp / f"rng_rank{world.rank}.pt", lambda path: torch.save(rng_state, path))
    if world.main:
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
    """Restore the latest checkpoint; returns the step to continue from (0 when there is none)."""
    name = latest_name(out)
    if name is None:
        return 0
    folder = out / CHECKPOINTS / name
    state = torch.load(folder / "state.pt", map_location="cpu", weights_only=True)
    if state["world_size"] != world.size:
        raise InputError(f"{folder} was written by {state['world_size']} processes; resume with the same number")
    if (module.readout is None) != ("readout" not in state):
        raise InputError(f"{folder} was written with latent_readout {'off' if module.readout is not None else 'on'}; "
                         "resume with the same setting")
    restore_trainable(module.model, state["model"], folder)
    if module.readout is not None:
        module.readout.load_state_dict(state["readout"])
    optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(torch.load(folder / f"rng_rank{world.rank}.pt", weights_only=True))
    return int(state["step"])


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
    saved = read_json(saved_path)
    now = json.loads(json.dumps(cfg.to_dict()))  # tuples as JSON has them

    def flat(d, prefix=""):
        return {k2: v2 for k, v in d.items()
                for k2, v2 in (flat(v, f"{prefix}{k}.").items() if isinstance(v, dict) else [(prefix + k, v)])}
    old, new = flat(saved), flat(now)
    changed = [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new))
               if old.get(k) != new.get(k) and k not in RESUMABLE_CHANGES]
    if changed:
        raise InputError(f"{out} holds a run with other settings ({'; '.join(changed)}): resume it with its own "
                         f"({saved_path}), or train into a new output_dir")


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
    model, state = _checkpoint_model(checkpoint, cfg)
    edit(model)
    state["model"] = trainable_state(model)
    write_atomically(checkpoint / "state.pt", lambda path: torch.save(state, path))
    return int(state["step"])


def _checkpoint_folder(run: Path, step: int | None) -> tuple[Path, TrainConfig]:
    """The folder of a run's checkpoint (the latest, or that of ``step``) and the run's config."""
    cfg = TrainConfig.from_dict(read_json(run / "train_config.json"))
    root = run / CHECKPOINTS
    name = f"step_{step:07d}" if step is not None else latest_name(run)
    if name is None or not (root / name / "state.pt").is_file():
        found = sorted(p.name for p in root.glob("step_*")) if root.is_dir() else []
        wanted = f"checkpoint {name}" if name is not None else "'latest' pointer"
        raise InputError(f"no {wanted} in {root}; it holds {found or 'none'} (pass a step)")
    return root / name, cfg


def _checkpoint_model(checkpoint: Path, cfg: TrainConfig) -> tuple[Harmon, dict[str, Any]]:
    """The run's starting model with a checkpoint's trained tensors (prepared as for training), and its state."""
    state = torch.load(checkpoint / "state.pt", map_location="cpu", weights_only=True)
    model = prepare_model(load_pretrained(cfg.model)[0],
                          dataclasses.replace(cfg, compile=False, gradient_checkpointing=False))
    restore_trainable(model, state["model"], checkpoint)
    return model, state
