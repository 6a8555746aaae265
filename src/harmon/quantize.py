"""Weight-only int8 quantization of a loaded model, with torchao: :func:`quantize_model`.

``"int8"`` stores the weights of the language model's linear layers (attention, MLP, and its LM head, with the
token embedding that shares the head's weight) and of the MAR encoder's and decoder's transformer blocks as
int8, one float32 scale per output row (symmetric, per channel: torchao's ``Int8Tensor``, as its
``Int8WeightOnlyConfig`` makes it), about a
quarter of their float32 bytes and half of their bfloat16 ones. Activations stay in the model's dtype: every
product converts the int8 weight to that dtype and multiplies in it, so the compute dtype (``--dtype``) is
unchanged and any of float32, bfloat16 and float16 goes with it.

Kept in the compute dtype, on purpose: the diffusion head (it predicts the noise of every diffusion step, so
its error would enter each image a hundred times over; ~7% of Harmon-0.5B's weights, ~4% of 1.5B's), the
projections between MAR and the LLM, the VAE (convolutions, which torchao's linear quantization does not
cover), norms, biases and position embeddings. ``docs/performance.md`` has the memory, speed and error this
measures against the unquantized model.

A quantized model is for inference: it cannot be trained or saved (load the folder again without
quantization for that). ``harmon.hub.load_pretrained(..., quantize="int8")`` and every command's
``--quantize int8`` apply it after loading.
"""
from __future__ import annotations

import logging
import warnings

import torch
from torch import nn

from .errors import InputError

QUANTIZATIONS = ("int8",)  # what ``quantize=`` accepts besides None
COMPUTE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # activations int8 weights are used with
DEVICE_TYPES = ("cpu", "cuda")  # where int8 weights are tested


def check_quantization(value: str | None) -> str | None:
    """``value`` as a quantization: None (or ``"none"``) for full-precision weights, else one of
    :data:`QUANTIZATIONS`; anything else is an :class:`~harmon.errors.InputError`."""
    if value is None or value == "none":
        return None
    if not isinstance(value, str) or value not in QUANTIZATIONS:
        raise InputError(f"unknown quantization {value!r}: use none or {', '.join(QUANTIZATIONS)}")
    return value


def check_combination(quantization: str | None, device: torch.device, dtype: torch.dtype) -> None:
    """Refuse (:class:`~harmon.errors.InputError`) int8 weights with a compute dtype other than float32,
    bfloat16 or float16, or on a device other than the CPU or CUDA."""
    if quantization is None:
        return
    if dtype not in COMPUTE_DTYPES:
        names = ", ".join(str(d).removeprefix("torch.") for d in COMPUTE_DTYPES)
        raise InputError(f"int8 weights compute in {names}, not {str(dtype).removeprefix('torch.')}")
    if torch.device(device).type not in DEVICE_TYPES:
        raise InputError(f"int8 weights run on cpu and cuda, not {torch.device(device).type}")


def _cuda_kernel_message(record: logging.LogRecord) -> bool:
    """False for torchao's notice that a CUDA kernel library (``_C_*.so``) did not load."""
    return not record.getMessage().startswith("Failed to load")


def _enum_registration_message(record: logging.LogRecord) -> bool:
    """False for torch's notice that registering an Enum as a pytree constant is deprecated (torchao does)."""
    return "is an Enum subclass" not in record.getMessage()


def quiet_torchao_warnings() -> None:
    """Keep three notices off stderr. Two come with torchao's import, which transformers does whenever torchao
    is installed, so every command would print them (``harmon``'s ``__init__`` calls this first): that its
    CUDA kernels did not load, in a build of torch without CUDA, where they cannot (weight-only int8 does not
    use them), and torch 2.13's deprecation of the Enums torchao registers. The third comes with compiling
    int8 layers: that torchao's ``Int8Tensor`` has no stable hash for the compile cache. Other messages
    pass; idempotent."""
    if torch.version.cuda is None:
        logging.getLogger("torchao").addFilter(_cuda_kernel_message)
    logging.getLogger("torch.utils._pytree").addFilter(_enum_registration_message)
    # torch.compile of int8 layers (--compile --quantize int8): only its compile cache's keys are affected
    warnings.filterwarnings("ignore", message="Int8Tensor does not implement _stable_hash_for_caching")


def import_torchao():
    """torchao (:func:`quiet_torchao_warnings` first), or an :class:`~harmon.errors.InputError` saying how
    to install it."""
    quiet_torchao_warnings()
    try:
        import torchao
    except ImportError as err:
        raise InputError("int8 weights need torchao: pip install 'torchao==0.18.0'") from err
    return torchao


