"""The landmark-to-pose baseline of the HopeNet paper: 2D landmarks, PnP against a mean 3D face.

HopeNet (Ruiz et al., 2018) measures its network against landmark-to-pose methods: detect 2D
face landmarks, then solve the perspective-n-point problem against a mean 3D head. clerf's
version, a predictor that ``clerf evaluate`` and ``clerf predict`` take where they take a model:

* **Landmarks**: MediaPipe's 468-point face mesh (weights inside the ``mediapipe==0.10.21``
  wheel: ``make detect-extra``), run on the evaluated crop. Its 36 face-oval points (the jaw and
  forehead contour) are left out of the fit: a contour point slides over the face as it turns.
* **The mean 3D face** is fitted by ``clerf landmark-fit STORE --out DIR`` from a *labelled
  training* store (never the test set; never AFLW2000's ``pt3d_68``): on each image whose label
  is within ``max_angle`` deg of frontal, the mesh's own 3D estimate ``X`` (468 x 3, x right,
  y up, z toward the viewer, scaled by the image side) is centred, scaled to unit RMS radius and
  turned into the head frame with the image's label (``p = R X``, rows of ``R`` = head axes in
  camera coordinates: ``docs/conventions.md``); the mean over images is the model. clerf's
  procedural head is not used: its parts are ellipsoid centres, not surface points.
* **PnP**: ``cv2.solvePnP`` (EPnP for a start, then Levenberg-Marquardt) with the focal length
  ``focal`` x the image side in pixels, the principal point at the image centre and no
  distortion; the solver's object-to-camera rotation is turned into clerf's convention by
  :func:`clerf.geometry.rotation_from_opencv`.
* **No face found**: the rotation is NaN. ``clerf evaluate`` counts those samples (``missed``)
  and scores them as the constant upright, frontal answer, and also reports the error of the
  others.

A fitted model is a directory holding ``landmark_pose.json`` (the mean shape, the settings, what
it was fitted on); :func:`clerf.inference.model.load_pose_model` recognises it.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from clerf.errors import ConfigError, DataError

__all__ = [
    "LANDMARK_MODEL_FILE",
    "MESH_POINTS",
    "MeshLandmarker",
    "LandmarkPoseModule",
    "fit_mean_shape",
    "solve_rotation",
    "camera_matrix",
    "save_landmark_model",
    "load_landmark_model",
    "is_landmark_model",
]

LANDMARK_MODEL_FILE = "landmark_pose.json"
MESH_POINTS = 468
_KIND = "clerf-landmark-pnp"
_VERSION = 1


def _mesh_module() -> Any:
    try:
        from mediapipe.python import solution_base
        from mediapipe.python.solutions import face_mesh
    except ImportError as exc:
        raise ConfigError(
            "the landmark baseline needs mediapipe's face mesh, which is not installed: run "
            f"`make detect-extra` (pip install --no-deps mediapipe==0.10.21 absl-py attrs "
            f"flatbuffers) [{exc}]"
        ) from None
    return solution_base, face_mesh


def face_oval_indices() -> list[int]:
    """The mesh's face-oval (contour) points, left out of the PnP fit."""
    from mediapipe.python.solutions.face_mesh_connections import FACEMESH_FACE_OVAL

    return sorted({i for edge in FACEMESH_FACE_OVAL for i in edge})


class MeshLandmarker:
    """MediaPipe's face mesh on one RGB image: ``(468, 3)`` points or None.

    Columns: x, y in pixels of the image (x right, y **down**), z the mesh's relative depth in
    the same pixel scale (smaller = nearer the camera). Static-image mode, one face, the
    mediapipe graph's own thresholds (0.5). The graph is built through mediapipe's
    ``SolutionBase`` without calculator options: ``FaceMesh(...)`` sets its thresholds through
    a protobuf field attribute (``FieldDescriptor.label``) that protobuf 5 and later removed,
    and clerf's environment has protobuf 7.
    """

    def __init__(self) -> None:
        solution_base, face_mesh = _mesh_module()
        graph = getattr(face_mesh, "_BINARYPB_FILE_PATH", None)  # mediapipe 0.10.21's layout
        if graph is None or not hasattr(solution_base, "SolutionBase"):
            import mediapipe

            raise ConfigError(
                f"the landmark baseline needs mediapipe 0.10.21's face-mesh solution; the "
                f"installed mediapipe {getattr(mediapipe, '__version__', '?')} has another "
                "layout: run `make detect-extra`")
        self._mesh = solution_base.SolutionBase(
            binary_graph_path=graph,
            side_inputs={"num_faces": 1, "with_attention": False, "use_prev_landmarks": False},
            outputs=["multi_face_landmarks"],
        )

    def __call__(self, image: np.ndarray) -> np.ndarray | None:
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"MeshLandmarker: expected an (H, W, 3) uint8 RGB image, got "
                             f"{image.shape} {image.dtype}")  # fmt: skip
        res = self._mesh.process(np.ascontiguousarray(image))
        if not res.multi_face_landmarks:
            return None
        h, w = image.shape[:2]
        pts = res.multi_face_landmarks[0].landmark
        return np.array([[p.x * w, p.y * h, p.z * w] for p in pts], dtype=np.float64)

    def close(self) -> None:
        self._mesh.close()


