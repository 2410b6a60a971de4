"""``clerf preview`` and ``clerf.drawing``: the grid, the axes colours, one-line errors."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch

from clerf.cli import main
from clerf.drawing import AXIS_COLOURS, draw_axes, image_grid, pose_caption, save_png
from clerf.geometry import rotation_from_euler


def euler(p: float, y: float, r: float) -> torch.Tensor:
    return rotation_from_euler(torch.tensor(p, dtype=torch.float64),
                               torch.tensor(y, dtype=torch.float64),
                               torch.tensor(r, dtype=torch.float64))  # fmt: skip


def colour_centroid(img: np.ndarray, colour: tuple[int, int, int]) -> np.ndarray:
    """(x, y) centroid of pixels close to ``colour``."""
    d = np.abs(img.astype(int) - np.array(colour)).sum(-1)
    ys, xs = np.nonzero(d < 60)
    assert len(xs) > 0, f"no pixels of colour {colour}"
    return np.array([xs.mean(), ys.mean()])


# --------------------------------------------------------------------------- drawing


def test_draw_axes_follows_conventions() -> None:
    blank = np.full((101, 101, 3), 128, np.uint8)
    c = np.array([50.0, 50.0])
    # frontal: x to the right (red), y up (green), nose toward the viewer (a dot)
    img = draw_axes(blank, euler(0, 0, 0), size=40, thickness=3)
    assert colour_centroid(img, AXIS_COLOURS[0])[0] > c[0] + 10
    assert colour_centroid(img, AXIS_COLOURS[1])[1] < c[1] - 10
    # yaw +45: the nose axis (blue) points to the image's left
    img = draw_axes(blank, euler(0, 45, 0), size=40, thickness=3)
    assert colour_centroid(img, AXIS_COLOURS[2])[0] < c[0] - 5
    # pitch +45: the nose points up; roll +30: the x axis turns clockwise (down on screen)
    img = draw_axes(blank, euler(45, 0, 0), size=40, thickness=3)
    assert colour_centroid(img, AXIS_COLOURS[2])[1] < c[1] - 5
    img = draw_axes(blank, euler(0, 0, 30), size=40, thickness=3)
    dx, dy = colour_centroid(img, AXIS_COLOURS[0]) - c
    assert abs(np.degrees(np.arctan2(dy, dx)) - 30) < 4
    assert (blank == 128).all()  # the input is not modified


def test_drawing_inputs() -> None:
    chw = torch.zeros(3, 20, 30, dtype=torch.uint8)
    assert draw_axes(chw, torch.eye(3)).shape == (20, 30, 3)
    with pytest.raises(ValueError, match="uint8"):
        draw_axes(np.zeros((8, 8, 3)), np.eye(3))
    with pytest.raises(ValueError, match="3, 3"):
        draw_axes(np.zeros((8, 8, 3), np.uint8), np.eye(4))
    assert pose_caption(euler(10, -20, 30)) == "p 10.0 y -20.0 r 30.0"
    grid = image_grid([np.zeros((16, 16, 3), np.uint8)] * 5, ["a", "b", "c", "d", "e"], ncols=3)
    assert grid.shape[1] == 3 * 16 + 4 * 4 and grid.shape[0] > 2 * 16
    with pytest.raises(ValueError, match="captions"):
        image_grid([np.zeros((4, 4, 3), np.uint8)], ["a", "b"])


def test_save_png_round_trip(tmp_path) -> None:
    img = np.zeros((5, 7, 3), np.uint8)
    img[..., 0] = 200  # red in RGB
    p = save_png(tmp_path / "sub" / "x.png", img)
    back = cv2.imread(str(p))[..., ::-1]
    assert np.array_equal(back, img)
    with pytest.raises(ValueError, match=".png"):
        save_png(tmp_path / "x.jpg", img)


# --------------------------------------------------------------------------- the command


def test_preview_writes_a_grid(tmp_path, capsys) -> None:
    out = tmp_path / "grid.png"
    rc = main(["preview", "--n", "6", "--resolution", "48", "--seed", "1", "--out", str(out),
               "--poses", "box", "--param", "glasses_prob=1.0"])  # fmt: skip
    assert rc == 0
    img = cv2.imread(str(out))
    assert img is not None and img.shape[0] > 2 * 48 and img.shape[1] > 3 * 48
    assert "wrote" in capsys.readouterr().out
    # the same seed gives the same grid
    out2 = tmp_path / "grid2.png"
    main(["preview", "--n", "6", "--resolution", "48", "--seed", "1", "--out", str(out2),
          "--poses", "box", "--param", "glasses_prob=1.0"])  # fmt: skip
    assert np.array_equal(cv2.imread(str(out2)), img)


def test_preview_renders_given_rotations(tmp_path) -> None:
    R = torch.stack([euler(0, 30, 0), euler(0, -30, 0)]).numpy()
    path = tmp_path / "r.npy"
    np.save(path, R)
    out = tmp_path / "g.png"
    assert main(["preview", "--rotations", str(path), "--resolution", "32", "--out", str(out),
                 "--no-axes"]) == 0  # fmt: skip
    txt = tmp_path / "r.txt"
    np.savetxt(txt, R.reshape(2, 9))
    assert main(["preview", "--rotations", str(txt), "--resolution", "32", "--out", str(out)]) == 0


@pytest.mark.parametrize(
    "argv,code,message",
    [
        (["--generator", "nope"], 2, "unknown generator 'nope'"),
        (["--resolution", "8"], 2, "--resolution: resolution must be an integer"),
        (["--resolution", "2048"], 2, "in [16, 1024], got 2048"),
        (["--n", "0"], 2, "--n must be in 1..1024"),
        (["--param", "oops"], 2, "not of the form KEY=VALUE"),
        (["--param", "colour=red"], 2, "bad parameters"),
        (["--generator", "eg3d"], 2, "no network pickle given"),
        (["--generator", "eg3d", "--network", "x.pkl"], 2, "refusing to load 'x.pkl'"),
        (["--generator", "eg3d", "--network", "x.pkl", "--trust-pickle"], 2, "no checkout given"),
        (["--generator", "panohead", "--network", "x.pkl", "--trust-pickle", "--checkout",
          "/nonexistent/eg3d"], 2, "checkout folder not found: /nonexistent/eg3d"),
    ],
)  # fmt: skip
def test_preview_errors_are_one_line(tmp_path, capsys, argv, code, message) -> None:
    out = tmp_path / "grid.png"
    assert main(["preview", "--out", str(out), *argv]) == code
    err = capsys.readouterr().err.strip().splitlines()
    assert message in err[-1] and err[-1].startswith(("clerf preview: error:", "usage"))
    assert "Traceback" not in "\n".join(err)
    assert not out.exists()


def test_preview_errors_for_files(tmp_path, capsys) -> None:
    out = tmp_path / "grid.png"
    out.write_bytes(b"keep me")
    bad = tmp_path / "bad.npy"
    np.save(bad, np.stack([np.eye(3), 2 * np.eye(3)]))
    assert main(["preview", "--rotations", str(bad), "--out", str(out)]) == 1
    err = capsys.readouterr().err.strip()
    assert "element (1,) is not a rotation matrix" in err and len(err.splitlines()) == 1
    assert out.read_bytes() == b"keep me"  # nothing already written is lost
    assert main(["preview", "--rotations", str(tmp_path / "none.npy"), "--out", str(out)]) == 1
    assert "file not found" in capsys.readouterr().err
    assert main(["preview", "--resolution", "abc", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "must be an integer number of pixels in [16, 1024], got 'abc'" in err
    assert len(err.splitlines()) == 1


def test_untrusted_pickle_has_one_exit_code_in_every_command(tmp_path, capsys) -> None:
    from tests.test_triplets_helpers import small_config

    pkl = tmp_path / "G.pkl"
    pkl.write_bytes(b"never unpickled")
    codes = [
        main(["preview", "--out", str(tmp_path / "g.png"), "--generator", "eg3d",
              "--network", str(pkl)]),
        main(["generate", str(small_config(tmp_path)), "--out", str(tmp_path / "t.h5"),
              "--no-progress", "generator.name=eg3d", f"generator.params.network={pkl}"]),
    ]  # fmt: skip
    errs = capsys.readouterr().err.splitlines()
    assert codes == [2, 2] and len(errs) == 2 and all("refusing to load" in e for e in errs)
