"""The protocol crop: exact numbers, PIL/torchvision oracles, missing landmarks, seeded k."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from clerf.data.crop import (
    CROP_PRESETS,
    crop_box,
    crop_image,
    get_preset,
    has_missing_landmarks,
    landmark_box,
    protocol_crop,
    resize_square,
    sample_k,
)
from clerf.errors import DataError

# --------------------------------------------------------------------------- exact arithmetic


def test_test_preset_hand_computed():
    # box w = 100, h = 140, k = 0.2, factors (2, 2, 2, 0.6):
    # x_min = 100.5 - 0.4*100 = 60.5 -> 60
    # y_min = 10.5 - 0.4*140 = -45.5 -> -45  (int() truncates toward zero, not floor)
    # x_max = 200.5 + 0.4*(200.5 - 60.5) = 256.5 -> 256   (uses the moved x_min)
    # y_max = 150.5 + 0.12*(150.5 + 45.5) = 174.02 -> 174 (uses the moved y_min)
    assert crop_box((100.5, 10.5, 200.5, 150.5), "hopenet_test", 0.2) == (60, -45, 256, 174)


def test_train_preset_hand_computed():
    # factors (0.6, 2, 0.6, 0.6), k = 0.3: 0.18 and 0.6
    # x_min = 100.5 - 18 = 82.5 -> 82 ; y_min = 120.5 - 84 = 36.5 -> 36
    # x_max = 200.5 + 0.18*(200.5 - 82.5) = 221.74 -> 221
    # y_max = 260.5 + 0.18*(260.5 - 36.5) = 300.82 -> 300
    assert crop_box((100.5, 120.5, 200.5, 260.5), "hopenet_train", 0.3) == (82, 36, 221, 300)


def test_train_rule_k02_hand_computed_and_asymmetry():
    # x_max = 200.5 + 0.12*(200.5 - 88.5) = 213.94 -> 213; a rule using the original width
    # would give 200.5 + 12 = 212.5 -> 212: the peers' order of updates matters.
    assert crop_box((100.5, 120.5, 200.5, 260.5), "train_rule_k02", 0.2) == (88, 64, 213, 284)


def test_presets_are_what_the_docs_say():
    tr, te = CROP_PRESETS["hopenet_train"], CROP_PRESETS["hopenet_test"]
    def factors(p):
        return (p.left, p.top, p.right, p.bottom, p.k_low, p.k_high)

    assert factors(tr) == (0.6, 2, 0.6, 0.6, 0.2, 0.4)
    assert factors(te) == (2, 2, 2, 0.6, 0.2, 0.2)
    assert tr.random and not te.random
    # the peers' presets take -1 landmarks as they are; the corrected alternative excludes them
    assert tr.missing == te.missing == "peers"
    tc = CROP_PRESETS["hopenet_test_corrected"]
    assert factors(tc) == factors(te) and tc.missing == "exclude"
    with pytest.raises(ValueError, match="unknown crop preset 'nope'.*hopenet_train"):
        get_preset("nope")
    with pytest.raises(ValueError, match="does not crop"):
        crop_box((0, 0, 1, 1), "none", 0.2)


@settings(max_examples=60, deadline=None)
@given(
    x0=st.floats(-50, 400), y0=st.floats(-50, 400),
    w=st.floats(1, 300), h=st.floats(1, 300), k=st.floats(0.0, 0.5),
    name=st.sampled_from(["hopenet_train", "hopenet_test", "train_rule_k02"]),
)  # fmt: skip
def test_crop_box_matches_closed_form(x0, y0, w, h, k, name):
    """Oracle: the sequential updates equal the closed form with the grown width/height."""
    p = get_preset(name)
    x1, y1 = x0 + w, y0 + h
    nx0 = x0 - p.left * k * w
    ny0 = y0 - p.top * k * h
    nx1 = x1 + p.right * k * (w + p.left * k * w)
    ny1 = y1 + p.bottom * k * (h + p.top * k * h)
    got = crop_box((x0, y0, x1, y1), p, k)
    want = (nx0, ny0, nx1, ny1)
    for g, v in zip(got, want, strict=True):
        # int() truncation toward zero; allow 1 px where float rounding sits on an integer
        assert abs(g - np.trunc(v)) <= (1 if abs(v - round(v)) < 1e-6 else 0)


# --------------------------------------------------------------------------- landmarks


def test_landmark_box_excludes_missing_points():
    pts = np.array([[10.0, 20.0, -1.0, 30.0, 15.0], [5.0, -1.0, -1.0, 40.0, 12.0]])
    # points 1 (y = -1) and 2 (both -1) are missing; the rest span x 10..30, y 5..40
    assert landmark_box(pts) == (10.0, 5.0, 30.0, 40.0)
    # a genuinely negative coordinate (off-image) is kept
    pts2 = np.array([[-3.5, 20.0], [4.0, 9.0]])
    assert landmark_box(pts2) == (-3.5, 4.0, 20.0, 9.0)


def _hopenet_aflw2000_box(pt2d: np.ndarray, k: float = 0.2) -> tuple[int, int, int, int]:
    """HopeNet's ``AFLW2000.__getitem__`` arithmetic, written out plainly (min/max over the raw
    ``pt2d`` values, -1 included; the right/bottom updates use the moved left/top)."""
    x_min = min(pt2d[0, :])
    y_min = min(pt2d[1, :])
    x_max = max(pt2d[0, :])
    y_max = max(pt2d[1, :])
    x_min -= 2 * k * abs(x_max - x_min)
    y_min -= 2 * k * abs(y_max - y_min)
    x_max += 2 * k * abs(x_max - x_min)
    y_max += 0.6 * k * abs(y_max - y_min)
    return int(x_min), int(y_min), int(x_max), int(y_max)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), n_missing=st.integers(0, 20))
def test_hopenet_test_preset_reproduces_the_peers_with_missing_landmarks(seed, n_missing):
    """Oracle: HopeNet's own arithmetic on the raw landmarks, -1 entries included."""
    rng = np.random.default_rng(seed)
    pts = np.stack([rng.uniform(100, 400, 68), rng.uniform(90, 380, 68)])
    if n_missing:
        pts[:, rng.choice(68, n_missing, replace=False)] = -1.0
    img = rng.integers(0, 256, (450, 480, 3), dtype=np.uint8)
    crop, box = protocol_crop(img, pts, "hopenet_test", 0.2)
    want = _hopenet_aflw2000_box(pts)
    assert box == want
    np.testing.assert_array_equal(crop, np.asarray(Image.fromarray(img).crop(want)))
    _, corrected = protocol_crop(img, pts, "hopenet_test_corrected", 0.2)
    present = pts[:, (pts != -1).all(axis=0)]
    assert corrected == _hopenet_aflw2000_box(present)
    assert (corrected == box) == (n_missing == 0)
    assert has_missing_landmarks(pts) == (n_missing > 0)