def camera_matrix(size: int, focal: float) -> np.ndarray:
    """Pinhole intrinsics of a square ``size`` image: focal ``focal * size`` px, centred."""
    f, c = float(focal) * size, size / 2.0
    return np.array([[f, 0.0, c], [0.0, f, c], [0.0, 0.0, 1.0]])


def solve_rotation(points2d: np.ndarray, model3d: np.ndarray, size: int, focal: float
                   ) -> np.ndarray | None:  # fmt: skip
    """clerf's rotation ``(3, 3)`` of a face from its 2D landmarks (pixels, y down) and the
    matching 3D model points (head frame: x right on a frontal face, y up, z the nose), or None
    if the solver fails. EPnP for a start, then Levenberg-Marquardt on the reprojection error."""
    import cv2

    from clerf.geometry import rotation_from_opencv

    obj = np.ascontiguousarray(model3d, dtype=np.float64)
    img = np.ascontiguousarray(points2d, dtype=np.float64)
    K = camera_matrix(size, focal)
    ok, rvec, tvec = cv2.solvePnP(obj, img, K, None, flags=cv2.SOLVEPNP_EPNP)
    if not ok:
        return None
    ok, rvec, tvec = cv2.solvePnP(obj, img, K, None, rvec, tvec, useExtrinsicGuess=True,
                                  flags=cv2.SOLVEPNP_ITERATIVE)  # fmt: skip
    if not ok or not np.isfinite(rvec).all():
        return None
    R_cv, _ = cv2.Rodrigues(rvec)
    if tvec[2, 0] <= 0:  # the face behind the camera: a mirror solution
        return None
    return rotation_from_opencv(torch.from_numpy(R_cv)).numpy()


def mesh_camera_points(mesh: np.ndarray) -> np.ndarray:
    """The mesh's 3D estimate in clerf's camera axes (x right, y up, z toward the viewer)."""
    from clerf.geometry import points_from_opencv

    return points_from_opencv(torch.from_numpy(np.asarray(mesh, dtype=np.float64))).numpy()


def _normalise(X: np.ndarray) -> np.ndarray:
    X = X - X.mean(axis=0)
    return X / np.sqrt((X * X).sum(axis=1).mean())


def fit_mean_shape(meshes: list[np.ndarray | None], rotations: np.ndarray) -> np.ndarray:
    """The mean 3D face ``(468, 3)`` (head frame, unit RMS radius) from per-image meshes.

    Args:
        meshes: :class:`MeshLandmarker` outputs (None where no face was found: skipped).
        rotations: ``(N, 3, 3)`` the images' labels (clerf's convention).
    """
    shapes = [_normalise(mesh_camera_points(m)) @ np.asarray(R, dtype=np.float64).T
              for m, R in zip(meshes, rotations, strict=True) if m is not None]  # fmt: skip
    if not shapes:
        raise DataError("landmark-fit: the face mesh found no face on any selected image")
    return _normalise(np.mean(shapes, axis=0))


