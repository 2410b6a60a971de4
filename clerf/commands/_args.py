"""Argument-parsing helpers shared by the subcommands."""

from __future__ import annotations

import argparse


def intermixed(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Let ``key=value`` overrides appear before or after the options.

    argparse fills a ``nargs="*"`` positional from the first run of positionals only, so
    ``CONFIG --out PATH a=1`` would reject ``a=1``; intermixed parsing accepts any order.
    """
    cls_parse = type(parser).parse_known_args
    inside = {"flag": False}

    def parse_known_args(args=None, namespace=None):  # noqa: ANN001 - argparse signature
        if inside["flag"]:
            return cls_parse(parser, args, namespace)
        inside["flag"] = True
        try:
            return parser.parse_known_intermixed_args(args, namespace)
        finally:
            inside["flag"] = False

    parser.parse_known_args = parse_known_args  # type: ignore[method-assign]
    return parser


def add_output_args(
    parser: argparse.ArgumentParser,
    overrides_example: str,
    resume_help: str = "continue a partial store",
    overwrite_help: str = "replace an existing store",
) -> argparse.ArgumentParser:
    """``--resume``, ``--overwrite``, ``--no-progress`` and trailing ``key=value`` overrides, as
    every command that writes a resumable store takes them (overrides in any position)."""
    parser.add_argument("--resume", action="store_true", help=resume_help)
    parser.add_argument("--overwrite", action="store_true", help=overwrite_help)
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument(
        "overrides", nargs="*", metavar="KEY=VALUE",
        help=f"config overrides, e.g. {overrides_example}",
    )
    return intermixed(parser)


def check_resume_overwrite(args: argparse.Namespace) -> None:
    """The two flags of :func:`add_output_args` exclude each other (a usage error)."""
    from clerf.errors import UsageError

    if args.resume and args.overwrite:
        raise UsageError("--resume and --overwrite exclude each other")