def test_landmark_box_errors_name_the_source():
    with pytest.raises(DataError, match=r"x\.mat: all 3 landmarks are missing"):
        landmark_box(-np.ones((2, 3)), "x.mat")
    with pytest.raises(DataError, match=r"y\.mat: pt2d must be a \(2, N\)"):
        landmark_box(np.zeros((3, 68)), "y.mat")
    with pytest.raises(DataError, match="NaN"):
        landmark_box(np.array([[1.0, np.nan], [1.0, 2.0]]))


# --------------------------------------------------------------------------- k


def test_sample_k_seeded_in_range_and_keyed():
    ks = [sample_k("hopenet_train", 0, f"AFW/img_{i}") for i in range(400)]
    assert all(0.2 <= k < 0.4 for k in ks)
    assert 0.25 < float(np.mean(ks)) < 0.35 and float(np.std(ks)) > 0.04  # ~U[0.2, 0.4)
    assert ks[7] == sample_k("hopenet_train", 0, "AFW/img_7")  # same (seed, key) -> same k
    assert ks[7] != sample_k("hopenet_train", 1, "AFW/img_7")  # seed matters
    assert sample_k("hopenet_test", 5, "anything") == 0.2


# --------------------------------------------------------------------------- image cut


@settings(max_examples=40, deadline=None)
@given(
    x0=st.integers(-30, 40), y0=st.integers(-30, 40),
    w=st.integers(1, 60), h=st.integers(1, 60), seed=st.integers(0, 5),
)  # fmt: skip
def test_crop_image_equals_pil_crop(x0, y0, w, h, seed):
    """Oracle: PIL's Image.crop (what the peers call), including zero padding outside."""
    img = np.random.default_rng(seed).integers(0, 256, (23, 31, 3), dtype=np.uint8)
    box = (x0, y0, x0 + w, y0 + h)
    want = np.asarray(Image.fromarray(img).crop(box))
    np.testing.assert_array_equal(crop_image(img, box), want)


