"""Identity sampling of the procedural head: per-identity uniforms -> scene parameters.

Identity ``i`` of a generator with seed ``s`` is drawn from a ``torch.Generator`` seeded by
:func:`generators.base.identity_seed` ``(s, i)`` (one generator per call, reseeded per identity),
so it depends on nothing else. The uniforms are consumed in a fixed order, section by section
(skull and face, eyes and brows, nose and mouth, ears and body, glasses, hair, colours, camera,
light, background, studio style): a new draw goes at the end so existing identities stay the same.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from types import SimpleNamespace
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from clerf.geometry import hflip_rotation, rot_x, rot_y, rot_z
from generators.base import identity_seed
from generators.procedural.parts import (
    CLOTH,
    EYE,
    FRAME,
    HAIR,
    HAIR_COLOURS,
    IRIS_COLOURS,
    LIP,
    MATERIAL,
    N_CLUTTER,
    N_UNIFORM,
    NOISE_GRID,
    PART,
    PARTS,
    SKIN,
    SKIN_RAMP,
    STUDIO_BACKDROPS,
    STUDIO_HAIR_COLOURS,
    STUDIO_SKIN_RAMP,
)

if TYPE_CHECKING:  # the options object is the generator itself
    from generators.procedural.head import ProceduralHead

_F = torch.tensor([-1.0, 1.0, 1.0], dtype=torch.float64)


class Uniforms:
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


#: MATERIAL as Python ints, read per part without a tensor read each time
_MATERIALS: tuple[int, ...] = tuple(int(m) for m in MATERIAL.tolist())

def palette(pal: list[tuple[float, float, float]], t: Tensor) -> Tensor:
    """Piecewise-linear colour ramp through ``pal`` at ``t`` in [0, 1): ``(B, 3)``."""
    p = torch.tensor(pal, dtype=t.dtype)
    x = t * (len(pal) - 1)
    i0 = x.floor().long().clamp(0, len(pal) - 2)
    w = (x - i0).unsqueeze(-1)
    return p[i0] * (1 - w) + p[i0 + 1] * w



def choice(colours: list[tuple[float, float, float]], t: Tensor, jitter: Tensor) -> Tensor:
    c = torch.tensor(colours, dtype=t.dtype)
    idx = (t * len(colours)).long().clamp(0, len(colours) - 1)
    return (c[idx] * jitter.unsqueeze(-1)).clamp(0, 1)



@dataclass
class Scene:
    """Per-identity scene tensors, all float64 on CPU unless stated. ``K = len(PARTS)``."""

    centre: Tensor  # (B, K, 3) head coordinates
    axes: Tensor  # (B, K, 3) semi-axes
    orient: Tensor  # (B, K, 3, 3) columns = local axes in head coordinates
    albedo: Tensor  # (B, K, 3)
    active: Tensor  # (B, K) bool
    clip: Tensor  # (B, 3, 4): keep a hit where n . q_local >= h, (n, h)
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
    bg_noise: Tensor  # (B, 3, NOISE_GRID, NOISE_GRID) standard normal
    clutter: Tensor  # (B, N_CLUTTER, 9): active, kind, cx, cy, rx, ry, r, g, b
    occluder: Tensor  # (B, 9): same layout



def shape2d(U: Uniforms, r_lo: float, r_hi: float, s_lo: float, s_hi: float) -> Tensor:
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



def identity_draws(seed: int, identities: Tensor) -> tuple[Tensor, Tensor]:
    """Uniforms ``(B, N_UNIFORM)`` and background noise ``(B, 3, n, n)``, float64 on CPU."""
    g = torch.Generator(device="cpu")
    us, ns = [], []
    for i in identities.tolist():
        g.manual_seed(identity_seed(seed, i))
        us.append(torch.rand(N_UNIFORM, generator=g, dtype=torch.float64))
        ns.append(torch.randn(3, NOISE_GRID, NOISE_GRID, generator=g, dtype=torch.float64))
    return torch.stack(us), torch.stack(ns)


# --------------------------------------------------------------------------- scene sampling


class _Parts:
    """The opaque parts' tensors being filled in, and the helpers that place parts on a head."""

    def __init__(self, U: Uniforms, B: int, dt: torch.dtype, sym: bool) -> None:
        K = len(PARTS)
        self.U, self.B, self.dt, self.sym = U, B, dt, sym
        self.centre = torch.zeros(B, K, 3, dtype=dt)
        self.axes = torch.ones(B, K, 3, dtype=dt)
        self.orient = torch.eye(3, dtype=dt).expand(B, K, 3, 3).clone()
        self.albedo = torch.zeros(B, K, 3, dtype=dt)
        self.active = torch.ones(B, K, dtype=torch.bool)

    def zeros(self) -> Tensor:
        return torch.zeros(self.B, dtype=self.dt)

    def put(self, name: str, c: tuple, a: tuple, Q: Tensor | None = None) -> None:
        k, B, dt = PART[name], self.B, self.dt
        self.centre[:, k] = torch.stack([torch.as_tensor(x, dtype=dt).expand(B) for x in c], -1)
        self.axes[:, k] = torch.stack([torch.as_tensor(x, dtype=dt).expand(B) for x in a], -1)
        if Q is not None:
            self.orient[:, k] = Q.expand(B, 3, 3)

    def pair(self, name: str, c: tuple, a: tuple, Q: Tensor | None = None,
             asym: float = 0.0) -> None:  # fmt: skip
        """Place ``name_r`` at ``c`` and its mirror ``name_l``; ``asym`` jitters the left one."""
        self.put(f"{name}_r", c, a, Q)
        if self.sym or asym == 0.0:
            jit = (0.0, 0.0, 0.0)
        else:
            jit = tuple(self.U.take(-asym, asym) for _ in range(3))
        cl = (-c[0] + jit[0], c[1] + jit[1], c[2] + jit[2])
        self.put(f"{name}_l", cl, a, None if Q is None else hflip_rotation(Q))

    def front(self, x: Tensor | float, y: Tensor | float) -> Tensor:
        """z of the front-most skull/face surface at head (x, y): features sit on it."""
        zs = []
        for k in (PART["skull"], PART["face"]):
            c, a = self.centre[:, k], self.axes[:, k]
            r2 = ((x - c[:, 0]) / a[:, 0]) ** 2 + ((y - c[:, 1]) / a[:, 1]) ** 2
            zs.append(c[:, 2] + a[:, 2] * (1 - r2).clamp_min(0.05).sqrt())
        return torch.maximum(*zs)


