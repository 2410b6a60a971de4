"""The 25-number camera of EG3D and PanoHead, and its exact relation to clerf rotations.

The GANs' camera label is a flattened 4 x 4 cam2world matrix (OpenCV camera axes: x right, y down,
z forward) followed by a flattened 3 x 3 intrinsics matrix normalised by image size,
``[[f, 0, 0.5], [0, f, 0.5], [0, 0, 1]]`` (``docs/conventions.md`` section 4).

The GANs' world frame, read from the public EG3D code (``camera_utils.py``): the frontal camera of
``LookAtPoseSampler.sample(pi/2, pi/2, ...)`` sits on +z looking toward -z, and
``create_cam2world_matrix`` builds a roll-free camera from the world up vector ``(0, 1, 0)``; its
image-down axis is world ``-y`` and its image-right axis world ``+x`` for the frontal camera. So the
world is **y up, z out of the face, x toward image-right of a frontal face**: exactly clerf's head
frame, and no axis flip is needed. (``camera_utils.py`` calls the frame "x-left": that is the
subject's anatomical left, which appears on the image's right.)

Hence, for a clerf label ``R`` (rows = head axes in camera coordinates x right, y up, z toward
the viewer), the camera axes in world coordinates are the columns of ``R``, and

    cam2world rotation = R @ diag(1, -1, -1)       (OpenCV y down, z forward)
    camera position    = pivot + radius * (R @ e_z)

    camera position    = pivot + t * (R @ e_z),  t > 0 with |position - orbit_centre| = radius

Conversely the label of any cam2world matrix is ``R = Rc @ diag(1, -1, -1)``, whatever angles
were asked for. Like EG3D's own ``LookAtPoseSampler``, its training cameras and ``gen_samples.py``,
the camera sits on the sphere of ``radius`` about the **world origin** (``orbit_centre``) and looks
at the pivot: for EG3D (pivot ``(0, 0, 0.2)``) the frontal camera is at ``(0, 0, 2.7)``, 2.5 from
the pivot, not 2.9. Placing it 2.7 from the pivot instead renders heads at 0.926x EG3D's own
frontal size and conditions the mapping network on cameras it never saw. PanoHead's pivot is the
origin, so there the two are the same. The rotation (hence the label) is the same either way.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from clerf.geometry import check_rotation

__all__ = [
    "CameraPreset",
    "EG3D_FFHQ",
    "PANOHEAD",
    "FFHQ_FOCAL",
    "camera_from_rotation",
    "rotation_from_camera",
    "camera_position",
    "intrinsics",
]

#: normalised focal length of the FFHQ-trained models (about 18.84 deg field of view)
FFHQ_FOCAL = 4.2647

_CV = (1.0, -1.0, -1.0)  # clerf camera axes (x right, y up, z back) -> OpenCV (x, y down, z fwd)


@dataclass(frozen=True)
class CameraPreset:
    """Orbit of a GAN's training cameras: on the sphere of ``radius`` about ``orbit_centre``,
    looking at ``pivot``; normalised ``focal``. The pivot must lie inside the sphere."""

    radius: float
    pivot: tuple[float, float, float]
    focal: float = FFHQ_FOCAL
    orbit_centre: tuple[float, float, float] = (0.0, 0.0, 0.0)


EG3D_FFHQ = CameraPreset(radius=2.7, pivot=(0.0, 0.0, 0.2))
PANOHEAD = CameraPreset(radius=2.7, pivot=(0.0, 0.0, 0.0))


def intrinsics(focal: float, dtype: torch.dtype = torch.float64, device=None) -> Tensor:
    """Normalised intrinsics ``[[f, 0, 0.5], [0, f, 0.5], [0, 0, 1]]``, ``(3, 3)``."""
    return torch.tensor([[focal, 0, 0.5], [0, focal, 0.5], [0, 0, 1]], dtype=dtype, device=device)


def camera_from_rotation(R: Tensor, preset: CameraPreset) -> Tensor:
    """The 25-number camera whose image of the head has label ``R``: ``(B, 25)``.

    The camera looks at ``preset.pivot`` along ``-R @ e_z`` from the point of that viewing ray
    on the sphere of ``preset.radius`` about ``preset.orbit_centre`` (module docstring).
    Pass a roll-free ``R`` (from :func:`clerf.geometry.split_camera_inplane`) for the look-at
    cameras the GANs were trained on; any rotation is converted exactly.

    Args:
        R: ``(B, 3, 3)`` rotations (clerf convention).
    """
    check_rotation(R, name="camera rotation")
    cv = torch.tensor(_CV, dtype=R.dtype, device=R.device)
    rot = R * cv  # columns scaled: R @ diag(1, -1, -1)
    pivot = torch.tensor(preset.pivot, dtype=R.dtype, device=R.device)
    centre = torch.tensor(preset.orbit_centre, dtype=R.dtype, device=R.device)
    d = R[..., :, 2]  # unit viewing direction (from the pivot toward the camera)
    # pivot + t d on the sphere: t^2 + 2 t (d . q) + |q|^2 - r^2 = 0 with q = pivot - centre;
    # the pivot is inside the sphere, so the positive root is the only one in front of it.
    q = pivot - centre
    if float(q.norm()) >= preset.radius:
        raise ValueError(f"camera: the pivot {preset.pivot} must lie inside the orbit of radius "
                         f"{preset.radius:g} about {preset.orbit_centre}")
    dq = (d * q).sum(-1)
    t = -dq + torch.sqrt(dq * dq - (q * q).sum() + preset.radius**2)
    origin = pivot + t[..., None] * d
    B = R.shape[0]
    c2w = torch.zeros(B, 4, 4, dtype=R.dtype, device=R.device)
    c2w[:, :3, :3] = rot
    c2w[:, :3, 3] = origin
    c2w[:, 3, 3] = 1.0
    K = intrinsics(preset.focal, R.dtype, R.device).expand(B, 3, 3)
    return torch.cat([c2w.reshape(B, 16), K.reshape(B, 9)], -1)


def rotation_from_camera(c: Tensor, tol: float = 1e-4) -> Tensor:
    """The clerf label of the image made by 25-number camera(s) ``c`` ``(B, 25)``: ``(B, 3, 3)``.

    ``R = Rc @ diag(1, -1, -1)`` where ``Rc`` is the cam2world rotation. Raises ``ValueError``
    when ``c`` has the wrong shape or its rotation part is not a rotation (beyond ``tol``).
    """
    if c.ndim != 2 or c.shape[-1] != 25:
        raise ValueError(f"camera: expected (B, 25) numbers, got shape {tuple(c.shape)}")
    rot = c[:, :16].reshape(-1, 4, 4)[:, :3, :3]
    cv = torch.tensor(_CV, dtype=c.dtype, device=c.device)
    return check_rotation(rot * cv, tol=tol, name="camera cam2world rotation")


def camera_position(c: Tensor) -> Tensor:
    """Camera centre in world (= head) coordinates, ``(B, 3)``."""
    return c[:, :16].reshape(-1, 4, 4)[:, :3, 3]
