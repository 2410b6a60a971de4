"""Benchmark of the procedural generator against ResNet-18 training, measured in the same run.

    .venv/bin/python benchmarks/bench_generator.py [--device cpu|cuda] [--resolutions 64 128]
        [--batch 64] [--train-batch 32] [--repeats 5] [--threads N] [--supersample 1]

For each resolution it prints the generator's images/s (batches of ``--batch`` random identities
at uniformly random rotations, default scene) next to ResNet-18 training images/s (torchvision,
random init, 6 outputs, forward + backward + SGD step, batches of ``--train-batch``), and their
ratio. The generator should be at least 3x faster than training so that generation never limits
the pipeline. Figures are medians over ``--repeats`` timed batches after one warm-up batch; CPU
machines shared with other jobs are noisy, which is why both are measured in the same run.

``--oracle N`` instead prints the in-plane oracle of docs/conventions.md 3 for N random non-frontal
rotations: PSNR on the head region between ``render(R)`` turned clockwise by phi and
``render(R @ Rz(phi))`` (correct rule) or ``render(Rz(phi) @ R)`` (roll + phi, wrong), rendered
at 256 px and area-downsampled to 64 px, as in ``tests/test_generators_procedural.py``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_generator(device: torch.device, res: int, batch: int, repeats: int,
                    supersample: int) -> float:  # fmt: skip
    from clerf.geometry import random_rotation
    from generators import build_generator

    gen = build_generator("procedural", seed=0, device=device, supersample=supersample)
    rng = torch.Generator().manual_seed(0)
    times = []
    for k in range(repeats + 1):
        ids = torch.arange(batch) + k * batch  # fresh identities each batch
        R = random_rotation(batch, rng).to(device)
        _sync(device)
        t0 = time.perf_counter()
        gen.render(ids, R, res)
        _sync(device)
        if k:  # the first batch warms up allocators and kernels
            times.append(time.perf_counter() - t0)
    return batch / statistics.median(times)


def bench_resnet18_train(device: torch.device, res: int, batch: int, repeats: int) -> float:
    import torchvision

    model = torchvision.models.resnet18(num_classes=6).to(device).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x = torch.randn(batch, 3, res, res, device=device)
    y = torch.randn(batch, 6, device=device)
    times = []
    for k in range(repeats + 1):
        _sync(device)
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        _sync(device)
        if k:
            times.append(time.perf_counter() - t0)
    return batch / statistics.median(times)


def oracle(n: int, seed: int = 0) -> None:
    import kornia
    import torch.nn.functional as F

    from clerf.geometry import camera_direction, random_rotation, rot_z, rotate_inplane
    from generators.procedural import ProceduralHead

    gen = torch.Generator().manual_seed(seed)
    R = random_rotation(8 * n, gen)
    R = R[camera_direction(R)[:, 2] < 0.866][:n]  # at least 30 deg from frontal
    mag = 20 + torch.rand(n, generator=gen) * 140
    phi = torch.where(torch.rand(n, generator=gen) < 0.5, -mag, mag)
    g = ProceduralHead.aligned(seed=11)
    ids = torch.arange(n)
    hi, res = 256, 64
    base = g.render(ids, R, hi).images.float()
    good = g.render_maps(ids, rotate_inplane(R, phi), hi)
    wrong = g.render(ids, rot_z(phi) @ R, hi).images.float()
    turned = kornia.geometry.transform.rotate(base, -phi)  # kornia: positive = counter-clockwise
    f = hi // res
    yy, xx = torch.meshgrid(torch.arange(res) - (res - 1) / 2, torch.arange(res) - (res - 1) / 2,
                            indexing="ij")  # fmt: skip
    disc = xx**2 + yy**2 < (res / 2 - 1) ** 2

    def psnr(a: torch.Tensor, b: torch.Tensor, m: torch.Tensor) -> float:
        err = ((F.avg_pool2d(a, f) - F.avg_pool2d(b, f)) ** 2).mean(0)[m]
        return float(10 * torch.log10(255.0**2 / err.mean()))

    print(f"{'phi deg':>8} {'correct dB':>11} {'roll+phi dB':>12}")
    for i in range(n):
        m = (F.max_pool2d((good.part_ids[i] >= 0).float()[None, None], f)[0, 0] > 0) & disc
        ok = psnr(turned[i], good.images[i].float(), m)
        bad = psnr(turned[i], wrong[i], m)
        print(f"{float(phi[i]):>8.1f} {ok:>11.1f} {bad:>12.1f}")


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark (``argv`` as on the command line); print it and return the figures.

    Returns ``{"device", "threads", "batch", "train_batch", "rows": [{"px", "generator_img_s",
    "train_img_s", "ratio"}]}`` (empty for ``--oracle``).
    """
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--resolutions", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--batch", type=int, default=64, help="generator batch (default 64)")
    ap.add_argument("--train-batch", type=int, default=32, help="ResNet-18 batch (default 32)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--supersample", type=int, default=1)
    ap.add_argument("--oracle", type=int, default=0, metavar="N",
                    help="print the in-plane oracle PSNRs for N rotations instead")
    args = ap.parse_args(argv)
    if args.oracle:
        oracle(args.oracle)
        return {}
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"torch {torch.__version__}, device {device} ({name}), "
          f"{torch.get_num_threads()} CPU threads")  # fmt: skip
    print(f"{'px':>5} {'generator img/s':>16} {'resnet18 train img/s':>21} {'ratio':>6}")
    rows = []
    for res in args.resolutions:
        g = bench_generator(device, res, args.batch, args.repeats, args.supersample)
        t = bench_resnet18_train(device, res, args.train_batch, args.repeats)
        print(f"{res:>5} {g:>16.1f} {t:>21.1f} {g / t:>6.2f}")
        rows.append({"px": res, "generator_img_s": g, "train_img_s": t, "ratio": g / t})
    return {"device": str(device), "threads": torch.get_num_threads(), "batch": args.batch,
            "train_batch": args.train_batch, "rows": rows}


if __name__ == "__main__":
    main()
