"""clerf inspect (triplets/inspect.py): report contents, figures, one-line errors."""

from __future__ import annotations

import h5py
import numpy as np

from clerf.cli import main
from clerf.config import load_config
from tests.test_triplets_helpers import small_config
from triplets.generate import run_generate
from triplets.inspect import format_report, inspect_store, text_histogram


def _store(tmp_path, *over):
    cfg = load_config(small_config(tmp_path), list(over))
    return run_generate(cfg, tmp_path / "t.h5", progress=False)


def test_report_counts_and_coverage(tmp_path):
    out = _store(tmp_path, "triplets.poses=uniform", "triplets.delta=90")
    r = inspect_store(out, verify=True)
    assert (r.kind, r.num_triplets, r.num_images, r.chunks_verified) == ("triplets", 40, 120, 10)
    assert sum(r.histograms["yaw"][0]) == 120 and sum(r.histograms["roll"][0]) == 120
    assert r.delta == 90.0 and r.below_delta == 0 and r.negative_distance["min"] >= 90.0 - 1e-3
    assert r.positive_distance["max"] < 1e-3
    assert r.identity_checks["positive_same_identity"] == 0.0
    assert r.identity_checks["negative_same_identity"] == 1.0
    text = format_report(r)
    for needle in ("kind triplets", "yaw histogram", "pitch histogram", "roll histogram",
                   "anchor-negative geodesic distance", "0 triplet(s) below delta",
                   "verified: 10 chunks"):
        assert needle in text


def test_text_histogram_scales_bars():
    lines = text_histogram(np.array([0, 5, 10]), np.array([0.0, 1.0, 2.0, 3.0]), width=10)
    assert lines[0].endswith("0") and lines[1].endswith("#" * 5) and lines[2].endswith("#" * 10)


def test_cli_inspect_writes_pngs(tmp_path, capsys):
    out = _store(tmp_path)
    figs = tmp_path / "figs"
    assert main(["inspect", str(out), "--out", str(figs), "--samples", "3"]) == 0
    text = capsys.readouterr().out
    assert "triplets 40" in text and "wrote" in text
    for name in ("triplets.png", "coverage.png"):
        data = (figs / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


def test_cli_inspect_errors_are_one_line(tmp_path, capsys):
    out = _store(tmp_path)
    cases = []
    foreign = tmp_path / "foreign.h5"
    with h5py.File(foreign, "w") as f:
        f["x"] = np.arange(4)
    cases.append((foreign, "not a clerf store"))
    truncated = tmp_path / "trunc.h5"
    truncated.write_bytes(out.read_bytes()[: out.stat().st_size // 3])
    cases.append((truncated, "truncated or corrupt"))
    garbage = tmp_path / "garbage.h5"
    garbage.write_bytes(b"\x00" * 1000)
    cases.append((garbage, "not an HDF5 file"))
    cases.append((tmp_path / "missing.h5", "store not found"))
    partial = tmp_path / "partial.h5"
    partial.write_bytes(out.read_bytes())
    with h5py.File(partial, "r+") as f:
        f.attrs["complete"] = False
    cases.append((partial, "incomplete"))
    for path, needle in cases:
        assert main(["inspect", str(path)]) == 1, path
        err = capsys.readouterr().err
        assert needle in err and err.count("\n") == 1 and "Traceback" not in err, err
