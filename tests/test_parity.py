"""Every case of ../shared/reference/tiny, recomputed by the package, within the tolerances of harmon.parity.

Tolerances (a tensor passes when max|ours - ref| <= atol + rtol * max|ref|):
single forward passes atol 1e-5 + rtol 1e-5; float64 schedules rtol 1e-12;
iterated sampling atol 1e-4 + rtol 1e-5 (latents reach 1e5 with random
weights); integer and boolean outputs exactly equal.
"""
from __future__ import annotations

import json

import pytest

from harmon import parity

CASE_NAMES = sorted(parity.CASES)


@pytest.mark.parametrize("case", CASE_NAMES)
def test_reference_case(case, reference_model, tiny_fixture_dir):
    folder_config = json.loads((tiny_fixture_dir / "config.json").read_text())
    fx = parity.load_fixture(tiny_fixture_dir, case, folder_config)
    result = parity.run_case(reference_model, fx)
    assert not result.error, result.error
    assert len(result.tensors) >= len(fx.outputs) > 0
    failed = [f"{t.name}: abs {t.max_abs:.2e} rel {t.max_rel:.2e} {t.note}" for t in result.tensors if not t.passed]
    assert not failed, "\n".join(failed)


def test_fixture_has_every_case(tiny_fixture_dir):
    present = sorted(p.stem for p in (tiny_fixture_dir / "cases").glob("*.json"))
    assert present == CASE_NAMES


def test_compare_detects_errors():
    import torch

    ref = torch.tensor([1.0, -2.0, 1e5])
    assert parity.compare("x", ref + 0.5, ref, parity.SAMPLE).passed  # 0.5 <= 1e-4 + 1e-5 * 1e5
    assert not parity.compare("x", ref + 2.0, ref, parity.SAMPLE).passed
    assert not parity.compare("x", ref[:2], ref, parity.MODULE).passed  # shape mismatch
    ids = torch.tensor([1, 2, 3])
    assert not parity.compare("ids", torch.tensor([1, 2, 4]), ids, parity.EXACT).passed
