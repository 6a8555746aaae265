"""Shared test fixtures: where the reference fixtures live, and the tiny reference model."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
TINY_FIXTURE = SHARED / "reference" / "tiny"
MANIFESTS = SHARED / "reference" / "manifests"


@pytest.fixture(scope="session")
def tiny_fixture_dir() -> Path:
    if not (TINY_FIXTURE / "config.json").is_file():
        pytest.fail(f"reference fixtures not found at {TINY_FIXTURE}: check out ../shared beside the repo")
    return TINY_FIXTURE


@pytest.fixture(scope="session")
def reference_model(tiny_fixture_dir):
    """The tiny model of the reference fixtures (float32, eval mode). Do not modify it in tests."""
    from harmon.checkpoint import load_model

    return load_model(tiny_fixture_dir, dtype=torch.float32)
