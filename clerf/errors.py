"""Errors that the CLI turns into one-line messages (no traceback unless ``--debug``)."""

from __future__ import annotations


class ClerfError(Exception):
    """A known failure caused by bad input or environment; the message says what and where.

    ``exit_code`` is what the CLI exits with.
    """

    exit_code = 1


class ConfigError(ClerfError):
    """A configuration file or override is invalid (unknown key, wrong type, bad value)."""

    exit_code = 2


class UsageError(ClerfError):
    """The command line is invalid."""

    exit_code = 2


class DataError(ClerfError):
    """An input file or directory is missing, malformed, truncated or of the wrong kind."""