class Int8Embedding(nn.Module):
    """A token embedding read from an int8 weight (torchao's ``Int8Tensor``, one scale per row): only the rows
    looked up are converted to the compute dtype. With a tied LM head it holds the head's own weight, so the
    model keeps one int8 copy of the vocabulary matrix."""

    def __init__(self, weight: nn.Parameter, dtype: torch.dtype):
        super().__init__()
        self.weight = weight
        self.dtype = dtype

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The rows of ``input_ids`` (any shape) in the compute dtype."""
        rows = self.weight.qdata[input_ids].to(self.dtype)
        return rows * self.weight.scale[input_ids].to(self.dtype)


QUANTIZED_PARTS = ("llm.", "mar.encoder_blocks.", "mar.decoder_blocks.")  # where int8 stores Linear weights
EMBED_KEY = "llm.model.embed_tokens.weight"


def int8_keys(model: nn.Module) -> set[str]:
    """The state-dict keys of the weights that int8 stores, for a model (also on the meta device) of
    :class:`~harmon.models.harmon.Harmon`'s layout: the ``nn.Linear`` weights under :data:`QUANTIZED_PARTS`
    (the LM head included) and the token embedding."""
    keys = {f"{name}.weight" for name, module in model.named_modules()
            if isinstance(module, nn.Linear) and name.startswith(QUANTIZED_PARTS)}
    return keys | {EMBED_KEY}


def int8_weight(weight: torch.Tensor) -> nn.Parameter:
    """``weight`` (out, in) as an int8 parameter with one scale per output row (symmetric; torchao's
    ``Int8Tensor``), on ``weight``'s device; ``F.linear`` with it multiplies in the input's dtype."""
    return int8_from_rows(lambda start, stop: weight[start:stop].detach(), tuple(weight.shape), weight.device,
                          weight.dtype)


def int8_from_rows(read_rows, shape: tuple[int, int], device: torch.device, dtype: torch.dtype,
                   chunk_elements: int = 1 << 21) -> nn.Parameter:
    """The int8 parameter of :func:`int8_weight` for a weight of ``shape`` given a row at a time:
    ``read_rows(start, stop)`` returns rows ``start:stop`` in ``dtype`` on ``device``, asked for about
    ``chunk_elements`` values at a time. Each row is quantized on its own, so the result is the same bits as
    in one go, and no full-precision copy of the whole weight is ever needed: the loader reads a checkpoint's
    rows this way (a vocabulary matrix of Harmon-1.5B is 0.9 GiB in float32, its int8 0.2 GiB)."""
    torchao = import_torchao()
    from torchao.quantization.granularity import PerRow

    Int8Tensor = torchao.quantization.Int8Tensor
    n, k = shape
    qdata = torch.empty(shape, dtype=torch.int8, device=device)
    scale = torch.empty((n, 1), dtype=torch.float32, device=device)
    zero_point = torch.empty((n, 1), dtype=torch.int8, device=device)
    step = max(1, chunk_elements // max(1, k))
    with torch.no_grad():
        for start in range(0, n, step):
            part = Int8Tensor.from_hp(read_rows(start, min(n, start + step)), PerRow())
            qdata[start:start + step] = part.qdata
            scale[start:start + step] = part.scale
            zero_point[start:start + step] = part.zero_point
        return nn.Parameter(Int8Tensor(qdata, scale, [1, k], dtype, zero_point=zero_point), requires_grad=False)


def finish_quantization(model, quantization: str) -> None:
    """After every key of :func:`int8_keys` holds an :func:`int8_weight`: the token embedding made an
    :class:`Int8Embedding` of its (with a tied head, shared) int8 weight, gradients off, ``model.quantization``
    set."""
    model.llm.model.embed_tokens = Int8Embedding(model.llm.model.embed_tokens.weight, model.dtype)
    model.requires_grad_(False)
    model.quantization = quantization


def quantize_model(model, quantization: str | None):
    """Quantize ``model`` (a loaded :class:`~harmon.models.harmon.Harmon`) in place to ``quantization``
    (:func:`check_quantization`; None leaves it as it is) and return it. Each weight is quantized where it
    is (its device), from its values in the model's dtype; a tied LM head and embedding stay one tensor.
    ``harmon.checkpoint.load_model(..., quantize=)`` does the same while reading, without ever holding the
    whole model in full precision.
    """
    quantization = check_quantization(quantization)
    if quantization is None:
        return model
    check_combination(quantization, model.device, model.dtype)
    if model.quantization is not None:
        raise InputError(f"the model is already quantized ({model.quantization})")
    done = {}  # id of a full-precision weight -> its int8 parameter (tied weights quantized once)
    for key in sorted(int8_keys(model)):
        owner, _, name = key.rpartition(".")
        module = model.get_submodule(owner)
        weight = getattr(module, name)
        if id(weight) not in done:
            done[id(weight)] = int8_weight(weight)
        setattr(module, name, done[id(weight)])
    del done, weight
    finish_quantization(model, quantization)
    return model


def weight_bytes(module: nn.Module) -> int:
    """Bytes of ``module``'s distinct parameters and buffers as stored: an int8 weight counts its int8 data,
    scales and zero points (a tensor shared by two modules, such as a tied embedding, once)."""
    seen, total = set(), 0
    for t in list(module.parameters()) + list(module.buffers()):
        if id(t) in seen:
            continue
        seen.add(id(t))
        names = getattr(t, "tensor_data_names", None)
        if names is None:
            total += t.numel() * t.element_size()
            continue
        for name in names + list(getattr(t, "optional_tensor_data_names", [])):
            inner = getattr(t, name, None)
            if inner is not None:
                total += inner.numel() * inner.element_size()
    return total
