"""The landmark-to-pose baseline (clerf.inference.landmarks): PnP against a projection oracle,
the mean-shape fit against a known shape, NaN predictions counted by the metrics, and the fitted
model through ``clerf evaluate`` (with the real face mesh where mediapipe is installed)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from clerf.evaluation.metrics import compute_errors, summarize
from clerf.geometry import (
    geodesic_error,
    random_rotation,
    rotation_from_euler,
    rotation_from_opencv,
)
from clerf.inference.landmarks import (
    MESH_POINTS,
    LandmarkPoseModule,
    camera_matrix,
    fit_mean_shape,
    load_landmark_model,
    save_landmark_model,
    solve_rotation,
)


def _face_points(n: int = MESH_POINTS, seed: int = 0) -> np.ndarray:
    """A face-like 3D point set in the head frame: a shallow bowl facing +z (the nose)."""
    rng = np.random.default_rng(seed)
    xy = rng.uniform(-1.0, 1.0, size=(n, 2)) * np.array([0.8, 1.0])
    z = 0.5 - 0.4 * (xy ** 2).sum(axis=1) + 0.05 * rng.standard_normal(n)
    return np.column_stack([xy, z])


def _project(P_head: np.ndarray, R: np.ndarray, size: int, focal: float, depth: float = 6.0):
    """Perspective projection (pixels, y down) of head-frame points posed by clerf's ``R``.

    Independent of the solver's convention code: camera coordinates in clerf's axes are
    ``X = R^T p`` (rows of R = head axes), the camera looks down -z from ``depth`` in front."""
    X = P_head @ R  # (R^T p)^T = p^T R
    z_dist = depth - X[:, 2]  # distance from the camera along its viewing direction
    f, c = focal * size, size / 2.0
    return np.column_stack([c + f * X[:, 0] / z_dist, c - f * X[:, 1] / z_dist])


def test_opencv_to_clerf_frontal_is_identity_and_proper():
    C = torch.diag(torch.tensor([1.0, -1.0, -1.0], dtype=torch.float64))
    torch.testing.assert_close(rotation_from_opencv(C), torch.eye(3, dtype=torch.float64))
    R = rotation_from_opencv(random_rotation(64, torch.Generator().manual_seed(1)).double())
    torch.testing.assert_close(torch.linalg.det(R), torch.ones(64, dtype=torch.float64))


@pytest.mark.parametrize("focal", [1.0, 3.0])
def test_pnp_recovers_the_pose_of_a_synthetic_projection(focal):
    """Projection oracle: known 3D points posed at known R, projected, solved: within 1e-3 deg."""
    P = _face_points()
    g = torch.Generator().manual_seed(3)
    n = 40
    pitch, yaw, roll = ((torch.rand(n, generator=g) * 2 - 1) * a for a in (50.0, 70.0, 60.0))
    Rs = rotation_from_euler(pitch.double(), yaw.double(), roll.double()).numpy()
    errs = []
    for R in Rs:
        uv = _project(P, R, 192, focal)
        R_hat = solve_rotation(uv, P, 192, focal)
        assert R_hat is not None
        errs.append(float(geodesic_error(torch.from_numpy(R_hat)[None],
                                         torch.from_numpy(R)[None])[0]))  # fmt: skip
    assert max(errs) < 1e-3, max(errs)


def test_mean_shape_fit_recovers_a_known_face_from_posed_meshes():
    """Meshes of one known face at known poses (in the mesh's pixel axes: y down, z away from
    the camera, scaled and shifted per image) average back to the face (unit RMS radius)."""
    P = _face_points(seed=5)
    P = P - P.mean(0)
    P = P / np.sqrt((P ** 2).sum(1).mean())
    Rs = random_rotation(12, torch.Generator().manual_seed(2)).double().numpy()
    meshes = []
    for k, R in enumerate(Rs):
        X = P @ R  # clerf camera axes
        meshes.append(X * np.array([1.0, -1.0, -1.0]) * (50 + 5 * k) + np.array([90, 80, 3.0]))
    shape = fit_mean_shape([*meshes, None], np.concatenate([Rs, np.eye(3)[None]]))
    np.testing.assert_allclose(shape, P, atol=1e-6)  # the labels are float32 rotations


def test_missed_predictions_are_counted_and_scored_as_the_frontal_answer():
    R_true = random_rotation(6, torch.Generator().manual_seed(0)).double()
    R_pred = R_true.clone()
    R_pred[[1, 4]] = float("nan")
    e = compute_errors(np.arange(6), R_pred, R_true)
    assert e.missed.tolist() == [False, True, False, False, True, False]
    frontal = geodesic_error(torch.eye(3, dtype=torch.float64).expand(2, 3, 3), R_true[[1, 4]])
    np.testing.assert_allclose(e.geodesic[[1, 4]], frontal.numpy())
    s = summarize(e, euler=False)
    assert s["missed"]["n"] == 2 and s["missed"]["share"] == pytest.approx(2 / 6)
    assert s["missed"]["geodesic_mean_found"] == pytest.approx(0.0, abs=1e-5)
    assert "missed" not in summarize(compute_errors(np.arange(6), R_true, R_true), euler=False)


def test_landmark_module_with_an_injected_landmarker(tmp_path):
    """The module solves each image's landmarks; no face -> NaN; save/load keeps it all."""
    P = _face_points(seed=7)
    R = rotation_from_euler(torch.tensor([10.0, -5.0]), torch.tensor([30.0, 0.0]),
                            torch.tensor([5.0, 0.0])).double().numpy()  # fmt: skip
    mesh_of = {}
    for k in range(2):
        uv = _project(P, R[k], 64, 1.0)
        mesh_of[k] = np.column_stack([uv, np.zeros(len(uv))])

    def landmarker(img: np.ndarray):  # the image's first pixel says which face it shows
        k = int(img[0, 0, 0])
        return mesh_of.get(k)

    images = torch.zeros(3, 3, 64, 64)
    images[1, 0, 0, 0] = 1 / 255
    images[2, 0, 0, 0] = 2 / 255  # no such face: missed
    mod = LandmarkPoseModule(P, focal=1.0, landmarker=landmarker, exclude=[0, 1, 2])
    out = mod(images)
    assert torch.isnan(out[2]).all() and mod.calls == {"images": 3, "missed": 1}
    err = geodesic_error(out[:2].double(), torch.from_numpy(R))
    assert float(err.max()) < 1e-3
    save_landmark_model(tmp_path / "lm", P, 1.0, 64, "none", {"store": "x"}, exclude=[0, 1, 2])
    mod2, rec = load_landmark_model(tmp_path / "lm")
    assert rec["input_size"] == 64 and mod2.keep.tolist() == mod.keep.tolist()
    np.testing.assert_allclose(mod2.mean_shape, P, atol=1e-6)