def _skull_and_face(p: _Parts) -> SimpleNamespace:
    U = p.U
    sw, sh, sd = U.take(0.68, 0.82), U.take(0.84, 0.98), U.take(0.86, 1.0)
    p.put("skull", (0.0, U.take(0.10, 0.2), U.take(-0.26, -0.16)), (sw, sh, sd))
    fw, fh, fd = U.take(0.5, 0.64), U.take(0.55, 0.72), U.take(0.56, 0.66)
    p.put("face", (0.0, -0.3, U.take(0.12, 0.2)), (fw, fh, fd))
    return SimpleNamespace(sw=sw, sh=sh, sd=sd, fw=fw, fh=fh, fd=fd)


def _eyes_and_brows(p: _Parts, f: SimpleNamespace) -> None:
    """Eyes: spheres whose local z is the gaze (iris and pupil are caps around it); brows."""
    U = p.U
    er = U.take(0.075, 0.1)
    ey = U.take(0.0, 0.08)
    ex = U.take(0.22, 0.3)
    ez = p.front(ex, ey) - er * U.take(0.3, 0.6)
    gaze = rot_y(U.take(-12.0, 12.0)) if not p.sym else rot_y(p.zeros())
    Qe = gaze @ rot_x(U.take(-8.0, 8.0))
    p.pair("eye", (ex, ey, ez), (er, er, er), Qe, asym=0.01)
    if not p.sym:  # a gaze is a common direction for both eyes, not mirrored
        p.orient[:, PART["eye_l"]] = Qe
    bw = U.take(0.12, 0.18)
    brow_tilt = rot_z(U.take(-15.0, 12.0))
    bx, by = ex + U.take(-0.02, 0.03), ey + er + U.take(0.04, 0.1)
    p.pair("brow", (bx, by, p.front(bx, by) - 0.03), (bw, U.take(0.022, 0.045), 0.06), brow_tilt,
           asym=0.012)  # fmt: skip
    f.er, f.ey, f.ex, f.ez = er, ey, ex, ez


