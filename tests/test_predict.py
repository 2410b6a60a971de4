"""clerf predict: detector, protocol crop from a detection, images, folders, video, errors."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from fixtures_evaluation import save_tiny_model
from matplotlib import cbook

from clerf.cli import main
from clerf.data.crop import crop_box
from clerf.geometry import euler_from_rotation, is_rotation
from clerf.inference.detect import (
    HAAR_MAPPING,
    Box,
    BoxesDetector,
    BoxMapping,
    FaceDetector,
    HaarDetector,
    landmark_box_from_detection,
    load_boxes,
)
from clerf.inference.model import load_pose_model
from clerf.inference.predict import FacePredictor, read_image

GRACE = Path(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("predict") / "model", seed=0)


class CornerDetector(FaceDetector):
    """A plug-in detector for the test: one fixed box."""

    name = "corner"

    def detect(self, image, source="", frame=None):
        return [Box(10, 20, 50, 60)]


def test_haar_finds_grace_hopper():
    boxes = HaarDetector().detect(read_image(GRACE))
    assert len(boxes) == 1
    # measured once by hand with OpenCV 4.x
    assert boxes[0].as_list() == [155.0, 105.0, 222.0, 222.0]


def test_detection_to_protocol_crop_by_hand(model_dir):
    box = Box(100, 50, 200, 100)
    # Haar mapping: centre (200, 100 + 0.15 * 100), size (0.88 * 200, 0.68 * 100)
    lm = landmark_box_from_detection(box, HAAR_MAPPING)
    assert lm == pytest.approx((112.0, 81.0, 288.0, 149.0))
    model = load_pose_model(model_dir)
    pred = FacePredictor(model, HaarDetector(), crop_preset="hopenet_test")
    # hopenet_test, k = 0.2: x0 = 112 - 2*.2*176 = 41.6; y0 = 81 - 2*.2*68 = 53.8;
    # x1 = 288 + 2*.2*(288 - 41.6) = 386.56; y1 = 149 + .6*.2*(149 - 53.8) = 160.424
    assert pred.crop_box(box) == (41, 53, 386, 160) == crop_box(lm, "hopenet_test", 0.2)
    train = FacePredictor(model, BoxesDetector({}), crop_preset="hopenet_train")
    assert train.k == pytest.approx(0.3)  # the middle of U[0.2, 0.4)
    assert train.mapping == BoxMapping()  # user boxes are landmark boxes
    square = FacePredictor(model, BoxesDetector({}), crop_preset="none")
    assert square.crop_box(Box(10, 20, 40, 20)) == (10, 10, 50, 50)
    x, cbs = pred.crops(read_image(GRACE), [Box(155, 105, 222, 222)])
    assert x.shape == (1, 3, 32, 32) and x.dtype == torch.uint8 and len(cbs) == 1


def test_predict_grace_hopper(model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["predict", str(model_dir), str(GRACE), "--out", str(out)]) == 0
    assert "1 face(s) in 1 input(s)" in capsys.readouterr().out
    rec = json.loads((out / "predictions.json").read_text())
    assert [r["status"] for r in rec["inputs"]] == ["ok"]
    (face,) = rec["faces"]
    # the default search (every 15 deg, profile, verified) finds the same face, upright
    x, y, w, h = face["box"]
    assert abs(x + w / 2 - 266) < 10 and abs(y + h / 2 - 216) < 10 and abs(w - 222) < 15
    assert abs(face["angle"]) <= 7.5
    R = torch.tensor(face["rotation"], dtype=torch.float64)
    assert bool(is_rotation(R, tol=1e-5))
    e = euler_from_rotation(R)
    assert (face["pitch"], face["yaw"], face["roll"]) == pytest.approx(
        (float(e.pitch), float(e.yaw), float(e.roll)), abs=1e-6)
    assert rec["settings"]["crop_preset"] == "hopenet_test"  # the model records none
    rows = (out / "predictions.csv").read_text().splitlines()
    assert len(rows) == 2 and rows[0].startswith("file,frame,face,x,y,w,h")
    ann = cv2.imread(str(out / "annotated" / "grace_hopper.png"))
    assert ann is not None and ann.shape == (600, 512, 3)
    assert not np.array_equal(ann, cv2.imread(str(GRACE)))  # something was drawn
    # upright only, frontal cascade, no verification: the detector of before, box for box
    assert main(["predict", str(model_dir), str(GRACE), "--out", str(out), "--angle-step", "0",
                 "--no-profile", "--no-verify"]) == 0
    (face,) = json.loads((out / "predictions.json").read_text())["faces"]
    assert face["box"] == [155.0, 105.0, 222.0, 222.0] and face["angle"] == 0.0


def test_no_face_is_a_message_not_a_crash(model_dir, tmp_path, capsys):
    folder = tmp_path / "in"
    folder.mkdir()
    cv2.imwrite(str(folder / "grey.png"), np.full((64, 64, 3), 128, np.uint8))
    shutil.copy(GRACE, folder / "face.jpg")
    (folder / "notes.txt").write_text("not an image: ignored inside folders")
    out = tmp_path / "out"
    assert main(["predict", str(model_dir), str(folder), "--out", str(out)]) == 0
    cap = capsys.readouterr()
    assert "grey.png: no face found" in cap.err and "1 without a face" in cap.out
    rec = json.loads((out / "predictions.json").read_text())
    assert {Path(r["file"]).name: r["status"] for r in rec["inputs"]} == {
        "face.jpg": "ok", "grey.png": "no face found"}


def test_user_boxes_and_plugin_detector(model_dir, tmp_path, capsys):
    boxes = tmp_path / "boxes.json"
    boxes.write_text(json.dumps({"grace_hopper.jpg": [[165, 175, 195, 150], [0, 0, 40, 40]]}))
    assert load_boxes(boxes)["grace_hopper.jpg"][0] == [165.0, 175.0, 195.0, 150.0]
    out = tmp_path / "b"
    assert main(["predict", str(model_dir), str(GRACE), "--out", str(out), "--boxes",
                 str(boxes), "--no-annotate"]) == 0
    rec = json.loads((out / "predictions.json").read_text())
    assert [f["box"] for f in rec["faces"]] == [[165, 175, 195, 150], [0, 0, 40, 40]]
    assert rec["faces"][1]["crop_box"][0] < 0  # outside the image: filled with black
    assert not (out / "annotated").exists()
    out = tmp_path / "c"
    assert main(["predict", str(model_dir), str(GRACE), "--out", str(out), "--detector",
                 "test_predict:CornerDetector", "--crop", "train_rule_k02"]) == 0
    rec = json.loads((out / "predictions.json").read_text())
    assert rec["faces"][0]["box"] == [10, 20, 50, 60]
    assert rec["settings"]["detector"]["name"] == "corner"


def _write_video(path: Path, frames: int = 3) -> None:
    img = cv2.resize(cv2.imread(str(GRACE)), (256, 300))
    w = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 10.0, (256, 300))
    assert w.isOpened()
    for k in range(frames):
        w.write(np.roll(img, 2 * k, axis=1))
    w.release()


def test_predict_on_video(model_dir, tmp_path, capsys):
    video = tmp_path / "clip.mp4"
    _write_video(video, 3)
    out = tmp_path / "v"
    # small frames: the eye check is unreliable at this size, so the search runs unverified
    assert main(["predict", str(model_dir), str(video), "--out", str(out), "--no-verify"]) == 0
    rec = json.loads((out / "predictions.json").read_text())
    assert rec["inputs"][0]["frames"] == 3 and rec["inputs"][0]["kind"] == "video"
    assert [f["frame"] for f in rec["faces"]] == [0, 1, 2]
    assert rec["inputs"][0]["fps"] > 0
    cap = cv2.VideoCapture(str(out / "annotated" / "clip.mp4"))
    n = 0
    while cap.read()[0]:
        n += 1
    cap.release()
    assert n == 3
    assert main(["predict", str(model_dir), str(video), "--out", str(tmp_path / "v1"),
                 "--max-frames", "1", "--no-annotate"]) == 0
    rec = json.loads((tmp_path / "v1" / "predictions.json").read_text())
    assert rec["inputs"][0]["frames"] == 1


def test_cli_errors_are_one_line(model_dir, tmp_path, capsys):
    def err(args, code=1):
        assert main(["predict", *args]) == code
        text = capsys.readouterr().err.strip()
        assert "Traceback" not in text and len(text.splitlines()) == 1, text
        return text

    out = str(tmp_path / "o")
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8 this is not a jpeg")
    assert "broken.jpg: cannot read this image" in err([str(model_dir), str(bad), "--out", out])
    badvid = tmp_path / "broken.mp4"
    badvid.write_bytes(b"not a video")
    assert "broken.mp4" in err([str(model_dir), str(badvid), "--out", out])
    assert not (tmp_path / "o").exists()  # no empty out/ or annotated/ left by failed runs
    assert "nothing.jpg: no such file" in err([str(model_dir), str(tmp_path / "nothing.jpg"),
                                               "--out", out])
    (tmp_path / "x.xyz").write_text("?")
    assert "unknown file type" in err([str(model_dir), str(tmp_path / "x.xyz"), "--out", out])
    boxes = tmp_path / "boxes.json"
    boxes.write_text('{"a.jpg": [[1, 2, 3]]}')
    assert "is not [x, y, w, h]" in err([str(model_dir), str(GRACE), "--out", out, "--boxes",
                                         str(boxes)])
    assert "unknown crop preset" in err([str(model_dir), str(GRACE), "--out", out, "--crop",
                                         "tight"])
    assert "unknown detector" in err([str(model_dir), str(GRACE), "--out", out, "--detector",
                                      "yolo"], code=2)
    assert "--angle-step must be 0" in err([str(model_dir), str(GRACE), "--out", out,
                                            "--angle-step", "7"], code=2)
    assert "model not found" in err([str(tmp_path / "nomodel"), str(GRACE), "--out", out])


def test_crop_preset_comes_from_the_training_data():
    from fixtures_evaluation import tiny_model

    from clerf.inference.model import wrap_head_pose_model

    m = tiny_model()
    assert wrap_head_pose_model(m).crop_preset == "hopenet_test"  # records nothing
    m.training_summary = {"train_data": {"crop_preset": "hopenet_train", "resize": "stretch"}}
    w = wrap_head_pose_model(m)
    assert (w.crop_preset, w.resize_mode, w.describe()["crop_source"]) == (
        "hopenet_train", "stretch", "model")
    m.training_summary = {"train_data": {"generator": "procedural"}}
    assert wrap_head_pose_model(m).crop_preset == "none"


def test_the_crop_protocol_is_read_from_the_saved_preprocessing_record(tmp_path):
    from fixtures_evaluation import tiny_model

    from clerf.finetune import crop_protocol

    m = tiny_model()
    m.crop = crop_protocol({"crop_preset": "hopenet_train", "resize": "stretch"})
    # a training summary that says otherwise is not searched: the record wins
    m.save_pretrained(tmp_path / "new", training={"train_data": {"crop_preset": "hopenet_test"}})
    meta = json.loads((tmp_path / "new" / "config.json").read_text())
    assert (meta["preprocessing"]["crop_preset"], meta["preprocessing"]["resize_mode"]) == (
        "hopenet_train", "stretch")
    w = load_pose_model(tmp_path / "new")
    assert (w.crop_preset, w.resize_mode, w.describe()["crop_source"]) == (
        "hopenet_train", "stretch", "model")

    m.crop = crop_protocol({"source": "in-memory tensors"})  # the data named no preset
    m.save_pretrained(tmp_path / "none", training={"train_data": {"crop_preset": "hopenet_train"}})
    w = load_pose_model(tmp_path / "none")
    assert w.crop_preset == "hopenet_test" and "names no crop preset" in w.describe()["crop_source"]


def test_a_model_saved_before_the_crop_record_loads_by_the_legacy_route(tmp_path):
    """A model directory written the old way: no crop keys in ``preprocessing``, the store's
    attributes somewhere inside the training summary."""
    from fixtures_evaluation import tiny_model

    m = tiny_model()
    m.save_pretrained(tmp_path / "old", training={
        "stage": "finetune", "train_data": {"path": "train.h5", "kind": "labelled",
                                            "crop_preset": "hopenet_train", "resize": "stretch"}})
    cfg_file = tmp_path / "old" / "config.json"
    meta = json.loads(cfg_file.read_text())
    for key in ("crop_preset", "resize_mode", "crop_source"):  # as written before the record
        meta["preprocessing"].pop(key, None)
    cfg_file.write_text(json.dumps(meta, indent=2, sort_keys=True))
    w = load_pose_model(tmp_path / "old")
    assert (w.crop_preset, w.resize_mode, w.describe()["crop_source"]) == (
        "hopenet_train", "stretch", "model")
    meta["training"] = {"train_data": {"source": "stream", "generator": "procedural"}}
    cfg_file.write_text(json.dumps(meta, indent=2, sort_keys=True))
    assert load_pose_model(tmp_path / "old").crop_preset == "none"


def test_cli_video_error_is_the_only_line_on_stderr(model_dir, tmp_path):
    """FFmpeg's own log line ("moov atom not found") is written by C code to the process's
    stderr: checked in a fresh process, where the backend is first initialised."""
    import subprocess
    import sys

    badvid = tmp_path / "broken.mp4"
    badvid.write_bytes(b"not a video")
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPENCV_")}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1])
    proc = subprocess.run([sys.executable, "-m", "clerf", "predict", str(model_dir), str(badvid),
                           "--out", str(tmp_path / "o")], capture_output=True, text=True,
                          env=env, timeout=300)  # fmt: skip
    assert proc.returncode == 1
    assert proc.stderr.count("\n") == 1 and "broken.mp4: cannot open" in proc.stderr, proc.stderr
