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


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["generate", "configs/generate_small.yaml", "--out", "x.h5", "--bogus"],
         "clerf generate: error: unrecognized arguments: --bogus"),
        (["evaluate", "m", "--data", "d.h5", "--out", "o", "--angles", "10,abc"],
         "clerf evaluate: error: argument --angles"),
        (["export", "m", "--out", "m.onnx", "--format", "tflite"],
         "clerf export: error: argument --format: invalid choice: 'tflite'"),
        (["pretrain", "configs/pretrain_small.yaml"], "the following arguments are required"),
        (["no-such-stage"], "invalid choice"),
    ],
)
def test_usage_errors_are_one_line(capsys, argv, needle):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and needle in err and "usage:" not in err, err


def test_internal_error_is_one_line_with_its_own_exit_code(capsys, monkeypatch):
    from clerf.commands import inspect as inspect_cmd
    from clerf.errors import INTERNAL_ERROR_EXIT

    def bug(args):
        raise ValueError("an internal invariant broke")  # not a ClerfError: a bug

    monkeypatch.setattr(inspect_cmd, "run", bug)
    assert main(["inspect", "x.h5"]) == INTERNAL_ERROR_EXIT == 3
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "internal error" in err and "--debug" in err
    assert "ValueError: an internal invariant broke" in err
    with pytest.raises(ValueError, match="invariant"):
        main(["inspect", "x.h5", "--debug"])
    monkeypatch.setattr(inspect_cmd, "run", lambda args: (_ for _ in ()).throw(
        OSError(28, "No space left on device")))
    assert main(["inspect", "x.h5"]) == 1  # the environment, not a bug
    assert "No space left" in capsys.readouterr().err
