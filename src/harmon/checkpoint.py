"""Loading Harmon weights, strictly and without executing pickled code (writing them: :mod:`harmon.saving`).

Supported inputs:

* the released layout: ``harmon_*.pth`` (state dict without ``vae.`` keys) +
  ``kl16.ckpt`` (``{"model": vae_state_dict}``), with the LLM config from a
  preset inferred from the weights' shapes or from a Qwen2.5 folder;
* our folder: ``config.json`` (``model_type: "harmon"``) + ``model.safetensors``
  (``*.pth`` / ``*.bin`` weights there are read with ``weights_only=True``);
* the official Hugging Face release (:mod:`harmon.release`): ``config.json`` with
  ``llm`` and ``mar.type`` + ``model.safetensors``; its ``.py`` files are never imported;
* a reference fixture folder: ``config.json`` (original kwargs) + ``weights.safetensors``.

The model is built on the meta device and every tensor is loaded straight into
the target device and dtype, so the weights are never held twice.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

import torch

from .config import PRESETS, HarmonConfig, VAEConfig
from .models.harmon import Harmon, qwen2_config
from .quantize import check_combination, check_quantization, finish_quantization, int8_from_rows, int8_keys
from .release import ReleaseConfigError, config_from_release, is_release_config
from .tensor_files import CheckpointError, PathLike, SafetensorsFile, read_torch_file, weight_headers

TIED_KEY, EMBED_KEY = "llm.lm_head.weight", "llm.model.embed_tokens.weight"
WEIGHTS_NAME, CONFIG_NAME = "model.safetensors", "config.json"
RELEASED_PRESETS = ("harmon-0.5b", "harmon-1.5b")


def _same_tensor(state_dict: Mapping[str, torch.Tensor], a: str, b: str) -> bool:
    if isinstance(state_dict, SafetensorsFile):
        return state_dict.same_bytes(a, b)
    return torch.equal(state_dict[a], state_dict[b])


# -- building and strict loading ----------------------------------------------------------------
def build_empty(config: HarmonConfig) -> Harmon:
    """The model with all parameters on the meta device (no memory allocated)."""
    with torch.device("meta"):
        return Harmon(config)


def expected_keys(config: HarmonConfig) -> dict[str, tuple[int, ...]]:
    """State-dict keys and shapes of a model of this configuration (built on meta)."""
    return {k: tuple(v.shape) for k, v in build_empty(config).state_dict().items()}


def load_state_dict(config: HarmonConfig, state_dict: Mapping[str, torch.Tensor], *,
                    device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                    quantize: str | None = None) -> Harmon:
    """Build the model on meta and fill it from ``state_dict`` with strict key and shape checks.

    The tied ``llm.lm_head.weight`` may be absent. Errors name the missing,
    unexpected and mis-shaped keys. ``quantize="int8"`` stores each weight that :mod:`harmon.quantize` makes
    int8 as it is read (never the whole model in ``dtype``).
    """
    quantize = check_quantization(quantize)
    check_combination(quantize, torch.device(device), dtype)
    model = build_empty(config)
    int8 = int8_keys(model) if quantize else set()
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    shape_of = state_dict.shape if isinstance(state_dict, SafetensorsFile) else \
        (lambda key: tuple(state_dict[key].shape))
    names = {k: k for k in state_dict}  # model key -> key in state_dict
    tied = bool(config.llm.get("tie_word_embeddings", False))
    if tied:
        # one tensor serves both keys; a checkpoint may hold either key or both (then equal)
        if TIED_KEY in names and EMBED_KEY in names and not _same_tensor(state_dict, TIED_KEY, EMBED_KEY):
            raise CheckpointError(f"{EMBED_KEY} and {TIED_KEY} differ, but the config ties them "
                                  "(tie_word_embeddings=True)")
        source = EMBED_KEY if EMBED_KEY in names else TIED_KEY if TIED_KEY in names else None
        names.pop(EMBED_KEY, None)
        names.pop(TIED_KEY, None)
        if source is not None:
            names[EMBED_KEY] = names[TIED_KEY] = source
    missing = sorted(set(expected) - set(names))
    unexpected = sorted(set(names) - set(expected))
    wrong = sorted(k for k in set(expected) & set(names) if shape_of(names[k]) != expected[k])
    if missing or unexpected or wrong:
        raise CheckpointError(_mismatch_message(missing, unexpected,
                                                [(k, shape_of(names[k]), expected[k]) for k in wrong], config))
    device = torch.device(device)
    floating = {k for k, v in model.state_dict().items() if v.is_floating_point()}
    converted, not_finite = {}, []
    for key, source in names.items():  # one tensor at a time: never two copies of the weights
        if tied and key == TIED_KEY:
            continue
        if key in int8:  # read, checked and quantized a few rows at a time: never the whole weight in dtype
            converted[key] = int8_from_rows(_checked_rows(state_dict, source, device, dtype, not_finite),
                                            expected[key], device, dtype)
            continue
        # a tensor copied anyway (to another dtype or device) is read with plain reads, so that the file's
        # pages do not pile up in this process beside the copies; else the mapped file is the tensor
        copied = isinstance(state_dict, SafetensorsFile) and (device.type != "cpu" or (
            key in floating and state_dict.stored_dtype(source) != str(dtype).removeprefix("torch.")))
        tensor = state_dict.read_copy(source) if copied else state_dict[source]
        if tensor.is_floating_point() != (key in floating):
            raise CheckpointError(f"{source} is stored as {str(tensor.dtype).removeprefix('torch.')}, but the model "
                                  f"holds {'floating point' if key in floating else 'integer'} values there: the "
                                  "file is corrupt or not a Harmon checkpoint")
        converted[key] = tensor.to(device=device, dtype=dtype if tensor.is_floating_point() else tensor.dtype)
        del tensor
        if key in floating and not _all_finite(converted[key]):
            not_finite.append(source)
    if not_finite:
        raise CheckpointError(f"{len(not_finite)} tensors hold NaN or infinite values ({', '.join(not_finite[:5])}"
                              f"{', ...' if len(not_finite) > 5 else ''}): the weights are corrupt (or overflowed "
                              f"when cast to {str(dtype).removeprefix('torch.')})")
    if tied:
        converted[TIED_KEY] = converted[EMBED_KEY]  # converted once, not twice
    model.load_state_dict(converted, strict=True, assign=True)
    if tied:
        model.llm.lm_head.weight = model.llm.model.embed_tokens.weight
    _materialize_buffers(model, device)
    if quantize:
        finish_quantization(model, quantize)
    model.eval()
    return model


def _checked_rows(state_dict: Mapping[str, torch.Tensor], source: str, device: torch.device, dtype: torch.dtype,
                  not_finite: list[str]):
    """``read_rows(start, stop)`` for :func:`~harmon.quantize.int8_from_rows`: rows of the floating tensor
    ``source`` in ``dtype`` on ``device`` (plain reads from a safetensors file), ``source`` noted in
    ``not_finite`` (once) when they hold NaN or infinity."""
    def read_rows(start: int, stop: int) -> torch.Tensor:
        rows = state_dict.read_copy(source, start, stop) if isinstance(state_dict, SafetensorsFile) \
            else state_dict[source][start:stop]
        if not rows.is_floating_point():
            raise CheckpointError(f"{source} is stored as {str(rows.dtype).removeprefix('torch.')}, but the model "
                                  "holds floating point values there: the file is corrupt or not a Harmon checkpoint")
        rows = rows.to(device=device, dtype=dtype)
        if not _all_finite(rows) and source not in not_finite:
            not_finite.append(source)
        return rows

    return read_rows


def _all_finite(tensor: torch.Tensor) -> bool:
    """No NaN or infinity in ``tensor``: its min and max, which NaN propagates to (as fast as a sum, no copy)."""
    if tensor.numel() == 0:
        return True
    low, high = torch.aminmax(tensor)
    return bool(torch.isfinite(low) & torch.isfinite(high))


def _materialize_buffers(model: Harmon, device: torch.device) -> None:
    """Recreate the non-persistent buffers (rotary frequencies) that meta construction left empty."""
    from transformers.models.qwen2.modeling_qwen2 import Qwen2RotaryEmbedding

    model.llm.model.rotary_emb = Qwen2RotaryEmbedding(model.llm.config).to(device)
    leftover = [name for name, t in model.named_buffers() if t.is_meta] + \
               [name for name, t in model.named_parameters() if t.is_meta]
    if leftover:
        raise CheckpointError(f"tensors left unloaded on the meta device: {leftover[:10]}")


def _mismatch_message(missing, unexpected, wrong, config: HarmonConfig) -> str:
    def head(keys, n=8):
        return ", ".join(map(str, keys[:n])) + (f", ... ({len(keys)} in all)" if len(keys) > n else "")
    lines = [f"checkpoint does not match the {config.name!r} architecture:"]
    if missing:
        lines.append(f"  missing keys: {head(missing)}")
        if all(k.startswith("vae.") for k in missing):
            lines.append("  (only VAE weights are missing: released harmon_*.pth files need kl16.ckpt as well)")
    if unexpected:
        lines.append(f"  unexpected keys: {head(unexpected)}")
    if wrong:
        lines.append("  wrong shapes: " + head([f"{k} {tuple(g)} (expected {tuple(e)})" for k, g, e in wrong]))
    return "\n".join(lines)


# -- the released layout ------------------------------------------------------------------------------
def infer_config(state_dict: Mapping[str, torch.Tensor]) -> HarmonConfig:
    """The released preset whose LLM width matches ``state_dict`` (Harmon-0.5B or -1.5B)."""
    if EMBED_KEY not in state_dict:
        raise CheckpointError(f"cannot recognise the model: {EMBED_KEY} is not in the checkpoint")
    vocab, hidden = tuple(state_dict[EMBED_KEY].shape)
    for name in RELEASED_PRESETS:  # never the test-only presets (their configs differ from any fixture's)
        config = PRESETS[name]()
        if config.llm_hidden_size == hidden and config.llm["vocab_size"] == vocab:
            return config
    raise CheckpointError(f"no released preset ({', '.join(RELEASED_PRESETS)}) has an LLM of hidden size {hidden} "
                          f"and vocabulary {vocab}; pass a config explicitly")


def config_with_qwen_folder(config: HarmonConfig, qwen_dir: PathLike) -> HarmonConfig:
    """``config`` with its LLM settings replaced by a Qwen2.5-Instruct folder's ``config.json``."""
    path = Path(qwen_dir) / CONFIG_NAME
    if not path.is_file():
        raise CheckpointError(f"{qwen_dir} is not a Qwen2.5 folder: {CONFIG_NAME} is missing")
    llm = read_json(path)
    keep = set(qwen2_config({}).to_dict()) - {"architectures", "transformers_version", "dtype", "torch_dtype"}
    llm = {k: v for k, v in llm.items() if k in keep and k not in ("model_type",)}
    return HarmonConfig(llm=llm, mar=config.mar, vae=config.vae, vae_scale=config.vae_scale, name=config.name)


