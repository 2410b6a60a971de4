"""Writers of tiny real-dataset fixtures in the EXACT on-disk formats (no downloads needed).

* 300W-LP / AFLW2000: ``<name>.jpg`` (written with ``cv2.imwrite``) + ``<name>.mat`` written with
  ``scipy.io.savemat``: ``Pose_Para`` 1 x 7 ``[pitch, yaw, roll, tx, ty, tz, scale]`` in radians
  and ``pt2d`` 2 x 68 landmarks in pixels (-1 = missing).
* BIWI: an ``.npz`` with ``image`` (N, H, W, 3) uint8 and ``pose`` (N, 3) yaw, pitch, roll (deg).

Used by ``tests/test_data_*.py`` and ``benchmarks/bench_prepare.py``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import scipy.io

W300LP_ALL = ("AFW", "AFW_Flip", "HELEN", "HELEN_Flip", "IBUG", "IBUG_Flip", "LFPW", "LFPW_Flip")


def landmarks_in_box(x0: float, y0: float, x1: float, y1: float, n: int = 68, seed: int = 0):
    """``(2, n)`` float64 landmarks inside the box whose extreme points are exactly the box."""
    rng = np.random.default_rng(seed)
    pts = np.stack([rng.uniform(x0, x1, n), rng.uniform(y0, y1, n)])
    pts[:, 0] = (x0, y0)  # pin the extremes so the landmark box is known exactly
    pts[:, 1] = (x1, y1)
    return pts


def face_image(h: int, w: int, seed: int = 0, gray: bool = False) -> np.ndarray:
    """A smooth, JPEG-friendly test picture: ``(h, w, 3)`` BGR or ``(h, w)`` gray uint8."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    base = rng.uniform(40, 200, size=3).astype(np.float32)
    img = np.empty((h, w, 3), np.float32)
    for c in range(3):
        img[..., c] = base[c] + 40 * np.sin(xx / (7 + 3 * c)) + 30 * np.cos(yy / (11 + c))
    cv2.ellipse(img, (w // 2, h // 2), (w // 4, h // 3), 0, 0, 360, (230, 200, 180), -1)
    img = np.clip(img, 0, 255).astype(np.uint8)
    return cv2.cvtColor(img, cv2.COLOR_BGR2GRAY) if gray else img


def write_jpg(path: Path, h: int = 48, w: int = 48, seed: int = 0, gray: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), face_image(h, w, seed, gray), [cv2.IMWRITE_JPEG_QUALITY, 90]):
        raise OSError(f"cv2.imwrite failed for {path}")
    return path


def write_pose_mat(
    path: Path,
    pitch: float,
    yaw: float,
    roll: float,
    pt2d: np.ndarray | None = None,
    with_pose: bool = True,
) -> Path:
    """Write a 300W-LP/AFLW2000 ``.mat``; angles given in DEGREES, stored in radians."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data: dict[str, np.ndarray] = {}
    if with_pose:
        pose = [math.radians(pitch), math.radians(yaw), math.radians(roll), 10.0, 20.0, 30.0, 0.5]
        data["Pose_Para"] = np.array([pose], dtype=np.float32)  # 1 x 7, as 3DDFA ships it
    else:
        data["Shape_Para"] = np.zeros((199, 1), np.float32)
    if pt2d is not None:
        data["pt2d"] = np.asarray(pt2d, dtype=np.float64)
    scipy.io.savemat(str(path), data)
    return path


@dataclass
class FixtureSample:
    """What a fixture writer wrote for one image (for the tests' expectations)."""

    key: str
    euler: tuple[float, float, float]
    box: tuple[float, float, float, float]
    gray: bool = False


@dataclass
class Fixture:
    root: Path
    samples: list[FixtureSample] = field(default_factory=list)
    rejected: list[str] = field(default_factory=list)
    bad: list[str] = field(default_factory=list)


def _pair(
    d: Path,
    stem: str,
    euler,
    size: int,
    seed: int,
    gray: bool = False,
    missing_pts: int = 0,
    mirror: bool = False,
) -> tuple[float, float, float, float]:
    """Write ``stem.jpg`` + ``stem.mat``; ``mirror`` writes the left-right mirrored image and
    landmarks (as 300W-LP's ``_Flip`` folders hold them). Returns the landmark box."""
    box = (0.3 * size, 0.35 * size, 0.7 * size, 0.8 * size)
    pts = landmarks_in_box(*box, seed=seed)
    img = face_image(size, size, seed, gray)
    if mirror:
        img = np.ascontiguousarray(img[:, ::-1])
        pts[0] = (size - 1) - pts[0]
        box = ((size - 1) - box[2], box[1], (size - 1) - box[0], box[3])
    if missing_pts:
        pts[:, -missing_pts:] = -1.0  # AFLW2000 style missing points
    d.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(d / f"{stem}.jpg"), img, [cv2.IMWRITE_JPEG_QUALITY, 90]):
        raise OSError(f"cv2.imwrite failed for {d / stem}.jpg")
    write_pose_mat(d / f"{stem}.mat", *euler, pt2d=pts)
    return box


def make_300wlp(
    root: Path,
    per_subset: int = 2,
    subsets: tuple[str, ...] = W300LP_ALL,
    size: int = 48,
    extreme: bool = True,
    gray: bool = True,
    missing_mat: bool = False,
) -> Fixture:
    """A 300W-LP tree. ``_Flip`` twins get the mirrored image and labels (pitch, -yaw, -roll).

    Edge cases: with ``extreme`` the first AFW sample has yaw = 105 deg (filtered by the
    protocol); with ``gray`` the first HELEN image is grayscale; with ``missing_mat`` one IBUG
    image has no ``.mat``. A ``landmarks/`` folder is written and must be ignored.
    """
    fx = Fixture(root)
    (root / "landmarks" / "AFW").mkdir(parents=True, exist_ok=True)
    (root / "landmarks" / "AFW" / "AFW_1_0_pts.mat").write_bytes(b"not read")
    for si, subset in enumerate(subsets):
        flip = subset.endswith("_Flip")
        base = subset.removesuffix("_Flip")
        for i in range(per_subset):
            stem = f"{base}_{100 + i}_1_{i}"
            seed = 1000 * (W300LP_ALL.index(base) if base in W300LP_ALL else si) + i
            pitch, yaw, roll = 10.0 + i, 20.0 + 5 * i, -7.0 - i
            if extreme and base == "AFW" and i == 0:
                yaw = 105.0
            if flip:
                yaw, roll = -yaw, -roll  # the dataset's own mirrored labels
            is_gray = gray and subset == "HELEN" and i == 0
            key = f"{subset}/{stem}"
            if missing_mat and subset == "IBUG" and i == 0:
                write_jpg(root / subset / f"{stem}.jpg", size, size, seed)
                fx.bad.append(key)
                continue
            box = _pair(root / subset, stem, (pitch, yaw, roll), size, seed, is_gray, mirror=flip)
            if abs(yaw) > 99:
                fx.rejected.append(key)
            else:
                fx.samples.append(FixtureSample(key, (pitch, yaw, roll), box, is_gray))
    return fx


def make_aflw2000(
    root: Path, n: int = 6, size: int = 48, n_extreme: int = 1, missing_pts: int = 5
) -> Fixture:
    """``image%05d.jpg/.mat`` pairs; the last ``n_extreme`` have pitch beyond 99 deg; every
    other sample has its last ``missing_pts`` landmarks set to -1; sample 1 is grayscale."""
    fx = Fixture(root)
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        stem = f"image{2 + 11 * i:05d}"
        euler = (-30.0 + 7 * i, 40.0 - 9 * i, 3.0 * i)
        if i >= n - n_extreme:
            euler = (-120.0, 10.0, 5.0)
        gray = i == 1
        box = _pair(root, stem, euler, size, 50 + i, gray, missing_pts if i % 2 == 0 else 0)
        if i >= n - n_extreme:
            fx.rejected.append(stem)
        else:
            fx.samples.append(FixtureSample(stem, euler, box, gray))
    return fx


def make_biwi_npz(path: Path, n: int = 5, size: int = 32, extreme_row: int | None = 2):
    """A BIWI ``.npz``: images stored BGR (as FSA-Net's cv2 pipeline does), pose = yaw, pitch,
    roll in degrees. Returns ``(images_bgr, pose)``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    images = np.stack([face_image(size, size, seed=7 + i) for i in range(n)])
    pose = np.array([[10.0 * i - 20.0, 5.0 - 3 * i, 2.0 * i] for i in range(n)])
    if extreme_row is not None:
        pose[extreme_row, 0] = -100.0
    np.savez(path, image=images, pose=pose, img_size=size)
    return images, pose


# --------------------------------------------------------------------------- Pointing'04

POINTING04_TILT_ROWS = (-60, -30, -15, 0, 15, 30, 60)


def pointing04_index(tilt: int, pan: int) -> int:
    """The pose number ``II`` Pointing'04 gives (tilt, pan): 0 = (-90, 0), then each tilt row's
    13 pans from -90 to 90, 92 = (+90, 0)."""
    if tilt == -90:
        return 0
    if tilt == 90:
        return 92
    return 1 + 13 * POINTING04_TILT_ROWS.index(tilt) + (pan + 90) // 15


def pointing04_stem(person: int, series: int, tilt: int, pan: int) -> str:
    return f"person{person:02d}{series}{pointing04_index(tilt, pan):02d}{tilt:+d}{pan:+d}"


def write_pointing04_box(path: Path, cx: int, cy: int, w: int, h: int) -> Path:
    """The ``.txt`` beside a Pointing'04 image, byte for byte as distributed: the image name,
    an empty line, ``Face``, then centre x, centre y, width, height, one per line."""
    path.write_text(f"{path.stem}.jpg\n\nFace\n{cx}\n{cy}\n{w}\n{h}\n", encoding="ascii")
    return path


def make_pointing04(
    root: Path,
    people: tuple[int, ...] = (1, 11, 13),
    poses: tuple[tuple[int, int], ...] = ((0, 0), (60, 90), (-90, 0), (15, -45)),
    series: tuple[int, ...] = (1,),
    size: tuple[int, int] = (96, 72),
) -> dict[str, tuple[float, float, float, float]]:
    """``PersonNN/personNNSII<tilt><pan>.jpg`` + ``.txt``; returns ``{key: face box (x_min, y_min,
    x_max, y_max)}`` as the loader must read it."""
    w, h = size
    boxes = {}
    for person in people:
        folder = root / f"Person{person:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        for s in series:
            for j, (tilt, pan) in enumerate(poses):
                stem = pointing04_stem(person, s, tilt, pan)
                write_jpg(folder / f"{stem}.jpg", h, w, seed=100 * person + 10 * s + j)
                bw, bh = 20 + 2 * j, 24 + j
                cx, cy = w // 2 + j, h // 2 - j
                write_pointing04_box(folder / f"{stem}.txt", cx, cy, bw, bh)
                boxes[f"Person{person:02d}/{stem}"] = (
                    cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2
                )
    return boxes