def _nose_mouth_cheeks(p: _Parts, f: SimpleNamespace) -> None:
    """A tilted nose bridge and a tip (length, width and protrusion vary), lips, chin, cheeks."""
    U, ey = p.U, f.ey
    nose_len = U.take(0.2, 0.3)
    nose_yaw = p.zeros() if p.sym else U.take(-4.0, 4.0)
    Qn = rot_y(nose_yaw) @ rot_x(U.take(-24.0, -12.0))
    nby = ey - nose_len * 0.55
    p.put("nose_bridge", (0.0, nby, p.front(0.0, nby) - 0.05 + nose_len * 0.3),
          (U.take(0.06, 0.1), nose_len * 0.75, 0.12), Qn)  # fmt: skip
    tip_y = ey - nose_len * 1.1
    tip_d = U.take(0.08, 0.11)
    p.put("nose_tip", (0.0, tip_y, p.front(0.0, tip_y) + U.take(0.08, 0.16)),
          (U.take(0.09, 0.15), U.take(0.07, 0.1), tip_d))  # fmt: skip
    lw = U.take(0.15, 0.24)
    my = tip_y - U.take(0.16, 0.24)
    mz = p.front(0.0, my) + U.take(-0.04, -0.01)
    p.put("lip_upper", (0.0, my + 0.04, mz), (lw, U.take(0.03, 0.05), 0.08))
    p.put("lip_lower", (0.0, my - 0.045, mz - 0.01), (lw * 0.92, U.take(0.035, 0.06), 0.08))
    cy = my - U.take(0.18, 0.26)
    cd = U.take(0.14, 0.2)
    p.put("chin", (0.0, cy, p.front(0.0, cy) - cd * 0.6),
          (U.take(0.16, 0.3), U.take(0.13, 0.2), cd))  # fmt: skip
    cw = U.take(0.15, 0.2)
    chx, chy = U.take(0.28, 0.36), tip_y + U.take(-0.02, 0.06)
    p.pair("cheek", (chx, chy, p.front(chx, chy) - cw * 0.92), (cw, cw * U.take(0.8, 1.0), cw),
           asym=0.015)  # fmt: skip


def _ears_and_body(p: _Parts, f: SimpleNamespace) -> None:
    U = p.U
    ea = U.take(0.17, 0.26)
    p.pair("ear", (f.sw * 0.97, U.take(-0.1, 0.02), U.take(-0.12, 0.0)),
           (U.take(0.05, 0.08), ea, ea * 0.62), rot_y(U.take(-25.0, -10.0)), asym=0.02)  # fmt: skip
    p.put("neck", (0.0, -0.95, U.take(-0.22, -0.1)),
          (U.take(0.32, 0.42), 0.62, U.take(0.34, 0.42)))  # fmt: skip
    p.put("torso", (0.0, -1.72, -0.2), (U.take(1.05, 1.35), U.take(0.45, 0.6), U.take(0.5, 0.62)))
    p.active[:, PART["torso"]] = U.prob(0.75)