def load_original(harmon_pth: PathLike, vae_ckpt: PathLike, *, config: HarmonConfig | None = None,
                  qwen_dir: PathLike | None = None, device: str | torch.device = "cpu",
                  dtype: torch.dtype = torch.float32) -> Harmon:
    """Load the released ``harmon_*.pth`` + ``kl16.ckpt`` (the VAE keys get the ``vae.`` prefix)."""
    weights = read_torch_file(harmon_pth)
    vae_keys = [k for k in weights if k.startswith("vae.")]
    if vae_keys:
        raise CheckpointError(f"{harmon_pth} already holds VAE keys ({vae_keys[0]}, ...): "
                              "load it as a complete state dict instead")
    vae = read_torch_file(vae_ckpt)
    if not any(k.startswith("encoder.conv_in") for k in vae):
        raise CheckpointError(f"{vae_ckpt} is not a KL-16 VAE checkpoint (no encoder.conv_in weights)")
    weights.update({f"vae.{k}": v for k, v in vae.items()})
    config = config or infer_config(weights)
    if qwen_dir is not None:
        config = config_with_qwen_folder(config, qwen_dir)
    return load_state_dict(config, weights, device=device, dtype=dtype)


# -- folders --------------------------------------------------------------------------------------
LAYOUTS = {
    "ours": "ours (config.json + model.safetensors)",
    "release": "Hugging Face release (config.json with llm + mar.type, model.safetensors; its .py files not used)",
    "reference": "reference fixture (original kwargs config.json + weights.safetensors)",
}


