"""Every command in the README's and docs' shell blocks is one clerf accepts as written.

Each ``clerf ...`` line (also under ``accelerate launch -m clerf`` or ``python -m clerf``) must
parse with clerf's own argument parser, and when it names a config file of the repository, the
config with the line's overrides must load and validate. Scripts (``python examples/...``,
``benchmarks/...``) must exist and accept their flags. Running the commands themselves is left
to the tests of each stage (the examples run in ``tests/test_examples.py``). Usage patterns
(``clerf predict MODEL INPUT [INPUT ...]``) are recognised and left out.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from clerf.cli import build_parser
from clerf.config import load_config

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")),
        ROOT / "benchmarks" / "README.md"]
FENCE = re.compile(r"```(\w*)\n(.*?)```", re.S)
#: in blocks without a shell language, only lines that start like a command are commands
COMMAND_START = ("clerf ", "python ", ".venv/bin/", "accelerate ", "ACCELERATE_USE_CPU=", "make ",
                 "time ")


def _commands() -> list[tuple[str, str]]:
    out = []
    for doc in DOCS:
        for lang, block in FENCE.findall(doc.read_text()):
            if lang not in ("", "bash", "sh", "console"):
                continue
            text = re.sub(r"\\\n\s*", " ", block)  # join continuation lines
            for line in text.splitlines():
                line = line.split(" #")[0].strip()
                if not line or line.startswith("#"):
                    continue
                if lang or line.startswith(COMMAND_START):
                    out.append((f"{doc.relative_to(ROOT)}: {line}", line))
    return out


def _synopsis(line: str) -> bool:
    """A usage pattern, not a command: ``...``, ``[optional]`` parts or UPPERCASE placeholders."""
    return "..." in line or " [" in line or bool(re.search(r"\b(MODEL|INPUT|DIR|STORE)\b", line))


def _clerf_argv(tokens: list[str]) -> list[str] | None:
    """The arguments after ``clerf`` / ``-m clerf``, or None if the line runs something else."""
    while tokens and "=" in tokens[0] and not tokens[0].startswith("-"):
        tokens = tokens[1:]  # VAR=value prefixes
    for i, t in enumerate(tokens):
        if Path(t).name == "clerf" and (i == 0 or tokens[i - 1] == "-m"):
            return tokens[i + 1:]
    return None


COMMANDS = [(w, line) for w, line in _commands() if not _synopsis(line)]


@pytest.mark.parametrize("where,line", COMMANDS, ids=[w for w, _ in COMMANDS])
def test_documented_command_is_accepted(where, line, capsys):
    tokens = shlex.split(line)
    argv = _clerf_argv(tokens)
    if argv is not None:
        if argv and argv[0] in ("--help", "--version"):
            return
        try:
            args = build_parser().parse_args(argv)
        except SystemExit as exc:
            pytest.fail(f"{where}: clerf rejects the arguments ({capsys.readouterr().err.strip()})"
                        f" [exit {exc.code}]")
        config = getattr(args, "config", None)
        if config and (ROOT / config).is_file():
            load_config(ROOT / config, list(getattr(args, "overrides", None) or []))
        return
    scripts = [t for t in tokens if t.endswith(".py")]
    for s in scripts:
        assert (ROOT / s).is_file(), f"{where}: {s} does not exist"
