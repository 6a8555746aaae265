"""Writing a Harmon's weights in the three layouts :mod:`harmon.checkpoint` reads: our folder, the official
Hugging Face release's folder, and the released ``.pth`` + ``kl16.ckpt`` pair. Every file is written whole
(:func:`harmon.files.write_atomically`), readable as the user's umask says."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from .checkpoint import CONFIG_NAME, EMBED_KEY, TIED_KEY, WEIGHTS_NAME, CheckpointError, PathLike
from .errors import InputError
from .files import write_atomically
from .models.harmon import Harmon
from .release import ReleaseConfigError, release_config


def _cpu_state(model: Harmon, dtype: torch.dtype | None, *, tied_head: bool) -> dict[str, torch.Tensor]:
    """The model's tensors on the CPU, floating ones in ``dtype`` (None: as they are); a tied LM head left out
    unless ``tied_head``. A quantized model is refused: its int8 weights are not a checkpoint's."""
    if model.quantization is not None:
        raise InputError(f"a model with {model.quantization} weights cannot be saved: load it without quantization")
    skip = {TIED_KEY} if model.config.llm.get("tie_word_embeddings", False) and not tied_head else set()
    return {k: v.detach().to("cpu", dtype=dtype if dtype is not None and v.is_floating_point() else v.dtype)
            .contiguous() for k, v in model.state_dict().items() if k not in skip}


def _write_json(path: Path, data: dict[str, Any]) -> None:
    write_atomically(path, json.dumps(data, indent=1) + "\n")


def _write_safetensors(path: Path, state: dict[str, torch.Tensor]) -> None:
    write_atomically(path, lambda tmp: save_file(state, str(tmp), metadata={"format": "pt", "model_type": "harmon"}))


def save_model(model: Harmon, folder: PathLike, *, dtype: torch.dtype | None = None) -> Path:
    """Write ``config.json`` + ``model.safetensors`` (the tied ``lm_head`` is stored once, as the embedding),
    floating tensors in ``dtype`` (None: as the model holds them)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = _cpu_state(model, dtype, tied_head=False)
    _write_safetensors(folder / WEIGHTS_NAME, state)
    _write_json(folder / CONFIG_NAME, model.config.to_dict())
    return folder


def save_release(model: Harmon, folder: PathLike, *, dtype: torch.dtype = torch.bfloat16) -> Path:
    """Write the official Hugging Face release's layout: its ``config.json`` and one ``model.safetensors``
    (VAE included, ``llm.lm_head.weight`` stored beside the embedding, as the release does).

    Raises :class:`CheckpointError` when the release's model code could not build this model.
    """
    try:
        config = release_config(model.config, str(dtype).removeprefix("torch."))
    except ReleaseConfigError as err:
        raise CheckpointError(str(err)) from err
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = _cpu_state(model, dtype, tied_head=True)
    if TIED_KEY in state and state[TIED_KEY].data_ptr() == state.get(EMBED_KEY, state[TIED_KEY]).data_ptr():
        state[TIED_KEY] = state[TIED_KEY].clone()  # safetensors stores no shared tensors
    _write_safetensors(folder / WEIGHTS_NAME, state)
    _write_json(folder / CONFIG_NAME, config)
    return folder


def save_original(model: Harmon, harmon_pth: PathLike, vae_ckpt: PathLike, *,
                  dtype: torch.dtype | None = None) -> None:
    """Write the released ``.pth`` layout: ``harmon_*.pth`` without VAE keys and ``kl16.ckpt`` as
    ``{"model": vae}`` (plain tensors, readable with ``weights_only=True``)."""
    state = _cpu_state(model, dtype, tied_head=True)
    vae_prefix = "vae."
    write_atomically(Path(harmon_pth), lambda tmp: torch.save(
        {k: v for k, v in state.items() if not k.startswith(vae_prefix)}, tmp))
    write_atomically(Path(vae_ckpt), lambda tmp: torch.save(
        {"model": {k[len(vae_prefix):]: v for k, v in state.items() if k.startswith(vae_prefix)}}, tmp))
