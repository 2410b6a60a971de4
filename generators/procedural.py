"""The built-in, weight-free 3D head generator (registered as ``procedural``).

A head is a union of about two dozen ellipsoids (skull, face, chin, cheeks, nose, eyes, brows,
lips, ears, neck, shoulders, hair cap, long hair, bun, beard, glasses) rendered by **analytic
ray-quadric intersection** with a perspective camera, per-pixel depth selection, Lambert + ambient
+ Blinn-Phong shading with normals from the quadric gradient, and transparent tinted lenses.

Why this technique: for a pinhole camera the ray through pixel ``(u, v)`` has a direction linear in
``(u, v)``, so for each (image, ellipsoid) the discriminant of the ray-ellipsoid equation is a
quadratic polynomial in ``(u, v)`` and the linear coefficient is affine in ``(u, v)``. Those
coefficients are computed once per (image, primitive) in float64; per pixel and primitive only a
handful of separable float32 operations remain (about 10), which is 10-100x cheaper than sphere
tracing or Gaussian splatting on a CPU.

Geometry (``docs/conventions.md`` section 2): head coordinates are x = head right (image right on
a frontal face), y = up, z = nose. A head point ``p`` is at ``R.T @ p + c`` in camera coordinates
(x = image right, y = image up, z = toward the viewer), with ``c = (tx, ty, -d)``: the camera sits
at distance ``d`` on the camera direction ``R @ e_z``, looking at the head centre (shifted by the
optional translation ``tx, ty``). Pixel ``(row, col)`` of an ``H x W`` image has normalised
coordinates ``u = (col + 0.5) / W * 2 - 1`` (right) and ``v = (row + 0.5) / H * 2 - 1`` (down); its
ray direction is ``(u tan(fov/2), -v tan(fov/2), -1)``.

Identity ``i`` of a generator with seed ``s`` (face shape, colours, hair, accessories, lighting,
background, camera distance, field of view, translation, occluder) is drawn from a
``torch.Generator`` seeded by a fixed 64-bit integer hash of ``(s, i)``, so it depends on nothing
else; rendering is a pure function of (seed, identity, rotation, resolution, parameters).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from clerf.geometry import check_rotation, rot_x, rot_y, rot_z
from generators.base import (
    PoseGenerator,
    Rendered,
    check_resolution,
    identity_seed,
    register_generator,
)

__all__ = ["ProceduralHead", "RenderMaps", "PARTS"]

# --------------------------------------------------------------------------- parts and materials

#: Opaque parts, in rendering order (part id = index). ``_r`` is the side at head +x.
PARTS: tuple[str, ...] = (
    "skull", "face", "chin", "cheek_r", "cheek_l", "nose_bridge", "nose_tip", "eye_r", "eye_l",
    "brow_r", "brow_l", "lip_upper", "lip_lower", "ear_r", "ear_l", "neck", "torso",
    "glasses_bridge", "temple_r", "temple_l", "hair_cap", "hair_long", "beard", "bun",
)  # fmt: skip
_P = {name: i for i, name in enumerate(PARTS)}
#: parts whose front hit is kept only on one side of a plane in their local frame
_CLIPPED = ("hair_cap", "hair_long", "beard")
_CLIP_IDX = tuple(_P[n] for n in _CLIPPED)
assert _CLIP_IDX == tuple(range(_CLIP_IDX[0], _CLIP_IDX[0] + len(_CLIP_IDX)))
#: transparent tinted lenses with an opaque rim, composited after the opaque parts
LENS_PARTS: tuple[str, ...] = ("lens_r", "lens_l")
LENS_ID_OFFSET = len(PARTS)  # part ids of lens rims in :class:`RenderMaps`

SKIN, EYE, HAIR, LIP, FRAME, CLOTH = range(6)
_MATERIAL = torch.tensor(
    [SKIN, SKIN, SKIN, SKIN, SKIN, SKIN, SKIN, EYE, EYE, HAIR, HAIR, LIP, LIP, SKIN, SKIN, SKIN,
     CLOTH, FRAME, FRAME, FRAME, HAIR, HAIR, HAIR, HAIR]
)  # fmt: skip
# specular weight and Blinn-Phong exponent per material
_SPEC = torch.tensor([0.06, 0.6, 0.05, 0.25, 0.5, 0.02])
_SHINE = torch.tensor([12.0, 60.0, 8.0, 30.0, 40.0, 4.0])

_N_UNIFORM = 256  # uniforms drawn per identity (a prefix is used; the rest leaves room to grow)
_NOISE = 8  # background noise grid is 3 x _NOISE x _NOISE
_N_CLUTTER = 5
_F = torch.tensor([-1.0, 1.0, 1.0], dtype=torch.float64)


@dataclass
class RenderMaps:
    """Rendered images plus per-pixel maps (for tests, masks and debugging).

    Attributes:
        images: ``(B, 3, H, W)`` uint8.
        rotations: ``(B, 3, 3)`` float32, the rendered labels.
        part_ids: ``(B, H, W)`` int64: index into :data:`PARTS`, ``LENS_ID_OFFSET + j`` for the rim
            of lens ``j``, ``-1`` for background (an occluder keeps the id of what it hides).
        depth: ``(B, H, W)`` float32 camera depth of the opaque hit in head units (inf: none).
    """

    images: Tensor
    rotations: Tensor
    part_ids: Tensor
    depth: Tensor


# --------------------------------------------------------------------------- identity sampling


class _Uniforms:
    """Hands out consecutive columns of a ``(B, N)`` tensor of U[0, 1) draws."""

    def __init__(self, u: Tensor) -> None:
        self.u = u
        self.i = 0

    def take(self, lo: float = 0.0, hi: float = 1.0) -> Tensor:
        if self.i >= self.u.shape[1]:
            raise RuntimeError("procedural: identity sampler ran out of uniforms")
        col = self.u[:, self.i]
        self.i += 1
        return lo + (hi - lo) * col

    def prob(self, p: float) -> Tensor:
        return self.take() < p


def _palette(pal: list[tuple[float, float, float]], t: Tensor) -> Tensor:
    """Piecewise-linear colour ramp through ``pal`` at ``t`` in [0, 1): ``(B, 3)``."""
    p = torch.tensor(pal, dtype=t.dtype)
    x = t * (len(pal) - 1)
    i0 = x.floor().long().clamp(0, len(pal) - 2)
    w = (x - i0).unsqueeze(-1)
    return p[i0] * (1 - w) + p[i0 + 1] * w


_SKIN_RAMP = [(0.24, 0.14, 0.09), (0.45, 0.28, 0.18), (0.68, 0.47, 0.34), (0.86, 0.66, 0.54),
              (0.97, 0.82, 0.72)]  # fmt: skip
_HAIR_COLOURS = [(0.05, 0.04, 0.04), (0.22, 0.13, 0.07), (0.45, 0.30, 0.16), (0.80, 0.66, 0.40),
                 (0.55, 0.20, 0.08), (0.62, 0.62, 0.62), (0.92, 0.92, 0.90), (0.20, 0.25, 0.60)]
#: ``style="studio"``: another palette, lighting and background family (a second domain, e.g.
#: a stand-in for real photographs beside the default renders)
_STUDIO_SKIN_RAMP = [(0.55, 0.40, 0.36), (0.72, 0.55, 0.50), (0.85, 0.70, 0.66),
                     (0.93, 0.82, 0.80)]  # fmt: skip
_STUDIO_HAIR_COLOURS = [(0.10, 0.08, 0.07), (0.30, 0.22, 0.15), (0.55, 0.45, 0.32)]
_STUDIO_BACKDROPS = [(0.20, 0.27, 0.38), (0.45, 0.50, 0.55), (0.62, 0.60, 0.56),
                     (0.12, 0.12, 0.14)]  # fmt: skip
STYLES = ("default", "studio")
_IRIS_COLOURS = [(0.25, 0.14, 0.06), (0.10, 0.07, 0.05), (0.25, 0.42, 0.62), (0.30, 0.45, 0.25),
                 (0.45, 0.47, 0.50)]  # fmt: skip


def _choice(colours: list[tuple[float, float, float]], t: Tensor, jitter: Tensor) -> Tensor:
    c = torch.tensor(colours, dtype=t.dtype)
    idx = (t * len(colours)).long().clamp(0, len(colours) - 1)
    return (c[idx] * jitter.unsqueeze(-1)).clamp(0, 1)


def _mirror_rot(Q: Tensor) -> Tensor:
    """Orientation of the mirror image (x -> -x) of an ellipsoid with orientation ``Q``."""
    f = _F.to(Q)
    return f[:, None] * Q * f[None, :]


@dataclass
class _Scene:
    """Per-identity scene tensors, all float64 on CPU unless stated. ``K = len(PARTS)``."""

    centre: Tensor  # (B, K, 3) head coordinates
    axes: Tensor  # (B, K, 3) semi-axes
    orient: Tensor  # (B, K, 3, 3) columns = local axes in head coordinates
    albedo: Tensor  # (B, K, 3)
    active: Tensor  # (B, K) bool
    clip: Tensor  # (B, len(_CLIPPED), 4): keep a hit where n . q_local >= h, (n, h)
    lens_centre: Tensor  # (B, 2, 3)
    lens_axes: Tensor  # (B, 2, 3)
    lens_orient: Tensor  # (B, 2, 3, 3)
    lens_tint: Tensor  # (B, 3)
    lens_alpha: Tensor  # (B,)
    lens_rim: Tensor  # (B,) rim starts at this normalised radius
    glasses: Tensor  # (B,) bool
    iris: Tensor  # (B, 3) iris colour
    iris_cos: Tensor  # (B,) cosine of the iris angular radius on the eyeball
    pupil_cos: Tensor  # (B,)
    hair_freq: Tensor  # (B,) stripe frequency of hair texture (local units)
    hair_phase: Tensor  # (B,)
    hair_amp: Tensor  # (B,)
    fov: Tensor  # (B,) degrees
    distance: Tensor  # (B,) head units
    shift: Tensor  # (B, 2) camera-frame translation (x right, y up), head units
    light: Tensor  # (B, 3) unit direction toward the light, camera coordinates
    ambient: Tensor  # (B,)
    diffuse: Tensor  # (B,)
    bg_a: Tensor  # (B, 3)
    bg_b: Tensor  # (B, 3)
    bg_dir: Tensor  # (B, 2) gradient direction in image coordinates
    bg_grad: Tensor  # (B,) gradient strength
    bg_tex: Tensor  # (B,) noise texture strength
    bg_noise: Tensor  # (B, 3, _NOISE, _NOISE) standard normal
    clutter: Tensor  # (B, _N_CLUTTER, 9): active, kind, cx, cy, rx, ry, r, g, b
    occluder: Tensor  # (B, 9): same layout


def _sample_scene(u: Tensor, noise: Tensor, opts: ProceduralHead) -> _Scene:
    """Map per-identity uniforms ``u`` ``(B, N)`` and noise to scene parameters."""
    B = u.shape[0]
    K = len(PARTS)
    U = _Uniforms(u)
    dt = u.dtype
    sym = opts.symmetric

    centre = torch.zeros(B, K, 3, dtype=dt)
    axes = torch.ones(B, K, 3, dtype=dt)
    orient = torch.eye(3, dtype=dt).expand(B, K, 3, 3).clone()
    albedo = torch.zeros(B, K, 3, dtype=dt)
    active = torch.ones(B, K, dtype=torch.bool)

    def put(name: str, c: tuple, a: tuple, Q: Tensor | None = None) -> None:
        k = _P[name]
        centre[:, k] = torch.stack([torch.as_tensor(x, dtype=dt).expand(B) for x in c], -1)
        axes[:, k] = torch.stack([torch.as_tensor(x, dtype=dt).expand(B) for x in a], -1)
        if Q is not None:
            orient[:, k] = Q.expand(B, 3, 3)

    def pair(name: str, c: tuple, a: tuple, Q: Tensor | None = None, asym: float = 0.0) -> None:
        """Place ``name_r`` at ``c`` and its mirror ``name_l``; ``asym`` jitters the left one."""
        put(f"{name}_r", c, a, Q)
        if sym or asym == 0.0:
            jit = (0.0, 0.0, 0.0)
        else:
            jit = tuple(U.take(-asym, asym) for _ in range(3))
        cl = (-c[0] + jit[0], c[1] + jit[1], c[2] + jit[2])
        put(f"{name}_l", cl, a, None if Q is None else _mirror_rot(Q))

    # --- skull, face, jaw
    sw, sh, sd = U.take(0.68, 0.82), U.take(0.84, 0.98), U.take(0.86, 1.0)
    put("skull", (0.0, U.take(0.10, 0.2), U.take(-0.26, -0.16)), (sw, sh, sd))
    fw, fh, fd = U.take(0.5, 0.64), U.take(0.55, 0.72), U.take(0.56, 0.66)
    put("face", (0.0, -0.3, U.take(0.12, 0.2)), (fw, fh, fd))

    def front(x: Tensor | float, y: Tensor | float) -> Tensor:
        """z of the front-most skull/face surface at head (x, y): features sit on it."""
        zs = []
        for k in (_P["skull"], _P["face"]):
            c, a = centre[:, k], axes[:, k]
            r2 = ((x - c[:, 0]) / a[:, 0]) ** 2 + ((y - c[:, 1]) / a[:, 1]) ** 2
            zs.append(c[:, 2] + a[:, 2] * (1 - r2).clamp_min(0.05).sqrt())
        return torch.maximum(*zs)

    # --- eyes: spheres whose local z is the gaze; iris and pupil are caps around it
    er = U.take(0.075, 0.1)
    ey = U.take(0.0, 0.08)
    ex = U.take(0.22, 0.3)
    ez = front(ex, ey) - er * U.take(0.3, 0.6)
    gaze = rot_y(U.take(-12.0, 12.0)) if not sym else rot_y(torch.zeros(B, dtype=dt))
    Qe = gaze @ rot_x(U.take(-8.0, 8.0))
    pair("eye", (ex, ey, ez), (er, er, er), Qe, asym=0.01)
    if not sym:  # a gaze is a common direction for both eyes, not mirrored
        orient[:, _P["eye_l"]] = Qe
    # --- brows
    bw = U.take(0.12, 0.18)
    brow_tilt = rot_z(U.take(-15.0, 12.0))
    bx, by = ex + U.take(-0.02, 0.03), ey + er + U.take(0.04, 0.1)
    pair("brow", (bx, by, front(bx, by) - 0.03), (bw, U.take(0.022, 0.045), 0.06), brow_tilt,
         asym=0.012)  # fmt: skip
    # --- nose: a tilted bridge and a tip; length, width and protrusion vary
    nose_len = U.take(0.2, 0.3)
    nose_yaw = torch.zeros(B, dtype=dt) if sym else U.take(-4.0, 4.0)
    Qn = rot_y(nose_yaw) @ rot_x(U.take(-24.0, -12.0))
    nby = ey - nose_len * 0.55
    put("nose_bridge", (0.0, nby, front(0.0, nby) - 0.05 + nose_len * 0.3),
        (U.take(0.06, 0.1), nose_len * 0.75, 0.12), Qn)  # fmt: skip
    tip_y = ey - nose_len * 1.1
    tip_d = U.take(0.08, 0.11)
    put("nose_tip", (0.0, tip_y, front(0.0, tip_y) + U.take(0.08, 0.16)),
        (U.take(0.09, 0.15), U.take(0.07, 0.1), tip_d))  # fmt: skip
    # --- mouth
    lw = U.take(0.15, 0.24)
    my = tip_y - U.take(0.16, 0.24)
    mz = front(0.0, my) + U.take(-0.04, -0.01)
    put("lip_upper", (0.0, my + 0.04, mz), (lw, U.take(0.03, 0.05), 0.08))
    put("lip_lower", (0.0, my - 0.045, mz - 0.01), (lw * 0.92, U.take(0.035, 0.06), 0.08))
    cy = my - U.take(0.18, 0.26)
    cd = U.take(0.14, 0.2)
    put("chin", (0.0, cy, front(0.0, cy) - cd * 0.6),
        (U.take(0.16, 0.3), U.take(0.13, 0.2), cd))  # fmt: skip
    cw = U.take(0.15, 0.2)
    chx, chy = U.take(0.28, 0.36), tip_y + U.take(-0.02, 0.06)
    pair("cheek", (chx, chy, front(chx, chy) - cw * 0.92), (cw, cw * U.take(0.8, 1.0), cw),
         asym=0.015)  # fmt: skip
    # --- ears
    ea = U.take(0.17, 0.26)
    pair("ear", (sw * 0.97, U.take(-0.1, 0.02), U.take(-0.12, 0.0)),
         (U.take(0.05, 0.08), ea, ea * 0.62), rot_y(U.take(-25.0, -10.0)), asym=0.02)  # fmt: skip
    # --- neck, shoulders
    put("neck", (0.0, -0.95, U.take(-0.22, -0.1)), (U.take(0.32, 0.42), 0.62, U.take(0.34, 0.42)))
    put("torso", (0.0, -1.72, -0.2), (U.take(1.05, 1.35), U.take(0.45, 0.6), U.take(0.5, 0.62)))
    active[:, _P["torso"]] = U.prob(0.75)
    # --- glasses: bridge, temples (opaque) and two lenses (transparent, rim)
    glasses = U.prob(opts.glasses_prob)
    lens_z = ez + er + U.take(0.04, 0.08)
    lens_w, lens_h = U.take(0.11, 0.15), U.take(0.08, 0.12)
    put("glasses_bridge", (0.0, ey + 0.01, lens_z), ((ex - lens_w + 0.02).clamp_min(0.02), 0.014,
                                                      0.014))  # fmt: skip
    # temples reach from the outer lens edge back to the ears
    x0, x1 = ex + lens_w, sw * 0.97
    z0, z1 = lens_z, torch.full_like(lens_z, -0.05)
    length = torch.hypot(x1 - x0, z1 - z0)
    Qt = rot_y(torch.rad2deg(torch.atan2(x1 - x0, z1 - z0)))
    put("temple_r", ((x0 + x1) / 2, ey + 0.01, (z0 + z1) / 2), (0.012, 0.012, length / 2), Qt)
    centre[:, _P["temple_l"]] = centre[:, _P["temple_r"]] * _F.to(dt)
    axes[:, _P["temple_l"]] = axes[:, _P["temple_r"]]
    orient[:, _P["temple_l"]] = _mirror_rot(Qt)
    for n in ("glasses_bridge", "temple_r", "temple_l"):
        active[:, _P[n]] = glasses
    lens_centre = torch.stack(
        [torch.stack([ex, ey, lens_z], -1), torch.stack([-ex, ey, lens_z], -1)], 1
    )
    lens_axes = torch.stack([lens_w, lens_h, torch.full_like(lens_w, 0.012)], -1)
    lens_axes = lens_axes.unsqueeze(1).expand(B, 2, 3)
    lens_orient = torch.eye(3, dtype=dt).expand(B, 2, 3, 3)
    sunglasses = U.prob(0.25)
    lens_alpha = torch.where(sunglasses, U.take(0.75, 0.92), U.take(0.05, 0.2))
    lens_tint = torch.where(
        sunglasses.unsqueeze(-1),
        torch.stack([U.take(0.0, 0.2) for _ in range(3)], -1),
        torch.stack([U.take(0.6, 1.0) for _ in range(3)], -1),
    )
    lens_rim = U.take(0.78, 0.9)
    frame_col = torch.where(
        U.prob(0.6).unsqueeze(-1),
        torch.stack([U.take(0.02, 0.15)] * 3, -1),
        torch.stack([U.take(0.1, 0.9) for _ in range(3)], -1),
    )
    # --- hair: cap over the skull cut by a plane (coverage), long hair behind, bun, beard
    hair_cov = U.take(0.0, 1.0)
    bald = hair_cov < opts.bald_prob
    cap_scale = U.take(1.04, 1.12)
    put("hair_cap", (0.0, 0.0, 0.0), (sw * cap_scale, sh * cap_scale, sd * cap_scale))
    centre[:, _P["hair_cap"]] = centre[:, _P["skull"]] + torch.stack(
        [torch.zeros(B, dtype=dt), U.take(0.0, 0.04), U.take(-0.04, 0.0)], -1
    )
    active[:, _P["hair_cap"]] = ~bald
    tilt = torch.deg2rad(U.take(20.0, 40.0))
    part_x = torch.zeros(B, dtype=dt) if sym else U.take(-0.25, 0.25)
    n_cap = torch.stack([part_x, torch.cos(tilt), -torch.sin(tilt)], -1)
    n_cap = n_cap / n_cap.norm(dim=-1, keepdim=True)
    h_cap = U.take(-0.15, 0.35)
    long_hair = U.prob(0.35) & ~bald
    put("hair_long", (0.0, U.take(-0.55, -0.3), U.take(-0.4, -0.28)),
        (sw * U.take(1.05, 1.25), U.take(0.8, 1.1), U.take(0.5, 0.65)))  # fmt: skip
    active[:, _P["hair_long"]] = long_hair
    n_long = torch.tensor([0.0, 0.0, -1.0], dtype=dt).expand(B, 3)
    h_long = U.take(-0.2, 0.2)
    put("bun", (0.0, U.take(0.3, 0.6), -0.95), (U.take(0.2, 0.3),) * 3)
    active[:, _P["bun"]] = U.prob(0.12) & ~bald
    beard = U.prob(opts.beard_prob)
    put("beard", (0.0, 0.0, 0.0), (fw * 1.07, fh * 1.07, fd * 1.07))
    centre[:, _P["beard"]] = centre[:, _P["face"]] + torch.tensor([0.0, -0.02, 0.0], dtype=dt)
    active[:, _P["beard"]] = beard
    n_beard = torch.stack(
        [torch.zeros(B, dtype=dt), -torch.ones(B, dtype=dt), U.take(0.0, 0.5)], -1
    )
    n_beard = n_beard / n_beard.norm(dim=-1, keepdim=True)
    h_beard = U.take(0.15, 0.5)
    clip = torch.stack(
        [
            torch.cat([n_cap, h_cap[:, None]], -1),
            torch.cat([n_long, h_long[:, None]], -1),
            torch.cat([n_beard, h_beard[:, None]], -1),
        ],
        1,
    )
    # --- colours
    skin = _palette(_SKIN_RAMP, U.take()) * torch.stack(
        [U.take(0.95, 1.05), U.take(0.93, 1.05), U.take(0.9, 1.05)], -1
    )
    skin = skin.clamp(0, 1)
    hair = _choice(_HAIR_COLOURS, U.take(), U.take(0.8, 1.15))
    cloth = torch.stack([U.take(0.05, 0.95) for _ in range(3)], -1)
    lip = (skin * torch.stack([U.take(0.8, 1.0), U.take(0.45, 0.65), U.take(0.5, 0.7)], -1))
    mat = _MATERIAL
    for k in range(K):
        m = int(mat[k])
        col = {SKIN: skin, EYE: torch.ones(B, 3, dtype=dt) * 0.92, HAIR: hair, LIP: lip,
               FRAME: frame_col, CLOTH: cloth}[m]  # fmt: skip
        albedo[:, k] = col
    # brows are usually a little darker than the hair
    albedo[:, _P["brow_r"]] = albedo[:, _P["brow_l"]] = hair * U.take(0.55, 0.9)[:, None]
    iris = _choice(_IRIS_COLOURS, U.take(), U.take(0.85, 1.15))
    iris_cos = torch.cos(torch.deg2rad(U.take(32.0, 42.0)))
    pupil_cos = torch.cos(torch.deg2rad(U.take(12.0, 18.0)))
    hair_freq = U.take(25.0, 60.0)
    hair_phase = torch.zeros(B, dtype=dt) if sym else U.take(0.0, 2 * math.pi)
    hair_amp = U.take(0.05, 0.25)

    # --- camera: field of view, distance from the framing, translation
    fov = U.take(*opts.fov_range)
    framing = U.take(0.5, 0.72)  # fraction of the half image spanned by a 1.15-unit head radius
    tan_half = torch.tan(torch.deg2rad(fov) / 2)
    distance = 1.15 / (framing * tan_half)
    shift = torch.stack([U.take(-1, 1), U.take(-1, 1)], -1) * opts.translation
    shift = shift * (distance * tan_half)[:, None]  # a fraction of the half-image at the head

    # --- light, in camera coordinates
    if opts.light == "camera":
        light = torch.tensor([0.0, 0.0, 1.0], dtype=dt).expand(B, 3).clone()
        for _ in range(3):
            U.take()
    else:
        light = torch.stack([U.take(-1.0, 1.0), U.take(-0.4, 1.0), U.take(0.25, 1.2)], -1)
        light = light / light.norm(dim=-1, keepdim=True)
    ambient = U.take(0.2, 0.5)
    diffuse = U.take(0.5, 0.95)

    # --- background
    bg_a = torch.stack([U.take(0.05, 0.95) for _ in range(3)], -1)
    bg_b = torch.stack([U.take(0.05, 0.95) for _ in range(3)], -1)
    ang = U.take(0, 2 * math.pi)
    bg_dir = torch.stack([torch.cos(ang), torch.sin(ang)], -1)
    kind = U.take()
    plain = opts.background == "plain"
    bg_grad = torch.where(kind < 0.3, torch.zeros_like(kind), U.take(0.3, 1.0))
    bg_tex = torch.where(kind > 0.55, U.take(0.03, 0.15), torch.zeros_like(kind))
    if plain:
        bg_grad = torch.zeros_like(bg_grad)
        bg_tex = torch.zeros_like(bg_tex)
    clutter = torch.stack([_shape(U, 0.2, 0.9, 0.05, 0.35) for _ in range(_N_CLUTTER)], 1)
    n_clutter = (U.take() * (_N_CLUTTER + 1)).floor()
    clutter[..., 0] = (torch.arange(_N_CLUTTER, dtype=dt)[None] < n_clutter[:, None]).to(dt)
    if not opts.clutter or plain:
        clutter[..., 0] = 0.0
    occluder = _shape(U, 0.0, 0.45, 0.08, 0.3)
    occluder[:, 0] = U.prob(opts.occluder_prob).to(dt)

    if opts.style == "studio":
        # Same shapes and camera; another palette (muted skin, natural hair, grey clothes), a
        # key light from the upper left with a strong fill, and a smooth portrait backdrop.
        t_skin = (skin.mean(-1) / 0.97).clamp(0, 0.999)
        studio_skin = _palette(_STUDIO_SKIN_RAMP, t_skin)
        studio_hair = _choice(_STUDIO_HAIR_COLOURS, (hair.sum(-1) * 7.0) % 1.0,
                              torch.ones(B, dtype=dt))  # fmt: skip
        grey = (cloth.mean(-1, keepdim=True) * 0.5).expand(B, 3)
        for k in range(K):
            m = int(mat[k])
            if m == SKIN:
                albedo[:, k] = studio_skin
            elif m == HAIR:
                albedo[:, k] = studio_hair
            elif m == CLOTH:
                albedo[:, k] = grey
            elif m == LIP:
                albedo[:, k] = studio_skin * torch.tensor([0.85, 0.55, 0.55], dtype=dt)
        albedo[:, _P["brow_r"]] = albedo[:, _P["brow_l"]] = studio_hair * 0.7
        light = torch.stack([-0.5 + 0.2 * (bg_a[:, 0] - 0.5), 0.55 + 0.2 * (bg_a[:, 1] - 0.5),
                             torch.ones(B, dtype=dt)], -1)  # fmt: skip
        light = light / light.norm(dim=-1, keepdim=True)
        ambient = 0.45 + 0.1 * (ambient - 0.2) / 0.3
        diffuse = 0.55 + 0.1 * (diffuse - 0.5) / 0.45
        bd = torch.tensor(_STUDIO_BACKDROPS, dtype=dt)
        which = (kind * len(_STUDIO_BACKDROPS)).long().clamp(0, len(_STUDIO_BACKDROPS) - 1)
        bg_a, bg_b = bd[which], bd[which] * 0.6
        bg_dir = torch.tensor([0.0, 1.0], dtype=dt).expand(B, 2).clone()
        bg_grad = torch.ones(B, dtype=dt) * 0.8
        bg_tex = torch.zeros(B, dtype=dt)
        clutter[..., 0] = 0.0

    return _Scene(
        centre=centre, axes=axes, orient=orient, albedo=albedo, active=active, clip=clip,
        lens_centre=lens_centre, lens_axes=lens_axes, lens_orient=lens_orient,
        lens_tint=lens_tint, lens_alpha=lens_alpha, lens_rim=lens_rim, glasses=glasses,
        iris=iris, iris_cos=iris_cos, pupil_cos=pupil_cos, hair_freq=hair_freq,
        hair_phase=hair_phase, hair_amp=hair_amp, fov=fov, distance=distance, shift=shift,
        light=light, ambient=ambient, diffuse=diffuse, bg_a=bg_a, bg_b=bg_b, bg_dir=bg_dir,
        bg_grad=bg_grad, bg_tex=bg_tex, bg_noise=noise, clutter=clutter, occluder=occluder,
    )  # fmt: skip


def _shape(U: _Uniforms, r_lo: float, r_hi: float, s_lo: float, s_hi: float) -> Tensor:
    """A 2D shape: ``(active, kind, cx, cy, rx, ry, r, g, b)``; centre at radius r_lo..r_hi."""
    ang = U.take(0, 2 * math.pi)
    rad = U.take(r_lo, r_hi)
    return torch.stack(
        [
            torch.ones_like(rad),
            (U.take() < 0.5).to(rad.dtype),
            rad * torch.cos(ang),
            rad * torch.sin(ang),
            U.take(s_lo, s_hi),
            U.take(s_lo, s_hi) * U.take(0.3, 1.0),
            U.take(), U.take(), U.take(),
        ],
        -1,
    )  # fmt: skip


# --------------------------------------------------------------------------- ray-quadric core


def _quadric_coeffs(
    centre: Tensor, axes: Tensor, orient: Tensor, R: Tensor, cam: Tensor, tan_half: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per (image, ellipsoid) ray coefficients, float64.

    For the ray ``p_c(t) = t * (u a, -v a, -1)`` (``a = tan(fov/2)``) the ellipsoid's local point is
    ``q(t) = q0 + t * (u e0 + v e1 + e2)``; a hit solves ``|q(t)|^2 = 1``.

    Args:
        centre, axes: ``(B, K, 3)``; orient: ``(B, K, 3, 3)``; R: ``(B, 3, 3)``;
        cam: ``(B, 3)`` head centre in camera coordinates; tan_half: ``(B,)``.

    Returns:
        ``q0 (B, K, 3)``, ``E (B, K, 3, 3)`` with columns ``e0, e1, e2``, and
        ``G (B, K, 3, 3)``: the matrix mapping ``q`` to the (unnormalised) camera-frame normal.
    """
    A = orient.transpose(-1, -2) / axes.unsqueeze(-1)  # head -> local, (B, K, 3, 3)
    M = A @ R.unsqueeze(1)  # camera -> local (linear part)
    q0 = -(A @ ((R @ cam.unsqueeze(-1)).unsqueeze(1))).squeeze(-1) - (
        A @ centre.unsqueeze(-1)
    ).squeeze(-1)
    a = tan_half[:, None, None]
    E = torch.stack([M[..., 0] * a, -M[..., 1] * a, -M[..., 2]], -1)
    G = M.transpose(-1, -2)  # gradient of |q|^2 w.r.t. the camera point is 2 M^T q
    return q0, E, G, M


