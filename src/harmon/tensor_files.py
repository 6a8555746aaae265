"""Reading tensor files strictly: ``.pth`` / ``.ckpt`` / ``.bin`` state dicts with ``weights_only=True`` (no
pickled code runs) and ``.safetensors`` files one tensor at a time (:class:`SafetensorsFile`), with the errors
(:class:`CheckpointError`) that say what is wrong with a file. :mod:`harmon.checkpoint` builds models from them.
"""
from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors import safe_open

from .errors import InputError

PathLike = str | os.PathLike


class CheckpointError(InputError):
    """A checkpoint that cannot be loaded as asked, with the reason."""


def read_torch_file(path: PathLike) -> dict[str, torch.Tensor]:
    """A ``.pth`` / ``.ckpt`` / ``.bin`` state dict, loaded with ``weights_only=True`` (no code runs).

    Unwraps ``{"model": ...}`` and ``{"state_dict": ...}`` containers.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint file not found: {path}")
    try:
        # mmap only works for the zip format of torch.save; legacy (non-zip) files are read without it
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except Exception as err:  # UnpicklingError, RuntimeError, EOFError, KeyError (garbage), ...
        detail = type(err).__name__ + "".join(f": {line}" for line in str(err).strip().splitlines()[:1])
        raise CheckpointError(
            f"refusing to load {path}: it is not a plain tensor checkpoint that can be read with "
            f"weights_only=True (no pickled code is ever executed). Details: {detail}") from err
    for wrapper in ("model", "state_dict", "module"):
        if isinstance(obj, dict) and wrapper in obj and isinstance(obj[wrapper], dict):
            obj = obj[wrapper]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path} does not hold a state dict of tensors")
    return obj


class SafetensorsFile(Mapping[str, torch.Tensor]):
    """A ``.safetensors`` file as a read-only mapping whose tensors are read one at a time, on access.

    Loading through it never holds the whole file in memory next to the model.
    """

    def __init__(self, path: PathLike):
        self.path = Path(path)
        if not self.path.is_file():
            raise CheckpointError(f"weights file not found: {self.path}")
        try:
            self._file = safe_open(str(self.path), framework="pt")
            self._keys = list(self._file.keys())
            self._header: tuple[int, dict[str, Any]] | None = None  # read on first use
        except Exception as err:  # SafetensorError for truncated or corrupt files
            raise CheckpointError(f"cannot read {self.path} as safetensors: {err}{_truncation_hint(self.path)}") \
                from err

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self._keys:
            raise KeyError(key)
        try:
            return self._file.get_tensor(key)
        except Exception as err:
            raise CheckpointError(f"cannot read tensor {key} from {self.path}: {err}") from err

    def read_copy(self, key: str, start: int | None = None, stop: int | None = None) -> torch.Tensor:
        """Tensor ``key`` (rows ``start:stop`` of it, when given) read with plain reads into memory of its own,
        mapping no page of the file: for a tensor that is copied anyway (to another dtype or device, to int8),
        so that the file's pages do not stay resident in this process beside the copies (they stay in the
        kernel's page cache only). A tensor of a dtype torch cannot view from bytes is read as ``self[key]``."""
        if key not in self._keys:
            raise KeyError(key)
        if self._header is None:
            self._header = _read_header(self.path)
        data_start, header = self._header
        entry = header[key]
        dtype = getattr(torch, _ST_DTYPES.get(entry["dtype"], ""), None)
        if not isinstance(dtype, torch.dtype):
            return self[key] if start is None and stop is None else self[key][start:stop]
        shape = list(entry["shape"])
        begin, end = entry["data_offsets"]
        if shape and (start is not None or stop is not None):
            start, stop, _ = slice(start, stop).indices(shape[0])
            row = (end - begin) // max(1, shape[0])
            begin, end, shape[0] = begin + start * row, begin + max(start, stop) * row, max(0, stop - start)
        data = bytearray(end - begin)
        with open(self.path, "rb") as fh:
            fh.seek(data_start + begin)
            if fh.readinto(data) != len(data):
                raise CheckpointError(f"cannot read tensor {key} from {self.path}: the file ends early"
                                      f"{_truncation_hint(self.path)}")
        if not data:
            return torch.empty(shape, dtype=dtype)
        return torch.frombuffer(data, dtype=dtype).reshape(shape)

    def stored_dtype(self, key: str) -> str:
        """The dtype tensor ``key`` is stored in, by name (``float32``, ``bfloat16``, ...), from the header."""
        dtype = self._file.get_slice(key).get_dtype()
        return _ST_DTYPES.get(dtype, dtype)

    def __iter__(self):
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def shape(self, key: str) -> tuple[int, ...]:
        """The tensor's shape, from the file header (nothing is read)."""
        return tuple(self._file.get_slice(key).get_shape())

    def same_bytes(self, a: str, b: str, chunk: int = 1 << 24) -> bool:
        """Whether tensors ``a`` and ``b`` are stored with the same dtype, shape and bytes.

        Read with plain reads, a chunk at a time: unlike ``torch.equal`` on the tensors, comparing maps no
        page of the file into memory (the release stores its tied LM head beside the embedding).
        """
        start, header = _read_header(self.path)
        ea, eb = header[a], header[b]
        if (ea["dtype"], ea["shape"]) != (eb["dtype"], eb["shape"]):
            return False
        (a0, a1), (b0, _) = ea["data_offsets"], eb["data_offsets"]
        with open(self.path, "rb") as fh:
            for offset in range(0, a1 - a0, chunk):
                n = min(chunk, a1 - a0 - offset)
                if os.pread(fh.fileno(), n, start + a0 + offset) != os.pread(fh.fileno(), n, start + b0 + offset):
                    return False
        return True


