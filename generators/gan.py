"""Adapters that drive a user's own EG3D or PanoHead network (registered as ``eg3d``, ``panohead``).

Neither project's code nor weights are part of clerf (EG3D: NVIDIA Source Code License; PanoHead:
CC BY-NC-SA 4.0; both non-commercial). The user points clerf at their own checkout (the folder
that holds ``dnnlib/`` and ``torch_utils/``: ``<eg3d repo>/eg3d`` or the PanoHead repository root)
and their own network pickle. Unpickling runs code from the file, so loading is refused unless
``trust_pickle=True``.

Rendering a target rotation ``R`` (``docs/conventions.md`` sections 3 and 4):

1. ``split_camera_inplane(R) -> (R_lookat, phi)``: a roll-free look-at camera with the same
   camera direction, and the in-plane angle (clockwise on screen) that remains;
2. reachable? EG3D: the camera within ``max_angle`` of the frontal direction; PanoHead: any yaw,
   elevation within ``max_elevation``. Otherwise an error, or (``unreachable="resample"``) a new
   camera direction drawn deterministically inside the usable range;
3. ``R_lookat`` -> 25-number camera (:mod:`generators.camera`); the mapping network is conditioned
   on the frontal camera (``conditioning="frontal"``, EG3D's default) or on the rendering camera;
4. ``G.mapping(z, c_cond, truncation_psi, truncation_cutoff)`` then ``G.synthesis(ws, c)['image']``
   in [-1, 1]; with ``rng="per_sample"`` (default) in batches of ``batch_size`` whose random
   draws (EG3D's renderer draws depth jitter and importance samples from the global generator)
   are split per sample, each from a generator seeded by :func:`render_seed`
   (:mod:`generators.batched_rng`), so a sample's image is what it is alone; one sample at a
   time under the seeded global generator where a draw cannot be split;
5. the exact in-plane rotation by ``phi`` clockwise (kornia ``rotate`` by ``-phi``), area resize to
   the requested resolution, uint8;
6. the label is computed from the camera actually passed to the network
   (:func:`~generators.camera.rotation_from_camera`), then composed with ``phi``.
"""

from __future__ import annotations

import hashlib
import logging
import math
import pickle
import struct
import sys
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from clerf.augment import GeometricParams, warp_images
from clerf.geometry import (
    band_directions,
    camera_direction,
    cap_directions,
    check_rotation,
    in_band,
    in_cap,
    lookat_rotation,
    rotate_inplane,
    split_camera_inplane,
)
from generators.base import (
    PoseGenerator,
    Rendered,
    check_resolution,
    identity_seed,
    register_generator,
)
from generators.camera import (
    EG3D_FFHQ,
    PANOHEAD,
    CameraPreset,
    camera_from_rotation,
    rotation_from_camera,
)

log = logging.getLogger("clerf.generators")

__all__ = ["GANAdapter", "EG3DGenerator", "PanoHeadGenerator", "load_network", "render_seed"]

_PADDING = ("zeros", "border", "reflection")
#: ``per_sample``: each sample's random draws come from its own generator seeded by
#: :func:`render_seed` (batched where they can be split; repeatable, independent of
#: batching); ``global``: batches of
#: ``batch_size`` draw from torch's global generator as EG3D's own scripts do (not repeatable).
RNG_MODES = ("per_sample", "global")


def render_seed(seed: int, identity: int, target: Tensor) -> int:
    """The torch seed of one render: a hash of ``(seed, identity, target rotation)``.

    The rotation is rounded to 1e-6 first, so float32 and float64 copies of a target agree.
    """
    t = torch.round(target.detach().to("cpu", torch.float64) * 1e6).to(torch.int64)
    h = hashlib.blake2b(digest_size=8)
    h.update(struct.pack("<qq", int(seed), int(identity)))
    h.update(t.contiguous().numpy().tobytes())
    return int.from_bytes(h.digest(), "little") & ((1 << 63) - 1)


