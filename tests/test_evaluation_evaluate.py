"""The evaluate stage: invariance to batch size, order and processes; reports; CLI errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from fixtures_evaluation import save_tiny_model, tiny_model, write_store

from clerf.cli import main
from clerf.config import EvaluateConfig
from clerf.evaluation.evaluate import (
    collect_errors,
    evaluate_predictor,
    run_evaluate,
)
from clerf.evaluation.protocols import TensorSource, build_views
from clerf.geometry import geodesic_distance, rotate_inplane
from clerf.inference.model import PoseModel, wrap_head_pose_model

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    d = tmp_path_factory.mktemp("eval")
    images, rotations = write_store(d / "data.h5", n=40, resolution=32)
    save_tiny_model(d / "model_a", seed=0)
    save_tiny_model(d / "model_b", seed=1, head="binned")
    return d, images, rotations


def _results(report):
    return [(m["name"], m["results"]) for m in report["models"]]


def _flat(tree, prefix=""):
    out = {}
    if isinstance(tree, dict):
        for k, v in tree.items():
            out.update(_flat(v, f"{prefix}{k}."))
    elif isinstance(tree, list):
        for i, v in enumerate(tree):
            out.update(_flat(v, f"{prefix}{i}."))
    else:
        out[prefix] = tree
    return out


@pytest.mark.slow
def test_batch_size_and_order_do_not_change_the_report(assets):
    d, images, rotations = assets
    images, rotations = images[:20], rotations[:20]  # 3 model batches of 8, the last padded
    model = wrap_head_pose_model(tiny_model(seed=0))
    opts = EvaluateConfig(protocols=["standard", "rotated", "flipped"],
                           rotated_angles=[30.0], model_batch=8)
    reports = []
    for bs in (1, 7, 64):
        opts.batch_size = bs
        reports.append(evaluate_predictor(model.predict_rotations, opts.protocols, opts,
                                          TensorSource(images, rotations), None)[0])
    assert reports[0] == reports[1] == reports[2]  # bitwise
    # A shuffled store: the same samples under other indices, in another order.
    perm = torch.randperm(len(images), generator=torch.Generator().manual_seed(5))
    shuffled = evaluate_predictor(model.predict_rotations, opts.protocols, opts,
                                  TensorSource(images[perm], rotations[perm]), None)[0]
    a, b = _flat(reports[0]), _flat(shuffled)
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], float):
            assert b[k] == pytest.approx(a[k], abs=1e-9), k
        else:
            assert b[k] == a[k], k


def _identity(x: torch.Tensor) -> torch.Tensor:
    return torch.eye(3).expand(x.shape[0], 3, 3)


def _padded_rows(src, views, rank: int, world: int) -> torch.Tensor:
    """The padded ``(cap, 19)`` records that process ``rank`` hands to the gather."""
    captured = {}

    def grab(t):
        captured["t"] = t
        return t

    with pytest.raises(RuntimeError, match="gathered"):  # alone, it lacks the others' rows
        collect_errors(_identity, src, views, 4, rank=rank, world=world, gather=grab)
    return captured["t"]


def test_padded_gather_is_deduplicated():
    # 10 samples over 3 processes: shares of 3, 3 and 4, padded to 4 rows each for the gather.
    R = rotate_inplane(torch.eye(3, dtype=torch.float64).expand(10, 3, 3),
                       torch.arange(10, dtype=torch.float64))
    src = TensorSource(torch.zeros(10, 3, 8, 8, dtype=torch.uint8), R.float())
    views = build_views("standard")
    rows = [_padded_rows(src, views, r, 3) for r in range(3)]
    assert [int((t[:, 0] >= 0).sum()) for t in rows] == [3, 3, 4]
    assert all(t.shape == (4, 19) for t in rows)
    # accelerate.gather concatenates the ranks' tensors; repeat them to mimic a padded loader
    everything = torch.cat(rows + rows)
    e = collect_errors(_identity, src, views, 4, rank=0, world=3,
                       gather=lambda t: everything)["standard/none"]
    assert e.index.tolist() == list(range(10))
    assert e.geodesic == pytest.approx(list(range(10)), abs=1e-4)


def test_identity_predictor_gives_the_label_angles(assets):
    d, images, rotations = assets
    module = torch.nn.Identity()
    ident = PoseModel(module, input_size=32,
                      rotation_fn=lambda m, x: torch.eye(3).expand(x.shape[0], 3, 3))
    opts = EvaluateConfig(protocols=["standard", "rotated"], rotated_angles=[90.0],
                           figures=False)
    rep, samples = evaluate_predictor(ident.predict_rotations, opts.protocols, opts,
                                      TensorSource(images, rotations), None)
    eye = torch.eye(3, dtype=torch.float64)
    want = geodesic_distance(eye, rotations.double())
    got = samples["standard"]["none"].geodesic
    assert torch.allclose(torch.from_numpy(got), want, atol=1e-9)
    want90 = geodesic_distance(eye, rotate_inplane(rotations.double(), 90.0))
    assert rep["rotated"]["views"]["rot+90"]["geodesic"]["mean"] == pytest.approx(
        float(want90.mean()), abs=1e-9)


def test_stage_writes_a_report_comparing_models(assets, tmp_path):
    d, _, _ = assets
    report = run_evaluate([d / "model_a", d / "model_b"], tmp_path / "out", data=d / "data.h5",
                          opts=EvaluateConfig(protocols=["standard", "full_range"],
                                               full_range_n=12))
    names = [m["name"] for m in report["models"]]
    assert names == ["model_a", "model_b"]
    out = tmp_path / "out"
    for f in ("report.json", "report.md", "cumulative_error.png", "error_vs_euler.png",
              "error_vs_upright.png", "samples_model_a.csv", "samples_model_b.csv"):
        assert (out / f).is_file(), f
    on_disk = json.loads((out / "report.json").read_text())
    assert _results(on_disk) == _results(json.loads(json.dumps(report)))
    fr = on_disk["models"][0]["results"]["full_range"]["pooled"]
    assert fr["n"] == 12 and fr["euler"]["n"] == 0
    assert set(fr["under"]) == {"5", "10", "15", "30"}
    md = (out / "report.md").read_text()
    assert "| model_b | none | 40 |" in md and "## full_range" in md
    assert on_disk["run"]["world_size"] == 1
    assert on_disk["models"][0]["model"]["input_size"] == 32


def test_cli_evaluate_and_its_errors(assets, tmp_path, capsys):
    d, _, _ = assets
    out = tmp_path / "cli"
    assert main(["evaluate", str(d / "model_a"), "--data", str(d / "data.h5"), "--out",
                 str(out), "--protocol", "standard,flipped", "--batch-size", "9",
                 "--no-figures"]) == 0
    assert "report in" in capsys.readouterr().out
    assert (out / "report.md").is_file() and not (out / "cumulative_error.png").exists()

    def err(args):
        code = main(["evaluate", *args])
        text = capsys.readouterr().err.strip()
        assert code != 0 and "Traceback" not in text and len(text.splitlines()) == 1, text
        return text

    model = str(d / "model_a")
    assert "need --data" in err([model, "--out", str(tmp_path / "x")])
    assert "'evaluate.protocols[0]': Invalid value 'upside', expected one of" in err(
        [model, "--data", str(d / "data.h5"), "--out", str(tmp_path / "x"), "--protocol", "upside"])
    missing = tmp_path / "nope"
    assert str(missing) in err([str(missing), "--data", str(d / "data.h5"), "--out",
                                str(tmp_path / "x")])
    bad = tmp_path / "bad.h5"
    bad.write_bytes(b"not hdf5 at all")
    assert "bad.h5" in err([model, "--data", str(bad), "--out", str(tmp_path / "x")])
    afile = tmp_path / "afile"
    afile.write_text("x")
    assert "not a directory" in err([model, "--data", str(d / "data.h5"), "--out", str(afile)])
    assert "batch_size" in err([model, "--data", str(d / "data.h5"), "--out",
                                str(tmp_path / "x"), "--batch-size", "0"])
    # nothing was written by the failed runs, and the earlier report is intact
    assert not (tmp_path / "x").exists()
    assert json.loads((out / "report.json").read_text())["protocols"] == ["standard", "flipped"]


@pytest.mark.slow
def test_two_accelerate_processes_equal_one(assets, tmp_path):
    d, _, _ = assets
    args = [str(d / "model_a"), "--data", str(d / "data.h5"), "--protocol",
            "standard,rotated", "--angles", "45,180", "--batch-size", "5", "--no-figures"]
    assert main(["evaluate", *args, "--out", str(tmp_path / "one")]) == 0
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes",
           "2", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "-m", "clerf", "evaluate", *args, "--out", str(tmp_path / "two")]
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one = json.loads((tmp_path / "one" / "report.json").read_text())
    two = json.loads((tmp_path / "two" / "report.json").read_text())
    assert two["run"]["world_size"] == 2 and one["run"]["world_size"] == 1
    a, b = _flat(_results(one)), _flat(_results(two))
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], float):
            assert b[k] == pytest.approx(a[k], abs=1e-9), k
        else:
            assert b[k] == a[k], k
