"""``clerf curves``: learning curves of training runs as a table and a figure."""

from __future__ import annotations

import json

from clerf.cli import main
from clerf.evaluation.curves import read_curve


def _run(d, evals):
    d.mkdir(parents=True)
    lines = []
    for step, val in evals:
        lines.append({"loss": 1.0, "step": step, "epoch": 0, "images": step * 64})
        lines.append({"step": step, "epoch": 0, "val/geodesic_deg": val,
                      "val/geodesic_median_deg": val / 2, "val/under_15deg": 0.25})
    (d / "metrics.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    (d / "summary.json").write_text(json.dumps({"seconds_this_run": 12.5}))
    return d


def test_curve_points_are_images_seen_at_each_evaluation(tmp_path):
    c = read_curve(_run(tmp_path / "a", [(10, 100.0), (20, 50.0)]))
    assert [p[0] for p in c["points"]] == [640, 1280]
    assert [p[1]["val/geodesic_deg"] for p in c["points"]] == [100.0, 50.0]


def test_cli_prints_a_table_and_writes_a_figure(tmp_path, capsys):
    a = _run(tmp_path / "a", [(10, 100.0), (20, 50.0)])
    b = _run(tmp_path / "b", [(10, 90.0)])
    assert main(["curves", str(a), str(b), "--chance", "126.5",
                 "--out", str(tmp_path / "c.png")]) == 0
    out = capsys.readouterr().out
    assert "| a | 100.0 / 50.0 | 50.0 | 25.0 | 25% | 1280 | 12.5 |" in out
    assert "| b | 90.0 | 90.0 | 45.0 | 25% | 640 | 12.5 |" in out
    assert (tmp_path / "c.png").stat().st_size > 1000


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert main(["curves", str(tmp_path / "nope")]) == 1
    err = capsys.readouterr().err
    assert "no metrics.jsonl" in err and len(err.strip().splitlines()) == 1
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "metrics.jsonl").write_text("{not json\n")
    assert main(["curves", str(bad)]) == 1
    assert "line 1 is not JSON" in capsys.readouterr().err