def _forked_devices(device: torch.device | str) -> list[int]:
    """CUDA devices whose generators :func:`torch.random.fork_rng` must save and restore: the
    render device only (forking every visible GPU would open a CUDA context on each of them
    from every rank)."""
    dev = torch.device(device)
    if dev.type != "cuda" or not torch.cuda.is_available():
        return []
    return [dev.index if dev.index is not None else torch.cuda.current_device()]


def _seed_render_rng(seed: int, cuda_devices: list[int]) -> None:
    """Seed the CPU generator and those of ``cuda_devices`` (the render device) only:
    ``torch.manual_seed`` would reseed every visible GPU, outside what ``fork_rng`` restores."""
    torch.random.default_generator.manual_seed(seed)
    for d in cuda_devices:
        with torch.cuda.device(d):
            torch.cuda.manual_seed(seed)


def load_network(checkout: str | Path | None, network: str | Path | None, trust_pickle: bool,
                 who: str = "gan") -> Any:  # fmt: skip
    """Load ``G_ema`` from a user's network pickle, with the user's checkout on ``sys.path``.

    Uses the checkout's ``legacy.load_network_pkl`` when it has ``legacy.py`` (EG3D, PanoHead),
    else plain ``pickle``; a pickle that holds only ``G_ema`` (EG3D's loader then fails with
    ``KeyError: 'G'``) is read with plain ``pickle``. Raises ``ValueError`` with a one-line
    reason: not trusted, no checkout or pickle given, folder or file missing, or the object
    lacks the generator interface.
    """
    if network is None or str(network) == "":
        raise ValueError(f"{who}: no network pickle given (set params.network: path/to/G.pkl)")
    if not trust_pickle:
        from clerf.errors import UntrustedPickleError

        raise UntrustedPickleError(
            f"{who}: refusing to load '{network}': unpickling a network runs arbitrary code "
            f"stored in the file; set trust_pickle: true (or --trust-pickle) only for a file you "
            f"trust"
        )
    if checkout is None or str(checkout) == "":
        raise ValueError(
            f"{who}: no checkout given (set params.checkout to the folder with dnnlib/ and "
            f"torch_utils/ of your own {who} code)"
        )
    ck = Path(checkout).expanduser()
    if not ck.is_dir():
        raise ValueError(f"{who}: checkout folder not found: {ck}")
    pkl = Path(network).expanduser()
    if not pkl.is_file():
        raise ValueError(f"{who}: network pickle not found: {pkl}")
    # The pickle refers to modules of the checkout; they must stay importable afterwards too.
    if str(ck.resolve()) not in sys.path:
        sys.path.insert(0, str(ck.resolve()))
    try:
        data = None
        if (ck / "legacy.py").is_file():
            import legacy  # type: ignore[import-not-found]  # the user's checkout

            try:
                with open(pkl, "rb") as f:
                    data = legacy.load_network_pkl(f)
            except (KeyError, AssertionError):
                # EG3D's loader insists on 'G' and 'D' (KeyError: 'G' for a pickle that holds
                # only G_ema); the pickle itself is fine: read it plainly, G_ema is all we use.
                data = None
        if data is None:
            with open(pkl, "rb") as f:
                data = pickle.load(f)
    except Exception as exc:  # unpickling runs the file's code: anything can come out
        msg = " ".join(str(exc).split())
        raise ValueError(
            f"{who}: cannot unpickle '{pkl}' with checkout '{ck}': "
            f"{exc.__class__.__name__}: {msg}"
        ) from exc
    G = data.get("G_ema", data.get("G")) if isinstance(data, dict) else data
    _check_interface(G, who, str(pkl))
    return G


def _check_interface(G: Any, who: str, where: str) -> None:
    missing = [a for a in ("mapping", "synthesis", "z_dim", "c_dim") if not hasattr(G, a)]
    if G is None or missing:
        raise ValueError(
            f"{who}: '{where}' holds no generator with mapping/synthesis/z_dim/c_dim "
            f"(missing: {', '.join(missing) or 'G_ema'})"
        )
    if int(G.c_dim) != 25:
        raise ValueError(f"{who}: '{where}': expected c_dim 25 (camera label), got {G.c_dim}")


