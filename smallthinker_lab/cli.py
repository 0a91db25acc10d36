"""The ``smallthinker-lab`` command line: one subcommand per job, each registered by its module."""

from __future__ import annotations

import argparse
import importlib
import sys

# modules that add subcommands through register(subparsers)
COMMAND_MODULES: list[str] = [
    "smallthinker_lab.data.cli",
    "smallthinker_lab.engine.cli",
    "smallthinker_lab.model.gguf_export",
    "smallthinker_lab.train.cli",
    "smallthinker_lab.report",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="smallthinker-lab", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, KeyError, RuntimeError, OSError) as e:
        print(f"smallthinker-lab {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
