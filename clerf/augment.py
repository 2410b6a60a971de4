"""On-device augmentation of whole batches, with rotation labels composed EXACTLY.

Geometric (changes the label, ``docs/conventions.md`` section 3), applied in this order:

1. in-plane rotation by ``angle`` degrees **clockwise on screen** about the image centre:
   ``R -> rotate_inplane(R, angle) = R @ Rz(angle)``;
2. horizontal flip (mirror left-right): ``R -> hflip_rotation(R) = F R F``;
3. vertical flip (mirror top-bottom): ``R -> vflip_rotation(R)``.

Framing (does not change the label): an isotropic scale ``s`` about the centre and a small
translation ``t``. Under the orthographic-ish camera of face crops, scaling and shifting the crop
moves the head in the image but does not turn it, so ``R`` is kept. (With a perspective camera a
shift off-centre changes the viewing ray by ``atan(t * size / f)``, a fraction of a degree for the
small ``translate`` used here; that approximation is the only one in this module.)

All of this is ONE affine warp per image (``kornia.geometry.transform.warp_affine``, bilinear),
with the matrix built here from angles this module samples itself, so the sign is ours and
pinned by tests: kornia's own ``rotate`` turns positive angles *counter*-clockwise on screen,
which is why it is not used with the label rule directly.

Photometric (label-free, independent for every image): brightness and contrast (multiplicative,
torchvision-style), saturation and hue (one linear map per image in YIQ space, see
:func:`chroma_matrix`), grayscale, Gaussian blur (per-image kernels through
``kornia.filters.filter2d_separable``), Gaussian noise. Saturation is torchvision's (a blend with
the luma image); the hue is a rotation of the YIQ chroma plane, close to but not the HSV hue:
kornia's HSV ``adjust_hue`` and ``adjust_saturation`` cost about 150x more on a CPU
(``benchmarks/bench_photometric.py``), a large share of a CPU training step. Every random factor is
drawn here from the caller's ``torch.Generator``: kornia's random augmentations draw from torch's
global generator, so a batch would no longer depend only on (seed, step, rank).

Triplets: anchor and positive get the SAME label-changing transform (rotation, flips: same
composed rotation, so they stay a positive pair); the negative gets its own; the framing (scale,
shift) and the photometric transforms are drawn for every image, so that they cannot become a
shortcut for matching an anchor with its positive. The rotated image's empty corners are another
such cue (they reveal the augmentation angle, shared by anchor and positive): the encoder's
``circle_mask`` hides everything outside a centred disk, which the rotated content always covers
when ``scale >= 1`` and ``translate`` is small (``clerf.models.encoder``).

Images enter as uint8 ``(N, 3, H, W)`` (or float in [0, 1]) on any device and leave as float32
in ``[0, 1]`` at ``output_size``; the encoder normalises them (``clerf.models.encoder``).
Randomness comes only from the ``generator`` argument (a ``torch.Generator`` on the images'
device), so a seeded generator reproduces a batch exactly.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor, nn

from clerf.config import AugmentConfig, section_config
from clerf.geometry import hflip_rotation, inplane_image_matrix, rotate_inplane, vflip_rotation

__all__ = [
    "GeometricParams",
    "PoseAugment",
    "compose_rotation",
    "affine_matrix",
    "warp_images",
    "to_float_images",
    "photometric",
    "chroma_matrix",
]

@dataclass
class GeometricParams:
    """Per-image geometric transform, all ``(N,)`` unless stated.

    Attributes:
        angle: in-plane rotation, degrees, clockwise on screen.
        hflip: bool, mirror left-right after the rotation.
        vflip: bool, mirror top-bottom after the horizontal flip.
        scale: isotropic zoom factor (> 1 enlarges the head).
        translate: ``(N, 2)`` shift (x right, y down) as a fraction of the output size.
    """

    angle: Tensor
    hflip: Tensor
    vflip: Tensor
    scale: Tensor
    translate: Tensor

    @classmethod
    def identity(cls, n: int, device: torch.device | str = "cpu") -> GeometricParams:
        z = torch.zeros(n, device=device)
        f = torch.zeros(n, dtype=torch.bool, device=device)
        out = cls(z, f, f.clone(), torch.ones(n, device=device), torch.zeros(n, 2, device=device))
        out._known_identity = True  # type: ignore[attr-defined]
        return out

    def index(self, idx: Tensor) -> GeometricParams:
        """Select / repeat images: ``idx`` is an index tensor into the batch."""
        return GeometricParams(self.angle[idx], self.hflip[idx], self.vflip[idx],
                               self.scale[idx], self.translate[idx])  # fmt: skip

    def to(self, device: torch.device | str) -> GeometricParams:
        return GeometricParams(*(t.to(device) for t in (
            self.angle, self.hflip, self.vflip, self.scale, self.translate)))

    def is_identity(self) -> bool:
        """Whether every transform is the identity. Known without reading the values back
        (no host sync) for params from :meth:`identity` and from
        :meth:`PoseAugment.sample_geometric` (identity only when its config allows no
        geometric change; a drawn batch is warped even if every draw happened to be 0: the
        warp of the identity moves values by < 1e-5)."""
        known = getattr(self, "_known_identity", None)
        if known is not None:
            return bool(known)
        return bool(
            (self.angle == 0).all() and not self.hflip.any() and not self.vflip.any()
            and (self.scale == 1).all() and (self.translate == 0).all()
        )


def compose_rotation(R: Tensor, params: GeometricParams) -> Tensor:
    """The label of the augmented image: in-plane rotation, then flips (``(N, 3, 3)``)."""
    out = rotate_inplane(R, params.angle.to(R))
    out = torch.where(params.hflip[:, None, None], hflip_rotation(out), out)
    out = torch.where(params.vflip[:, None, None], vflip_rotation(out), out)
    return out


def affine_matrix(params: GeometricParams, size: int) -> Tensor:
    """``(N, 2, 3)`` pixel-coordinate affine (source -> destination) for ``warp_affine``.

    Pixel coordinates: x right, y down, pixel centres at integers (kornia's
    ``align_corners=True``), centre ``c = (size - 1) / 2``. In coordinates centred on ``c`` the
    linear part is ``scale * V @ H @ Rcw(angle)`` with ``Rcw = [[cos, -sin], [sin, cos]]``,
    which, because y points down, turns the image clockwise on screen; ``H = diag(-1, 1)``,
    ``V = diag(1, -1)`` when flipped.
    """
    rot = inplane_image_matrix(params.angle.double())  # Rcw(angle): the in-plane rule's image side
    hx = torch.where(params.hflip, -1.0, 1.0).double()
    vy = torch.where(params.vflip, -1.0, 1.0).double()
    k = params.scale.double()
    # scale * diag(hx, vy) @ Rcw(angle): row i of Rcw times the flip sign of row i
    A = rot * torch.stack([hx, vy], -1)[..., :, None]
    A = A * k[:, None, None]
    ctr = torch.full((rot.shape[0], 2), (size - 1) / 2.0, dtype=torch.float64, device=rot.device)
    t = ctr + params.translate.double() * size - (A @ ctr[..., None])[..., 0]
    return torch.cat([A, t[..., None]], dim=-1).float()


def to_float_images(images: Tensor, size: int | None = None) -> Tensor:
    """uint8 (or float [0, 1]) ``(N, 3, H, W)`` -> float32 [0, 1], resized to ``size`` if given.

    Resizing uses kornia's antialiased resize (a plain bilinear warp would alias).
    """
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"augment: expected images (N, 3, H, W), got {tuple(images.shape)}")
    x = images.float().div_(255.0) if images.dtype == torch.uint8 else images.float()
    if size is not None and tuple(x.shape[-2:]) != (size, size):
        from kornia.geometry.transform import resize

        x = resize(x, (size, size), interpolation="bilinear", antialias=True).clamp_(0.0, 1.0)
    return x


def warp_images(images: Tensor, params: GeometricParams, padding: str = "zeros") -> Tensor:
    """Apply the geometric transform to float images ``(N, 3, S, S)`` (one bilinear warp)."""
    from kornia.geometry.transform import warp_affine

    size = images.shape[-1]
    if images.shape[-2] != size:
        raise ValueError(f"augment: expected square images, got {tuple(images.shape[-2:])}")
    M = affine_matrix(params.to(images.device), size).to(images.dtype)
    return warp_affine(images, M, dsize=(size, size), mode="bilinear", padding_mode=padding,
                       align_corners=True)  # fmt: skip


def _uniform(n: int, lo: float, hi: float, g: torch.Generator | None, device) -> Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=g, device=device)


def _bernoulli(n: int, p: float, g: torch.Generator | None, device) -> Tensor:
    return torch.rand(n, generator=g, device=device) < p


def _gray(x: Tensor) -> Tensor:
    from kornia.color import rgb_to_grayscale

    return rgb_to_grayscale(x)


_YIQ = torch.tensor([[0.299, 0.587, 0.114], [0.595716, -0.274453, -0.321263],
                     [0.211456, -0.522591, 0.311135]], dtype=torch.float64)  # fmt: skip
_YIQ_INV = torch.linalg.inv(_YIQ)


def chroma_matrix(saturation: Tensor, hue: Tensor) -> Tensor:
    """``(N, 3, 3)`` RGB -> RGB maps scaling chroma by ``saturation`` and rotating it by
    ``hue`` radians in YIQ space; luma (``0.299 R + 0.587 G + 0.114 B``) is unchanged."""
    n = saturation.shape[0]
    c, s = torch.cos(hue.double()), torch.sin(hue.double())
    k = saturation.double()
    M = torch.zeros(n, 3, 3, dtype=torch.float64, device=saturation.device)
    M[:, 0, 0] = 1.0
    M[:, 1, 1], M[:, 1, 2], M[:, 2, 1], M[:, 2, 2] = k * c, -k * s, k * s, k * c
    return (_YIQ_INV.to(M.device) @ M @ _YIQ.to(M.device)).float()


def photometric(x: Tensor, cfg: Mapping[str, Any], generator: torch.Generator | None) -> Tensor:
    """Independent colour jitter, grayscale, blur and noise for float images in [0, 1]."""
    from kornia.filters import filter2d_separable

    n, dev = x.shape[0], x.device
    if cfg["brightness"] > 0:
        b = _uniform(n, 1 - cfg["brightness"], 1 + cfg["brightness"], generator, dev)
        x = (x * b[:, None, None, None]).clamp_(0, 1)
    if cfg["contrast"] > 0:
        c = _uniform(n, 1 - cfg["contrast"], 1 + cfg["contrast"], generator, dev)
        mean = _gray(x).mean(dim=(1, 2, 3), keepdim=True)
        x = (mean + c[:, None, None, None] * (x - mean)).clamp_(0, 1)
    if cfg["saturation"] > 0 or cfg["hue"] > 0:
        # Saturation and hue as one per-image linear map in YIQ space: luma Y is kept, the
        # chroma plane (I, Q) is scaled by s (= blending with the gray image, as torchvision
        # does) and rotated by the hue angle (a linear stand-in for an HSV hue shift that costs
        # one 3 x 3 matrix per image instead of two colour-space conversions).
        s = (_uniform(n, 1 - cfg["saturation"], 1 + cfg["saturation"], generator, dev)
             if cfg["saturation"] > 0 else torch.ones(n, device=dev))  # fmt: skip
        h = (_uniform(n, -cfg["hue"], cfg["hue"], generator, dev) * 2 * math.pi
             if cfg["hue"] > 0 else torch.zeros(n, device=dev))  # fmt: skip
        x = (torch.einsum("nij,njhw->nihw", chroma_matrix(s, h).to(x.dtype), x)).clamp_(0, 1)
    if cfg["p_grayscale"] > 0:
        m = _bernoulli(n, cfg["p_grayscale"], generator, dev)
        x = torch.where(m[:, None, None, None], _gray(x).expand_as(x), x)
    if cfg["p_blur"] > 0:
        m = _bernoulli(n, cfg["p_blur"], generator, dev)
        lo, hi = (float(v) for v in cfg["blur_sigma"])
        sig = _uniform(n, lo, hi, generator, dev)
        # The whole batch is blurred and the chosen images kept: no host read of which were
        # chosen (a sync per step on a GPU), at the cost of blurring the others too.
        # Per-image Gaussian kernels built here and applied with kornia's separable filter:
        # equal to kornia's gaussian_blur2d, whose sigma check reads sigma back to the host.
        k = 2 * math.ceil(3 * hi) + 1
        t = torch.arange(-(k // 2), k // 2 + 1, device=x.device, dtype=x.dtype)
        w = torch.exp(-(t[None] ** 2) / (2 * sig.to(x.dtype)[:, None] ** 2))
        w = w / w.sum(dim=1, keepdim=True)
        blurred = filter2d_separable(x, w, w, border_type="reflect")
        x = torch.where(m[:, None, None, None], blurred, x)
    if cfg["p_noise"] > 0 and cfg["noise_std"] > 0:
        m = _bernoulli(n, cfg["p_noise"], generator, dev)
        noise = torch.randn(x.shape, generator=generator, device=dev)
        noisy = (x + noise * cfg["noise_std"]).clamp_(0, 1)
        x = torch.where(m[:, None, None, None], noisy, x)
    return x


class PoseAugment(nn.Module):
    """Geometric + photometric augmentation with exact labels; see the module docstring.

    Args:
        cfg: an ``augment`` config section, a :class:`clerf.config.AugmentConfig` or a dict;
            missing keys take the dataclass's defaults; a bad key or value is a ``ConfigError``
            naming ``section.key``.
        output_size: side of the square output images (the encoder's ``input_size``).

    Example:
        >>> aug = PoseAugment({"p_hflip": 1.0}, output_size=32)
        >>> g = torch.Generator().manual_seed(0)
        >>> imgs = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
        >>> x, R = aug(imgs, torch.eye(3).expand(4, 3, 3), generator=g)
        >>> tuple(x.shape), x.dtype, tuple(R.shape)
        ((4, 3, 32, 32), torch.float32, (4, 3, 3))
    """

    def __init__(self, cfg: Mapping[str, Any] | AugmentConfig | None = None,
                 output_size: int = 64, section: str = "augment") -> None:  # fmt: skip
        super().__init__()
        #: the checked section as a plain dict (:func:`photometric` reads it)
        self.cfg: dict[str, Any] = asdict(section_config(AugmentConfig, cfg, section))
        self.output_size = int(output_size)

    # ----------------------------------------------------------------------- sampling

    def sample_geometric(
        self, n: int, generator: torch.Generator | None = None, device: Any = None
    ) -> GeometricParams:
        """Draw ``n`` geometric transforms from the config (identity when disabled)."""
        c = self.cfg
        dev = generator.device if generator is not None else (device or "cpu")
        if not c["enabled"] or self.geometric_noop:
            return GeometricParams.identity(n, dev)
        lim = float(c["inplane_deg"])
        angle = _uniform(n, -lim, lim, generator, dev)
        angle = torch.where(_bernoulli(n, float(c["p_inplane"]), generator, dev), angle, 0.0)
        hflip = _bernoulli(n, float(c["p_hflip"]), generator, dev)
        vflip = _bernoulli(n, float(c["p_vflip"]), generator, dev)
        lo, hi = (float(v) for v in c["scale"])
        scale = _uniform(n, lo, hi, generator, dev)
        t = float(c["translate"])
        translate = (torch.rand(n, 2, generator=generator, device=dev) * 2 - 1) * t
        out = GeometricParams(angle, hflip, vflip, scale, translate)
        out._known_identity = False  # type: ignore[attr-defined]
        return out

    @property
    def geometric_noop(self) -> bool:
        """The config allows no geometric change (no turn, flip, zoom or shift)."""
        c = self.cfg
        return ((float(c["inplane_deg"]) == 0 or float(c["p_inplane"]) == 0)
                and float(c["p_hflip"]) == 0 and float(c["p_vflip"]) == 0
                and all(float(v) == 1 for v in c["scale"]) and float(c["translate"]) == 0)

    # ----------------------------------------------------------------------- application

    def forward(
        self,
        images: Tensor,
        rotations: Tensor,
        generator: torch.Generator | None = None,
        params: GeometricParams | None = None,
        photometric_aug: bool = True,
    ) -> tuple[Tensor, Tensor]:
        """Augment ``images (N, 3, H, W)`` and their labels ``rotations (N, 3, 3)``.

        Returns float32 images in [0, 1] ``(N, 3, S, S)`` and composed rotations ``(N, 3, 3)``.
        ``params`` overrides the sampled geometric transform (tests, evaluation).
        """
        n = images.shape[0]
        if rotations.shape != (n, 3, 3):
            raise ValueError(f"augment: rotations must be ({n}, 3, 3), got "
                             f"{tuple(rotations.shape)}")  # fmt: skip
        x = to_float_images(images, self.output_size)
        if params is None:
            params = self.sample_geometric(n, generator, device=x.device)
        if not params.is_identity():
            x = warp_images(x, params, padding=self.cfg["padding"])
            rotations = compose_rotation(rotations, params.to(rotations.device))
        if self.cfg["enabled"] and photometric_aug:
            x = photometric(x, self.cfg, generator)
        return x, rotations

    def triplets(
        self, images: Tensor, rotations: Tensor, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor]:
        """Augment triplets: ``images (B, 3, 3, H, W)`` [anchor, positive, negative] and
        ``rotations (B, 3, 3, 3)``; anchor and positive share their geometric transform.

        Returns ``(B, 3, 3, S, S)`` float images and ``(B, 3, 3, 3)`` composed rotations.
        """
        if images.ndim != 5 or images.shape[1] != 3:
            raise ValueError(f"augment: expected triplet images (B, 3, 3, H, W), got "
                             f"{tuple(images.shape)}")  # fmt: skip
        b = images.shape[0]
        dev = images.device
        # 2B label-changing transforms: one per (anchor, positive) pair, one per negative.
        drawn = self.sample_geometric(2 * b, generator, device=dev)
        ar = torch.arange(b, device=drawn.angle.device)
        idx = torch.stack([ar, ar, ar + b], dim=1).reshape(-1)  # (3B,) in (b, slot) order
        params = drawn.index(idx)
        # The framing (scale, shift) does not change the label: drawn for every image, so that
        # head size and position cannot tell an anchor's positive from its negative.
        framing = self.sample_geometric(3 * b, generator, device=dev)
        params.scale, params.translate = framing.scale, framing.translate
        params._known_identity = getattr(drawn, "_known_identity", None)  # type: ignore[attr-defined]
        x, R = self.forward(images.reshape(3 * b, *images.shape[2:]),
                            rotations.reshape(3 * b, 3, 3), generator=generator,
                            params=params)  # fmt: skip
        return x.reshape(b, 3, *x.shape[1:]), R.reshape(b, 3, 3, 3)