class GANAdapter(PoseGenerator):
    """Common adapter of look-at 3D-aware GANs with EG3D's call interface.

    Args:
        seed: identity seed; identity ``i``'s latent ``z`` depends only on ``(seed, i)``.
        device: where the network runs.
        checkout: folder with the user's ``dnnlib/`` and ``torch_utils/`` (added to ``sys.path``).
        network: path of the user's network pickle (``G_ema`` is used).
        trust_pickle: must be ``True`` to unpickle ``network`` (it executes code).
        truncation_psi, truncation_cutoff: passed to ``G.mapping``.
        conditioning: ``"frontal"`` (mapping conditioned on the frontal camera) or ``"target"``.
        unreachable: ``"error"`` or ``"resample"`` for targets outside the usable camera range.
        radius, pivot, focal: override the preset orbit and focal length.
        padding: how kornia fills corners of the in-plane rotation (zeros, border, reflection).
        noise_mode: passed to ``G.synthesis`` (``"const"`` fixes the noise inputs; the renderer
            still draws depth jitter and importance samples from torch's generator, see ``rng``).
        batch_size: network batch size (memory bound).
        rng: ``per_sample`` (default: each sample's draws from its own generator seeded by
            :func:`render_seed`, batched where the draws can be split per sample, so renders
            repeat whatever the batching, resuming or sharding) or ``global`` (batches drawing
            from torch's global generator, as EG3D's scripts do: not repeatable).
        G: an already loaded network (programmatic use; bypasses checkout/network/trust).
    """

    preset: ClassVar[CameraPreset] = EG3D_FFHQ

    def __init__(
        self,
        seed: int = 0,
        device: str | torch.device = "cpu",
        *,
        checkout: str | None = None,
        network: str | None = None,
        trust_pickle: bool = False,
        truncation_psi: float = 0.7,
        truncation_cutoff: int | None = 14,
        conditioning: str = "frontal",
        unreachable: str = "error",
        radius: float | None = None,
        pivot: tuple[float, float, float] | list[float] | None = None,
        focal: float | None = None,
        padding: str = "reflection",
        noise_mode: str = "const",
        batch_size: int = 8,
        rng: str = "per_sample",
        G: Any = None,
    ) -> None:
        super().__init__(seed=seed, device=device)
        who = self.name or type(self).__name__
        if conditioning not in ("frontal", "target"):
            raise ValueError(
                f"{who}: conditioning must be 'frontal' or 'target', got {conditioning!r}"
            )
        if unreachable not in ("error", "resample"):
            raise ValueError(
                f"{who}: unreachable must be 'error' or 'resample', got {unreachable!r}"
            )
        if padding not in _PADDING:
            raise ValueError(f"{who}: padding must be one of {_PADDING}, got {padding!r}")
        if rng not in RNG_MODES:
            raise ValueError(f"{who}: rng must be one of {RNG_MODES}, got {rng!r}")
        if int(batch_size) < 1:
            raise ValueError(f"{who}: batch_size must be >= 1, got {batch_size}")
        p = self.preset
        self.camera = CameraPreset(
            radius=float(radius if radius is not None else p.radius),
            pivot=tuple(float(x) for x in (pivot if pivot is not None else p.pivot)),  # type: ignore[arg-type]
            focal=float(focal if focal is not None else p.focal),
            orbit_centre=p.orbit_centre,
        )
        if len(self.camera.pivot) != 3 or self.camera.radius <= 0 or self.camera.focal <= 0:
            raise ValueError(f"{who}: bad camera (radius > 0, pivot (x, y, z), focal > 0)")
        off = math.dist(self.camera.pivot, self.camera.orbit_centre)
        if off >= self.camera.radius:
            raise ValueError(f"{who}: the pivot {list(self.camera.pivot)} must lie inside the "
                             f"camera orbit (radius {self.camera.radius:g} about the origin)")
        self.checkout, self.network = checkout, network
        self.truncation_psi = float(truncation_psi)
        self.truncation_cutoff = truncation_cutoff
        self.conditioning, self.unreachable = conditioning, unreachable
        self.padding, self.noise_mode = padding, noise_mode
        self.batch_size = int(batch_size)
        self.rng = rng
        self._batched_draws = True  # until the network draws in a way clerf cannot split
        if G is None:
            G = load_network(checkout, network, bool(trust_pickle), who)
        else:
            _check_interface(G, who, "G")
        if isinstance(G, torch.nn.Module):
            G = G.eval().requires_grad_(False).to(self.device)
        self.G = G

    @classmethod
    def from_network(cls, G: Any, seed: int = 0, device: str | torch.device = "cpu",
                     **params: Any) -> GANAdapter:  # fmt: skip
        """Wrap an already loaded network object."""
        return cls(seed=seed, device=device, G=G, **params)

    def params(self) -> dict[str, Any]:
        return {
            "checkout": self.checkout, "network": self.network,
            "truncation_psi": self.truncation_psi, "truncation_cutoff": self.truncation_cutoff,
            "conditioning": self.conditioning, "unreachable": self.unreachable,
            "radius": self.camera.radius, "pivot": list(self.camera.pivot),
            "focal": self.camera.focal, "orbit_centre": list(self.camera.orbit_centre),
            "padding": self.padding, "noise_mode": self.noise_mode,
            "batch_size": self.batch_size, "rng": self.rng,
        }  # fmt: skip

    # ------------------------------------------------------------------ camera range

    def _reachable_direction(self, d: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def _sample_direction(self, n: int, gen: torch.Generator) -> Tensor:  # pragma: no cover
        raise NotImplementedError

    def _range_text(self) -> str:  # pragma: no cover - abstract
        raise NotImplementedError

    def reachable(self, rotations: Tensor) -> Tensor:
        """Boolean ``(B,)``: whether the camera direction of each target is in the usable range.

        In-plane rotation does not matter: it is applied exactly to the image.
        """
        return self._reachable_direction(camera_direction(rotations).double())

    def latents(self, identities: Tensor) -> Tensor:
        """Latent codes ``(B, z_dim)`` float32 on CPU; identity ``i`` depends only on (seed, i)."""
        zs = []
        for i in identities.tolist():
            g = torch.Generator().manual_seed(identity_seed(self.seed, i))
            zs.append(torch.randn(int(self.G.z_dim), generator=g))
        return torch.stack(zs)

    def _resolve_targets(self, identities: Tensor, R: Tensor) -> Tensor:
        """Roll-free cameras to render ``(B, 3, 3)`` float64, resampled or refused if needed."""
        R_look, _ = split_camera_inplane(R)
        ok = self._reachable_direction(camera_direction(R_look))
        if bool(ok.all()):
            return R_look
        bad = (~ok).nonzero().flatten()
        if self.unreachable == "error":
            i = int(bad[0])
            d = camera_direction(R_look[i])
            raise ValueError(
                f"{self.name}: target rotation {i} puts the camera at direction "
                f"({float(d[0]):.3f}, {float(d[1]):.3f}, {float(d[2]):.3f}), outside the usable "
                f"range ({self._range_text()}; {len(bad)} of {len(R)} targets); check "
                f"reachable() first or set unreachable: resample"
            )
        R_look = R_look.clone()
        for i in bad.tolist():
            # deterministic per (seed, identity, target): the same request gives the same image
            key = identity_seed(self.seed ^ 0x5EED, int(identities[i]))
            key ^= hash(tuple(round(float(x), 6) for x in R[i].flatten())) & ((1 << 62) - 1)
            d = self._sample_direction(1, torch.Generator().manual_seed(key))
            R_look[i] = lookat_rotation(d)[0]
        return R_look

    # ------------------------------------------------------------------ rendering

    def frontal_camera(self) -> Tensor:
        """The 25-number frontal camera ``(1, 25)`` float64 (mapping conditioning by default)."""
        return camera_from_rotation(torch.eye(3, dtype=torch.float64)[None], self.camera)

    @torch.no_grad()
    def render(self, identities: Tensor, rotations: Tensor, resolution: int) -> Rendered:
        res = check_resolution(resolution)
        if identities.ndim != 1 or rotations.shape != (identities.shape[0], 3, 3):
            raise ValueError(
                f"{self.name}: expected identities (B,) and rotations (B, 3, 3), got "
                f"{tuple(identities.shape)} and {tuple(rotations.shape)}"
            )
        check_rotation(rotations, name="rotations")
        if len(identities) == 0:
            return Rendered(torch.empty(0, 3, res, res, dtype=torch.uint8, device=self.device),
                            torch.empty(0, 3, 3, device=self.device))  # fmt: skip
        R = rotations.detach().to("cpu", torch.float64)
        ids = identities.detach().cpu()
        _, phi = split_camera_inplane(R)
        R_look = self._resolve_targets(ids, R)
        cams = camera_from_rotation(R_look, self.camera).float()  # what the network receives
        cond = (self.frontal_camera().float().expand_as(cams) if self.conditioning == "frontal"
                else cams)  # fmt: skip
        z = self.latents(ids)
        dev = self.device
        out = []
        if self.rng == "per_sample":
            # EG3D's renderer draws depth jitter and importance samples from torch's global
            # generator. Each sample's draws come from its own generator seeded by (seed,
            # identity, target), so its image never depends on what was rendered before or
            # beside it: batched, with the draws split per sample (generators.batched_rng), or
            # one sample at a time under the seeded global generator when the network draws
            # in a way that cannot be split.
            seeds = [render_seed(self.seed, int(ids[i]), R[i]) for i in range(len(ids))]
            for s in range(0, len(ids), self.batch_size):
                sl = slice(s, s + self.batch_size)
                img = self._synthesize_per_sample(z[sl], cond[sl], cams[sl], seeds[sl])
                out.append(self._finish(img.float(), phi[sl].to(dev, torch.float32), res))
        else:
            for s in range(0, len(ids), self.batch_size):
                sl = slice(s, s + self.batch_size)
                img = self._synthesize(z[sl], cond[sl], cams[sl])
                out.append(self._finish(img.float(), phi[sl].to(dev, torch.float32), res))
        images = torch.cat(out)
        # the label of the image: from the camera actually used, then the exact in-plane step
        labels = rotate_inplane(rotation_from_camera(cams.double()), phi)
        return Rendered(images=images, rotations=labels.to(dev, torch.float32))

    def _synthesize_per_sample(self, z: Tensor, cond: Tensor, cams: Tensor,
                               seeds: list[int]) -> Tensor:  # fmt: skip
        """:meth:`_synthesize` of a batch whose every image is what it would be alone."""
        from generators.batched_rng import PerSampleRNG, Unattributable

        forked = _forked_devices(self.device)
        if self._batched_draws and len(seeds) > 1:
            try:
                with torch.random.fork_rng(devices=forked), PerSampleRNG(seeds):
                    return self._synthesize(z, cond, cams)
            except Unattributable as exc:
                self._batched_draws = False
                log.warning("%s: the network's random draws cannot be split per sample (%s): "
                            "rendering one sample at a time", self.name, exc)
        imgs = []
        for i, seed in enumerate(seeds):
            with torch.random.fork_rng(devices=forked):
                _seed_render_rng(seed, forked)
                imgs.append(self._synthesize(z[i : i + 1], cond[i : i + 1], cams[i : i + 1]))
        return torch.cat(imgs)

    def _synthesize(self, z: Tensor, cond: Tensor, cams: Tensor) -> Tensor:
        """``G.mapping`` then ``G.synthesis``: the network's ``(B, 3, H, W)`` image in [-1, 1]."""
        dev = self.device
        ws = self.G.mapping(z.to(dev), cond.to(dev), truncation_psi=self.truncation_psi,
                            truncation_cutoff=self.truncation_cutoff)  # fmt: skip
        return self.G.synthesis(ws, cams.to(dev), noise_mode=self.noise_mode)["image"]

    def _finish(self, img: Tensor, phi: Tensor, res: int) -> Tensor:
        """[-1, 1] network output -> turned clockwise by ``phi`` -> resized -> uint8."""
        x = (img.clamp(-1, 1) + 1) * 0.5
        if bool((phi != 0).any()):
            # the image side of the in-plane rule, shared with the augmentation
            n = x.shape[0]
            no = torch.zeros(n, dtype=torch.bool, device=x.device)
            turn = GeometricParams(angle=phi.to(x.device, torch.float32), hflip=no, vflip=no,
                                   scale=torch.ones(n, device=x.device),
                                   translate=torch.zeros(n, 2, device=x.device))  # fmt: skip
            x = warp_images(x, turn, padding=self.padding)
        if x.shape[-1] != res or x.shape[-2] != res:
            mode = "area" if x.shape[-1] > res else "bilinear"
            kw = {} if mode == "area" else {"align_corners": False}
            x = F.interpolate(x, size=(res, res), mode=mode, **kw)
        return (x.clamp(0, 1) * 255).round().to(torch.uint8)


@register_generator("eg3d")
class EG3DGenerator(GANAdapter):
    """EG3D (FFHQ preset: radius 2.7, pivot (0, 0, 0.2), focal 4.2647).

    Extra args:
        max_angle: usable cameras lie within this angle (deg) of the frontal direction; EG3D's
            training set is mostly near-frontal and quality degrades beyond about 60 deg.
    """

    preset = EG3D_FFHQ

    def __init__(self, seed: int = 0, device: str | torch.device = "cpu", *,
                 max_angle: float = 60.0, **kw: Any) -> None:  # fmt: skip
        if not 0.0 < float(max_angle) <= 180.0:
            raise ValueError(f"eg3d: max_angle must be in (0, 180] deg, got {max_angle}")
        self.max_angle = float(max_angle)
        super().__init__(seed=seed, device=device, **kw)

    def params(self) -> dict[str, Any]:
        return {**super().params(), "max_angle": self.max_angle}

    def _reachable_direction(self, d: Tensor) -> Tensor:
        return in_cap(d, self.max_angle)

    def _sample_direction(self, n: int, gen: torch.Generator) -> Tensor:
        c = torch.rand(n, generator=gen, dtype=torch.float64)
        az = torch.rand(n, generator=gen, dtype=torch.float64)
        return cap_directions(c, az, self.max_angle)

    def _range_text(self) -> str:
        return f"within max_angle {self.max_angle:g} deg of frontal"


@register_generator("panohead")
class PanoHeadGenerator(GANAdapter):
    """PanoHead (preset: radius 2.7, pivot (0, 0, 0), focal 4.2647): any yaw (360 deg).

    Extra args:
        max_elevation: usable cameras lie within this elevation (deg) above or below the head's
            horizontal plane; views from straight above or below are outside its training data.
    """

    preset = PANOHEAD

    def __init__(self, seed: int = 0, device: str | torch.device = "cpu", *,
                 max_elevation: float = 60.0, **kw: Any) -> None:  # fmt: skip
        if not 0.0 < float(max_elevation) <= 90.0:
            raise ValueError(f"panohead: max_elevation must be in (0, 90] deg, got {max_elevation}")
        self.max_elevation = float(max_elevation)
        super().__init__(seed=seed, device=device, **kw)

    def params(self) -> dict[str, Any]:
        return {**super().params(), "max_elevation": self.max_elevation}

    def _reachable_direction(self, d: Tensor) -> Tensor:
        return in_band(d, self.max_elevation)

    def _sample_direction(self, n: int, gen: torch.Generator) -> Tensor:
        h = torch.rand(n, generator=gen, dtype=torch.float64)
        az = torch.rand(n, generator=gen, dtype=torch.float64)
        return band_directions(h, az, self.max_elevation)

    def _range_text(self) -> str:
        return f"elevation within max_elevation {self.max_elevation:g} deg"
