"""The ``clerf`` command: parses, loads the config, calls one stage function.

Every failure is one line on stderr (``--debug`` shows the traceback instead): known errors
(:class:`clerf.errors.ClerfError`: bad files, bad values; and operating-system errors) exit 1, or
2 for usage and config errors; anything else is a bug and says "internal error", exit 3. The exit
codes are listed in :mod:`clerf.errors`.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from clerf.commands import COMMANDS
from clerf.errors import INTERNAL_ERROR_EXIT, ClerfError
from clerf.versions import __version__


class _Parser(argparse.ArgumentParser):
    """argparse that reports usage errors in one line and exits 2."""

    def error(self, message: str):  # noqa: D401 - argparse API
        # One line only: the usage block stays in --help.
        self.exit(2, f"{self.prog}: error: {' '.join(message.split())} (see {self.prog} --help)\n")


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


def _quiet_libraries() -> None:
    """Library log lines (FFmpeg inside OpenCV, OpenCV's own) would come before clerf's one-line
    error; clerf reports what failed itself. Set before the first video is opened; a value the
    user exported wins."""
    import os

    os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")  # AV_LOG_QUIET
    os.environ.setdefault("OPENCV_LOG_LEVEL", "SILENT")


def main(argv: Sequence[str] | None = None) -> int:
    _quiet_libraries()
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # reported by the subcommand's name, so the hint points at the right --help
        cmd = getattr(args, "command", None)
        prog = f"clerf {cmd.replace('_', '-')}" if cmd else "clerf"
        parser.exit(2, f"{prog}: error: unrecognized arguments: {' '.join(extra)} "
                       f"(see {prog} --help)\n")  # fmt: skip
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
    except OSError as exc:
        # The file system refused (missing file, permission, disk full): the environment's fault.
        if debug:
            raise
        print(f"clerf {args.command}: error: {_one_line(exc)}", file=sys.stderr)
        return 1
    except Exception as exc:  # noqa: BLE001 - anything else is a bug: say so, in one line
        if debug:
            raise
        print(f"clerf {args.command}: internal error (a bug in clerf, please report it): "
              f"{exc.__class__.__name__}: {_one_line(exc)}; rerun with --debug for the "
              "traceback", file=sys.stderr)  # fmt: skip
        return INTERNAL_ERROR_EXIT


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
