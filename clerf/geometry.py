"""The single source of truth for pose geometry in clerf (``docs/conventions.md``).

Every function is batched over leading dimensions, differentiable where that makes sense, and
works on any device in float32 or float64. Angles at this API are in **degrees**.

Conventions (see ``docs/conventions.md``):

* A label ``(pitch, yaw, roll)`` means ``R = Rz(roll) @ Ry(yaw) @ Rx(pitch)`` with the standard
  right-handed elementary rotations.
* The rows of ``R`` are the head's axes (right, up, nose) in camera coordinates, where the camera
  frame is x = image right, y = image up, z = toward the viewer. The third column ``R @ e_z`` is
  the direction of the camera seen from the head.
* Positive yaw turns the face toward the image's left, positive pitch tilts it up, positive roll
  turns the head clockwise on screen.
* An image rotation by ``phi`` degrees **clockwise on screen** maps ``R -> R @ Rz(phi)``; a
  horizontal flip maps ``R -> F @ R @ F`` with ``F = diag(-1, 1, 1)``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

__all__ = [
    "wrap180",
    "PROTOCOL_MAX_ABS_ANGLE",
    "EulerAngles",
    "BinSpec",
    "HOPENET_BINS",
    "FULL_RANGE_BINS",
    "rot_x",
    "rot_y",
    "rot_z",
    "rotation_from_euler",
    "euler_from_rotation",
    "euler_other_branch",
    "rotation_from_6d",
    "sixd_from_rotation",
    "nearest_rotation",
    "geodesic_distance",
    "geodesic_error",
    "hflip_rotation",
    "vflip_rotation",
    "rotate_inplane",
    "camera_direction",
    "split_camera_inplane",
    "lookat_rotation",
    "random_rotation",
    "fibonacci_sphere",
    "rotation_from_axes",
    "sample_euler_box",
    "check_rotation",
    "first_non_rotation",
    "is_rotation",
    "image_axes",
    "view_angles",
    "rotation_from_opencv",
    "points_from_opencv",
    "wrap_degrees",
    "euler_abs_error",
    "maev",
    "axis_errors",
    "bin_edges",
    "bin_centers",
    "angle_to_bin",
    "decode_bins",
    "decode_bins_circular",
]


class EulerAngles(NamedTuple):
    """Euler angles in degrees, each a tensor of the same shape."""

    pitch: Tensor
    yaw: Tensor
    roll: Tensor


def _as_tensor(x: Tensor | float, like: Tensor | None = None) -> Tensor:
    if isinstance(x, Tensor):
        return x if x.is_floating_point() else x.to(torch.get_default_dtype())
    if like is not None:
        return torch.as_tensor(x, dtype=like.dtype, device=like.device)
    return torch.as_tensor(x, dtype=torch.get_default_dtype())


def _stack33(entries: Sequence[Tensor]) -> Tensor:
    """Stack 9 same-shape tensors (row-major) into ``(..., 3, 3)``."""
    return torch.stack(list(entries), dim=-1).unflatten(-1, (3, 3))


# --------------------------------------------------------------------------- elementary rotations


def rot_x(angle: Tensor | float) -> Tensor:
    """Rotation about the x axis by ``angle`` degrees: ``[[1,0,0],[0,c,-s],[0,s,c]]``."""
    a = torch.deg2rad(_as_tensor(angle))
    c, s = torch.cos(a), torch.sin(a)
    o, z = torch.ones_like(a), torch.zeros_like(a)
    return _stack33([o, z, z, z, c, -s, z, s, c])


def rot_y(angle: Tensor | float) -> Tensor:
    """Rotation about the y axis by ``angle`` degrees: ``[[c,0,s],[0,1,0],[-s,0,c]]``."""
    a = torch.deg2rad(_as_tensor(angle))
    c, s = torch.cos(a), torch.sin(a)
    o, z = torch.ones_like(a), torch.zeros_like(a)
    return _stack33([c, z, s, z, o, z, -s, z, c])


def rot_z(angle: Tensor | float) -> Tensor:
    """Rotation about the z axis by ``angle`` degrees: ``[[c,-s,0],[s,c,0],[0,0,1]]``."""
    a = torch.deg2rad(_as_tensor(angle))
    c, s = torch.cos(a), torch.sin(a)
    o, z = torch.ones_like(a), torch.zeros_like(a)
    return _stack33([c, -s, z, s, c, z, z, z, o])


# --------------------------------------------------------------------------- Euler angles


def rotation_from_euler(
    pitch: Tensor | float, yaw: Tensor | float, roll: Tensor | float
) -> Tensor:
    """Rotation matrix ``Rz(roll) @ Ry(yaw) @ Rx(pitch)`` from angles in degrees.

    Args:
        pitch, yaw, roll: broadcastable tensors (or floats) of shape ``(...)``, degrees.

    Returns:
        ``(..., 3, 3)`` rotation matrices.

    Example:
        >>> R = rotation_from_euler(torch.tensor(0.0), torch.tensor(30.0), torch.tensor(0.0))
        >>> bool(R[2, 0] < 0)  # the nose (row 2) points to image-left for positive yaw
        True
    """
    ref = next((t for t in (pitch, yaw, roll) if isinstance(t, Tensor)), None)
    p, y, r = (_as_tensor(t, ref) for t in (pitch, yaw, roll))
    p, y, r = torch.broadcast_tensors(p, y, r)
    return rot_z(r) @ rot_y(y) @ rot_x(p)


def euler_from_rotation(R: Tensor, eps: float | None = None) -> EulerAngles:
    """Euler angles (degrees) of ``R = Rz(roll) @ Ry(yaw) @ Rx(pitch)``.

    ``pitch = atan2(R21, R22)``, ``yaw = atan2(-R20, hypot(R00, R10))``, ``roll = atan2(R10, R00)``,
    so yaw lies in ``[-90, 90]``; pitch and roll in ``(-180, 180]``.

    Singular case: when ``hypot(R00, R10) <= eps`` (|yaw| = 90 deg, gimbal lock) only
    ``pitch - sign(yaw) * roll`` is determined. Then ``roll`` is set to 0 and
    ``pitch = atan2(-R20 * R01, R11)``, which reconstructs ``R`` exactly.
    ``eps`` defaults to 1e-6 (float64) or 1e-5 (float32/16).

    Args:
        R: ``(..., 3, 3)`` rotation matrices.

    Returns:
        :class:`EulerAngles` of ``(...)`` tensors in degrees.
    """
    if eps is None:
        eps = 1e-6 if R.dtype == torch.float64 else 1e-5
    r00, r01, r10, r11 = R[..., 0, 0], R[..., 0, 1], R[..., 1, 0], R[..., 1, 1]
    r20, r21, r22 = R[..., 2, 0], R[..., 2, 1], R[..., 2, 2]
    cy = torch.hypot(r00, r10)
    singular = cy <= eps
    yaw = torch.atan2(-r20, cy)
    # Keep the unselected branch finite so gradients through torch.where stay finite.
    safe = torch.ones_like(r00)
    pitch_regular = torch.atan2(torch.where(singular, safe, r21), torch.where(singular, safe, r22))
    roll_regular = torch.atan2(torch.where(singular, safe, r10), torch.where(singular, safe, r00))
    pitch_singular = torch.atan2(
        torch.where(singular, -r20 * r01, safe), torch.where(singular, r11, safe)
    )
    pitch = torch.where(singular, pitch_singular, pitch_regular)
    roll = torch.where(singular, torch.zeros_like(roll_regular), roll_regular)
    return EulerAngles(torch.rad2deg(pitch), torch.rad2deg(yaw), torch.rad2deg(roll))


def euler_other_branch(e: EulerAngles) -> EulerAngles:
    """The other Euler triple of the same rotation (degrees): ``(pitch + 180, +-180 - yaw,
    roll + 180)``, wrapped by 360 into ``[-180, 180)``; the sign of the 180 is that of ``yaw``.

    ``euler_from_rotation`` returns the branch with ``|yaw| <= 90``; this is the one with
    ``|yaw| >= 90`` (e.g. AFLW2000's labels with yaw in (90, 99], as HopeNet's bins decode them).
    """
    yaw = torch.where(e.yaw >= 0, 180.0 - e.yaw, -180.0 - e.yaw)
    return EulerAngles(wrap_degrees(e.pitch + 180.0), wrap_degrees(yaw),
                       wrap_degrees(e.roll + 180.0))


# --------------------------------------------------------------------------- 6D representation


def rotation_from_6d(x: Tensor, eps: float = 1e-8) -> Tensor:
    """Rotation from the 6D representation by Gram-Schmidt, as in 6DRepNet.

    ``x[..., :3]`` and ``x[..., 3:]`` are two raw vectors ``a, b``. The first column is
    ``a / |a|``, the third is ``normalize(col0 x b)``, the second is ``col2 x col0``.

    Args:
        x: ``(..., 6)``.

    Returns:
        ``(..., 3, 3)`` rotation matrices whose first two columns span ``a, b``.
    """
    if x.shape[-1] != 6:
        raise ValueError(f"rotation_from_6d expects (..., 6), got shape {tuple(x.shape)}")
    a, b = x[..., :3], x[..., 3:]
    c0 = a / a.norm(dim=-1, keepdim=True).clamp_min(eps)
    c2 = torch.linalg.cross(c0, b, dim=-1)
    c2 = c2 / c2.norm(dim=-1, keepdim=True).clamp_min(eps)
    c1 = torch.linalg.cross(c2, c0, dim=-1)
    return torch.stack([c0, c1, c2], dim=-1)


def sixd_from_rotation(R: Tensor) -> Tensor:
    """The 6D representation of ``R``: its first two columns, ``(..., 6)``.

    ``rotation_from_6d(sixd_from_rotation(R)) == R`` for any rotation ``R``.
    """
    return torch.cat([R[..., :, 0], R[..., :, 1]], dim=-1)


# --------------------------------------------------------------------------- distances


def nearest_rotation(M: Tensor) -> Tensor:
    """The rotation closest to ``M`` ``(..., 3, 3)`` in Frobenius norm (SVD, ``det = +1``).

    ``U diag(1, 1, det(U V^T)) V^T`` for ``M = U S V^T`` (the orthogonal Procrustes solution
    restricted to SO(3)); exact for a rotation.
    """
    U, _, Vh = torch.linalg.svd(M)
    d = torch.det(U @ Vh)
    D = torch.diag_embed(torch.stack([torch.ones_like(d), torch.ones_like(d), d], dim=-1))
    return U @ D @ Vh


def geodesic_distance(R1: Tensor, R2: Tensor) -> Tensor:
    """Angle of ``R1.T @ R2`` in degrees, ``(...)``, in ``[0, 180]``.

    Computed with ``atan2(|skew|, trace - 1)`` rather than ``arccos``: exact near 0 and 180 deg and
    with a finite gradient there (``arccos`` of a clamped cosine has an infinite slope at 0);
    when ``R1 == R2`` exactly the gradient is 0 (a subgradient).
    """
    M = R1.transpose(-1, -2) @ R2
    cos2 = M[..., 0, 0] + M[..., 1, 1] + M[..., 2, 2] - 1.0  # 2 cos(theta)
    skew = torch.stack(
        [M[..., 2, 1] - M[..., 1, 2], M[..., 0, 2] - M[..., 2, 0], M[..., 1, 0] - M[..., 0, 1]],
        dim=-1,
    )
    sq = (skew * skew).sum(-1)
    pos = sq > 0
    # 2 sin(theta) >= 0; the inner where keeps sqrt's gradient finite when R1 == R2.
    sin2 = torch.where(pos, torch.sqrt(torch.where(pos, sq, torch.ones_like(sq))), 0.0)
    return torch.rad2deg(torch.atan2(sin2, cos2))


def chance_geodesic(rotations: Tensor, max_n: int | None = None) -> float:
    """Mean geodesic distance (deg) between distinct labels of a set: the error of guessing the
    pose of another sample of the same set (chance level). About 126.5 deg for uniform random
    rotations; NaN for fewer than two. ``max_n`` caps the number used (the first ``max_n``)."""
    R = (rotations if max_n is None else rotations[:max_n]).double()
    n = R.shape[0]
    if n < 2:
        return float("nan")
    d = geodesic_distance(R[:, None], R[None, :])
    return float(d.sum() / (n * (n - 1)))


def geodesic_error(R_pred: Tensor, R_true: Tensor) -> Tensor:
    """Per-sample geodesic error in degrees (docs/conventions.md section 7); ``(...)``."""
    return geodesic_distance(R_pred, R_true)


# --------------------------------------------------------------------------- image operations


_F_DIAG = (-1.0, 1.0, 1.0)
_G_DIAG = (1.0, -1.0, 1.0)


def _diag_like(values: tuple[float, float, float], R: Tensor) -> Tensor:
    return torch.tensor(values, dtype=R.dtype, device=R.device)


def hflip_rotation(R: Tensor) -> Tensor:
    """Label of the horizontally mirrored image: ``F @ R @ F``, ``F = diag(-1, 1, 1)``.

    Equals ``(pitch, -yaw, -roll)`` in Euler angles.
    """
    f = _diag_like(_F_DIAG, R)
    return f[:, None] * R * f[None, :]


def hflip_euler(pitch, yaw, roll):
    """:func:`hflip_rotation` in Euler angles: ``(pitch, -yaw, -roll)`` (any numbers or arrays).

    ``rotation_from_euler(*hflip_euler(p, y, r)) == hflip_rotation(rotation_from_euler(p, y, r))``.
    """
    return pitch, -yaw, -roll


def vflip_rotation(R: Tensor) -> Tensor:
    """Label of the vertically mirrored image.

    A vertical flip is an image rotation by 180 deg followed by a horizontal flip, so this equals
    ``hflip_rotation(rotate_inplane(R, 180))`` = ``F @ R @ diag(1, -1, 1)``.
    """
    f = _diag_like(_F_DIAG, R)
    g = _diag_like(_G_DIAG, R)
    return f[:, None] * R * g[None, :]


def rotate_inplane(R: Tensor, angle: Tensor | float) -> Tensor:
    """Label of the image rotated by ``angle`` degrees **clockwise on screen**: ``R @ Rz(angle)``.

    This is a rotation about the camera's optical axis; it is not ``roll + angle`` (that is
    ``Rz(angle) @ R``, a rotation about the head's facing axis).

    Args:
        R: ``(..., 3, 3)``.
        angle: degrees, broadcastable to ``R.shape[:-2]``.
    """
    return R @ rot_z(_as_tensor(angle, R)).to(R)


def inplane_image_matrix(angle: Tensor) -> Tensor:
    """The image side of :func:`rotate_inplane`: the ``(..., 2, 2)`` linear map of pixel
    coordinates (x right, y down, about the image centre) that turns an image by ``angle``
    degrees **clockwise on screen**: ``[[cos, -sin], [sin, cos]]`` (with y down this is clockwise).

    An image warped by it (source -> destination) has the label ``rotate_inplane(R, angle)``.
    kornia's ``rotate(x, a)`` turns counter-clockwise for positive ``a``: it equals this matrix
    for ``a = -angle``.
    """
    a = torch.deg2rad(angle)
    c, s = torch.cos(a), torch.sin(a)
    return torch.stack([torch.stack([c, -s], -1), torch.stack([s, c], -1)], -2)


def camera_direction(R: Tensor) -> Tensor:
    """Direction of the camera seen from the head (head coordinates): ``R @ [0, 0, 1]``."""
    return R[..., :, 2]


def lookat_rotation(direction: Tensor, eps: float = 1e-9) -> Tensor:
    """The roll-free rotation whose camera direction is ``direction`` (head coordinates).

    A look-at camera placed on the ray ``direction`` from the head, looking at the head, with the
    head's up axis (+y) as its up vector and no camera roll. Its image-right axis is
    ``normalize(e_y x d)``. The result is ``Ry(azimuth) @ Rx(elevation)`` with
    ``azimuth = atan2(d_x, d_z)`` and ``elevation = atan2(-d_y, hypot(d_x, d_z))``. When the camera
    sits straight above or below the head (``d`` parallel to y) the azimuth is taken as 0.

    Args:
        direction: ``(..., 3)``, need not be unit length.

    Returns:
        ``(..., 3, 3)``.
    """
    d = direction / direction.norm(dim=-1, keepdim=True).clamp_min(eps)
    horiz = torch.hypot(d[..., 0], d[..., 2])
    azimuth = torch.rad2deg(torch.atan2(d[..., 0], d[..., 2]))
    azimuth = torch.where(horiz <= 1e-12, torch.zeros_like(azimuth), azimuth)
    elevation = torch.rad2deg(torch.atan2(-d[..., 1], horiz))
    return rot_y(azimuth) @ rot_x(elevation)


def split_camera_inplane(R: Tensor) -> tuple[Tensor, Tensor]:
    """Split ``R`` into a roll-free look-at rotation and an in-plane image rotation.

    Returns ``(R_lookat, angle)`` with ``camera_direction(R_lookat) == camera_direction(R)``,
    ``R_lookat`` as a look-at camera with no roll would give (:func:`lookat_rotation`), and
    ``rotate_inplane(R_lookat, angle) == R``; ``angle`` in degrees (clockwise on screen),
    in ``(-180, 180]``.
    """
    R_lookat = lookat_rotation(camera_direction(R)).to(R)
    M = R_lookat.transpose(-1, -2) @ R  # = Rz(angle)
    angle = torch.rad2deg(torch.atan2(M[..., 1, 0], M[..., 0, 0]))
    return R_lookat, angle


def image_axes(R: Tensor) -> Tensor:
    """Head axes as 2D image directions (orthographic), ``(..., 3, 2)``.

    Row ``i`` is ``(dx, dy)`` of head axis ``i`` (right, up, nose) in image pixel coordinates,
    where y points **down**: ``(R[i, 0], -R[i, 1])``. Length is the axis' projected length (<= 1).
    """
    return torch.stack([R[..., :, 0], -R[..., :, 1]], dim=-1)


#: the axis signs between OpenCV's camera (y down, z forward) and clerf's (y up, z to the viewer)
_OPENCV_TO_CLERF = (1.0, -1.0, -1.0)


def rotation_from_opencv(R_cv: Tensor) -> Tensor:
    """clerf's pose ``(..., 3, 3)`` from an OpenCV object-to-camera rotation (``cv2.solvePnP``).

    OpenCV's camera has x right, y **down**, z **forward** (away from the viewer); clerf's has
    x right, y up, z toward the viewer (``C = diag(1, -1, -1)`` between them). With the object
    points given in the head frame (x: the image's right on a frontal face, y up, z the nose),
    ``X_cv = R_cv p + t``, so head axis ``i`` in clerf's camera is column ``i`` of ``C R_cv``,
    and clerf's rows-are-head-axes matrix is ``(C R_cv)^T``. A frontal face (``R_cv = C``) gives
    the identity.
    """
    C = torch.diag(_diag_like(_OPENCV_TO_CLERF, R_cv))
    return (C @ R_cv).transpose(-1, -2)


def points_from_opencv(X: Tensor) -> Tensor:
    """Points ``(..., 3)`` in OpenCV's camera axes (x right, y down, z away from the viewer; also
    MediaPipe's face-mesh pixels and relative depth) in clerf's camera axes (x right, y up, z
    toward the viewer): ``C X`` with the ``C`` of :func:`rotation_from_opencv`."""
    return X * _diag_like(_OPENCV_TO_CLERF, X)


def view_angles(R: Tensor) -> tuple[Tensor, Tensor]:
    """How far a pose is from upright and from frontal, in degrees: ``(tilt, facing)``.

    ``tilt``: angle between the head's up axis (row 1 of ``R``) and the image's up direction:
    0 = upright, 90 = lying on its side, 180 = upside-down (``acos(R[1, 1])``). ``facing``:
    angle between the nose axis (row 2) and the direction toward the camera: 0 = frontal,
    90 = profile, 180 = the back of the head (``acos(R[2, 2])``). ``tilt`` does not change when
    the head turns about its own up axis; ``facing`` does not change under in-plane image
    rotation (``R -> R @ Rz(phi)``).
    """
    tilt = torch.rad2deg(torch.acos(R[..., 1, 1].clamp(-1.0, 1.0)))
    facing = torch.rad2deg(torch.acos(R[..., 2, 2].clamp(-1.0, 1.0)))
    return tilt, facing


# --------------------------------------------------------------------------- sampling & checks


def fibonacci_sphere(n: int, dtype: torch.dtype = torch.float32, device=None) -> Tensor:
    """``(n, 3)`` unit vectors spread almost evenly over the sphere (the Fibonacci lattice:
    equal-area latitude bands, golden-angle longitudes); neighbours are about
    ``sqrt(4 pi / n)`` rad apart. Deterministic."""
    if n < 1:
        raise ValueError(f"fibonacci_sphere: n must be >= 1, got {n}")
    i = torch.arange(n, dtype=torch.float64) + 0.5
    polar = torch.acos(1.0 - 2.0 * i / n)
    azimuth = math.pi * (1.0 + math.sqrt(5.0)) * i
    pts = torch.stack([torch.cos(azimuth) * torch.sin(polar), torch.sin(azimuth) * torch.sin(polar),
                       torch.cos(polar)], dim=-1)  # fmt: skip
    return pts.to(dtype=dtype, device=device)


def rotation_from_axes(up: Tensor, nose: Tensor, eps: float = 1e-8) -> Tensor:
    """The rotation whose rows are the head axes closest to the given up and nose directions
    (``(..., 3)`` each, any length): the nose is kept, the up direction is made orthogonal to
    it (Gram-Schmidt) and the right axis is ``up x nose`` (docs/conventions.md: rows = right, up,
    nose in camera coordinates)."""
    z = nose / nose.norm(dim=-1, keepdim=True).clamp_min(eps)
    y = up - (up * z).sum(-1, keepdim=True) * z
    y = y / y.norm(dim=-1, keepdim=True).clamp_min(eps)
    x = torch.linalg.cross(y, z, dim=-1)
    return torch.stack([x, y, z], dim=-2)


def random_rotation(
    n: int,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> Tensor:
    """``n`` rotations drawn uniformly (Haar measure) over SO(3), ``(n, 3, 3)``.

    Uses normalised 4D Gaussian quaternions, which are uniform on the 3-sphere. Sampling happens
    in float64 on the generator's device, so a seeded generator gives the same rotations whatever
    ``dtype`` is asked for.
    """
    gen_device = generator.device if generator is not None else torch.device("cpu")
    q = torch.randn(n, 4, generator=generator, dtype=torch.float64, device=gen_device)
    q = q / q.norm(dim=-1, keepdim=True)
    w, x, y, z = q.unbind(-1)
    R = _stack33(
        [
            1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w),
            2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w),
            2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y),
        ]
    )  # fmt: skip
    return R.to(dtype=dtype, device=device if device is not None else gen_device)


def haar_angle_quantile(u: Tensor) -> Tensor:
    """Inverse CDF of the Haar rotation angle, ``F(theta) = (theta - sin theta) / pi``.

    ``u`` in [0, 1] -> ``theta`` in radians; solved by bisection (monotone, exact to float64).
    """
    target = u * math.pi
    lo = torch.zeros_like(u)
    hi = torch.full_like(u, math.pi)
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        below = (mid - torch.sin(mid)) < target
        lo = torch.where(below, mid, lo)
        hi = torch.where(below, hi, mid)
    return 0.5 * (lo + hi)


def random_rotation_at_least(
    R: Tensor, delta: float, generator: torch.Generator
) -> Tensor:
    """For each ``R[i]``, a rotation uniform (Haar) among those at least ``delta`` deg away.

    ``R_n = R @ U @ Rz(theta) @ U.T``: ``U @ Rz(theta) @ U.T`` is a rotation by ``theta`` about the
    uniformly distributed axis ``U e_z``, so ``geodesic_distance(R, R_n) == theta``; ``theta`` has
    the Haar angle density restricted to ``[delta, 180]`` deg. With ``delta = 0`` the result is
    exactly Haar-uniform. ``R``: ``(n, 3, 3)`` float64; returns the same shape.
    """
    if not 0.0 <= delta <= 180.0:
        raise ValueError(f"delta must be in [0, 180] deg, got {delta}")
    n = R.shape[0]
    U = random_rotation(n, generator=generator, dtype=torch.float64)
    d = math.radians(delta)
    f_lo = (d - math.sin(d)) / math.pi
    u = f_lo + (1.0 - f_lo) * torch.rand(n, generator=generator, dtype=torch.float64)
    theta = torch.rad2deg(haar_angle_quantile(u))
    Q = U @ rot_z(theta).to(U) @ U.transpose(-1, -2)
    return R @ Q


def cap_directions(u_polar: Tensor, u_azimuth: Tensor, max_angle: float) -> Tensor:
    """Unit vectors uniform on the spherical cap of half-angle ``max_angle`` deg around +z.

    From uniforms in [0, 1): the cosine of the polar angle is uniform in ``[cos(max_angle), 1]``
    (Archimedes), the azimuth uniform in ``[0, 360)`` deg from +x toward +y. ``(..., 3)``.
    """
    cmax = math.cos(math.radians(max_angle))
    cos_t = 1.0 - u_polar * (1.0 - cmax)
    sin_t = torch.sqrt((1.0 - cos_t * cos_t).clamp_min(0.0))
    az = 2.0 * math.pi * u_azimuth
    return torch.stack([sin_t * torch.cos(az), sin_t * torch.sin(az), cos_t], dim=-1)


def in_cap(d: Tensor, max_angle: float, tol: float = 1e-12) -> Tensor:
    """Boolean ``(...)``: direction ``d`` lies within ``max_angle`` deg of +z."""
    return d[..., 2] / d.norm(dim=-1) >= math.cos(math.radians(max_angle)) - tol


def band_directions(u_height: Tensor, u_azimuth: Tensor, max_elevation: float) -> Tensor:
    """Unit vectors uniform on the band of the sphere with ``|elevation| <= max_elevation`` deg
    above or below the x-z plane (y up); azimuth from +z toward +x. From uniforms in [0, 1)."""
    m = math.sin(math.radians(max_elevation))
    y = (u_height * 2 - 1) * m
    az = u_azimuth * 2 * math.pi
    r = (1 - y * y).clamp_min(0).sqrt()
    return torch.stack([r * torch.sin(az), y, r * torch.cos(az)], -1)


def in_band(d: Tensor, max_elevation: float, tol: float = 1e-12) -> Tensor:
    """Boolean ``(...)``: direction ``d`` lies within ``max_elevation`` deg of the x-z plane."""
    return (d[..., 1] / d.norm(dim=-1)).abs() <= math.sin(math.radians(max_elevation)) + tol


def sample_euler_box(
    n: int,
    pitch: tuple[float, float] = (-60.0, 60.0),
    yaw: tuple[float, float] = (-90.0, 90.0),
    roll: tuple[float, float] = (-45.0, 45.0),
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> Tensor:
    """``n`` rotations with each Euler angle uniform in its ``(low, high)`` range (degrees).

    Uniform in the angles, not in SO(3). Returns ``(n, 3, 3)``.
    """
    for name, (lo, hi) in (("pitch", pitch), ("yaw", yaw), ("roll", roll)):
        if not lo <= hi:
            raise ValueError(f"{name} range must be (low, high) with low <= high, got ({lo}, {hi})")
    gen_device = generator.device if generator is not None else torch.device("cpu")
    u = torch.rand(n, 3, generator=generator, dtype=torch.float64, device=gen_device)
    lo = torch.tensor([pitch[0], yaw[0], roll[0]], dtype=torch.float64, device=gen_device)
    hi = torch.tensor([pitch[1], yaw[1], roll[1]], dtype=torch.float64, device=gen_device)
    a = lo + u * (hi - lo)
    R = rotation_from_euler(a[:, 0], a[:, 1], a[:, 2])
    return R.to(dtype=dtype, device=device if device is not None else gen_device)


def _rotation_defects(R: Tensor) -> tuple[Tensor, Tensor]:
    eye = torch.eye(3, dtype=R.dtype, device=R.device)
    ortho = (R @ R.transpose(-1, -2) - eye).abs().amax(dim=(-1, -2))
    det = torch.linalg.det(R)
    return ortho, det


def is_rotation(R: Tensor, tol: float = 1e-4) -> Tensor:
    """Boolean ``(...)``: ``max|R R^T - I| <= tol`` and ``|det R - 1| <= tol``."""
    ortho, det = _rotation_defects(R)
    return (ortho <= tol) & ((det - 1).abs() <= tol)


def first_non_rotation(R: Tensor, tol: float = 1e-4) -> tuple[tuple[int, ...], str] | None:
    """The first matrix of ``R`` ``(..., 3, 3)`` that is not a rotation and why; None if none.

    A rotation label is finite, orthonormal (``max|R R^T - I| <= tol``) and has ``det R = +1``
    (within ``tol``): docs/conventions.md. Vectorised; returns the batch index of the first
    offender and a short reason (``"not finite"`` or its defect and determinant).
    """
    R = R.detach().double()
    finite = torch.isfinite(R).all(dim=-1).all(dim=-1)
    ortho, det = _rotation_defects(torch.where(finite[..., None, None], R, torch.eye(3).to(R)))
    bad = ~finite | (ortho > tol) | ((det - 1).abs() > tol)
    if not bool(bad.any()):
        return None
    idx = tuple(int(i) for i in bad.nonzero()[0])
    if not bool(finite[idx]):
        return idx, "not finite (NaN or infinity)"
    return idx, (f"not a rotation matrix (max |R R^T - I| = {float(ortho[idx]):.3g}, "
                 f"det = {float(det[idx]):.6g}; tolerance {tol:g})")  # fmt: skip


def check_rotation(R: Tensor, tol: float = 1e-4, name: str = "rotation") -> Tensor:
    """Return ``R`` if it is a batch of rotation matrices, else raise ``ValueError``.

    The error names the first offending element, its orthonormality defect and determinant.
    """
    if R.ndim < 2 or tuple(R.shape[-2:]) != (3, 3):
        raise ValueError(f"{name}: expected a (..., 3, 3) tensor, got shape {tuple(R.shape)}")
    if not torch.isfinite(R).all():
        raise ValueError(f"{name}: contains NaN or infinite values")
    found = first_non_rotation(R, tol)
    if found is not None:
        raise ValueError(f"{name}: element {found[0]} is {found[1]}")
    return R


# --------------------------------------------------------------------------- metrics


def wrap_degrees(x: Tensor) -> Tensor:
    """Wrap angles (degrees) by 360 into ``[-180, 180)``. Never by 180."""
    return torch.remainder(x + 180.0, 360.0) - 180.0


def wrap180(angle: float) -> float:
    """One angle (degrees, a Python float) wrapped by 360 into ``(-180, 180]``: the scalar twin
    of :func:`wrap_degrees` for image turns and box angles (+180 stays +180)."""
    a = math.fmod(float(angle), 360.0)
    if a <= -180.0:
        a += 360.0
    elif a > 180.0:
        a -= 360.0
    return a + 0.0


def euler_abs_error(pred: Tensor, true: Tensor) -> Tensor:
    """Absolute angle differences in degrees, wrapped by 360 only: ``|wrap(pred - true)|``."""
    return wrap_degrees(pred - true).abs()


def axis_errors(R_pred: Tensor, R_true: Tensor, eps: float = 1e-7) -> Tensor:
    """Angle (degrees) between each predicted and true head axis (rows of ``R``), ``(..., 3)``."""
    cross = torch.linalg.cross(R_pred, R_true, dim=-1).norm(dim=-1)
    dot = (R_pred * R_true).sum(-1)
    return torch.rad2deg(torch.atan2(cross, dot))


def maev(R_pred: Tensor, R_true: Tensor) -> Tensor:
    """MAEV per sample: mean over the three head axes of their angle errors (deg), ``(...)``."""
    return axis_errors(R_pred, R_true).mean(-1)


# --------------------------------------------------------------------------- bins (HopeNet)


#: The benchmarks' Euler bound (docs/conventions.md section 6): a sample is kept (and its Euler
#: angles are meaningful for the Euler MAE) only if |pitch|, |yaw| and |roll| are all <= 99 deg.
PROTOCOL_MAX_ABS_ANGLE = 99.0


@dataclass(frozen=True)
class BinSpec:
    """Uniform angle bins: ``num_bins`` bins of ``width`` degrees starting at ``start``.

    Bin ``i`` covers ``[start + i * width, start + (i + 1) * width)``; its centre is
    ``start + (i + 0.5) * width``. The default is HopeNet's: 66 bins of 3 deg over [-99, 99).
    """

    start: float = -99.0
    width: float = 3.0
    num_bins: int = 66

    def __post_init__(self) -> None:
        if self.width <= 0 or self.num_bins <= 0:
            raise ValueError(f"BinSpec needs width > 0 and num_bins > 0, got {self}")

    @property
    def stop(self) -> float:
        return self.start + self.width * self.num_bins

    @property
    def full_circle(self) -> bool:
        """Whether the bins cover exactly 360 deg (angles are then wrapped into them)."""
        return abs(self.num_bins * self.width - 360.0) < 1e-9

    def contains(self, angle: Tensor) -> Tensor:
        """Boolean mask: ``angle`` (deg) lies in ``[start, stop)`` (NaN does not)."""
        return (angle >= self.start) & (angle < self.stop)

    def wrap(self, angle: Tensor) -> Tensor:
        """``angle`` (deg) wrapped by 360 into ``[start, start + 360)``."""
        return torch.remainder(angle - self.start, 360.0) + self.start

    @classmethod
    def from_range(cls, start: float, stop: float, width: float) -> BinSpec:
        n = (stop - start) / width
        if abs(n - round(n)) > 1e-9 or round(n) <= 0:
            raise ValueError(f"range [{start}, {stop}) is not a whole number of {width}-deg bins")
        return cls(start=float(start), width=float(width), num_bins=int(round(n)))


HOPENET_BINS = BinSpec()
FULL_RANGE_BINS = BinSpec(start=-180.0, width=3.0, num_bins=120)


def bin_edges(spec: BinSpec = HOPENET_BINS, dtype=torch.float32, device=None) -> Tensor:
    """``num_bins + 1`` bin edges in degrees."""
    i = torch.arange(spec.num_bins + 1, dtype=torch.float64, device=device)
    return (spec.start + spec.width * i).to(dtype)


def bin_centers(spec: BinSpec = HOPENET_BINS, dtype=torch.float32, device=None) -> Tensor:
    """``num_bins`` bin centres in degrees (HopeNet default: ``-97.5 + 3 i``)."""
    i = torch.arange(spec.num_bins, dtype=torch.float64, device=device)
    return (spec.start + spec.width * (i + 0.5)).to(dtype)


def angle_to_bin(angle: Tensor, spec: BinSpec = HOPENET_BINS, name: str = "angle",
                 check: bool = True) -> Tensor:  # fmt: skip
    """Bin index (int64) of each angle in degrees; raises ``ValueError`` outside ``[start, stop)``.

    The error names the first offending value, so it never reaches ``cross_entropy`` as -1 or
    ``num_bins``. ``check=False`` skips the test (one host read) for callers that made it
    already, e.g. once for several angles.
    """
    a = angle.detach().double()
    bad = ~spec.contains(a) if check else None  # NaN is bad too
    if bad is not None and bad.any():
        first = a[bad].flatten()[0].item()
        raise ValueError(
            f"{name} = {first:.6g} deg lies outside the binned range "
            f"[{spec.start:g}, {spec.stop:g}) ({int(bad.sum())} value(s) out of range)"
        )
    # Compare against the same edges that bin_edges() reports, so an angle always lies in
    # [edges[i], edges[i + 1]) exactly (a floor of (a - start) / width can round across an edge).
    edges = bin_edges(spec, dtype=torch.float64, device=a.device)
    idx = torch.bucketize(a, edges, right=True) - 1
    return idx.clamp_(0, spec.num_bins - 1).to(angle.device)


def decode_bins(logits: Tensor, spec: BinSpec = HOPENET_BINS) -> Tensor:
    """Expected angle (degrees) under ``softmax(logits)`` using bin **centres**, ``(...)``.

    HopeNet's reference code uses left edges (a 1.5 deg bias); clerf uses centres.
    """
    if logits.shape[-1] != spec.num_bins:
        raise ValueError(f"decode_bins: expected {spec.num_bins} logits, got {logits.shape[-1]}")
    centers = bin_centers(spec, dtype=logits.dtype, device=logits.device)
    return torch.softmax(logits, dim=-1) @ centers


def decode_bins_circular(logits: Tensor, spec: BinSpec) -> Tensor:
    """Circular mean (degrees) of the bin centres under ``softmax(logits)``, ``(...)``.

    ``atan2(sum_i p_i sin c_i, sum_i p_i cos c_i)``, returned in ``[spec.start, spec.start + 360)``.
    Unlike the plain expectation this has no seam: probability split between the first and last
    bins of a [-180, 180) head decodes near +-180 deg, not near 0.
    """
    if logits.shape[-1] != spec.num_bins:
        raise ValueError(f"decode_bins_circular: expected {spec.num_bins} logits, "
                         f"got {logits.shape[-1]}")
    c = torch.deg2rad(bin_centers(spec, dtype=logits.dtype, device=logits.device))
    p = torch.softmax(logits, dim=-1)
    return spec.wrap(torch.rad2deg(torch.atan2(p @ torch.sin(c), p @ torch.cos(c))))
