"""The benchmark protocol's face crop: one function, named presets (``docs/conventions.md`` 6).

The peers (HopeNet ``code/datasets.py``, copied by 6DRepNet and most successors) crop a loose box
around the 68 landmarks. With the landmark box ``(x_min, y_min, x_max, y_max)`` and a margin
factor ``k`` the arithmetic is, **in this order**::

    x_min -= left   * k * |x_max - x_min|
    y_min -= top    * k * |y_max - y_min|
    x_max += right  * k * |x_max - x_min|     # x_min was already moved: the width grew
    y_max += bottom * k * |y_max - y_min|     # y_min was already moved: the height grew
    box = (int(x_min), int(y_min), int(x_max), int(y_max))   # int() truncates toward zero

so the right margin is ``right * k * w * (1 + left * k)``, not ``right * k * w``. The box is then
cut with PIL's ``Image.crop`` semantics: the half-open pixel range ``[x0, x1) x [y0, y1)``, and
any part outside the image is filled with black (0). :func:`crop_box` and :func:`crop_image`
reproduce all of it exactly.

Presets (factors ``left, top, right, bottom``; ``k``):

* ``hopenet_train``: ``0.6, 2, 0.6, 0.6``; ``k ~ U[0.2, 0.4)`` (HopeNet ``Pose_300W_LP``).
  HopeNet draws a new ``k`` every time an image is read; a prepared store fixes one ``k`` per
  image, drawn from ``(seed, sample key)`` so it is reproducible and independent of file order.
* ``hopenet_test``: ``2, 2, 2, 0.6``; ``k = 0.2``. This is the AFLW2000 test crop **as the peers'
  code does it** (HopeNet ``AFLW2000`` class at its final commit; 6DRepNet's and 6DRepNet360's
  copies): wider on the sides than the training rule, and missing landmarks (-1) taken as
  coordinates, as they do. The crop behind every figure presented as comparable with theirs.
* ``hopenet_test_corrected``: the same factors, missing landmarks excluded (a named alternative:
  a tighter, face-centred box on the images with -1 landmarks, not the peers' crop).
* ``train_rule_k02``: the training factors with ``k = 0.2`` fixed, which is how
  ``docs/conventions.md`` section 6 words the test crop ("the same rule with k = 0.2").
* ``none``: no crop (BIWI's preprocessed ``.npz`` images are already face crops).

Missing landmarks (``CropPreset.missing``): AFLW2000 marks a missing point with the value -1 (not
a coordinate; 300W-LP has none). The peers take ``min``/``max`` over the raw values, -1 included,
so a -1 drags the box's top-left corner to (-1, -1) before the margins are added (``peers``:
reproduced exactly). ``exclude`` drops a point when either of its coordinates is exactly -1 and
raises when none remain. Stores record the preset and how many images had missing landmarks.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import get_args

import numpy as np

from clerf.config import ResizeMode
from clerf.errors import DataError

__all__ = [
    "CropPreset",
    "CROP_PRESETS",
    "MISSING_LANDMARK",
    "get_preset",
    "landmark_box",
    "has_missing_landmarks",
    "MISSING_RULES",
    "crop_box",
    "sample_k",
    "crop_image",
    "resize_square",
    "RESIZE_MODES",
    "protocol_crop",
]

#: the ``prepare.resize`` choices (:data:`clerf.config.ResizeMode`), for :func:`resize_square`
RESIZE_MODES: tuple[str, ...] = get_args(ResizeMode)

#: The value AFLW2000 stores for a landmark that was not annotated.
MISSING_LANDMARK = -1.0


@dataclass(frozen=True)
class CropPreset:
    """A named crop rule: margin factors (multiplied by ``k``) and the range of ``k``.

    ``k`` is fixed when ``k_low == k_high``, else drawn uniformly from ``[k_low, k_high)``.
    ``enabled=False`` means no crop at all (the image is used whole). ``missing``: how landmarks
    marked -1 enter the landmark box, ``peers`` (as values, as HopeNet/6DRepNet do) or
    ``exclude`` (left out).
    """

    name: str
    left: float = 0.6
    top: float = 2.0
    right: float = 0.6
    bottom: float = 0.6
    k_low: float = 0.2
    k_high: float = 0.2
    enabled: bool = True
    description: str = ""
    missing: str = "peers"

    @property
    def random(self) -> bool:
        return self.k_high > self.k_low


CROP_PRESETS: dict[str, CropPreset] = {
    p.name: p
    for p in (
        CropPreset(
            "hopenet_train", 0.6, 2.0, 0.6, 0.6, 0.2, 0.4,
            description="HopeNet 300W-LP training crop, k ~ U[0.2, 0.4) seeded per sample",
        ),
        CropPreset(
            "hopenet_test", 2.0, 2.0, 2.0, 0.6, 0.2, 0.2,
            description="HopeNet/6DRepNet AFLW2000 test crop exactly as in their code, k = 0.2, "
                        "-1 landmarks included as they are",
        ),
        CropPreset(
            "hopenet_test_corrected", 2.0, 2.0, 2.0, 0.6, 0.2, 0.2,
            description="hopenet_test with missing (-1) landmarks excluded: not the peers' crop",
            missing="exclude",
        ),
        CropPreset(
            "train_rule_k02", 0.6, 2.0, 0.6, 0.6, 0.2, 0.2,
            description="training factors with k = 0.2 fixed (docs/conventions.md "
                        "section 6 wording), -1 landmarks excluded",
            missing="exclude",
        ),
        CropPreset(
            "pointing04_box", 2.0, 2.0, 2.0, 2.0, 0.2, 0.2,
            description="Pointing'04: its annotated face box (brows to mouth) grown by 0.4 of "
                        "its size on every side, k = 0.2",
        ),
        CropPreset("none", enabled=False, description="no crop: the image is already a face"),
    )
}  # fmt: skip


def get_preset(name: str) -> CropPreset:
    """The preset called ``name``; an unknown name is a ``ValueError`` listing the known ones."""
    try:
        return CROP_PRESETS[name]
    except KeyError:
        known = ", ".join(CROP_PRESETS)
        raise ValueError(f"unknown crop preset '{name}' (known: {known})") from None


MISSING_RULES = ("peers", "exclude")


def has_missing_landmarks(pt2d: np.ndarray | None) -> bool:
    """Whether any landmark of ``pt2d`` is marked missing (-1 in either coordinate)."""
    if pt2d is None:
        return False
    pts = np.asarray(pt2d, dtype=np.float64)
    return bool(((pts == MISSING_LANDMARK).any(axis=0)).any()) if pts.ndim == 2 else False


def landmark_box(
    pt2d: np.ndarray, source: str = "landmarks", missing: str = "exclude"
) -> tuple[float, float, float, float]:
    """Tight box ``(x_min, y_min, x_max, y_max)`` (pixels) of the landmarks.

    Args:
        pt2d: ``(2, N)`` array, row 0 = x, row 1 = y, in pixels (300W-LP/AFLW2000 ``pt2d``).
        source: named in errors (e.g. the ``.mat`` path).
        missing: ``exclude``: a point with either coordinate exactly -1 is missing and left out;
            ``peers``: min/max over the raw values, -1 included (HopeNet's and 6DRepNet's code).

    Raises:
        DataError: wrong shape, non-finite values, or (``exclude``) no annotated landmark left.
    """
    if missing not in MISSING_RULES:
        raise ValueError(f"missing must be one of {MISSING_RULES}, got {missing!r}")
    pts = np.asarray(pt2d, dtype=np.float64)
    if pts.ndim != 2 or pts.shape[0] != 2 or pts.shape[1] == 0:
        raise DataError(f"{source}: pt2d must be a (2, N) array of landmarks, got {pts.shape}")
    present = ~((pts[0] == MISSING_LANDMARK) | (pts[1] == MISSING_LANDMARK))
    if not present.any():
        raise DataError(f"{source}: all {pts.shape[1]} landmarks are missing (-1): no crop box")
    if missing == "exclude":
        pts = pts[:, present]
    if not np.isfinite(pts).all():
        raise DataError(f"{source}: pt2d contains NaN or infinite coordinates")
    return (float(pts[0].min()), float(pts[1].min()), float(pts[0].max()), float(pts[1].max()))


def crop_box(
    box: tuple[float, float, float, float], preset: CropPreset | str, k: float
) -> tuple[int, int, int, int]:
    """The peers' loose crop of a landmark box, exactly (see the module docstring).

    Args:
        box: ``(x_min, y_min, x_max, y_max)`` in pixels (floats).
        preset: a :class:`CropPreset` or its name; must be an enabled preset.
        k: margin factor.

    Returns:
        ``(x0, y0, x1, y1)`` integers (truncated toward zero), half-open: width ``x1 - x0``.
    """
    p = get_preset(preset) if isinstance(preset, str) else preset
    if not p.enabled:
        raise ValueError(f"crop preset '{p.name}' does not crop")
    x_min, y_min, x_max, y_max = (float(v) for v in box)
    x_min -= p.left * k * abs(x_max - x_min)
    y_min -= p.top * k * abs(y_max - y_min)
    # The peers update the right/bottom edges with the already-moved left/top: reproduced.
    x_max += p.right * k * abs(x_max - x_min)
    y_max += p.bottom * k * abs(y_max - y_min)
    return int(x_min), int(y_min), int(x_max), int(y_max)


def sample_k(preset: CropPreset | str, seed: int, key: str) -> float:
    """The margin factor ``k`` of one sample: fixed, or uniform in ``[k_low, k_high)``.

    A random ``k`` depends only on ``(seed, key)`` (``key`` = the sample's path inside its
    dataset), so resuming, reordering or selecting other subsets never changes a sample's crop.
    """
    p = get_preset(preset) if isinstance(preset, str) else preset
    if not p.random:
        return float(p.k_low)
    ss = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, zlib.crc32(key.encode("utf-8"))])
    u = float(np.random.default_rng(ss).random())  # in [0, 1)
    return p.k_low + (p.k_high - p.k_low) * u


def crop_image(
    image: np.ndarray, box: tuple[int, int, int, int], source: str = "image"
) -> np.ndarray:
    """Cut ``box = (x0, y0, x1, y1)`` out of ``image`` with PIL ``crop`` semantics.

    Args:
        image: ``(H, W, C)`` uint8.
        box: half-open integer box; parts outside the image become 0 (black).

    Returns:
        ``(y1 - y0, x1 - x0, C)`` uint8, a new array.

    Raises:
        DataError: an empty box (``x1 <= x0`` or ``y1 <= y0``), naming ``source``.
    """
    x0, y0, x1, y1 = (int(v) for v in box)
    if x1 <= x0 or y1 <= y0:
        raise DataError(f"{source}: empty crop box {(x0, y0, x1, y1)}")
    h, w = image.shape[:2]
    out = np.zeros((y1 - y0, x1 - x0) + image.shape[2:], dtype=image.dtype)
    sx0, sy0, sx1, sy1 = max(x0, 0), max(y0, 0), min(x1, w), min(y1, h)
    if sx1 > sx0 and sy1 > sy0:
        out[sy0 - y0 : sy1 - y0, sx0 - x0 : sx1 - x0] = image[sy0:sy1, sx0:sx1]
    return out


#: ``center`` (= ``hopenet``): torchvision ``Resize(r)`` + ``CenterCrop(r)``, HopeNet's test
#: transform (aspect ratio kept, the longer side trimmed). ``6drepnet``: ``Resize(r * 256 / 224)``
#: + ``CenterCrop(r)``, 6DRepNet's and 6DRepNet360's test transform (``Resize(256)`` +
#: ``CenterCrop(224)`` at ``r = 224``: a further 1/8 of the crop is trimmed). ``stretch``: resize
#: the whole crop to ``r x r``.


def resize_before_crop(resolution: int, mode: str) -> int:
    """The ``Resize`` size of a centre-cropping mode at output size ``resolution``."""
    r = int(resolution)
    return int(round(r * 256 / 224)) if mode == "6drepnet" else r


def resize_square(image: np.ndarray, resolution: int, mode: ResizeMode = "center"
                  ) -> np.ndarray:  # fmt: skip
    """Resize an ``(H, W, 3)`` uint8 crop to ``(r, r, 3)`` with PIL bilinear interpolation.

    ``center``/``hopenet`` compute the sizes exactly as torchvision does for ``Resize(s)`` on a PIL
    image (shorter side -> ``s``, longer side -> ``int(s * long / short)``; PIL ``BILINEAR``,
    which antialiases when shrinking) followed by ``CenterCrop(r)`` (offset
    ``int(round((L - r) / 2))``), with ``s = r``; ``6drepnet`` the same with
    ``s = round(r * 256 / 224)``. At ``r = 224`` the stored image is HopeNet's (``center``) or
    6DRepNet's (``6drepnet``) network input before normalisation.
    """
    from PIL import Image  # pillow ships with torchvision

    if mode not in RESIZE_MODES:
        raise ValueError(f"unknown resize mode '{mode}' (known: {', '.join(RESIZE_MODES)})")
    r = int(resolution)
    h, w = image.shape[:2]
    pil = Image.fromarray(image)
    if mode == "stretch":
        return np.asarray(pil.resize((r, r), Image.BILINEAR))
    size = resize_before_crop(r, mode)
    if w <= h:
        new_w, new_h = size, int(size * h / w)
    else:
        new_w, new_h = int(size * w / h), size
    if (new_w, new_h) != (w, h):
        pil = pil.resize((new_w, new_h), Image.BILINEAR)
    top = int(round((new_h - r) / 2.0))
    left = int(round((new_w - r) / 2.0))
    return np.asarray(pil)[top : top + r, left : left + r].copy()


def protocol_crop(
    image: np.ndarray,
    pt2d: np.ndarray | None,
    preset: CropPreset | str,
    k: float | None = None,
    source: str = "image",
    box: tuple[float, float, float, float] | None = None,
) -> tuple[np.ndarray, tuple[int, int, int, int] | None]:
    """Landmark box -> loose box -> cut: the whole protocol crop for one image.

    Args:
        image: ``(H, W, 3)`` uint8 RGB.
        pt2d: ``(2, N)`` landmarks (-1 = missing); ignored by the ``none`` preset.
        preset: preset or its name.
        k: margin factor; required for enabled presets (use :func:`sample_k`).
        box: a dataset's own face box ``(x_min, y_min, x_max, y_max)`` (Pointing'04), used in
            place of the landmark box when ``pt2d`` is None.

    Returns:
        ``(crop, box)``; ``box`` is None for the ``none`` preset.
    """
    p = get_preset(preset) if isinstance(preset, str) else preset
    if not p.enabled:
        return image, None
    if pt2d is None and box is None:
        raise DataError(f"{source}: crop preset '{p.name}' needs landmarks (pt2d) or a face box")
    if k is None:
        raise ValueError("protocol_crop: k is required for an enabled preset")
    tight = landmark_box(pt2d, source, p.missing) if pt2d is not None else box
    loose = crop_box(tight, p, k)
    return crop_image(image, loose, source), loose
