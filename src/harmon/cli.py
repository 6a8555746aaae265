"""The ``harmon`` command. Each subcommand is a plain function taking parsed arguments."""
from __future__ import annotations

import argparse
import sys


def cmd_parity(args: argparse.Namespace) -> int:
    """Run every case of a reference fixture folder; exit 1 if any fails."""
    from .parity import run_parity

    results = run_parity(args.folder, verbose=args.verbose, cases=args.case or None)
    failed = [r.name for r in results if not r.passed]
    print(f"{len(results) - len(failed)} passed, {len(failed)} failed")
    return 1 if failed or not results else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="harmon", description="Harmon: one model to describe and draw images.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("parity", help="reproduce a reference fixture folder and report errors per case")
    p.add_argument("folder", help="fixture folder with config.json, weights.safetensors and cases/")
    p.add_argument("--case", action="append", help="run only this case (repeatable)")
    p.add_argument("-v", "--verbose", action="store_true", help="print every tensor's errors")
    p.set_defaults(func=cmd_parity)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
