"""The ``clerf`` command: parses, loads the config, calls one stage function.

Known errors (:class:`clerf.errors.ClerfError`, bad files, bad values) become one line on stderr
and a non-zero exit (2 for usage and config errors); ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from clerf.commands import COMMANDS
from clerf.errors import ClerfError
from clerf.versions import __version__


class _Parser(argparse.ArgumentParser):
    """argparse that reports usage errors in one line and exits 2."""

    def error(self, message: str):  # noqa: D401 - argparse API
        self.print_usage(sys.stderr)
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--debug", action="store_true", default=argparse.SUPPRESS,
        help="show full tracebacks instead of one-line errors",
    )
    parser = _Parser(
        prog="clerf",
        description="clerf: head pose estimation research toolkit (CLERF and HopeNet).",
        parents=[common],
    )
    parser.add_argument("--version", action="version", version=f"clerf {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name in COMMANDS:
        module = importlib.import_module(f"clerf.commands.{name}")
        module.register(sub, parents=[common])
    return parser


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip() or exc.__class__.__name__
    if isinstance(exc, KeyError) and len(exc.args) == 1:
        text = str(exc.args[0])
    return " ".join(text.split())


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    debug = getattr(args, "debug", False)
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        if debug:
            raise
        print("clerf: interrupted", file=sys.stderr)
        return 130
    except ClerfError as exc:
        if debug:
            raise
        print(f"clerf {args.command}: error: {_one_line(exc)}", file=sys.stderr)
        return exc.exit_code
    except (OSError, ValueError) as exc:
        # Bad files and values that the stage did not wrap: still one line, no traceback.
        if debug:
            raise
        print(f"clerf {args.command}: error: {_one_line(exc)}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
