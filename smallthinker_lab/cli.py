"""The ``smallthinker-lab`` command line: one subcommand per job, each registered by its module.

Every parser of the tree is a :class:`Parser`, so one help formatter (:class:`HelpFormatter`) renders them all.
"""

from __future__ import annotations

import argparse
import importlib
import re
import sys
import textwrap

from . import __version__

# modules that add subcommands through register(subparsers)
COMMAND_MODULES: list[str] = [
    "smallthinker_lab.data.cli",
    "smallthinker_lab.engine.cli",
    "smallthinker_lab.train.cli",
    "smallthinker_lab.report",
]

DESCRIPTION = ("A workbench for SmallThinker Mixture-of-Experts models: generate in memory or with the offloading "
               "engine, write the expert bundle, run the instrumented report, prepare data and train. "
               "'default' names the tiny model shipped with the package.")


class HelpFormatter(argparse.HelpFormatter):
    """Descriptions wrapped paragraph by paragraph (blank lines and numbered or dashed items kept), and every
    option's default appended to its help unless the help states one or there is none to state (None, False)."""

    def __init__(self, prog: str) -> None:
        super().__init__(prog, max_help_position=32)

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        out = []
        for paragraph in text.strip().split("\n\n"):
            for item in re.split(r"\n(?=\d+\. |- )", paragraph):
                marker = re.match(r"\d+\. |- ", item)
                hang = " " * len(marker.group(0)) if marker else ""
                out.append(textwrap.fill(" ".join(item.split()), width, initial_indent=indent,
                                         subsequent_indent=indent + hang))
            out.append("")
        return "\n".join(out).rstrip()

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if ("default" in text or default in (None, False, argparse.SUPPRESS) or isinstance(action, _NO_DEFAULT)
                or (not action.option_strings and action.nargs not in ("?", "*"))):
            return text
        shown = " ".join(map(str, default)) if isinstance(default, (list, tuple)) else default
        return f"{text} (default: {str(shown).replace('%', '%%')})"


_NO_DEFAULT = (argparse._HelpAction, argparse._VersionAction, argparse._SubParsersAction)


class Parser(argparse.ArgumentParser):
    """An ArgumentParser that always uses :class:`HelpFormatter`, whatever a subcommand's module asks for."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs["formatter_class"] = HelpFormatter
        super().__init__(*args, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="smallthinker-lab", description=DESCRIPTION)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}",
                        help="print the version and exit")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=Parser)
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
