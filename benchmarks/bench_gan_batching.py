"""Batched per-sample rendering of the GAN adapter: images/s batched vs one sample at a time.

A stand-in network with EG3D's interface and its habits (a mapping network, a convolutional
synthesis that draws per-layer noise ``torch.randn([B, 1, r, r])`` and depth jitter
``torch.rand_like`` from torch's global generator) is rendered through ``EG3DGenerator`` with
``rng: per_sample``, once with the draws split per sample inside one batched call
(``generators.batched_rng``), once forced to one sample at a time (what clerf did before).
Both give the same images (checked). A mechanism check of clerf's side, not an EG3D figure.

    .venv/bin/python benchmarks/bench_gan_batching.py --n 64 --batch 16 --resolution 64
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn


class StandInSynthesis(nn.Module):
    """Convolutions at ``res`` px with StyleGAN-like noise inputs and an EG3D-like jitter."""

    z_dim, c_dim, w_dim = 512, 25, 512

    def __init__(self, res: int = 64, width: int = 32, layers: int = 4) -> None:
        super().__init__()
        self.img_resolution = res
        self.inp = nn.Linear(self.w_dim + self.c_dim, width * 8 * 8)
        self.convs = nn.ModuleList(nn.Conv2d(width, width, 3, padding=1) for _ in range(layers))
        self.out = nn.Conv2d(width, 3, 1)
        self.width = width

    def mapping(self, z, c, truncation_psi=1.0, truncation_cutoff=None):
        return z[:, None, :].repeat(1, 14, 1)

    def synthesis(self, ws, c, noise_mode="random"):
        b = ws.shape[0]
        x = self.inp(torch.cat([ws[:, 0], c], 1)).view(b, self.width, 8, 8)
        x = nn.functional.interpolate(x, size=self.img_resolution, mode="bilinear")
        depth = torch.zeros(b * 4, 16, device=x.device)
        depth = depth + torch.rand_like(depth) * 0.1  # the renderer's depth jitter
        for conv in self.convs:
            noise = torch.randn([b, 1, self.img_resolution, self.img_resolution], device=x.device)
            x = torch.relu(conv(x) + 0.1 * noise)
        img = torch.tanh(self.out(x)) + 0.0 * depth.view(b, -1).mean(1)[:, None, None, None]
        return {"image": img}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=64, help="images per measurement")
    ap.add_argument("--batch", type=int, default=16, help="network batch size")
    ap.add_argument("--resolution", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--device", default="cpu", help="where the network runs (cpu, cuda)")
    a = ap.parse_args(argv)
    from clerf.geometry import random_rotation
    from generators.gan import EG3DGenerator

    torch.manual_seed(0)
    net = StandInSynthesis(a.resolution).eval().to(a.device)
    R = random_rotation(a.n, torch.Generator().manual_seed(1)).float()
    # keep the targets where EG3D's camera can reach them (in front of the face)
    gen = EG3DGenerator.from_network(net, seed=0, device=a.device, batch_size=a.batch,
                                     unreachable="resample")  # fmt: skip
    ids = torch.arange(a.n)

    def rate(batched: bool) -> tuple[float, torch.Tensor]:
        gen._batched_draws = batched
        gen.render(ids[: a.batch], R[: a.batch], a.resolution)  # warm-up
        best, images = 0.0, None
        for _ in range(a.rounds):
            if a.device.startswith("cuda"):
                torch.cuda.synchronize()
            t = time.perf_counter()
            images = gen.render(ids, R, a.resolution).images.cpu()
            best = max(best, a.n / (time.perf_counter() - t))
        return best, images

    solo, img_solo = rate(False)
    batched, img_batched = rate(True)
    same = bool(torch.equal(img_solo, img_batched))
    diff = int((img_solo.int() - img_batched.int()).abs().max())
    print(f"EG3D-interface stand-in on {a.device}, {a.n} images at {a.resolution} px, batch "
          f"{a.batch}, torch threads {torch.get_num_threads()}, CPU "
          f"{torch.backends.cpu.get_cpu_capability()}")
    print(f"one sample at a time: {solo:.1f} img/s; batched with per-sample draws: "
          f"{batched:.1f} img/s ({batched / solo:.2f}x); identical images: {same} (largest "
          f"difference {diff} of 255: batched convolutions round differently)")
    return {"solo_img_s": solo, "batched_img_s": batched, "speedup": batched / solo,
            "identical": same, "max_diff_u8": diff}


if __name__ == "__main__":
    main()