def config_layout(data: dict[str, Any]) -> str:
    """Which of :data:`LAYOUTS` a model folder's ``config.json`` belongs to."""
    if "mar_kwargs" in data:
        return "reference"
    return "release" if is_release_config(data) else "ours"


def read_config(folder: PathLike) -> HarmonConfig:
    """The :class:`HarmonConfig` of a model folder in any of :data:`LAYOUTS`."""
    path = Path(folder) / CONFIG_NAME
    if not path.is_file():
        raise CheckpointError(f"{folder} has no {CONFIG_NAME}")
    data = read_json(path)
    layout = config_layout(data)
    try:
        if layout == "reference":
            return config_from_reference(data)
        if layout == "release":
            return config_from_release(data)
        return HarmonConfig.from_dict(data)
    except ReleaseConfigError as err:
        raise CheckpointError(f"{path} (Hugging Face release layout): {err}") from err
    except (TypeError, ValueError, KeyError) as err:
        raise CheckpointError(f"{path}: {err}") from err


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from ``path``; unreadable or non-object content raises :class:`CheckpointError`."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"cannot read {path}: {err}") from err
    except RecursionError:
        raise CheckpointError(f"cannot read {path}: JSON nested too deeply") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} does not hold a JSON object")
    return data


def config_from_reference(data: dict[str, Any]) -> HarmonConfig:
    """Config of a reference fixture ``config.json`` (``llm_config``, ``mar_kwargs``, ``vae``, ``vae_scale``)."""
    llm = {k: v for k, v in data["llm_config"].items() if k != "torch_dtype"}
    vae = {k: v for k, v in data["vae"].items() if k != "note"}
    return HarmonConfig(llm=llm, mar=data["mar_kwargs"], vae=VAEConfig.from_dict(vae),
                        vae_scale=data["vae_scale"], name=data.get("name", "reference"))


