"""clerf export: ONNX round trip with onnxruntime, metadata, loud failures, CLI errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from fixtures_evaluation import save_tiny_model, tiny_model

import clerf.inference.export as export_mod
from clerf.cli import main
from clerf.inference.export import ExportCheckError, PoseExportModule, check_onnx, export_onnx
from clerf.inference.model import load_pose_model, wrap_head_pose_model

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    d = tmp_path_factory.mktemp("export")
    model_dir = save_tiny_model(d / "model", seed=2, head="rotation6d")
    out = d / "pose.onnx"
    assert main(["export", str(model_dir), "--format", "onnx", "--out", str(out)]) == 0
    return model_dir, out


def test_round_trip_matches_torch(exported):
    model_dir, path = exported
    model = load_pose_model(model_dir)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_inputs()] == ["images"]
    assert [o.name for o in sess.get_outputs()] == ["rotation", "euler"]
    for b in (1, 5):  # the batch axis is dynamic
        x = torch.rand(b, 3, 32, 32, generator=torch.Generator().manual_seed(b))
        R, e = sess.run(None, {"images": x.numpy()})
        want = model.predict_rotations(x).numpy()
        assert R.shape == (b, 3, 3) and e.shape == (b, 3)
        assert np.abs(R - want).max() <= 1e-4
        with torch.inference_mode():
            _, e_t = PoseExportModule(model)(x)
        assert np.abs(e - e_t.numpy()).max() <= 1e-2


def test_metadata_records_the_input_contract(exported):
    _, path = exported
    meta = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    assert meta["clerf.input_size"] == "32"
    assert json.loads(meta["clerf.mean"]) == pytest.approx([0.485, 0.456, 0.406])
    assert json.loads(meta["clerf.std"]) == pytest.approx([0.229, 0.224, 0.225])
    assert meta["clerf.input_range"] == "[0, 1]" and "inside the graph" in meta[
        "clerf.normalisation"]
    assert meta["clerf.exporter"] in ("dynamo", "legacy")
    check = json.loads(meta["clerf.check"])
    assert check["rotation_max_abs"] <= check["atol"] == 1e-4
    assert meta["clerf.crop_preset"] == "hopenet_test"


@pytest.mark.slow
def test_binned_head_exports_with_dynamo(tmp_path):
    model = wrap_head_pose_model(tiny_model(seed=3, head="binned"))
    res = export_onnx(model, tmp_path / "binned.onnx", exporter="dynamo")
    assert res["exporter"] == "dynamo" and res["check"]["rotation_max_abs"] <= 1e-4


def test_a_mismatch_fails_loudly(exported, tmp_path):
    model_dir, path = exported
    other = PoseExportModule(wrap_head_pose_model(tiny_model(seed=9)))
    with pytest.raises(ExportCheckError, match="differs from torch"):
        check_onnx(path, other, 32)


def test_failed_check_leaves_nothing(monkeypatch, tmp_path, capsys):
    model_dir = save_tiny_model(tmp_path / "m", seed=2)
    out = tmp_path / "keep.onnx"
    out.write_bytes(b"an earlier export")

    def broken(*args, **kwargs):
        raise ExportCheckError("simulated: onnxruntime differs from torch")

    monkeypatch.setattr(export_mod, "check_onnx", broken)
    code = main(["export", str(model_dir), "--out", str(out), "--exporter", "legacy"])
    err = capsys.readouterr().err.strip()
    assert code == 1 and err.count("\n") == 0 and "differs from torch" in err
    assert out.read_bytes() == b"an earlier export"  # not replaced
    assert [p.name for p in tmp_path.iterdir() if p.suffix == ".onnx"] == ["keep.onnx"]


def test_cli_errors_are_one_line(tmp_path, capsys):
    def err(args, code):
        assert main(["export", *args]) == code
        text = capsys.readouterr().err.strip()
        assert "Traceback" not in text and len(text.splitlines()) == 1, text
        return text

    model_dir = save_tiny_model(tmp_path / "m", seed=1)
    assert "model not found" in err([str(tmp_path / "none"), "--out", str(tmp_path / "a.onnx")],
                                    1)
    assert "expected a .onnx" in err([str(model_dir), "--out", str(tmp_path / "a.txt")], 1)
    assert "--atol" in err([str(model_dir), "--out", str(tmp_path / "a.onnx"), "--atol", "0"], 2)
    with pytest.raises(SystemExit) as exc:  # argparse: one error line (no usage block), exit 2
        main(["export", str(model_dir), "--out", str(tmp_path / "a.onnx"), "--format", "tflite"])
    assert exc.value.code == 2 and "invalid choice" in capsys.readouterr().err
    assert not (tmp_path / "a.onnx").exists()
