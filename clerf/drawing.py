"""Drawing head axes on images and laying out captioned image grids (numpy + OpenCV, CPU).

Axes follow ``docs/conventions.md`` section 2, as the HopeNet and 6DRepNet visualisers draw
them: the rows of ``R`` projected orthographically (:func:`clerf.geometry.image_axes`, image y
down), x (head right) in red, y (head up) in green, z (nose) in blue. Images are RGB ``uint8``
``(H, W, 3)`` arrays; nothing here needs torch on the hot path or a display.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from clerf.geometry import euler_from_rotation, image_axes

__all__ = ["AXIS_COLOURS", "draw_axes", "pose_caption", "image_grid", "save_png", "to_hwc"]

#: RGB colours of the head's x (right), y (up) and z (nose) axes
AXIS_COLOURS: tuple[tuple[int, int, int], ...] = ((230, 30, 30), (30, 200, 30), (40, 80, 255))


def to_hwc(image: np.ndarray | torch.Tensor) -> np.ndarray:
    """An RGB uint8 image as a contiguous ``(H, W, 3)`` numpy array (accepts ``(3, H, W)``)."""
    a = image.detach().cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    if a.ndim == 3 and a.shape[0] == 3 and a.shape[-1] != 3:
        a = a.transpose(1, 2, 0)
    if a.ndim != 3 or a.shape[-1] != 3:
        raise ValueError(f"expected an RGB image (H, W, 3) or (3, H, W), got shape {a.shape}")
    if a.dtype != np.uint8:
        raise ValueError(f"expected a uint8 image, got {a.dtype}")
    return np.ascontiguousarray(a)


def draw_axes(
    image: np.ndarray | torch.Tensor,
    R: np.ndarray | torch.Tensor,
    centre: tuple[float, float] | None = None,
    size: float | None = None,
    thickness: int | None = None,
) -> np.ndarray:
    """Draw the head axes of rotation ``R`` on a copy of ``image``.

    Args:
        image: RGB uint8 ``(H, W, 3)`` (or ``(3, H, W)``).
        R: ``(3, 3)`` rotation (rows = head axes in camera coordinates, docs/conventions.md 2).
        centre: ``(x, y)`` pixel where the axes start; the image centre by default.
        size: length in pixels of an axis parallel to the image plane; ``0.4 * min(H, W)``.
        thickness: line width in pixels; scales with the image by default.

    Returns:
        a new RGB uint8 ``(H, W, 3)`` array. The axis pointing most toward the viewer is drawn
        last, so it stays visible.
    """
    import cv2

    img = to_hwc(image).copy()
    h, w = img.shape[:2]
    Rt = torch.as_tensor(np.asarray(R, dtype=np.float64))
    if Rt.shape != (3, 3):
        raise ValueError(f"R: expected a (3, 3) rotation, got shape {tuple(Rt.shape)}")
    ax2d = image_axes(Rt).numpy()  # (3, 2): (dx, dy) per head axis, image y down
    cx, cy = centre if centre is not None else ((w - 1) / 2, (h - 1) / 2)
    size = 0.4 * min(h, w) if size is None else size
    thick = max(1, round(min(h, w) / 64)) if thickness is None else int(thickness)
    order = np.argsort(Rt[:, 2].numpy())  # far to near: z component toward the viewer
    shift = 4  # sub-pixel precision of cv2.line
    p0 = (round(cx * (1 << shift)), round(cy * (1 << shift)))
    for i in order:
        dx, dy = ax2d[i] * size
        p1 = (round((cx + dx) * (1 << shift)), round((cy + dy) * (1 << shift)))
        cv2.line(img, p0, p1, AXIS_COLOURS[i], thick, cv2.LINE_AA, shift)
    return img


def pose_caption(R: np.ndarray | torch.Tensor) -> str:
    """``"p 12.3 y -45.0 r 3.1"``: pitch, yaw, roll in degrees (docs/conventions.md 1)."""
    e = euler_from_rotation(torch.as_tensor(np.asarray(R, dtype=np.float64)))
    return f"p {float(e.pitch):.1f} y {float(e.yaw):.1f} r {float(e.roll):.1f}"


def image_grid(
    images: Sequence[np.ndarray | torch.Tensor],
    captions: Sequence[str] | None = None,
    ncols: int | None = None,
    pad: int = 4,
    background: tuple[int, int, int] = (255, 255, 255),
    text_colour: tuple[int, int, int] = (0, 0, 0),
) -> np.ndarray:
    """Lay out equally sized RGB images in a grid, each with an optional caption under it.

    Returns an RGB uint8 ``(H, W, 3)`` array. Captions are scaled to fit the tile width.
    """
    import cv2

    if len(images) == 0:
        raise ValueError("image_grid: no images")
    tiles = [to_hwc(im) for im in images]
    h, w = tiles[0].shape[:2]
    if any(t.shape[:2] != (h, w) for t in tiles):
        raise ValueError("image_grid: images differ in size")
    if captions is not None and len(captions) != len(tiles):
        raise ValueError(f"image_grid: {len(captions)} captions for {len(tiles)} images")
    n = len(tiles)
    ncols = ncols or int(np.ceil(np.sqrt(n)))
    nrows = int(np.ceil(n / ncols))
    font = cv2.FONT_HERSHEY_SIMPLEX
    scale, text_h = 0.0, 0
    if captions is not None:
        # largest font scale (<= 0.5) that fits the longest caption in the tile width
        longest = max(captions, key=len) or " "
        (tw, th), base = cv2.getTextSize(longest, font, 1.0, 1)
        scale = min(0.5, (w - 2) / max(tw, 1))
        text_h = int(np.ceil((th + base) * scale)) + 4
    cell_h, cell_w = h + text_h + pad, w + pad
    grid = np.empty((nrows * cell_h + pad, ncols * cell_w + pad, 3), dtype=np.uint8)
    grid[:] = background
    for k, tile in enumerate(tiles):
        r, c = divmod(k, ncols)
        y0, x0 = pad + r * cell_h, pad + c * cell_w
        grid[y0 : y0 + h, x0 : x0 + w] = tile
        if captions is not None and captions[k]:
            org = (x0 + 1, y0 + h + text_h - 4)
            cv2.putText(grid, captions[k], org, font, scale, text_colour, 1, cv2.LINE_AA)
    return grid


def save_png(path: str | Path, image: np.ndarray) -> Path:
    """Write an RGB uint8 image as PNG (parent folders created); raises ``OSError`` on failure.

    Written to a temporary name first and renamed, so an existing file is never left half
    written.
    """
    import cv2

    p = Path(path)
    if p.suffix.lower() != ".png":
        raise ValueError(f"{p}: expected a .png path")
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(p.name + ".part.png")
    ok = cv2.imwrite(str(tmp), np.ascontiguousarray(to_hwc(image)[..., ::-1]))
    if not ok:
        tmp.unlink(missing_ok=True)
        raise OSError(f"{p}: could not write the PNG")
    tmp.replace(p)
    return p