def folder_weights_path(folder: Path) -> Path:
    """The weights file of a model folder (``model.safetensors``, a fixture's ``weights.safetensors``, ...)."""
    for name in (WEIGHTS_NAME, "weights.safetensors", "pytorch_model.bin", "model.pth"):
        if (folder / name).is_file():
            return folder / name
    shards = sorted(folder.glob("*.safetensors"))
    if len(shards) == 1:
        return shards[0]
    raise CheckpointError(f"{folder} has no weights: expected {WEIGHTS_NAME} (found {[p.name for p in folder.iterdir()]})")


def stored_dtype(path: Path) -> torch.dtype:
    """The dtype a weights file stores its floating tensors in (float32 when they are mixed)."""
    floating = {d for d in weight_headers(path)[1].values() if d in ("float32", "bfloat16", "float16", "float64")}
    return getattr(torch, floating.pop()) if len(floating) == 1 else torch.float32


def load_model(folder: PathLike, *, device: str | torch.device = "cpu",
               dtype: torch.dtype = torch.float32, quantize: str | None = None) -> Harmon:
    """Load a model folder in any of :data:`LAYOUTS`, casting the weights to ``dtype`` as they are read
    (``quantize``: as :func:`load_state_dict`)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"model folder not found: {folder}")
    config = read_config(folder)
    path = folder_weights_path(folder)
    weights = SafetensorsFile(path) if path.suffix == ".safetensors" else read_torch_file(path)
    return load_state_dict(config, weights, device=device, dtype=dtype, quantize=quantize)
