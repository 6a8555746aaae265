"""Rewards for reward fine-tuning (:mod:`harmon.train.grpo`): the interface, loading one by name, prompt files.

A reward is any object with ``__call__(images, records) -> list[float]``: PIL images and the prompt records
they were drawn for (``{"prompt": ..., ...}``, as the run's prompts file holds them), one number each, higher
is better; and ``category(record) -> str``, the group its score is logged under (``reward/<category>``).
Rewards run on the main process's CPU between sampling and the update, so they should be fast and
deterministic (the same image and record, the same number: a resumed run then repeats the run exactly).

For the shapes world: ``harmon.shapes.reward:ShapesReward`` (the GenEval-style evaluator of
:mod:`harmon.shapes.detect`, with partial credit). For real models, a GenEval-style detector reward
implements the same two methods: detect objects in each image (e.g. an open-vocabulary detector), check
them against the record's ``include`` / ``exclude`` constraints as GenEval's metadata gives them, and return
1.0 for a satisfied prompt (or the fraction of satisfied constraints); ``category`` returns the record's
``tag``. The config names it as ``"your_module:YourReward"``.
"""
from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Any, Protocol, Sequence, runtime_checkable

from PIL import Image

from ..errors import InputError
from ..validation import check_prompt


@runtime_checkable
class Reward(Protocol):
    """Scores images drawn for prompt records (see the module docstring)."""

    def __call__(self, images: Sequence[Image.Image], records: Sequence[dict[str, Any]]) -> list[float]: ...

    def category(self, record: dict[str, Any]) -> str: ...


def load_reward(name: str) -> Reward:
    """The reward ``"module:Name"``: the module imported, ``Name`` called without arguments."""
    module_name, _, attr = name.partition(":")
    if not module_name or not attr:
        raise InputError(f"grpo.reward must look like 'module:Name', got {name!r}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise InputError(f"grpo.reward: cannot import {module_name!r}: {err}") from None
    if not hasattr(module, attr):
        raise InputError(f"grpo.reward: {module_name} has no {attr!r}")
    reward = getattr(module, attr)()
    if not isinstance(reward, Reward):
        raise InputError(f"grpo.reward: {name} gives a {type(reward).__name__}, which lacks __call__(images, "
                         "records) or category(record)")
    return reward


def read_prompt_records(path: str | Path) -> list[dict[str, Any]]:
    """A JSON list or JSONL file of prompt strings or records with a ``"prompt"`` -> records, each checked."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
        stripped = text.lstrip()
        items = json.loads(text) if stripped.startswith("[") else \
            [json.loads(line) for line in text.splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise InputError(f"grpo.prompts: cannot read {path}: {err}") from None
    if not isinstance(items, list) or not items:
        raise InputError(f"grpo.prompts: {path} holds no prompts")
    records = []
    for i, item in enumerate(items):
        record = {"prompt": item} if isinstance(item, str) else item
        if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
            raise InputError(f"grpo.prompts: item {i} of {path} is neither a prompt nor a record with a 'prompt'")
        check_prompt(record["prompt"], f"grpo.prompts item {i}")
        records.append(record)
    return records