def _glasses(p: _Parts, f: SimpleNamespace, opts: ProceduralHead) -> dict[str, Tensor]:
    """Bridge and temples (opaque parts) and two transparent lenses with a rim."""
    U, B, dt = p.U, p.B, p.dt
    ex, ey = f.ex, f.ey
    glasses = U.prob(opts.glasses_prob)
    lens_z = f.ez + f.er + U.take(0.04, 0.08)
    lens_w, lens_h = U.take(0.11, 0.15), U.take(0.08, 0.12)
    p.put("glasses_bridge", (0.0, ey + 0.01, lens_z),
          ((ex - lens_w + 0.02).clamp_min(0.02), 0.014, 0.014))  # fmt: skip
    # temples reach from the outer lens edge back to the ears
    x0, x1 = ex + lens_w, f.sw * 0.97
    z0, z1 = lens_z, torch.full_like(lens_z, -0.05)
    length = torch.hypot(x1 - x0, z1 - z0)
    Qt = rot_y(torch.rad2deg(torch.atan2(x1 - x0, z1 - z0)))
    p.put("temple_r", ((x0 + x1) / 2, ey + 0.01, (z0 + z1) / 2), (0.012, 0.012, length / 2), Qt)
    p.centre[:, PART["temple_l"]] = p.centre[:, PART["temple_r"]] * _F.to(dt)
    p.axes[:, PART["temple_l"]] = p.axes[:, PART["temple_r"]]
    p.orient[:, PART["temple_l"]] = hflip_rotation(Qt)
    for n in ("glasses_bridge", "temple_r", "temple_l"):
        p.active[:, PART[n]] = glasses
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
    f.frame_col = frame_col
    return dict(lens_centre=lens_centre, lens_axes=lens_axes, lens_orient=lens_orient,
                lens_tint=lens_tint, lens_alpha=lens_alpha, lens_rim=lens_rim,
                glasses=glasses)  # fmt: skip


def _unit(x: Tensor) -> Tensor:
    return x / x.norm(dim=-1, keepdim=True)


def _hair(p: _Parts, f: SimpleNamespace, opts: ProceduralHead) -> Tensor:
    """Cap over the skull cut by a plane (coverage), long hair behind, bun, beard; returns the
    clipping planes ``(B, 3, 4)`` of :data:`CLIPPED`."""
    U, B, dt = p.U, p.B, p.dt
    hair_cov = U.take(0.0, 1.0)
    bald = hair_cov < opts.bald_prob
    cap_scale = U.take(1.04, 1.12)
    p.put("hair_cap", (0.0, 0.0, 0.0), (f.sw * cap_scale, f.sh * cap_scale, f.sd * cap_scale))
    p.centre[:, PART["hair_cap"]] = p.centre[:, PART["skull"]] + torch.stack(
        [p.zeros(), U.take(0.0, 0.04), U.take(-0.04, 0.0)], -1
    )
    p.active[:, PART["hair_cap"]] = ~bald
    tilt = torch.deg2rad(U.take(20.0, 40.0))
    part_x = p.zeros() if p.sym else U.take(-0.25, 0.25)
    n_cap = _unit(torch.stack([part_x, torch.cos(tilt), -torch.sin(tilt)], -1))
    h_cap = U.take(-0.15, 0.35)
    long_hair = U.prob(0.35) & ~bald
    p.put("hair_long", (0.0, U.take(-0.55, -0.3), U.take(-0.4, -0.28)),
          (f.sw * U.take(1.05, 1.25), U.take(0.8, 1.1), U.take(0.5, 0.65)))  # fmt: skip
    p.active[:, PART["hair_long"]] = long_hair
    n_long = torch.tensor([0.0, 0.0, -1.0], dtype=dt).expand(B, 3)
    h_long = U.take(-0.2, 0.2)
    p.put("bun", (0.0, U.take(0.3, 0.6), -0.95), (U.take(0.2, 0.3),) * 3)
    p.active[:, PART["bun"]] = U.prob(0.12) & ~bald
    beard = U.prob(opts.beard_prob)
    p.put("beard", (0.0, 0.0, 0.0), (f.fw * 1.07, f.fh * 1.07, f.fd * 1.07))
    p.centre[:, PART["beard"]] = p.centre[:, PART["face"]] + torch.tensor([0.0, -0.02, 0.0],
                                                                          dtype=dt)  # fmt: skip
    p.active[:, PART["beard"]] = beard
    n_beard = _unit(torch.stack([p.zeros(), -torch.ones(B, dtype=dt), U.take(0.0, 0.5)], -1))
    h_beard = U.take(0.15, 0.5)
    return torch.stack(
        [
            torch.cat([n_cap, h_cap[:, None]], -1),
            torch.cat([n_long, h_long[:, None]], -1),
            torch.cat([n_beard, h_beard[:, None]], -1),
        ],
        1,
    )