def _poly_coeffs(q0: Tensor, E: Tensor, active: Tensor) -> Tensor:
    """Polynomial coefficients of ``a(u,v)``, ``b(u,v)``, ``disc(u,v)``: ``(B, K, 15)`` float64.

    ``a = |qd|^2``, ``b = q0 . qd``, ``disc = b^2 - a (|q0|^2 - 1)``, ``qd = u e0 + v e1 + e2``.
    Layout: a: [uu, vv, uv, u, v, 1], b: [u, v, 1], disc: [uu, vv, uv, u, v, 1].
    """
    e0, e1, e2 = E[..., 0], E[..., 1], E[..., 2]

    def dot(x: Tensor, y: Tensor) -> Tensor:
        return (x * y).sum(-1)

    A = torch.stack(
        [dot(e0, e0), dot(e1, e1), 2 * dot(e0, e1), 2 * dot(e0, e2), 2 * dot(e1, e2),
         dot(e2, e2)], -1
    )  # fmt: skip
    g0, g1, g2 = dot(q0, e0), dot(q0, e1), dot(q0, e2)
    c = dot(q0, q0) - 1.0
    Bc = torch.stack([g0, g1, g2], -1)
    D = torch.stack(
        [g0 * g0, g1 * g1, 2 * g0 * g1, 2 * g0 * g2, 2 * g1 * g2, g2 * g2], -1
    ) - c.unsqueeze(-1) * A
    # an inactive part never intersects: disc = -1 everywhere
    off = ~active
    D = torch.where(off.unsqueeze(-1), torch.zeros_like(D), D)
    D[..., 5] = torch.where(off, torch.full_like(c, -1.0), D[..., 5])
    return torch.cat([A, Bc, D], -1)