def _read_header(path: Path) -> tuple[int, dict[str, Any]]:
    """(where the data begins, the JSON header) of a safetensors file; ValueError for a broken header."""
    with open(path, "rb") as fh:
        length = int.from_bytes(fh.read(8), "little")
        if not 0 < length <= min(path.stat().st_size - 8, 100_000_000):
            raise InputError(f"header length {length}")
        return 8 + length, json.loads(fh.read(length))


def _truncation_hint(path: Path) -> str:
    """'; it is N bytes but its header describes M ...' for a file cut short (a broken download), else ''."""
    try:
        start, header = _read_header(path)
        end = start + max(v["data_offsets"][1] for k, v in header.items() if k != "__metadata__")
    except (OSError, ValueError, KeyError, TypeError):
        return ""
    size = path.stat().st_size
    if end <= size:
        return ""
    return (f"; the file is {size:,} bytes but its header describes {end:,}: it was cut short "
            "(an interrupted download or copy?); download or copy it again")


_ST_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16", "F64": "float64", "I64": "int64",
              "I32": "int32", "U8": "uint8", "BOOL": "bool"}


def weight_headers(path: Path) -> tuple[dict[str, tuple[int, ...]], dict[str, str]]:
    """Shapes and dtypes of the tensors in a weights file, without reading the tensors."""
    if path.suffix == ".safetensors":
        try:
            with safe_open(str(path), framework="pt") as f:
                slices = {k: f.get_slice(k) for k in f.keys()}
                return ({k: tuple(s.get_shape()) for k, s in slices.items()},
                        {k: _ST_DTYPES.get(s.get_dtype(), s.get_dtype()) for k, s in slices.items()})
        except Exception as err:
            raise CheckpointError(f"cannot read {path} as safetensors: {err}{_truncation_hint(path)}") from err
    tensors = read_torch_file(path)  # memory-mapped zip checkpoints: shapes without reading the data
    return ({k: tuple(v.shape) for k, v in tensors.items()},
            {k: str(v.dtype).split(".")[-1] for k, v in tensors.items()})
