"""Finding a model, its tokenizer, and the device and dtype to run it on: :func:`load_pretrained`.

A model is a local folder in any layout :func:`harmon.checkpoint.read_config` knows (ours,
written by ``harmon convert`` / ``harmon export`` / training; the official Hugging Face
release; a reference fixture), or a Hugging Face repo id (``wusize/Harmon-1_5B``): taken
from the local Hugging Face cache, else downloaded where the hub can be reached; offline,
the error says what to download and where to put it.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import torch

from .checkpoint import CheckpointError, load_model
from .errors import InputError
from .models.harmon import Harmon
from .quantize import check_combination, check_quantization

PathLike = str | os.PathLike
QWEN2_5_VOCAB_SIZE = 151_665  # BPE ranks + the 22 added tokens of Qwen2.5
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
# what a model needs from a hub repo: never the release's remote-code .py files
HUB_FILES = ["*.json", "*.safetensors", "*.txt"]
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")

HOW_TO_GET_A_MODEL = (
    "download the Hugging Face release (`huggingface-cli download wusize/Harmon-1_5B --local-dir MODEL_DIR`) and "
    "pass that folder, or download the .pth weights (harmon_1.5b.pth and kl16.ckpt from the repo wusize/harmon) "
    "and run `harmon convert --pth harmon_1.5b.pth --vae kl16.ckpt --out MODEL_DIR`")


DEFAULT_MODEL_DIR = Path(__file__).parent / "assets" / "shapes-model"


def default_model_folder() -> Path:
    """The model shipped with the package: the small Harmon of the shapes world (``harmon train-shapes``)."""
    if not (DEFAULT_MODEL_DIR / "config.json").is_file():
        raise CheckpointError(f"the default model is missing from this installation ({DEFAULT_MODEL_DIR}): "
                              "reinstall harmon, make one with `harmon train-shapes --out DIR` (then --model "
                              "DIR/model), or pass --model")
    return DEFAULT_MODEL_DIR


def resolve_model_folder(name_or_path: PathLike | None) -> Path:
    """A local model folder for ``name_or_path``: the folder itself, or a cached Hugging Face snapshot;
    None means the shipped default model (:func:`default_model_folder`).

    Raises :class:`CheckpointError` saying what to download and where to put it when neither exists.
    """
    if name_or_path is None:
        return default_model_folder()
    text = os.fspath(name_or_path)
    if not text.strip():
        raise CheckpointError("the model name is empty")
    path = Path(text).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise CheckpointError(f"the model must be a folder (config.json + model.safetensors), not a file: {path}; "
                              "to use released .pth/.ckpt files, run `harmon convert` first")
    if _REPO_ID.match(text) and not text.startswith("."):
        try:
            from huggingface_hub import snapshot_download
        except ImportError:
            snapshot_download = None
        if snapshot_download is not None:
            try:
                return Path(snapshot_download(text, local_files_only=True, allow_patterns=HUB_FILES))
            except Exception:  # not in the local cache (LocalEntryNotFoundError, ...)
                pass
            if not os.environ.get("HF_HUB_OFFLINE"):
                try:  # online where the hub can be reached; fails fast where it cannot
                    return Path(snapshot_download(text, etag_timeout=10, allow_patterns=HUB_FILES))
                except Exception as err:
                    reason = f" (download failed: {type(err).__name__})"
            else:
                reason = " (HF_HUB_OFFLINE is set)"
        else:
            reason = " (huggingface_hub is not installed)"
        raise CheckpointError(
            f"model {text!r} is neither a local folder nor in the local Hugging Face cache{reason}: download it "
            f"first (`huggingface-cli download {text} --local-dir MODEL_DIR`, then use MODEL_DIR), or "
            + HOW_TO_GET_A_MODEL)
    raise CheckpointError(f"model folder not found: {path}. To get one, " + HOW_TO_GET_A_MODEL)


def has_tokenizer(folder: PathLike) -> bool:
    """Whether ``folder`` holds a saved tokenizer (``tokenizer.json`` or ``tokenizer_config.json``)."""
    return any((Path(folder) / name).is_file() for name in TOKENIZER_FILES)


def default_tokenizer(vocab_size: int):
    """The tokenizer for a model without one of its own: Qwen2.5's (rebuilt offline) when the LLM's
    vocabulary can hold it, else the 260-token byte-level tokenizer (tiny test models)."""
    from .tokenizer import build_byte_tokenizer, build_qwen2_tokenizer

    if vocab_size >= QWEN2_5_VOCAB_SIZE:
        return build_qwen2_tokenizer()
    if vocab_size < 260:
        raise CheckpointError(f"the LLM's vocabulary of {vocab_size} tokens is too small for any built-in "
                              "tokenizer; save one next to the model (tokenizer.save_pretrained(folder))")
    return build_byte_tokenizer()


def load_tokenizer(folder: PathLike, vocab_size: int):
    """The tokenizer saved in ``folder``, else :func:`default_tokenizer` for ``vocab_size``."""
    if has_tokenizer(folder):
        from transformers import AutoTokenizer
        from transformers.utils import logging as hf_logging

        # AutoTokenizer also reads our config.json and warns that model_type "harmon" is unknown to it
        level = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()
        try:
            # never the remote code a folder may name (the release's auto_map): its .py files are not run
            return AutoTokenizer.from_pretrained(os.fspath(folder), local_files_only=True, trust_remote_code=False)
        except Exception as err:  # corrupt or incomplete tokenizer files
            raise CheckpointError(f"cannot load the tokenizer in {folder}: {err}") from err
        finally:
            hf_logging.set_verbosity(level)
    return default_tokenizer(vocab_size)


def load_pretrained(name_or_path: PathLike | None = None, *, device: str | torch.device = "cpu",
                    dtype: str | torch.dtype = torch.float32, quantize: str | None = None) -> tuple[Harmon, Any]:
    """The model and its tokenizer: the one loading entry point of the command line, the server, batch runs,
    evaluation, training and the pipelines' ``from_pretrained``.

    ``name_or_path``: a model folder in any supported layout (ours, the official Hugging Face release, a
    reference fixture), a Hugging Face repo id (local cache first), or None for the shipped shapes model.
    ``device`` / ``dtype`` may be names (``"auto"`` as :func:`pick_device` / :func:`pick_dtype`); weights
    are cast to ``dtype`` while they are read. ``quantize="int8"`` stores the LLM's and the MAR blocks' linear
    weights as int8 while they are read (:mod:`harmon.quantize`; activations stay in ``dtype``: float32,
    bfloat16 or float16, on the CPU or CUDA), checked before anything is read. The tokenizer is the folder's
    own, else a built-in one.
    """
    quantize = check_quantization(quantize)
    device = pick_device(device) if isinstance(device, str) else torch.device(device)
    dtype = pick_dtype(dtype, device) if isinstance(dtype, str) else dtype
    check_combination(quantize, device, dtype)
    folder = resolve_model_folder(name_or_path)
    model = load_model(folder, device=device, dtype=dtype, quantize=quantize)
    return model, load_tokenizer(folder, int(model.config.llm["vocab_size"]))


def pick_device(name: str = "auto") -> torch.device:
    """``auto``: CUDA if available, else MPS if available, else CPU. Named devices must be available."""
    name = (name or "auto").lower()
    mps = getattr(torch.backends, "mps", None)
    mps_ok = bool(mps is not None and mps.is_available())
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps") if mps_ok else torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise InputError(f"device {name!r} requested, but CUDA is not available; choose cpu")
    if name == "mps" and not mps_ok:
        raise InputError("device 'mps' requested, but MPS is not available; choose cpu")
    try:
        return torch.device(name)
    except RuntimeError as err:
        raise InputError(f"unknown device {name!r}: use auto, cpu, cuda or mps") from err


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    """``auto``: bfloat16 on CUDA, float32 on CPU and MPS; else the named dtype."""
    name = (name or "auto").lower()
    if name == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    if name not in DTYPES:
        raise InputError(f"unknown dtype {name!r}: use auto, {', '.join(DTYPES)}")
    return DTYPES[name]
