"""Shared test fixtures: where the reference data lives, and the tiny reference model in its forms.

The reference data is the repository's sibling folder ``../shared/reference``: ``tiny/`` (a small
model and the parity cases recorded with the original code) and ``manifests/`` (the full-size
checkpoints' key listings). A test that needs it fails, naming the folder, when it is missing.

Session fixtures are shared by every test file: do not modify what they return (copy a folder
before changing it, load a private model with ``load_model(tiny_fixture_dir)`` to change one).
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
REFERENCE = SHARED / "reference"
TINY_FIXTURE = REFERENCE / "tiny"
MANIFESTS = REFERENCE / "manifests"


def _required(path: Path) -> Path:
    if not path.exists():
        pytest.fail(f"reference data not found at {path}: check out ../shared beside the repo")
    return path


@pytest.fixture(scope="session")
def tiny_fixture_dir() -> Path:
    """``../shared/reference/tiny``: ``config.json``, ``weights.safetensors`` and ``cases/``."""
    return _required(TINY_FIXTURE / "config.json").parent


@pytest.fixture(scope="session")
def manifests_dir() -> Path:
    """``../shared/reference/manifests``: the released checkpoints' keys and shapes."""
    return _required(MANIFESTS)


@pytest.fixture(scope="session")
def reference_model(tiny_fixture_dir):
    """The tiny model of the reference fixtures (float32, eval mode). Do not modify it in tests."""
    from harmon.checkpoint import load_model

    return load_model(tiny_fixture_dir, dtype=torch.float32)


@pytest.fixture(scope="session")
def tiny_config(tiny_fixture_dir):
    """The tiny model's :class:`~harmon.config.HarmonConfig`, as read from its ``config.json``."""
    from harmon.checkpoint import read_config

    return read_config(tiny_fixture_dir)


@pytest.fixture(scope="session")
def tiny_weights(tiny_fixture_dir) -> dict[str, torch.Tensor]:
    """The tiny model's state dict as stored in ``weights.safetensors`` (both tied keys). Copy the dict to
    change it; never change its tensors in place."""
    from safetensors.torch import load_file

    return load_file(str(tiny_fixture_dir / "weights.safetensors"))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, reference_model) -> Path:
    """The tiny model saved in this package's layout (``config.json``, ``model.safetensors``) with the
    byte-level tokenizer beside it: a folder every command and pipeline loads. Do not write into it."""
    from harmon.saving import save_model
    from harmon.tokenizer import build_byte_tokenizer, save_tokenizer

    folder = tmp_path_factory.mktemp("tiny-model")
    save_model(reference_model, folder)
    save_tokenizer(build_byte_tokenizer(), folder)
    return folder
