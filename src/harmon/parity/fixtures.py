"""A reference case file and the comparison of recomputed tensors with it: tolerances, results, loading."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file


@dataclass(frozen=True)
class Tolerance:
    atol: float
    rtol: float


MODULE = Tolerance(atol=1e-5, rtol=1e-5)       # one forward pass of a network
SCHEDULE = Tolerance(atol=0.0, rtol=1e-12)     # float64 diffusion tables
SAMPLE = Tolerance(atol=1e-4, rtol=1e-5)       # iterated sampling; latents reach |x| ~ 1e5 (fixture README)
EXACT = Tolerance(atol=0.0, rtol=0.0)          # integers, booleans
# sin/cos of float32 arguments up to ~1000: one ulp of the argument is 6e-5, and CPU
# vector kernels differ by about that much (the fixture's values differ from
# correctly rounded ones by 3e-5)
SINUSOID = Tolerance(atol=1e-4, rtol=0.0)


@dataclass
class Fixture:
    """One case file: its tensors, its ``meta`` dict and the folder's ``config.json``."""

    name: str
    tensors: dict[str, torch.Tensor]
    outputs: list[str]
    meta: dict[str, Any]
    folder_config: dict[str, Any]

    def __getitem__(self, key: str) -> torch.Tensor:
        return self.tensors[key]


@dataclass
class TensorResult:
    name: str
    max_abs: float
    max_rel: float
    passed: bool
    note: str = ""


@dataclass
class CaseResult:
    name: str
    tensors: list[TensorResult]
    error: str = ""

    @property
    def passed(self) -> bool:
        return not self.error and bool(self.tensors) and all(t.passed for t in self.tensors)


def compare(name: str, actual: torch.Tensor, expected: torch.Tensor, tol: Tolerance, note: str = "") -> TensorResult:
    """Max absolute error and error relative to the reference's max magnitude, and the verdict."""
    if tuple(actual.shape) != tuple(expected.shape):
        return TensorResult(name, math.inf, math.inf, False, f"shape {tuple(actual.shape)} != {tuple(expected.shape)}")
    if expected.numel() == 0:
        return TensorResult(name, 0.0, 0.0, True, note)
    a, e = actual.detach().cpu().double(), expected.double()
    err = (a - e).abs().max().item()
    scale = e.abs().max().item()
    rel = err / scale if scale > 0 else err
    exact = tol is EXACT or not expected.is_floating_point()
    passed = err == 0 if exact else err <= tol.atol + tol.rtol * scale
    return TensorResult(name, err, rel, passed, note)


# A reference name ending in COND_HALF compares with the first half of the fixture's
# [cond; uncond] tensor: the rows the original computes and then throws away are not computed here.
COND_HALF = "#cond_half"


def load_fixture(folder: Path, name: str, folder_config: dict) -> Fixture:
    info = json.loads((folder / "cases" / f"{name}.json").read_text())
    tensors = load_file(str(folder / "cases" / f"{name}.safetensors"))
    outputs = [k for k, v in info["tensors"].items() if v.get("role") == "output"]
    return Fixture(name, tensors, outputs, info.get("meta", {}), folder_config)
