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