def _eval_quad(c: Tensor, u: Tensor, v: Tensor) -> Tensor:
    """``c[...,0] u^2 + c[...,1] v^2 + c[...,2] uv + c[...,3] u + c[...,4] v + c[...,5]``.

    ``c`` is ``(B, K, 6)``, ``u`` ``(W,)``, ``v`` ``(H,)``; result ``(B, K, H, W)`` built from a
    row term, a column term and one fused multiply-add for the ``uv`` term.
    """
    row = (c[..., 0:1] * u + c[..., 3:4]) * u + c[..., 5:6]  # (B, K, W)
    col = (c[..., 1:2] * v + c[..., 4:5]) * v  # (B, K, H)
    uvc = (c[..., 2:3] * v).unsqueeze(-1)  # (B, K, H, 1)
    out = row.unsqueeze(-2) + col.unsqueeze(-1)
    return out.addcmul_(uvc, u.view(1, 1, 1, -1))


def _eval_lin(c: Tensor, u: Tensor, v: Tensor) -> Tensor:
    """``c[...,0] u + c[...,1] v + c[...,2]``, ``(B, K, H, W)``."""
    return (c[..., 0:1] * u + c[..., 2:3]).unsqueeze(-2) + (c[..., 1:2] * v).unsqueeze(-1)