def test_crop_image_empty_box_is_an_error():
    with pytest.raises(DataError, match=r"a\.jpg: empty crop box"):
        crop_image(np.zeros((4, 4, 3), np.uint8), (2, 2, 2, 3), "a.jpg")


@pytest.mark.parametrize("shape", [(40, 30), (30, 40), (50, 50), (17, 90), (12, 12)])
def test_resize_center_equals_torchvision_resize_centercrop(shape):
    """Oracle: torchvision's Resize(r) + CenterCrop(r) on the PIL image (the peers' test input)."""
    from torchvision import transforms

    h, w = shape
    img = np.random.default_rng(h * w).integers(0, 256, (h, w, 3), dtype=np.uint8)
    r = 24
    tf = transforms.Compose([transforms.Resize(r), transforms.CenterCrop(r)])
    want = np.asarray(tf(Image.fromarray(img)))
    got = resize_square(img, r, "center")
    assert got.shape == (r, r, 3) and got.dtype == np.uint8
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("shape,r", [((300, 260), 224), ((40, 30), 28), ((30, 45), 28)])
def test_resize_6drepnet_equals_torchvision_resize256_centercrop224(shape, r):
    """Oracle: 6DRepNet's test transform, Resize(256) + CenterCrop(224) (scaled by r / 224)."""
    from torchvision import transforms

    h, w = shape
    img = np.random.default_rng(h + w).integers(0, 256, (h, w, 3), dtype=np.uint8)
    s = 256 if r == 224 else 32  # 28 * 256 / 224 = 32
    tf = transforms.Compose([transforms.Resize(s), transforms.CenterCrop(r)])
    want = np.asarray(tf(Image.fromarray(img)))
    np.testing.assert_array_equal(resize_square(img, r, "6drepnet"), want)
    # HopeNet's transform is another image: Resize(r) + CenterCrop(r)
    hope = transforms.Compose([transforms.Resize(r), transforms.CenterCrop(r)])
    np.testing.assert_array_equal(resize_square(img, r, "hopenet"),
                                  np.asarray(hope(Image.fromarray(img))))
    assert not np.array_equal(resize_square(img, r, "hopenet"), want)


def test_resize_stretch_and_bad_mode():
    img = np.zeros((10, 40, 3), np.uint8)
    img[:, 20:] = 255
    out = resize_square(img, 8, "stretch")
    assert out.shape == (8, 8, 3)
    assert out[:, :3].max() == 0 and out[:, 5:].min() == 255  # whole width kept, aspect not
    with pytest.raises(ValueError, match="unknown resize mode 'crop'"):
        resize_square(img, 8, "crop")


def test_protocol_crop_end_to_end():
    img = np.random.default_rng(0).integers(0, 256, (100, 120, 3), dtype=np.uint8)
    pts = np.array([[30.5, 80.5, -1.0], [40.5, 90.5, -1.0]])
    crop, box = protocol_crop(img, pts, "hopenet_test_corrected", 0.2)
    assert box == crop_box((30.5, 40.5, 80.5, 90.5), "hopenet_test", 0.2)
    np.testing.assert_array_equal(crop, crop_image(img, box))
    # the peers' preset takes the -1 as a coordinate
    crop, box = protocol_crop(img, pts, "hopenet_test", 0.2)
    assert box == crop_box((-1.0, -1.0, 80.5, 90.5), "hopenet_test", 0.2)
    np.testing.assert_array_equal(crop, crop_image(img, box))
    same, none_box = protocol_crop(img, None, "none")
    assert same is img and none_box is None
    with pytest.raises(DataError, match="needs landmarks"):
        protocol_crop(img, None, "hopenet_test", 0.2, "z.jpg")
