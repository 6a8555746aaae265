"""Checks of values where they enter: text, and the typed fields of our configuration dataclasses.

Each raises ``ValueError`` naming the value at fault; the layers above turn it into one line for the
user. Nothing here imports the rest of the package, so that every layer may use it.
"""
from __future__ import annotations

import dataclasses
import math
import types
import typing
from typing import Any, Literal

from .errors import InputError


def check_text(text: Any, what: str) -> str:
    """``text`` if it is a string that can be written as UTF-8; else ``ValueError`` naming ``what``.

    Text that was not valid UTF-8 reaches Python as lone surrogates (command-line arguments decode
    bytes such as ``\\xff`` so; JSON may spell ``\\ud800``): no tokenizer can encode them.
    """
    if not isinstance(text, str):
        raise InputError(f"{what} must be text, got {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise InputError(f"{what} is not valid UTF-8 text: character {err.start} is {text[err.start]!r} (bytes "
                         "that are not UTF-8, or a lone surrogate); give UTF-8 text") from None
    return text


def check_prompt(text: Any, what: str = "the prompt") -> str:
    """A usable prompt or question: UTF-8 text that is not blank (:func:`check_text`)."""
    check_text(text, what)
    if not text.strip():
        raise InputError(f"{what} is empty")
    return text


def _describe(value: Any) -> str:
    return f"{value!r} ({type(value).__name__})"


def _matches(value: Any, hint: Any) -> bool:
    """Whether ``value`` is of the annotated type ``hint`` (bool is not an int; an int is a float)."""
    if hint is Any:
        return True
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Literal:
        return value in args and all(type(value) is type(a) for a in args if a == value)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, a) for a in args)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if hint is str:
        return isinstance(value, str)
    if origin in (tuple, list):
        if not isinstance(value, (tuple, list)):
            return False
        if origin is tuple and args and args[-1] is not Ellipsis:
            return len(value) == len(args) and all(_matches(v, a) for v, a in zip(value, args))
        return all(_matches(v, args[0]) for v in value) if args else True
    if origin is dict or hint is dict:
        return isinstance(value, dict)
    if dataclasses.is_dataclass(hint):
        return isinstance(value, hint)
    raise TypeError(f"no check for the annotation {hint!r}")


def check_field_types(obj: Any, where: str) -> None:
    """Every field of the dataclass instance ``obj`` holds a value of its annotated type (numbers finite);
    else ``ValueError`` naming ``where.field``, the value and the type expected."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if not _matches(value, hints[f.name]):
            name = f"{where}.{f.name}" if where else f.name
            raise InputError(f"{name} must be {_expected(hints[f.name])}, got {_describe(value)}")


def _expected(hint: Any) -> str:
    """An annotation as a user reads it: ``one of 'a', 'b'``, ``a finite number``, ``list[str]``."""
    if typing.get_origin(hint) is Literal:
        return "one of " + ", ".join(map(repr, typing.get_args(hint)))
    names = {int: "an integer", float: "a finite number", bool: "true or false", str: "text"}
    if hint in names:
        return names[hint]
    return str(hint).replace("typing.", "")


def check_range(value: float, where: str, low: float | None = None, high: float | None = None, *,
                low_open: bool = False, high_open: bool = False) -> None:
    """``low <= value <= high`` (or strict, for an open end); else ``ValueError`` naming ``where``."""
    too_low = low is not None and (value <= low if low_open else value < low)
    too_high = high is not None and (value >= high if high_open else value > high)
    if too_low or too_high:
        left = "" if low is None else ("(" if low_open else "[") + f"{low}"
        right = "" if high is None else f"{high}" + (")" if high_open else "]")
        bound = f"in {left}, {right}" if low is not None and high is not None else \
            (f"{'>' if low_open else '>='} {low}" if low is not None else f"{'<' if high_open else '<='} {high}")
        raise InputError(f"{where} must be {bound}, got {value!r}")