def _colours(p: _Parts, f: SimpleNamespace) -> dict[str, Tensor]:
    """Albedo of every part (skin, eyes, hair, lips, frame, clothes), iris and hair texture."""
    U, B, dt = p.U, p.B, p.dt
    skin = palette(SKIN_RAMP, U.take()) * torch.stack(
        [U.take(0.95, 1.05), U.take(0.93, 1.05), U.take(0.9, 1.05)], -1
    )
    skin = skin.clamp(0, 1)
    hair = choice(HAIR_COLOURS, U.take(), U.take(0.8, 1.15))
    cloth = torch.stack([U.take(0.05, 0.95) for _ in range(3)], -1)
    lip = (skin * torch.stack([U.take(0.8, 1.0), U.take(0.45, 0.65), U.take(0.5, 0.7)], -1))
    for k in range(len(PARTS)):
        m = _MATERIALS[k]
        col = {SKIN: skin, EYE: torch.ones(B, 3, dtype=dt) * 0.92, HAIR: hair, LIP: lip,
               FRAME: f.frame_col, CLOTH: cloth}[m]  # fmt: skip
        p.albedo[:, k] = col
    # brows are usually a little darker than the hair
    p.albedo[:, PART["brow_r"]] = p.albedo[:, PART["brow_l"]] = hair * U.take(0.55, 0.9)[:, None]
    f.skin, f.hair, f.cloth = skin, hair, cloth
    return dict(
        iris=choice(IRIS_COLOURS, U.take(), U.take(0.85, 1.15)),
        iris_cos=torch.cos(torch.deg2rad(U.take(32.0, 42.0))),
        pupil_cos=torch.cos(torch.deg2rad(U.take(12.0, 18.0))),
        hair_freq=U.take(25.0, 60.0),
        hair_phase=p.zeros() if p.sym else U.take(0.0, 2 * math.pi),
        hair_amp=U.take(0.05, 0.25),
    )


def _camera(U: Uniforms, opts: ProceduralHead) -> dict[str, Tensor]:
    """Field of view, distance from the framing, translation."""
    fov = U.take(*opts.fov_range)
    framing = U.take(0.5, 0.72)  # fraction of the half image spanned by a 1.15-unit head radius
    tan_half = torch.tan(torch.deg2rad(fov) / 2)
    distance = 1.15 / (framing * tan_half)
    shift = torch.stack([U.take(-1, 1), U.take(-1, 1)], -1) * opts.translation
    shift = shift * (distance * tan_half)[:, None]  # a fraction of the half-image at the head
    return dict(fov=fov, distance=distance, shift=shift)


def _light(p: _Parts, opts: ProceduralHead) -> dict[str, Tensor]:
    """Light direction (camera coordinates), ambient and diffuse weights."""
    U = p.U
    if opts.light == "camera":
        light = torch.tensor([0.0, 0.0, 1.0], dtype=p.dt).expand(p.B, 3).clone()
        for _ in range(3):
            U.take()
    else:
        light = _unit(torch.stack([U.take(-1.0, 1.0), U.take(-0.4, 1.0), U.take(0.25, 1.2)], -1))
    return dict(light=light, ambient=U.take(0.2, 0.5), diffuse=U.take(0.5, 0.95))


def _background(p: _Parts, opts: ProceduralHead) -> dict[str, Tensor]:
    """Two colours, a gradient, a noise texture, clutter shapes and a 2D occluder."""
    U, dt = p.U, p.dt
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
    clutter = torch.stack([shape2d(U, 0.2, 0.9, 0.05, 0.35) for _ in range(N_CLUTTER)], 1)
    n_clutter = (U.take() * (N_CLUTTER + 1)).floor()
    clutter[..., 0] = (torch.arange(N_CLUTTER, dtype=dt)[None] < n_clutter[:, None]).to(dt)
    if not opts.clutter or plain:
        clutter[..., 0] = 0.0
    occluder = shape2d(U, 0.0, 0.45, 0.08, 0.3)
    occluder[:, 0] = U.prob(opts.occluder_prob).to(dt)
    return dict(bg_a=bg_a, bg_b=bg_b, bg_dir=bg_dir, bg_grad=bg_grad, bg_tex=bg_tex,
                clutter=clutter, occluder=occluder, kind=kind)  # fmt: skip


