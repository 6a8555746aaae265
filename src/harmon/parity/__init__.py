"""Reproduce a reference fixture folder with this package's code and report the errors.

A fixture folder (``../shared/reference/tiny`` is one) holds ``config.json`` +
``weights.safetensors`` of a small model and ``cases/<case>.safetensors`` +
``cases/<case>.json`` pairs recorded by running the original Harmon code. Each
case recomputes every output tensor of its file from the inputs, seeds
and settings stored there (no sizes are assumed), and :func:`run_parity`
compares them: a tensor passes when ``max|ours - ref| <= atol + rtol * max|ref|``
(integer and boolean tensors must be equal).

The cases are in :mod:`.cases`, the fixture type, tolerances and comparison in :mod:`.fixtures`.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Callable

import torch

from ..checkpoint import load_model, read_config
from ..models.harmon import Harmon
from .cases import CASES
from .fixtures import (COND_HALF, EXACT, MODULE, SAMPLE, SCHEDULE, SINUSOID, CaseResult, Fixture, TensorResult,
                       Tolerance, compare, load_fixture)

__all__ = ["CASES", "EXACT", "MODULE", "SAMPLE", "SCHEDULE", "SINUSOID", "CaseResult", "Fixture", "TensorResult",
           "Tolerance", "compare", "load_fixture", "run_case", "run_parity"]


def run_case(model: Harmon, fx: Fixture) -> CaseResult:
    """Recompute one case and compare every output tensor of the fixture (missing ones fail)."""
    try:
        with torch.no_grad():
            computed = CASES[fx.name](model, fx)
    except Exception as err:  # report and go on with the other cases
        return CaseResult(fx.name, [], f"{type(err).__name__}: {err}")
    results, covered = [], set()
    for label, item in computed.items():
        actual, tol, *ref = item
        ref_name = ref[0] if ref else label
        if ref_name == "":  # a check against a scalar recorded in the case's meta
            expected = _meta_value(fx, label)
        elif ref_name.removesuffix(COND_HALF) in fx.tensors:
            expected = fx[ref_name.removesuffix(COND_HALF)]
            if ref_name.endswith(COND_HALF):  # conditional half of a [cond; uncond] tensor
                expected = expected[: expected.shape[0] // 2]
            ref_name = ref_name.removesuffix(COND_HALF)
        else:
            continue
        covered.add(ref_name)
        results.append(compare(label, actual, expected, tol))
    for name in fx.outputs:
        if name not in covered:
            results.append(TensorResult(name, math.inf, math.inf, False, "not reproduced"))
    return CaseResult(fx.name, results)


def _meta_value(fx: Fixture, label: str) -> torch.Tensor:
    prefix, _, name = label.partition(" norm ")
    norm = fx.meta[f"{prefix.split('_grad')[0]}_grad_norms"][name]
    return torch.tensor(0.0 if norm is None else norm, dtype=torch.float64)


def run_parity(folder: str | Path, *, verbose: bool = False, cases: list[str] | None = None,
               print_fn: Callable[[str], None] = print) -> list[CaseResult]:
    """Load a fixture folder's model, run each case present (or those named), print one line per case."""
    folder = Path(folder)
    folder_config = json.loads((folder / "config.json").read_text())
    read_config(folder)  # fail early with a clear message on a bad config
    model = load_model(folder, dtype=torch.float32)
    present = sorted(p.stem for p in (folder / "cases").glob("*.json"))
    unknown = [n for n in present if n not in CASES]
    names = [n for n in present if n in CASES and (cases is None or n in cases)]
    results = []
    for name in unknown:
        results.append(CaseResult(name, [], "no implementation for this case name"))
    for name in names:
        results.append(run_case(model, load_fixture(folder, name, folder_config)))
    for res in results:
        worst_abs = max((t.max_abs for t in res.tensors), default=math.nan)
        worst_rel = max((t.max_rel for t in res.tensors), default=math.nan)
        verdict = "PASS" if res.passed else "FAIL"
        print_fn(f"{res.name:<24} tensors={len(res.tensors):<4} max_abs={worst_abs:.3e} max_rel={worst_rel:.3e} "
                 f"{verdict}{'  ' + res.error if res.error else ''}")
        for t in res.tensors:
            if verbose or not t.passed:
                print_fn(f"    {t.name:<48} abs={t.max_abs:.3e} rel={t.max_rel:.3e} "
                         f"{'ok' if t.passed else 'FAIL'} {t.note}")
    return results
