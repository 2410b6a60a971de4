"""The procedural head generator: options, rendering and anchors (see the package docstring)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from clerf.geometry import check_rotation
from generators.base import PoseGenerator, Rendered, check_resolution, register_generator
from generators.procedural.identity import Scene, identity_draws, sample_scene
from generators.procedural.parts import CLIP_IDX, PART, PARTS, STYLES
from generators.procedural.quadrics import (
    clip_coeffs,
    eval_lin,
    intersect,
    poly_coeffs,
    quadric_coeffs,
)
from generators.procedural.shading import background, lenses, occlude, shade


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

    def scene(self, identities: Tensor) -> Scene:
        """Scene parameters of ``identities`` (CPU, float64)."""
        u, noise = identity_draws(self.seed, identities)
        return sample_scene(u, noise, self)

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
        q0, E, G, _ = quadric_coeffs(sc.centre, sc.axes, sc.orient, R64, cam, tan_half)
        coef = poly_coeffs(q0, E, sc.active)
        clip = clip_coeffs(sc.clip, q0[:, CLIP_IDX], E[:, CLIP_IDX])

        f32 = torch.float32
        grid = (torch.arange(hi, device=dev, dtype=f32) + 0.5) / hi * 2 - 1
        coef_d, clip_d = coef.to(dev, f32), clip.to(dev, f32)
        K = coef.shape[1]
        per = max(1, self.chunk_elems // (K * hi * hi))
        depth = torch.empty(B, hi, hi, device=dev, dtype=f32)
        ids = torch.empty(B, hi, hi, device=dev, dtype=torch.int64)
        for s in range(0, B, per):
            sl = slice(s, min(B, s + per))
            t = intersect(coef_d[sl], grid, grid)
            # clipped parts keep their front hit only on the kept side of their plane
            c0 = CLIP_IDX[0]
            tc = t[:, c0 : c0 + len(CLIP_IDX)]
            side = eval_lin(clip_d[sl][..., 1:4], grid, grid).mul_(tc).add_(
                clip_d[sl][..., 0, None, None]
            )
            tc.masked_fill_(side < 0, math.inf)
            depth[sl], ids[sl] = t.min(dim=1)
        hit = torch.isfinite(depth)
        ids = torch.where(hit, ids, torch.full_like(ids, -1))

        img = shade(sc, R64, cam, tan_half, depth, ids, grid, dev)
        img, rim_ids = lenses(sc, R64, cam, tan_half, depth, img, grid, dev)
        img = torch.where(hit.unsqueeze(1), img, background(sc, grid, dev))
        img = occlude(sc, img, grid, dev)
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
        k = PART["nose_tip"]
        out["nose_front"] = sc.centre[:, k] + sc.orient[:, k, :, 2] * sc.axes[:, k, 2:3]
        return out

