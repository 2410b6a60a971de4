"""Errors that the CLI turns into one-line messages (no traceback unless ``--debug``).

Exit codes of ``clerf`` (README, "Bad input"):

* 0 success;
* 1 bad input or environment: :class:`DataError` (a missing, malformed, truncated or damaged
  file; a store whose labels are not rotations) and operating-system errors (disk full,
  permission denied);
* 2 usage and config errors: :class:`UsageError` (argparse errors included), :class:`ConfigError`
  (unknown key, bad value, an empty config file, an untrusted pickle);
* 3 internal error (:data:`INTERNAL_ERROR_EXIT`): anything else, i.e. a bug in clerf; one line
  says so and ``--debug`` shows the traceback;
* 130 interrupted (Ctrl-C).
"""

from __future__ import annotations

#: exit code of an unexpected exception (a bug, not bad input)
INTERNAL_ERROR_EXIT = 3


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


class UntrustedPickleError(ConfigError, ValueError):
    """Refusing to unpickle a file the user has not marked as trusted (``trust_pickle``).

    A config error (exit 2) wherever it comes from (``generate``, ``preview``, ``real-anchor``):
    the fix is a setting. Also a ``ValueError`` for callers that build generators directly.
    """


class TrainingDiverged(ClerfError, FloatingPointError):
    """Training produced a non-finite loss (exit 1; the message says what to change)."""
