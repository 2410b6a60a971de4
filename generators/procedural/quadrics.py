"""Ray-quadric core of the procedural head: per (image, ellipsoid) polynomial coefficients in
float64, then a handful of separable float32 operations per pixel (see the package docstring)."""

from __future__ import annotations

import math

import torch
from torch import Tensor


def quadric_coeffs(
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


def poly_coeffs(q0: Tensor, E: Tensor, active: Tensor) -> Tensor:
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


def eval_quad(c: Tensor, u: Tensor, v: Tensor) -> Tensor:
    """``c[...,0] u^2 + c[...,1] v^2 + c[...,2] uv + c[...,3] u + c[...,4] v + c[...,5]``.

    ``c`` is ``(B, K, 6)``, ``u`` ``(W,)``, ``v`` ``(H,)``; result ``(B, K, H, W)`` built from a
    row term, a column term and one fused multiply-add for the ``uv`` term.
    """
    row = (c[..., 0:1] * u + c[..., 3:4]) * u + c[..., 5:6]  # (B, K, W)
    col = (c[..., 1:2] * v + c[..., 4:5]) * v  # (B, K, H)
    uvc = (c[..., 2:3] * v).unsqueeze(-1)  # (B, K, H, 1)
    out = row.unsqueeze(-2) + col.unsqueeze(-1)
    return out.addcmul_(uvc, u.view(1, 1, 1, -1))


def eval_lin(c: Tensor, u: Tensor, v: Tensor) -> Tensor:
    """``c[...,0] u + c[...,1] v + c[...,2]``, ``(B, K, H, W)``."""
    return (c[..., 0:1] * u + c[..., 2:3]).unsqueeze(-2) + (c[..., 1:2] * v).unsqueeze(-1)


def intersect(coef: Tensor, u: Tensor, v: Tensor) -> Tensor:
    """Depth of the front hit per pixel and ellipsoid, inf where missed: ``(B, K, H, W)``."""
    disc = eval_quad(coef[..., 9:15], u, v)
    a = eval_quad(coef[..., 0:6], u, v)
    b = eval_lin(coef[..., 6:9], u, v)
    hit = disc > 0
    t = b.add_(disc.clamp_min_(0).sqrt_()).div_(a).neg_()
    return t.masked_fill_(~hit, math.inf)


# --------------------------------------------------------------------------- the generator


def clip_coeffs(clip: Tensor, q0: Tensor, E: Tensor) -> Tensor:
    """Plane test coefficients ``(B, C, 4)``: side = ``c0 + t (c1 u + c2 v + c3)``."""
    n, h = clip[..., :3], clip[..., 3]
    c0 = (n * q0).sum(-1) - h
    lin = (n.unsqueeze(-1) * E).sum(-2)  # n . e_j for j = 0, 1, 2
    return torch.cat([c0.unsqueeze(-1), lin], -1)