class LandmarkPoseModule(nn.Module):
    """Images ``(B, 3, S, S)`` float in [0, 1] -> rotations ``(B, 3, 3)``, NaN where no face.

    Runs on the CPU in NumPy whatever the input's device (the mesh is a MediaPipe graph); the
    result comes back on the input's device.
    """

    def __init__(self, mean_shape: np.ndarray, focal: float,
                 landmarker: Callable[[np.ndarray], np.ndarray | None] | None = None,
                 exclude: list[int] | None = None) -> None:  # fmt: skip
        super().__init__()
        self.mean_shape = np.asarray(mean_shape, dtype=np.float64)
        if self.mean_shape.shape != (MESH_POINTS, 3):
            raise DataError(f"landmark model: mean shape must be ({MESH_POINTS}, 3), got "
                            f"{self.mean_shape.shape}")  # fmt: skip
        self.focal = float(focal)
        self._landmarker = landmarker
        drop = set(face_oval_indices() if exclude is None else exclude)
        self.keep = np.array([i for i in range(MESH_POINTS) if i not in drop])
        self.calls = {"images": 0, "missed": 0}

    @property
    def landmarker(self) -> Callable[[np.ndarray], np.ndarray | None]:
        if self._landmarker is None:
            self._landmarker = MeshLandmarker()
        return self._landmarker

    def rotation_of(self, image: np.ndarray) -> np.ndarray | None:
        """One ``(H, W, 3)`` uint8 RGB square image -> rotation or None."""
        mesh = self.landmarker(image)
        if mesh is None:
            return None
        return solve_rotation(mesh[self.keep, :2], self.mean_shape[self.keep], image.shape[0],
                              self.focal)  # fmt: skip

    def forward(self, images: Tensor) -> Tensor:
        u8 = (images.detach().float().clamp(0, 1) * 255.0).round().to(torch.uint8)
        u8 = u8.permute(0, 2, 3, 1).cpu().numpy()
        out = np.full((u8.shape[0], 3, 3), np.nan, dtype=np.float32)
        for i, img in enumerate(u8):
            R = self.rotation_of(img)
            self.calls["images"] += 1
            if R is None:
                self.calls["missed"] += 1
            else:
                out[i] = R
        return torch.from_numpy(out).to(images.device)


def is_landmark_model(path: str | Path) -> bool:
    return (Path(path) / LANDMARK_MODEL_FILE).is_file()


def save_landmark_model(out: str | Path, mean_shape: np.ndarray, focal: float, input_size: int,
                        crop_preset: str, fitted_on: dict[str, Any],
                        exclude: list[int] | None = None) -> Path:  # fmt: skip
    """Write ``out/landmark_pose.json`` (atomically) and return its path."""
    from clerf.files import replacing
    from clerf.versions import CONVENTIONS_VERSION

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rec = {"kind": _KIND, "version": _VERSION, "conventions_version": CONVENTIONS_VERSION,
           "landmarks": "mediapipe face mesh (468 points), face oval left out",
           "exclude": sorted(int(i) for i in (face_oval_indices() if exclude is None
                                              else exclude)),
           "focal": float(focal), "input_size": int(input_size), "crop_preset": crop_preset,
           "fitted_on": fitted_on,
           "mean_shape": np.round(np.asarray(mean_shape, dtype=np.float64), 6).tolist()}
    path = out / LANDMARK_MODEL_FILE
    with replacing(path) as tmp:
        tmp.write_text(json.dumps(rec, indent=1))
    return path


def load_landmark_model(path: str | Path) -> tuple[LandmarkPoseModule, dict[str, Any]]:
    """The module and the record of a saved landmark model directory."""
    f = Path(path) / LANDMARK_MODEL_FILE
    try:
        rec = json.loads(f.read_text())
    except (OSError, ValueError) as exc:
        raise DataError(f"{f}: not a readable landmark model ({exc})") from None
    if not isinstance(rec, dict) or rec.get("kind") != _KIND:
        raise DataError(f"{f}: field 'kind' must be '{_KIND}'")
    if rec.get("version") != _VERSION:
        raise DataError(f"{f}: field 'version' is {rec.get('version')!r}; this clerf reads "
                        f"version {_VERSION}")  # fmt: skip
    for key, typ in (("focal", (int, float)), ("input_size", int), ("mean_shape", list),
                     ("crop_preset", str), ("exclude", list)):
        if not isinstance(rec.get(key), typ):
            raise DataError(f"{f}: field '{key}' is missing or not a {typ}")
    if not float(rec["focal"]) > 0 or not int(rec["input_size"]) >= 32:
        raise DataError(f"{f}: 'focal' must be > 0 and 'input_size' >= 32")
    shape = np.asarray(rec["mean_shape"], dtype=np.float64)
    if shape.shape != (MESH_POINTS, 3) or not np.isfinite(shape).all():
        raise DataError(f"{f}: field 'mean_shape' must be {MESH_POINTS} finite 3D points")
    exclude = rec["exclude"]
    if not all(isinstance(i, int) and 0 <= i < MESH_POINTS for i in exclude):
        raise DataError(f"{f}: field 'exclude' must list mesh point numbers 0-{MESH_POINTS - 1}")
    return LandmarkPoseModule(shape, float(rec["focal"]), exclude=exclude), rec
