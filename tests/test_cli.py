"""The ``clerf`` command: help, version, usage errors, one-line errors without tracebacks."""

from __future__ import annotations

import subprocess
import sys

import pytest

from clerf import __version__
from clerf.cli import main
from clerf.commands import COMMANDS


def test_version(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.strip() == f"clerf {__version__}"


def test_help_lists_every_registered_command(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for name in COMMANDS:
        assert name.replace("_", "-") in out


def test_no_command_is_a_usage_error(capsys):
    assert main([]) == 2


def test_unknown_command_exits_2_without_traceback(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["no-such-stage"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "invalid choice" in err and "Traceback" not in err


def test_python_dash_m_clerf():
    out = subprocess.run(
        [sys.executable, "-m", "clerf", "--version"], capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == f"clerf {__version__}"


def test_importing_geometry_stays_light():
    code = (
        "import sys, clerf, clerf.geometry; "
        "heavy = [m for m in ('torchvision', 'accelerate', 'h5py', 'kornia') if m in sys.modules]; "
        "print(','.join(heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