def _studio(p: _Parts, f: SimpleNamespace, light: dict[str, Tensor],
            bg: dict[str, Tensor]) -> None:  # fmt: skip
    """``style="studio"``: same shapes and camera; another palette (muted skin, natural hair,
    grey clothes), a key light from the upper left with a strong fill, a smooth portrait
    backdrop. Draws nothing: a function of the default identity."""
    B, dt = p.B, p.dt
    t_skin = (f.skin.mean(-1) / 0.97).clamp(0, 0.999)
    studio_skin = palette(STUDIO_SKIN_RAMP, t_skin)
    studio_hair = choice(STUDIO_HAIR_COLOURS, (f.hair.sum(-1) * 7.0) % 1.0,
                         torch.ones(B, dtype=dt))  # fmt: skip
    grey = (f.cloth.mean(-1, keepdim=True) * 0.5).expand(B, 3)
    by_material = {SKIN: studio_skin, HAIR: studio_hair, CLOTH: grey,
                   LIP: studio_skin * torch.tensor([0.85, 0.55, 0.55], dtype=dt)}  # fmt: skip
    for k in range(len(PARTS)):
        m = _MATERIALS[k]
        if m in by_material:
            p.albedo[:, k] = by_material[m]
    p.albedo[:, PART["brow_r"]] = p.albedo[:, PART["brow_l"]] = studio_hair * 0.7
    bg_a = bg["bg_a"]
    light["light"] = _unit(torch.stack([-0.5 + 0.2 * (bg_a[:, 0] - 0.5),
                                        0.55 + 0.2 * (bg_a[:, 1] - 0.5),
                                        torch.ones(B, dtype=dt)], -1))  # fmt: skip
    light["ambient"] = 0.45 + 0.1 * (light["ambient"] - 0.2) / 0.3
    light["diffuse"] = 0.55 + 0.1 * (light["diffuse"] - 0.5) / 0.45
    bd = torch.tensor(STUDIO_BACKDROPS, dtype=dt)
    which = (bg["kind"] * len(STUDIO_BACKDROPS)).long().clamp(0, len(STUDIO_BACKDROPS) - 1)
    bg["bg_a"], bg["bg_b"] = bd[which], bd[which] * 0.6
    bg["bg_dir"] = torch.tensor([0.0, 1.0], dtype=dt).expand(B, 2).clone()
    bg["bg_grad"] = torch.ones(B, dtype=dt) * 0.8
    bg["bg_tex"] = torch.zeros(B, dtype=dt)
    bg["clutter"][..., 0] = 0.0


def sample_scene(u: Tensor, noise: Tensor, opts: ProceduralHead) -> Scene:
    """Map per-identity uniforms ``u`` ``(B, N)`` and noise to scene parameters.

    ``opts`` is the generator (its options: symmetric, probabilities, ranges, style).
    """
    p = _Parts(Uniforms(u), u.shape[0], u.dtype, opts.symmetric)
    f = _skull_and_face(p)
    _eyes_and_brows(p, f)
    _nose_mouth_cheeks(p, f)
    _ears_and_body(p, f)
    lenses = _glasses(p, f, opts)
    clip = _hair(p, f, opts)
    textures = _colours(p, f)
    camera = _camera(p.U, opts)
    light = _light(p, opts)
    bg = _background(p, opts)
    if opts.style == "studio":
        _studio(p, f, light, bg)
    bg.pop("kind")
    return Scene(centre=p.centre, axes=p.axes, orient=p.orient, albedo=p.albedo, active=p.active,
                 clip=clip, bg_noise=noise, **lenses, **textures, **camera, **light, **bg)
