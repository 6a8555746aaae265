"""Prompt files: JSON lists, JSONL, text, and the benchmarks' own (GenEval's metadata, DPG-Bench's folder of
``<item_id>.txt`` files, WISE's JSON files), read into :class:`PromptRecord` s."""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from ..errors import InputError
from ..validation import check_prompt
from .options import BatchError


class PromptFileError(BatchError):
    """The prompts file cannot be read or holds something that is not a usable prompt."""


@dataclass(frozen=True)
class PromptRecord:
    """One prompt: its 0-based index, text, the original JSON object (strings become ``{"prompt": s}``)
    and where it was in the file (``line`` for JSONL and text files, else None)."""

    index: int
    prompt: str
    record: dict[str, Any]
    line: int | None = None
    name: str | None = None  # the benchmark's name of the prompt (DPG-Bench item id, WISE prompt_id)


def _kind(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null",
            int: "a number", float: "a number"}.get(type(value), type(value).__name__)


def _record(value: Any, index: int, where: str, source: str, line: int | None = None, *, key: str = "prompt",
            name: str | None = None) -> PromptRecord:
    if isinstance(value, str):
        prompt, record = value, {key: value}
    elif isinstance(value, dict):
        if key not in value:
            raise PromptFileError(f"{source}: prompt {index} ({where}) has no \"{key}\" key "
                                  f"(keys: {', '.join(map(str, value)) or 'none'})")
        prompt, record = value[key], dict(value)
        if not isinstance(prompt, str):
            raise PromptFileError(f"{source}: prompt {index} ({where}): \"prompt\" must be a string, "
                                  f"got {_kind(prompt)}")
    else:
        raise PromptFileError(f"{source}: prompt {index} ({where}) is {_kind(value)}; expected a string or an "
                              "object with a \"prompt\" key")
    try:
        check_prompt(prompt, f"{source}: prompt {index} ({where})")
    except ValueError as err:
        raise PromptFileError(str(err)) from None
    return PromptRecord(index, prompt, record, line, name)


def parse_prompts(text: str, *, fmt: str = "auto", source: str = "prompts", key: str = "prompt") -> list[PromptRecord]:
    """Prompts from the text of a prompts file; ``fmt`` is ``json``, ``jsonl``, ``txt`` or ``auto``; objects
    hold the prompt under ``key``.

    Raises :class:`PromptFileError` naming the line (JSONL, text), the line and column (JSON
    syntax) or the entry (JSON list) at fault.
    """
    if text.startswith("\ufeff"):
        text = text[1:]
    if fmt == "auto":
        fmt = "json" if text.lstrip().startswith("[") else "jsonl"
    records: list[PromptRecord] = []
    if fmt == "json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise PromptFileError(f"{source}: not valid JSON at line {err.lineno}, column {err.colno} "
                                  f"(character {err.pos}): {err.msg}") from None
        except RecursionError:
            raise PromptFileError(f"{source}: JSON nested too deeply to read") from None
        if not isinstance(data, list):
            raise PromptFileError(f"{source}: expected a JSON list of prompts (strings or objects with a "
                                  f"\"prompt\" key), got {_kind(data)}")
        records = [_record(value, i, f"entry {i}", source, key=key) for i, value in enumerate(data)]
    elif fmt == "jsonl":
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as err:
                raise PromptFileError(f"{source}: line {number} is not valid JSON ({err.msg} at column "
                                      f"{err.colno})") from None
            except RecursionError:
                raise PromptFileError(f"{source}: line {number} is JSON nested too deeply to read") from None
            records.append(_record(value, len(records), f"line {number}", source, number, key=key))
    elif fmt == "txt":
        for number, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                records.append(_record(line.strip(), len(records), f"line {number}", source, number))
    else:
        raise InputError(f"fmt must be json, jsonl, txt or auto, got {fmt!r}")
    if not records:
        raise PromptFileError(f"{source}: no prompts in the file")
    return records


def load_prompts(path: str | os.PathLike, benchmark: str | None = None) -> list[PromptRecord]:
    """Read a prompts file (``.json``, ``.jsonl``, ``.txt``; other names are sniffed), or a benchmark's:
    ``benchmark="dpg"`` reads DPG-Bench's folder of ``.txt`` prompts, ``"wise"`` a WISE JSON file."""
    path = Path(path)
    if benchmark == "dpg":
        records = _dpg_prompts(path)
    elif benchmark == "wise":
        records = _wise_prompts(path, _read_text(path))
    else:
        suffix = path.suffix.lower()
        fmt = {".json": "json", ".jsonl": "jsonl", ".ndjson": "jsonl", ".txt": "txt"}.get(suffix, "auto")
        return parse_prompts(_read_text(path), fmt=fmt, source=str(path))
    _check_names(records, str(path))
    return records


def _read_text(path: Path) -> str:
    if not path.is_file():
        raise PromptFileError(f"prompts file not found: {path}" if not path.exists()
                              else f"prompts file is not a file: {path}")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise PromptFileError(f"{path}: not UTF-8 text (byte {err.start})") from None


def _dpg_prompts(folder: Path) -> list[PromptRecord]:
    """DPG-Bench's ``prompts/`` folder: one ``<item_id>.txt`` per prompt, taken in name order."""
    if not folder.is_dir():
        raise PromptFileError(f"DPG-Bench prompts must be its folder of <item_id>.txt files (dpg_bench/prompts), "
                              f"got {folder}")
    files = sorted(folder.glob("*.txt"))
    if not files:
        raise PromptFileError(f"{folder}: no .txt prompt files")
    return [_record(_read_text(f).strip(), i, f.name, str(folder), name=f.stem) for i, f in enumerate(files)]


def _wise_prompts(path: Path, text: str) -> list[PromptRecord]:
    """A WISE prompts file: a JSON list of objects with ``"Prompt"`` and ``"prompt_id"``."""
    data = parse_prompts(text, fmt="json", source=str(path), key="Prompt")
    records = []
    for r in data:
        if "prompt_id" not in r.record:
            raise PromptFileError(f"{path}: prompt {r.index} (entry {r.index}) has no \"prompt_id\" key")
        records.append(PromptRecord(r.index, r.prompt, r.record, r.line, str(r.record["prompt_id"])))
    return records


_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def _check_names(records: Sequence[PromptRecord], source: str) -> None:
    """Benchmark names become file names: plain, and each used once."""
    seen: dict[str, int] = {}
    for r in records:
        if not _SAFE_NAME.match(r.name or ""):
            raise PromptFileError(f"{source}: prompt {r.index} is named {r.name!r}, which cannot be a file name "
                                  "(letters, digits, '.', '_', '-')")
        if r.name in seen:
            raise PromptFileError(f"{source}: prompts {seen[r.name]} and {r.index} are both named {r.name!r}")
        seen[r.name] = r.index

