"""The ``smallthinker-lab`` command line: one subcommand per job, each registered by its module.

Every parser of the tree is a :class:`Parser`, so one help formatter (:class:`HelpFormatter`) renders them all.
An expected error (a bad argument or file: the project's own error types, ValueError, OSError such as
FileNotFoundError, KeyError, RuntimeError) prints one line ``smallthinker-lab COMMAND: error: ...`` on stderr and
exits with status 2, without a traceback; Ctrl-C exits with 130. Any other exception is a bug and shows its
traceback.
"""

from __future__ import annotations

import argparse
import importlib
import re
import subprocess
import sys
import textwrap
from collections.abc import Callable

from . import __version__

# modules that add subcommands through register(subparsers)
COMMAND_MODULES: list[str] = [
    "smallthinker_lab.data.cli",
    "smallthinker_lab.engine.cli",
    "smallthinker_lab.model.gguf_export",
    "smallthinker_lab.train.cli",
    "smallthinker_lab.analysis.report",
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


ERROR_STATUS = 2  # what argparse exits with for a bad command line, too
# exceptions that report a bad input, a missing or damaged file or a failed download, not a bug. The project's
# own errors derive from these: ConfigError, CheckpointError, MemoryLimitError, TokenizerError (ValueError),
# BundleError, ExpertReadError, FetchError, ChecksumError (RuntimeError)
EXPECTED_ERRORS: tuple[type[BaseException], ...] = (ValueError, OSError, KeyError, RuntimeError, EOFError,
                                                    subprocess.SubprocessError)
# subclasses of those that are programming errors: they keep their traceback
BUGS: tuple[type[BaseException], ...] = (NotImplementedError, RecursionError)


def _expected(e: BaseException) -> bool:
    if isinstance(e, BUGS):
        return False
    if isinstance(e, EXPECTED_ERRORS):
        return True
    from .data.clean import OverlapError  # an AssertionError: a held-out item in the corpus, a data error

    return isinstance(e, OverlapError)


def error_line(e: BaseException) -> str:
    """The message of ``e`` on one line (a KeyError's key unquoted, lines joined with '; ')."""
    msg = str(e.args[0]) if isinstance(e, KeyError) and len(e.args) == 1 else str(e)
    parts = [line.strip() for line in msg.splitlines() if line.strip()]
    return "; ".join(parts) or type(e).__name__


def run_command(func: Callable[[argparse.Namespace], int | None], args: argparse.Namespace, prog: str) -> int:
    """``func(args)``'s status; an expected error is one line on stderr and status 2 (see the module docstring)."""
    try:
        return int(func(args) or 0)
    except KeyboardInterrupt:
        print(f"\n{prog}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if not _expected(e):
            raise
        sys.stdout.flush()
        print(f"{prog}: error: {error_line(e)}", file=sys.stderr)
        return ERROR_STATUS


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
    return run_command(args.func, args, f"smallthinker-lab {args.command}")


def sub_main(register: Callable, argv: list[str] | None = None) -> int:
    """The main of one module's subcommands alone (``python -m smallthinker_lab.train.cli train ...``), with the
    same help formatter and error handling as :func:`main`."""
    parser = Parser(prog="smallthinker-lab")
    register(parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=Parser))
    args = parser.parse_args(argv)
    return run_command(args.func, args, f"smallthinker-lab {args.command}")


if __name__ == "__main__":
    sys.exit(main())