def _intersect(coef: Tensor, u: Tensor, v: Tensor) -> Tensor:
    """Depth of the front hit per pixel and ellipsoid, inf where missed: ``(B, K, H, W)``."""
    disc = _eval_quad(coef[..., 9:15], u, v)
    a = _eval_quad(coef[..., 0:6], u, v)
    b = _eval_lin(coef[..., 6:9], u, v)
    hit = disc > 0
    t = b.add_(disc.clamp_min_(0).sqrt_()).div_(a).neg_()
    return t.masked_fill_(~hit, math.inf)


# --------------------------------------------------------------------------- the generator


@register_generator("procedural")
class ProceduralHead(PoseGenerator):
    """Analytic ray-traced 3D head; renders any ``R`` in SO(3) with no weights.

    Args:
        seed: identity seed; identity ``i`` depends only on ``(seed, i)``.
        device: where rendering happens (identities are sampled on CPU, then moved).
        symmetric: make every identity exactly left-right symmetric (geometry, colours, hair
            texture), for the flip oracle.
        background: ``"random"`` (plain, gradients, noise textures) or ``"plain"`` (one colour).
        clutter: draw random shapes in the background.
        translation: maximum head offset from the optical axis, as a fraction of the half image.
        light: ``"random"`` (direction per identity, fixed in camera coordinates) or ``"camera"``
            (along the optical axis, so the scene transforms exactly with an image rotation).
        occluder_prob: probability that an identity has a 2D occluder in front of the face.
        glasses_prob, beard_prob, bald_prob: accessory and hair probabilities.
        fov_range: ``(low, high)`` field of view in degrees; the camera distance follows from the
            framing so the head size in the image stays similar.
        supersample: render at ``supersample x`` the resolution and area-average (anti-aliasing).
        style: ``"default"``, or ``"studio"``: the same identities' shapes and cameras with another
            palette (muted skin, natural hair, grey clothes), a key light from the upper left with
            a strong fill, and a smooth portrait backdrop without clutter: a second, visibly
            different domain (the "real" images of the small-scale CLERF experiment).
        chunk_elems: work size per step (pixels x primitives); bounds memory and keeps caches warm.
    """

    def __init__(
        self,
        seed: int = 0,
        device: str | torch.device = "cpu",
        *,
        symmetric: bool = False,
        background: str = "random",
        clutter: bool = True,
        translation: float = 0.06,
        light: str = "random",
        occluder_prob: float = 0.1,
        glasses_prob: float = 0.25,
        beard_prob: float = 0.2,
        bald_prob: float = 0.12,
        fov_range: tuple[float, float] | list[float] = (12.0, 40.0),
        style: str = "default",
        supersample: int = 1,
        chunk_elems: int = 1 << 18,
    ) -> None:
        super().__init__(seed=seed, device=device)
        if background not in ("random", "plain"):
            raise ValueError(
                f"procedural: background must be 'random' or 'plain', got {background!r}"
            )
        if style not in STYLES:
            raise ValueError(f"procedural: style must be one of {STYLES}, got {style!r}")
        if light not in ("random", "camera"):
            raise ValueError(f"procedural: light must be 'random' or 'camera', got {light!r}")
        for name, p in (("occluder_prob", occluder_prob), ("glasses_prob", glasses_prob),
                        ("beard_prob", beard_prob), ("bald_prob", bald_prob)):  # fmt: skip
            if not 0.0 <= float(p) <= 1.0:
                raise ValueError(f"procedural: {name} must be in [0, 1], got {p}")
        if not 0.0 <= float(translation) <= 0.5:
            raise ValueError(f"procedural: translation must be in [0, 0.5], got {translation}")
        fov_range = tuple(float(x) for x in fov_range)
        if len(fov_range) != 2 or not 5.0 <= fov_range[0] <= fov_range[1] <= 60.0:
            raise ValueError(
                f"procedural: fov_range must be (low, high) with 5 <= low <= high <= 60 deg, "
                f"got {fov_range}"
            )
        if int(supersample) != supersample or not 1 <= int(supersample) <= 8:
            raise ValueError(f"procedural: supersample must be an int in 1..8, got {supersample}")
        self.symmetric = bool(symmetric)
        self.style = style
        self.background = background
        self.clutter = bool(clutter)
        self.translation = float(translation)
        self.light = light
        self.occluder_prob = float(occluder_prob)
        self.glasses_prob = float(glasses_prob)
        self.beard_prob = float(beard_prob)
        self.bald_prob = float(bald_prob)
        self.fov_range = fov_range
        self.supersample = int(supersample)
        self.chunk_elems = int(chunk_elems)

    @classmethod
    def aligned(
        cls, seed: int = 0, device: str | torch.device = "cpu", **kw: Any
    ) -> ProceduralHead:
        """A scene that transforms exactly with the camera (for oracle tests).

        Symmetric identities, head on the optical axis, light along the optical axis, plain
        background, no clutter or occluder.
        """
        base = dict(symmetric=True, background="plain", clutter=False, translation=0.0,
                    light="camera", occluder_prob=0.0)  # fmt: skip
        base.update(kw)
        return cls(seed=seed, device=device, **base)

    def params(self) -> dict[str, Any]:
        return {
            "symmetric": self.symmetric, "background": self.background, "clutter": self.clutter,
            "translation": self.translation, "light": self.light,
            "occluder_prob": self.occluder_prob, "glasses_prob": self.glasses_prob,
            "beard_prob": self.beard_prob, "bald_prob": self.bald_prob,
            "fov_range": list(self.fov_range), "supersample": self.supersample,
            "style": self.style,
        }  # fmt: skip

    # ------------------------------------------------------------------ identities

    def _identity_draws(self, identities: Tensor) -> tuple[Tensor, Tensor]:
        """Uniforms ``(B, N)`` and background noise ``(B, 3, n, n)``, float64 on CPU."""
        us, ns = [], []
        for i in identities.tolist():
            g = torch.Generator(device="cpu").manual_seed(identity_seed(self.seed, i))
            us.append(torch.rand(_N_UNIFORM, generator=g, dtype=torch.float64))
            ns.append(torch.randn(3, _NOISE, _NOISE, generator=g, dtype=torch.float64))
        return torch.stack(us), torch.stack(ns)

    def scene(self, identities: Tensor) -> _Scene:
        """Scene parameters of ``identities`` (CPU, float64)."""
        u, noise = self._identity_draws(identities)
        return _sample_scene(u, noise, self)

    # ------------------------------------------------------------------ rendering

    def _check(self, identities: Tensor, rotations: Tensor, resolution: int) -> int:
        res = check_resolution(resolution)
        if identities.ndim != 1 or identities.dtype not in (torch.int64, torch.int32):
            raise ValueError(
                f"identities: expected a (B,) int64 tensor, got {tuple(identities.shape)} "
                f"{identities.dtype}"
            )
        if rotations.shape != (identities.shape[0], 3, 3):
            raise ValueError(
                f"rotations: expected shape ({identities.shape[0]}, 3, 3), "
                f"got {tuple(rotations.shape)}"
            )
        if (identities < 0).any():
            raise ValueError("identities must be non-negative")
        check_rotation(rotations, name="rotations")
        return res

    def render(self, identities: Tensor, rotations: Tensor, resolution: int) -> Rendered:
        maps = self.render_maps(identities, rotations, resolution)
        return Rendered(images=maps.images, rotations=maps.rotations)

    @torch.no_grad()
    def render_maps(self, identities: Tensor, rotations: Tensor, resolution: int) -> RenderMaps:
        """Render and also return part ids and depth (see :class:`RenderMaps`).

        With ``supersample > 1`` the maps are those of the centre sub-sample of each pixel.
        """
        res = self._check(identities, rotations, resolution)
        B = identities.shape[0]
        dev = self.device
        if B == 0:
            return RenderMaps(
                images=torch.empty(0, 3, res, res, dtype=torch.uint8, device=dev),
                rotations=torch.empty(0, 3, 3, device=dev),
                part_ids=torch.empty(0, res, res, dtype=torch.int64, device=dev),
                depth=torch.empty(0, res, res, device=dev),
            )
        R64 = rotations.detach().to("cpu", torch.float64)
        sc = self.scene(identities.detach().cpu())
        ss = self.supersample
        hi = res * ss
        tan_half = torch.tan(torch.deg2rad(sc.fov) / 2)
        cam = torch.cat([sc.shift, -sc.distance[:, None]], -1)  # head centre, camera coordinates
        q0, E, G, _ = _quadric_coeffs(sc.centre, sc.axes, sc.orient, R64, cam, tan_half)
        coef = _poly_coeffs(q0, E, sc.active)
        clip = _clip_coeffs(sc.clip, q0[:, _CLIP_IDX], E[:, _CLIP_IDX])

        f32 = torch.float32
        grid = (torch.arange(hi, device=dev, dtype=f32) + 0.5) / hi * 2 - 1
        coef_d, clip_d = coef.to(dev, f32), clip.to(dev, f32)
        K = coef.shape[1]
        per = max(1, self.chunk_elems // (K * hi * hi))
        depth = torch.empty(B, hi, hi, device=dev, dtype=f32)
        ids = torch.empty(B, hi, hi, device=dev, dtype=torch.int64)
        for s in range(0, B, per):
            sl = slice(s, min(B, s + per))
            t = _intersect(coef_d[sl], grid, grid)
            # clipped parts keep their front hit only on the kept side of their plane
            c0 = _CLIP_IDX[0]
            tc = t[:, c0 : c0 + len(_CLIP_IDX)]
            side = _eval_lin(clip_d[sl][..., 1:4], grid, grid).mul_(tc).add_(
                clip_d[sl][..., 0, None, None]
            )
            tc.masked_fill_(side < 0, math.inf)
            depth[sl], ids[sl] = t.min(dim=1)
        hit = torch.isfinite(depth)
        ids = torch.where(hit, ids, torch.full_like(ids, -1))

        img = self._shade(sc, R64, cam, tan_half, depth, ids, grid)
        img, rim_ids = self._lenses(sc, R64, cam, tan_half, depth, img, grid)
        img = torch.where(hit.unsqueeze(1), img, self._background(sc, grid))
        img = self._occlude(sc, img, grid)
        ids = torch.where(rim_ids >= 0, rim_ids, ids)
        if ss > 1:
            img = F.avg_pool2d(img, ss)
            c = ss // 2
            ids, depth = ids[:, c::ss, c::ss], depth[:, c::ss, c::ss]
        images = (img.clamp(0, 1) * 255).round().to(torch.uint8)
        return RenderMaps(
            images=images,
            rotations=rotations.detach().to(dev, torch.float32),
            part_ids=ids,
            depth=depth,
        )

    def _shade(self, sc, R64, cam, tan_half, depth, ids, grid) -> Tensor:
        """Lambert + ambient + Blinn-Phong shading of the opaque hit, ``(B, 3, H, W)``.

        The camera-frame normal of an ellipsoid at camera point ``p`` is ``S p + s`` with
        ``S = R^T Q D^-2 Q^T R`` and ``s = -R^T Q D^-2 Q^T (R c + m)``; so per pixel only 9
        geometric numbers of the visible part are gathered (plus colour and material), as
        contiguous rows ``(F, B, H*W)`` with one ``index_select``. Per-image values broadcast as
        ``(B, 1)``. Textures use the normal in head coordinates: iris and pupil are caps around
        the eyeball's gaze axis, hair strands vary along the head's x.
        """
        dev, f32 = self.device, torch.float32
        B, H, W = depth.shape
        K = sc.centre.shape[1]
        Qd = sc.orient / sc.axes.unsqueeze(-2) ** 2  # Q D^-2
        Mh = Qd @ sc.orient.transpose(-1, -2)  # Q D^-2 Q^T, head frame, (B, K, 3, 3)
        Rb = R64.unsqueeze(1)
        S = Rb.transpose(-1, -2) @ Mh @ Rb
        off = (R64 @ cam.unsqueeze(-1)).squeeze(-1).unsqueeze(1) + sc.centre  # R c + m
        s_vec = -(Rb.transpose(-1, -2) @ Mh @ off.unsqueeze(-1)).squeeze(-1)
        sym6 = torch.stack([S[..., 0, 0], S[..., 0, 1], S[..., 0, 2], S[..., 1, 1], S[..., 1, 2],
                            S[..., 2, 2]], -1)  # fmt: skip
        mat = _MATERIAL.double()
        feats = torch.cat(
            [sym6, s_vec, sc.orient[..., :, 2], sc.albedo,
             torch.stack([mat, _SPEC.double()[_MATERIAL], _SHINE.double()[_MATERIAL]], -1)
             .expand(B, K, 3)], -1
        )  # (B, K, 18)  # fmt: skip
        table = feats.reshape(B * K, -1).t().contiguous().to(dev, f32)  # (18, B*K)
        flat = (ids.clamp_min(0) + torch.arange(B, device=dev).view(B, 1, 1) * K).reshape(-1)
        P = table.index_select(1, flat).view(-1, B, H * W)  # (18, B, HW)

        def img(x: Tensor) -> Tensor:  # a per-image value as (B, 1)
            return x.to(dev, f32).reshape(B, 1)

        th = img(tan_half)
        u = grid.view(1, 1, W).expand(1, H, W).reshape(1, H * W)
        v = grid.view(1, H, 1).expand(1, H, W).reshape(1, H * W)
        t = depth.reshape(B, H * W).nan_to_num(posinf=0.0)
        px, py, pz = t * (u * th), t * (-v * th), -t  # camera-frame hit point
        n0 = P[0] * px + P[1] * py + P[2] * pz + P[6]
        n1 = P[1] * px + P[3] * py + P[4] * pz + P[7]
        n2 = P[2] * px + P[4] * py + P[5] * pz + P[8]
        inv = (n0 * n0 + n1 * n1 + n2 * n2).clamp_min(1e-30).rsqrt()
        n = [n0 * inv, n1 * inv, n2 * inv]
        m = P[15]
        view = [-u * th, v * th]
        vinv = (view[0] * view[0] + view[1] * view[1] + 1).rsqrt()
        lb = [img(sc.light[:, i]) for i in range(3)]
        lam = (n[0] * lb[0] + n[1] * lb[1] + n[2] * lb[2]).clamp_min(0)
        half = [lb[0] + view[0] * vinv, lb[1] + view[1] * vinv, lb[2] + vinv]
        hinv = (half[0] * half[0] + half[1] * half[1] + half[2] * half[2]).clamp_min(1e-24).rsqrt()
        nh = ((n[0] * half[0] + n[1] * half[1] + n[2] * half[2]) * hinv).clamp_min(0)
        spec = P[16] * (lam > 0) * nh.pow(P[17])
        # normal in head coordinates: n_h = R n_c (rows of R are head axes in camera coordinates)
        Rf = R64.to(dev, f32)
        nhead = [sum(Rf[:, i, j].view(B, 1) * n[j] for j in range(3)) for i in range(3)]
        albedo = P[12:15]
        eye = m == EYE
        gaze = P[9] * nhead[0] + P[10] * nhead[1] + P[11] * nhead[2]
        iris = eye & (gaze > img(sc.iris_cos))
        pupil = eye & (gaze > img(sc.pupil_cos))
        iris_c = sc.iris.to(dev, f32).t().reshape(3, B, 1)
        albedo = torch.where(iris, iris_c, albedo)
        albedo = albedo.masked_fill(pupil, 0.03)
        hair = m == HAIR
        strands = 1 + img(sc.hair_amp) * torch.cos(
            img(sc.hair_freq) * nhead[0] + img(sc.hair_phase)
        ) * torch.cos(7 * nhead[1])
        albedo = torch.where(hair, albedo * strands, albedo)
        light_amt = img(sc.ambient) + img(sc.diffuse) * lam
        col = torch.addcmul(spec, albedo, light_amt)  # (3, B, HW)
        return col.view(3, B, H, W).transpose(0, 1)

    def _lenses(self, sc, R64, cam, tan_half, depth, img, grid) -> tuple[Tensor, Tensor]:
        """Composite the tinted transparent lenses and their opaque rims over ``img``."""
        dev, f32 = self.device, torch.float32
        B, H, W = depth.shape
        rim_ids = torch.full((B, H, W), -1, dtype=torch.int64, device=dev)
        if not bool(sc.glasses.any()):
            return img, rim_ids
        active = sc.glasses.unsqueeze(1).expand(B, 2)
        q0, E, G, _ = _quadric_coeffs(sc.lens_centre, sc.lens_axes, sc.lens_orient, R64, cam,
                                      tan_half)  # fmt: skip
        coef = _poly_coeffs(q0, E, active).to(dev, f32)
        t = _intersect(coef, grid, grid)  # (B, 2, H, W)
        q0d, Ed = q0.to(dev, f32), E.to(dev, f32)
        tint = sc.lens_tint.to(dev, f32).view(B, 3, 1, 1)
        alpha = sc.lens_alpha.to(dev, f32).view(B, 1, 1, 1)
        rim_r = sc.lens_rim.to(dev, f32).view(B, 1, 1)
        frame = sc.albedo[:, _P["glasses_bridge"]].to(dev, f32).view(B, 3, 1, 1)
        amb = (sc.ambient + sc.diffuse * 0.8).to(dev, f32).view(B, 1, 1, 1)
        for j in range(2):
            tj = t[:, j]
            in_front = torch.isfinite(tj) & (tj < depth)
            if not bool(in_front.any()):
                continue
            tt = tj.nan_to_num(posinf=0.0)
            # local coordinates of the hit: q = q0 + t (u e0 + v e1 + e2), components x and y
            lx = q0d[:, j, 0, None, None] + tt * (
                Ed[:, j, 0, 0, None, None] * grid.view(1, 1, W)
                + Ed[:, j, 0, 1, None, None] * grid.view(1, H, 1)
                + Ed[:, j, 0, 2, None, None]
            )
            ly = q0d[:, j, 1, None, None] + tt * (
                Ed[:, j, 1, 0, None, None] * grid.view(1, 1, W)
                + Ed[:, j, 1, 1, None, None] * grid.view(1, H, 1)
                + Ed[:, j, 1, 2, None, None]
            )
            rim = in_front & (lx * lx + ly * ly > rim_r * rim_r)
            glass = in_front & ~rim
            img = torch.where(glass.unsqueeze(1), img * (1 - alpha) + tint * alpha, img)
            img = torch.where(rim.unsqueeze(1), frame * amb, img)
            rim_ids = torch.where(rim, torch.full_like(rim_ids, LENS_ID_OFFSET + j), rim_ids)
        return img, rim_ids

    def _background(self, sc, grid) -> Tensor:
        """Background image ``(B, 3, H, W)``: colour, gradient, noise texture, clutter."""
        dev, f32 = self.device, torch.float32
        H = W = grid.shape[0]
        B = sc.bg_a.shape[0]
        x = grid.view(1, 1, 1, W)
        y = grid.view(1, 1, H, 1)
        d = sc.bg_dir.to(dev, f32)
        ramp = (d[:, 0].view(B, 1, 1, 1) * x + d[:, 1].view(B, 1, 1, 1) * y) * 0.5 + 0.5
        w = (ramp * sc.bg_grad.to(dev, f32).view(B, 1, 1, 1)).clamp(0, 1)
        a = sc.bg_a.to(dev, f32).view(B, 3, 1, 1)
        b = sc.bg_b.to(dev, f32).view(B, 3, 1, 1)
        bg = a + (b - a) * w
        tex = sc.bg_tex.to(dev, f32)
        textured = (tex > 0).nonzero().flatten()
        if len(textured):
            noise = F.interpolate(sc.bg_noise[textured.cpu()].to(dev, f32), size=(H, W),
                                  mode="bilinear", align_corners=False)  # fmt: skip
            bg = bg.index_add(0, textured, tex[textured].view(-1, 1, 1, 1) * noise)
        return _draw_shapes(bg, sc.clutter.to(dev, f32), grid)

    def _occlude(self, sc, img, grid) -> Tensor:
        occ = sc.occluder.to(self.device, torch.float32)
        if not bool((occ[:, 0] > 0).any()):
            return img
        return _draw_shapes(img, occ.unsqueeze(1), grid)

    # ------------------------------------------------------------------ anchors

    def project(self, identities: Tensor, rotations: Tensor, resolution: int,
                points: Tensor) -> Tensor:  # fmt: skip
        """Pixel coordinates ``(B, P, 2)`` (col, row; pixel centres at integers) of head points.

        Args:
            points: ``(B, P, 3)`` or ``(P, 3)`` in head coordinates (units of this head model).
        """
        res = self._check(identities, rotations, resolution)
        sc = self.scene(identities.detach().cpu())
        R = rotations.detach().to("cpu", torch.float64)
        pts = points.to(torch.float64).cpu().expand(R.shape[0], -1, 3)
        cam = torch.cat([sc.shift, -sc.distance[:, None]], -1)
        pc = pts @ R + cam.unsqueeze(1)  # R.T @ p for row vectors is p @ R
        th = torch.tan(torch.deg2rad(sc.fov) / 2).view(-1, 1)
        un = pc[..., 0] / (-pc[..., 2]) / th
        vn = -pc[..., 1] / (-pc[..., 2]) / th
        return torch.stack([(un + 1) / 2 * res - 0.5, (vn + 1) / 2 * res - 0.5], -1).float()

    def part_centres(self, identities: Tensor) -> dict[str, Tensor]:
        """Head-coordinate centres ``(B, 3)`` of each part, plus ``nose_front``: the nose tip's
        most protruding point."""
        sc = self.scene(identities.detach().cpu())
        out = {name: sc.centre[:, k] for k, name in enumerate(PARTS)}
        k = _P["nose_tip"]
        out["nose_front"] = sc.centre[:, k] + sc.orient[:, k, :, 2] * sc.axes[:, k, 2:3]
        return out


def _clip_coeffs(clip: Tensor, q0: Tensor, E: Tensor) -> Tensor:
    """Plane test coefficients ``(B, C, 4)``: side = ``c0 + t (c1 u + c2 v + c3)``."""
    n, h = clip[..., :3], clip[..., 3]
    c0 = (n * q0).sum(-1) - h
    lin = (n.unsqueeze(-1) * E).sum(-2)  # n . e_j for j = 0, 1, 2
    return torch.cat([c0.unsqueeze(-1), lin], -1)


def _draw_shapes(img: Tensor, shapes: Tensor, grid: Tensor) -> Tensor:
    """Paint ellipses (kind 0) or axis-aligned rectangles (kind 1) onto ``img``, later on top.

    ``shapes`` is ``(B, S, 9)``: active, kind, cx, cy, rx, ry, r, g, b in normalised image
    coordinates (x right, y down, [-1, 1]). Builds one index map, then one colour gather.
    """
    B, S, _ = shapes.shape
    W = grid.shape[0]
    x = grid.view(1, 1, W)
    y = grid.view(1, W, 1)
    top = torch.full((B, W, W), -1, dtype=torch.int64, device=img.device)
    for s in range(S):
        sh = shapes[:, s]
        act = sh[:, 0] > 0.5
        if not bool(act.any()):
            continue
        dx = (x - sh[:, 2].view(B, 1, 1)) / sh[:, 4].view(B, 1, 1)
        dy = (y - sh[:, 3].view(B, 1, 1)) / sh[:, 5].view(B, 1, 1)
        rect = sh[:, 1].view(B, 1, 1) > 0.5
        inside = torch.where(rect, torch.maximum(dx.abs(), dy.abs()), dx * dx + dy * dy) <= 1
        top.masked_fill_(inside & act.view(B, 1, 1), s)
    hit = top >= 0
    if not bool(hit.any()):
        return img
    colours = shapes[..., 6:9]  # (B, S, 3)
    flat = (top.clamp_min(0) + torch.arange(B, device=img.device).view(B, 1, 1) * S).reshape(-1)
    painted = colours.reshape(B * S, 3).index_select(0, flat).view(B, W, W, 3).permute(0, 3, 1, 2)
    return torch.where(hit.unsqueeze(1), painted, img)
