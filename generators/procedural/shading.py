"""Shading of the procedural head's hits, its transparent lenses, background and occluders."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from generators.procedural.identity import Scene
from generators.procedural.parts import (
    EYE,
    HAIR,
    LENS_ID_OFFSET,
    MATERIAL,
    PART,
    SHININESS,
    SPECULAR,
)
from generators.procedural.quadrics import intersect, poly_coeffs, quadric_coeffs


def shade(sc: Scene, R64: Tensor, cam: Tensor, tan_half: Tensor, depth: Tensor, ids: Tensor,
          grid: Tensor, dev: torch.device) -> Tensor:
    """Lambert + ambient + Blinn-Phong shading of the opaque hit, ``(B, 3, H, W)``.

    The camera-frame normal of an ellipsoid at camera point ``p`` is ``S p + s`` with
    ``S = R^T Q D^-2 Q^T R`` and ``s = -R^T Q D^-2 Q^T (R c + m)``; so per pixel only 9
    geometric numbers of the visible part are gathered (plus colour and material), as
    contiguous rows ``(F, B, H*W)`` with one ``index_select``. Per-image values broadcast as
    ``(B, 1)``. Textures use the normal in head coordinates: iris and pupil are caps around
    the eyeball's gaze axis, hair strands vary along the head's x.
    """
    f32 = torch.float32
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
    mat = MATERIAL.double()
    feats = torch.cat(
        [sym6, s_vec, sc.orient[..., :, 2], sc.albedo,
         torch.stack([mat, SPECULAR.double()[MATERIAL], SHININESS.double()[MATERIAL]], -1)
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

def lenses(sc: Scene, R64: Tensor, cam: Tensor, tan_half: Tensor, depth: Tensor, img: Tensor,
           grid: Tensor, dev: torch.device) -> tuple[Tensor, Tensor]:
    """Composite the tinted transparent lenses and their opaque rims over ``img``."""
    f32 = torch.float32
    B, H, W = depth.shape
    rim_ids = torch.full((B, H, W), -1, dtype=torch.int64, device=dev)
    if not bool(sc.glasses.any()):
        return img, rim_ids
    active = sc.glasses.unsqueeze(1).expand(B, 2)
    q0, E, G, _ = quadric_coeffs(sc.lens_centre, sc.lens_axes, sc.lens_orient, R64, cam,
                                  tan_half)  # fmt: skip
    coef = poly_coeffs(q0, E, active).to(dev, f32)
    t = intersect(coef, grid, grid)  # (B, 2, H, W)
    q0d, Ed = q0.to(dev, f32), E.to(dev, f32)
    tint = sc.lens_tint.to(dev, f32).view(B, 3, 1, 1)
    alpha = sc.lens_alpha.to(dev, f32).view(B, 1, 1, 1)
    rim_r = sc.lens_rim.to(dev, f32).view(B, 1, 1)
    frame = sc.albedo[:, PART["glasses_bridge"]].to(dev, f32).view(B, 3, 1, 1)
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

def background(sc: Scene, grid: Tensor, dev: torch.device) -> Tensor:
    """Background image ``(B, 3, H, W)``: colour, gradient, noise texture, clutter."""
    f32 = torch.float32
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
    return draw_shapes(bg, sc.clutter.to(dev, f32), grid)

def occlude(sc: Scene, img: Tensor, grid: Tensor, dev: torch.device) -> Tensor:
    occ = sc.occluder.to(dev, torch.float32)
    if not bool((occ[:, 0] > 0).any()):
        return img
    return draw_shapes(img, occ.unsqueeze(1), grid)


def draw_shapes(img: Tensor, shapes: Tensor, grid: Tensor) -> Tensor:
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

