"""The ``harmon`` command: one small module per command group, each declaring its commands' arguments
beside the functions that read them (``add_parsers(subparsers)``).

A command parses, builds the library's settings, calls the library and prints. What a user can fix
(:class:`~harmon.errors.InputError`: a missing file, a bad size, an unusable model folder, ...) ends with one
``harmon: error: ...`` line on stderr and exit code 2; any other exception keeps its traceback.
"""
from __future__ import annotations

import argparse
import sys

from .. import __version__
from ..errors import InputError
from . import answers, evaluate, images, models, serve, train

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130


def build_parser() -> argparse.ArgumentParser:
    """The ``harmon`` parser with every command group's subcommands."""
    parser = argparse.ArgumentParser(
        prog="harmon", description="Harmon: one model to describe and draw images.",
        epilog="Get a model folder with `harmon convert` from the released weights; see `harmon COMMAND --help`.")
    parser.add_argument("--version", action="version", version=f"harmon {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for group in (images, answers, serve, models, train, evaluate):
        group.add_parsers(subparsers)
    return parser


def _one_line(err: BaseException) -> str:
    text = " ".join(line.strip() for line in str(err).strip().splitlines() if line.strip())
    return text or type(err).__name__


def main(argv: list[str] | None = None) -> int:
    """Run ``harmon`` with ``argv`` (default: the process's arguments); returns the exit code."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except InputError as err:
        print(f"harmon: error: {_one_line(err)}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("harmon: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