def test_a_bad_landmark_model_file_names_the_field(tmp_path):
    from clerf.errors import DataError

    P = _face_points()
    save_landmark_model(tmp_path / "lm", P, 1.0, 64, "none", {}, exclude=[])
    f = tmp_path / "lm" / "landmark_pose.json"
    rec = json.loads(f.read_text())
    rec["mean_shape"] = rec["mean_shape"][:10]
    f.write_text(json.dumps(rec))
    with pytest.raises(DataError, match="landmark_pose.json: field 'mean_shape'"):
        load_landmark_model(tmp_path / "lm")


def test_camera_matrix_is_centred():
    K = camera_matrix(100, 2.0)
    assert K[0, 0] == K[1, 1] == 200.0 and K[0, 2] == K[1, 2] == 50.0


def _has_mediapipe() -> bool:
    try:
        from mediapipe.python.solutions import face_mesh  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.skipif(not _has_mediapipe(), reason="needs mediapipe (make detect-extra)")
def test_fit_and_evaluate_on_a_real_photograph(tmp_path, capsys):
    """End to end with the real face mesh: a store of the astronaut's face crop, upright and
    turned, labelled frontal and turned; fit on it, evaluate the fit through ``clerf evaluate``:
    every face found; the in-plane turn read within a few degrees of the label's."""
    from skimage import data

    from clerf.cli import main
    from triplets.store import StoreWriter

    img = data.astronaut()[20:220, 130:330]  # the face, 200 x 200
    import cv2

    face = cv2.resize(img, (192, 192), interpolation=cv2.INTER_AREA)
    turns = [0.0, 20.0, -20.0]
    images, Rs = [], []
    for phi in turns:
        M = cv2.getRotationMatrix2D((96, 96), -phi, 1.0)  # clockwise on screen by phi
        images.append(cv2.warpAffine(face, M, (192, 192), borderMode=cv2.BORDER_REPLICATE))
        Rs.append(rotation_from_euler(torch.zeros(1), torch.zeros(1), torch.tensor([phi]))[0])
    store = tmp_path / "astro.h5"
    ims = torch.from_numpy(np.stack(images).transpose(0, 3, 1, 2).copy())
    with StoreWriter(store, "labelled", 192, total=3, chunk=3) as w:
        for s, e in w.pending():
            w.write_chunk(s, ims[s:e], torch.stack(Rs)[s:e].float(), torch.arange(s, e))
        w.finalize()
    assert main(["landmark-fit", str(store), "--out", str(tmp_path / "lm"),
                 "--max-angle", "30"]) == 0  # fmt: skip
    assert "found 3 of 3" in capsys.readouterr().out
    assert main(["evaluate", str(tmp_path / "lm"), "--data", str(store), "--protocol",
                 "standard", "--out", str(tmp_path / "ev"), "--no-figures"]) == 0  # fmt: skip
    rep = json.loads((tmp_path / "ev" / "report.json").read_text())
    s = rep["models"][0]["results"]["standard"]["pooled"]
    assert "missed" not in s and s["n"] == 3
    assert s["geodesic"]["mean"] < 8.0, s["geodesic"]


def test_predict_draws_a_face_without_a_pose():
    """A face whose predictor returned nothing (NaN rotation) is drawn as a box with 'no pose',
    not a crash; the refine pass keeps its box."""
    from clerf.inference.detect import Box
    from clerf.inference.predict import FacePose, annotate

    img = np.zeros((80, 80, 3), dtype=np.uint8)
    nan = float("nan")
    face = FacePose("x.png", None, 0, Box(10, 10, 40, 40), (10, 10, 40, 40),
                    np.full((3, 3), nan), nan, nan, nan)  # fmt: skip
    out = annotate(img, [face])
    assert out.shape == img.shape and out.any()  # the box and the text are drawn


def test_points_from_opencv_matches_the_rotation_rule():
    """Oracle: a point posed by OpenCV's R_cv, moved into clerf's axes, equals the point posed by
    clerf's rotation (rows = head axes: X = R^T p)."""
    from clerf.geometry import points_from_opencv

    g = torch.Generator().manual_seed(4)
    R = random_rotation(8, g).double()
    p = torch.randn(8, 3, generator=g, dtype=torch.float64)
    C = torch.diag(torch.tensor([1.0, -1.0, -1.0], dtype=torch.float64))
    R_cv = C @ R.transpose(-1, -2)  # so that rotation_from_opencv(R_cv) == R
    torch.testing.assert_close(rotation_from_opencv(R_cv), R)
    X_cv = (R_cv @ p[..., None])[..., 0]
    X = (R.transpose(-1, -2) @ p[..., None])[..., 0]
    torch.testing.assert_close(points_from_opencv(X_cv), X)
