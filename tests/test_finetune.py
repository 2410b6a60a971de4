"""The fine-tune stage and ``clerf finetune``: learning, out-of-range policies, freezing, resume,
CLI errors and a 2-process accelerate run.

Data: a synthetic image family whose pixels encode the pose exactly and transform exactly like a
face under in-plane image rotation: three blobs, one per colour channel, drawn where the head's
right/up/nose axes point in the image (``image_axes``), brightness from the axis' depth. A CNN can
read the full rotation from it (the first two columns of ``R``), so uniform random rotations over
SO(3) are learnable in seconds: chance is ~126.5 deg mean geodesic error.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from clerf.cli import main
from clerf.config import load_config
from clerf.errors import ConfigError, DataError
from clerf.finetune import (
    FinetuneTask,
    InMemoryLabelled,
    evaluate_rotations,
    run_finetune,
)
from clerf.geometry import geodesic_distance, random_rotation, rotation_from_euler
from clerf.models.encoder import Encoder, EncoderSpec
from clerf.models.pose_model import HeadPoseModel
from clerf.training import StepContext

REPO = Path(__file__).resolve().parents[1]
#: augmentation: in-plane rotation only (the blob images transform exactly under it)
INPLANE_ONLY = [
    "finetune.augment.p_hflip=0", "finetune.augment.scale=[1.0,1.0]",
    "finetune.augment.translate=0", "finetune.augment.brightness=0",
    "finetune.augment.contrast=0", "finetune.augment.saturation=0", "finetune.augment.hue=0",
    "finetune.augment.p_grayscale=0", "finetune.augment.p_blur=0", "finetune.augment.p_noise=0",
]  # fmt: skip
NO_AUG = ["finetune.augment.enabled=false"]


def axis_blobs(R: torch.Tensor, size: int = 32, sigma: float = 1.6) -> torch.Tensor:
    """uint8 ``(N, 3, size, size)``: channel i has a blob at the image position of head axis i."""
    c, r = (size - 1) / 2.0, 0.3 * size
    ys, xs = torch.meshgrid(torch.arange(size).float(), torch.arange(size).float(), indexing="ij")
    px, py = c + r * R[:, :, 0], c - r * R[:, :, 1]  # image y points down
    d2 = (xs - px[..., None, None]) ** 2 + (ys - py[..., None, None]) ** 2
    amp = 0.55 + 0.45 * R[:, :, 2]
    img = amp[..., None, None] * torch.exp(-d2 / (2 * sigma**2))
    return (img.clamp(0, 1) * 255).round().to(torch.uint8)


def _cfg(*overrides: str, size: int = 32):
    base = [f"encoder.input_size={size}", "finetune.train.progress=false",
            "finetune.train.log_every=1", "finetune.train.batch_size=16",
            "finetune.train.lr=2e-3", "finetune.train.weight_decay=1e-4",
            "finetune.head_lr_scale=1"]  # fmt: skip
    kinds = [o.split("=", 1)[1] for o in overrides if o.startswith("head.type=")]
    if (kinds[-1] if kinds else "binned") != "binned":  # each head takes only its own keys
        base.append("head.hidden=64")
    return load_config(None, base + list(overrides))


def _write_store(path: Path, images: torch.Tensor, R: torch.Tensor) -> Path:
    from triplets.store import StoreWriter

    with StoreWriter(path, "labelled", images.shape[-1], total=images.shape[0], chunk=32) as w:
        for s, e in w.pending():
            w.write_chunk(s, images[s:e], R[s:e], torch.arange(s, e))
        w.finalize()
    return path


@pytest.fixture(scope="module")
def blob_store(tmp_path_factory):
    R = random_rotation(128, torch.Generator().manual_seed(5))
    return _write_store(tmp_path_factory.mktemp("ft") / "blobs.h5", axis_blobs(R, 16), R)


class _Accelerator:
    """The parts of ``accelerate.Accelerator`` a task reads outside :func:`fit`."""

    num_processes = 1
    process_index = 0
    is_main_process = True
    device = torch.device("cpu")

    @staticmethod
    def unwrap_model(model):
        return model


def _ctx(cfg=None, seed: int = 0) -> StepContext:
    cfg = cfg if cfg is not None else load_config(None)
    return StepContext(accelerator=_Accelerator(), cfg=cfg, train_cfg=cfg.finetune.train,
                       out=Path("."), generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------- helpers


def test_evaluate_rotations_matches_direct_geodesic():
    g = torch.Generator().manual_seed(1)
    Rt, Rp = random_rotation(50, g), random_rotation(50, g)
    res = evaluate_rotations(Rp, Rt)
    assert res["geodesic_deg"] == pytest.approx(float(geodesic_distance(
        Rp.double(), Rt.double()).mean()), abs=1e-9)


def test_blob_images_transform_exactly_under_inplane_augmentation():
    # the synthetic family is a valid oracle: augment(render(R)) ~ render(composed R)
    from clerf.augment import PoseAugment

    R = random_rotation(8, torch.Generator().manual_seed(2))
    aug = PoseAugment({"inplane_deg": 180.0, "p_hflip": 0.0, "scale": [1.0, 1.0],
                       "translate": 0.0, "brightness": 0.0, "contrast": 0.0, "saturation": 0.0,
                       "hue": 0.0, "p_grayscale": 0.0, "p_blur": 0.0, "p_noise": 0.0},
                      output_size=32)  # fmt: skip
    x, R2 = aug(axis_blobs(R, 32), R, generator=torch.Generator().manual_seed(3))
    direct = axis_blobs(R2, 32).float() / 255
    assert (x - direct).abs().mean() < 0.01
    wrong = axis_blobs(R2.transpose(-1, -2), 32).float() / 255
    assert (x - wrong).abs().mean() > 3 * (x - direct).abs().mean()


# --------------------------------------------------------------------------- out-of-range labels


def _binned_task(R: torch.Tensor, *overrides: str) -> FinetuneTask:
    cfg = _cfg("head.type=binned", *overrides)
    return FinetuneTask(cfg, train_data=InMemoryLabelled(axis_blobs(R, 32), R))


def test_out_of_range_labels_are_counted_and_dropped_without_augmentation():
    R = random_rotation(64, torch.Generator().manual_seed(4))
    task = _binned_task(R, *NO_AUG)
    model = task.build_model()
    expected = int((~model.head.in_range(R)).sum())
    assert 0 < expected < 64  # uniform rotations: many Euler angles beyond +-99 deg

    batch = {"images": axis_blobs(R, 32), "rotations": R}
    loss, logs = task.train_step(model, batch, _ctx())
    assert torch.isfinite(loss)
    assert logs["out_of_range"] == expected and logs["dropped"] == expected
    assert task.out_of_range.totals() == {"labels": 64, "out_of_range": expected,
                                          "dropped": expected}  # fmt: skip
    loss.backward()  # the kept samples train the head
    assert model.head.fc.weight.grad.abs().sum() > 0


def test_the_masked_loss_equals_the_loss_of_the_kept_rows():
    """Oracle: the fine-tune's weighted loss (labels out of range weigh 0, no host read) against
    the same head's loss on the kept rows only (boolean indexing), for the binned and the
    combined head: the loss, its parts and the gradients agree."""
    R = random_rotation(64, torch.Generator().manual_seed(4))
    for head in ("binned", "both"):
        task = _binned_task(R, *NO_AUG, f"head.type={head}")
        model = task.build_model()
        ok = model.head.in_range(R)
        assert 0 < int(ok.sum()) < 64
        out = model(axis_blobs(R, 32))
        lw, pw = model.loss(out, R, weight=ok.float())
        gw = torch.autograd.grad(lw, [p for p in model.head.parameters()], retain_graph=True)
        keep = ok.nonzero()[:, 0]
        lk, pk = model.loss({k: v[keep] for k, v in out.items()}, R[keep])
        gk = torch.autograd.grad(lk, [p for p in model.head.parameters()])
        torch.testing.assert_close(lw, lk, rtol=1e-5, atol=1e-5)
        assert pw.keys() == pk.keys()
        for k in pw:
            torch.testing.assert_close(pw[k], pk[k], rtol=1e-5, atol=1e-5, msg=k)
        for a, b in zip(gw, gk, strict=True):
            # float32 sums in another order: agree to the rounding of the largest gradient
            torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5 * float(b.abs().max()))


def test_out_of_range_error_policy_names_the_problem():
    R = rotation_from_euler(torch.tensor([0.0, 150.0]), torch.zeros(2), torch.zeros(2))
    task = _binned_task(R, *NO_AUG, "finetune.out_of_range=error")
    model = task.build_model()

    with pytest.raises(DataError, match=r"1 label\(s\).*outside the head's bins.*150\.0"):
        task.train_step(model, {"images": axis_blobs(R, 32), "rotations": R}, _ctx())


def test_resample_policy_redraws_the_augmentation():
    # roll = 95 deg on a frontal face; an in-plane turn by phi in [-30, 30] gives roll 95 + phi,
    # outside [-99, 99) for phi >= 4 (about 43%). Three redraws leave about 0.43^4 = 3.4%.
    n = 2000
    R = rotation_from_euler(torch.zeros(n), torch.zeros(n), torch.full((n,), 95.0))
    task = _binned_task(R[:32], *INPLANE_ONLY, "finetune.out_of_range=resample",
                        "finetune.augment.inplane_deg=30")
    head = task.build_model().head
    params, ok, n_out = task.out_of_range.draw(R, head, _ctx().generator)
    assert n_out / n == pytest.approx(26 / 60, abs=0.04)
    assert (~ok).float().mean().item() == pytest.approx((26 / 60) ** 4, abs=0.015)
    from clerf.augment import compose_rotation

    torch.testing.assert_close(head.in_range(compose_rotation(R, params)), ok)
    # drop: no redraw
    task = _binned_task(R[:32], *INPLANE_ONLY, "finetune.augment.inplane_deg=30")
    params, ok, n_out = task.out_of_range.draw(R, head, _ctx().generator)
    assert n_out == -1  # no redraw: counted with the drops, on the device (no host read)
    dropped = task.out_of_range.dropped(R, params, ok)
    assert isinstance(dropped, torch.Tensor) and int(dropped) == int((~ok).sum()) > 0


def test_a_batch_with_every_label_out_of_range_still_backpropagates():
    R = rotation_from_euler(torch.full((4,), 150.0), torch.zeros(4), torch.zeros(4))
    task = _binned_task(R, *NO_AUG)
    model = task.build_model()

    loss, logs = task.train_step(model, {"images": axis_blobs(R, 32), "rotations": R}, _ctx())
    assert loss.item() == 0.0 and logs["dropped"] == 4
    # the loss parts say there was nothing to report: the window leaves them out of its means
    assert all(present.item() == 0.0 for _, present in
               (logs[k] for k in model.head.loss_keys))  # fmt: skip
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() and not g.any() for g in grads)


# --------------------------------------------------------------------------- parameter groups


def test_param_groups_lr_scales_and_permanent_freeze():
    R = random_rotation(32, torch.Generator().manual_seed(6))
    cfg = _cfg("finetune.freeze=[backbone.conv1,backbone.bn1]", "finetune.head_lr_scale=5",
               "finetune.encoder_lr_scale=0.5")  # fmt: skip
    task = FinetuneTask(cfg, train_data=InMemoryLabelled(axis_blobs(R, 32), R))
    model = task.build_model()
    groups = {g["name"]: g for g in task.param_groups(model, _ctx(cfg))}
    assert groups["head"]["lr_scale"] == 5.0 and groups["encoder"]["lr_scale"] == 0.5
    enc_ids = {id(p) for p in groups["encoder"]["params"]}
    assert id(model.encoder.backbone.conv1.weight) not in enc_ids
    assert id(model.encoder.backbone.layer1[0].conv1.weight) in enc_ids
    assert not model.encoder.backbone.bn1.weight.requires_grad
    bad = _cfg("finetune.freeze=[backbone.stem]")
    with pytest.raises(ConfigError, match="finetune.freeze: 'backbone.stem' matches no"):
        FinetuneTask(bad, train_data=InMemoryLabelled(axis_blobs(R, 32), R)).build_model()


@pytest.mark.parametrize("override, message", [
    ("finetune.out_of_range=clip", "finetune.out_of_range"),
    ("head.type=quaternion", "head.type"),
    ("finetune.val_fraction=1.0", "finetune.val_fraction"),
    ("head.decode=mode", "decode"),
    ("finetune.head_lr_scale=-1", "finetune.head_lr_scale"),
    # progressive resizing (train.epochs is 2 by default): checked at load, and against the
    # encoder's input_size (32 here) when the task is built
    ("finetune.epoch_sizes=[32]", "finetune.epoch_sizes: expected one size per epoch"),
    ("finetune.epoch_sizes=[16,32]", "finetune.epoch_sizes: expected sizes of at least 32"),
    ("finetune.epoch_sizes=[32,48]", "finetune.epoch_sizes: expected sizes up to the encoder"),
])  # fmt: skip
def test_bad_config_values_are_config_errors(override, message):
    R = random_rotation(32, torch.Generator().manual_seed(6))
    with pytest.raises(ConfigError, match=message):
        FinetuneTask(_cfg(override), train_data=InMemoryLabelled(axis_blobs(R, 32), R))


def test_progressive_resizing_trains_each_epoch_at_its_size(monkeypatch, tmp_path):
    # finetune.epoch_sizes: the network sees each epoch's size (antialiased resize of the
    # augmented images), the labels are untouched, and the held-out evaluation uses input_size
    seen: list[tuple[bool, int]] = []
    forward = HeadPoseModel.forward

    def spy(self, images):
        seen.append((self.training, images.shape[-1]))
        return forward(self, images)

    monkeypatch.setattr(HeadPoseModel, "forward", spy)
    g = torch.Generator().manual_seed(2)
    R = random_rotation(64 + 16, g)
    imgs = axis_blobs(R, 48)
    cfg = _cfg("head.type=rotation6d", "finetune.train.epochs=3", "finetune.epoch_sizes=[32,40,48]",
               "finetune.train.batch_size=32", *NO_AUG, size=48)  # fmt: skip
    run_finetune(cfg, tmp_path / "run", train_data=InMemoryLabelled(imgs[:64], R[:64]),
                 val_data={"images": imgs[64:], "rotations": R[64:]})  # fmt: skip
    train_sizes = [s for training, s in seen if training]
    assert train_sizes == [32, 32, 40, 40, 48, 48]
    assert {s for training, s in seen if not training} == {48}


# --------------------------------------------------------------------------- training runs


@pytest.mark.slow
def test_tiny_run_learns_full_range_rotations_and_saves_a_loadable_model(tmp_path):
    # 6D head, uniform rotations over SO(3), in-plane augmentation up to +-180 deg.
    g = torch.Generator().manual_seed(0)
    R = random_rotation(1024 + 128, g)
    imgs = axis_blobs(R, 16, sigma=1.0)
    train = InMemoryLabelled(imgs[:1024], R[:1024])
    val = {"images": imgs[1024:], "rotations": R[1024:]}
    cfg = _cfg("head.type=rotation6d", "finetune.train.epochs=3", "finetune.train.batch_size=32",
               "head.hidden=128",
               "finetune.train.warmup_steps=10", "finetune.augment.inplane_deg=180",
               *INPLANE_ONLY, size=16)  # fmt: skip
    summary = run_finetune(cfg, tmp_path / "run", train_data=train, val_data=val)
    ev = summary["evaluation"]
    print(f"\nheld-out geodesic error {ev['val/geodesic_deg']:.1f} deg (median "
          f"{ev['val/geodesic_median_deg']:.1f}), chance {ev['val/chance_geodesic_deg']:.1f} deg, "
          f"{summary['steps']} steps, {summary['seconds_this_run']:.1f} s")
    assert ev["val/chance_geodesic_deg"] == pytest.approx(126.5, abs=6.0)
    assert ev["val/geodesic_deg"] < 0.4 * ev["val/chance_geodesic_deg"], ev
    # the saved model reproduces the held-out figure through predict()
    m = HeadPoseModel.from_pretrained(tmp_path / "run")
    pred = m.predict(val["images"])
    err = geodesic_distance(pred.rotations.double(), val["rotations"].double()).mean().item()
    assert err == pytest.approx(ev["val/geodesic_deg"], abs=1e-3)
    meta = json.loads((tmp_path / "run" / "model" / "config.json").read_text())
    assert meta["training"]["stage"] == "finetune" and meta["training"]["steps"] == 96
    # in-memory images name no crop preset: the record says so (inference uses its default)
    assert meta["preprocessing"]["crop_preset"] is None
    assert "names no crop preset" in meta["preprocessing"]["crop_source"]


def test_crop_protocol_of_the_training_data():
    from clerf.finetune import crop_protocol

    assert crop_protocol({"kind": "labelled", "crop_preset": "hopenet_train",
                          "resize": "stretch"}) == {
        "crop_preset": "hopenet_train", "resize_mode": "stretch",
        "crop_source": "training data (its crop_preset)"}  # fmt: skip
    rendered = crop_protocol({"source": "stream", "generator": "procedural"})
    assert (rendered["crop_preset"], rendered["resize_mode"]) == ("none", "center")
    assert crop_protocol({"source": "in-memory tensors"})["crop_preset"] is None
    unknown = crop_protocol({"crop_preset": "from_the_future", "resize": "sideways"})
    assert unknown["crop_preset"] is None and unknown["resize_mode"] == "center"
    assert "'from_the_future'" in unknown["crop_source"]



def test_a_source_without_describe_still_trains_with_an_unknown_crop():
    """A user's own source that predates ``describe()`` in the DataSource protocol: no
    AttributeError; the saved crop protocol says the preset is unknown."""
    from clerf.finetune import FinetuneTask, crop_protocol

    R = random_rotation(8, generator=torch.Generator().manual_seed(0))
    inner = InMemoryLabelled(axis_blobs(R, 32), R)

    class OldSource:  # __len__ / block_size / read_batch only
        block_size = inner.block_size

        def __len__(self):
            return len(inner)

        def read_batch(self, ids):
            return inner.read_batch(ids)

    task = FinetuneTask(_cfg(), train_data=OldSource())
    assert task.data_info == {"source": "OldSource"}
    assert crop_protocol(task.data_info)["crop_preset"] is None
    from clerf.data_sources import Prefix

    assert Prefix(OldSource(), 4).describe() == {"source": "OldSource"}


def _state(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.slow
def test_interrupted_run_resumes_to_the_same_weights(tmp_path, monkeypatch):
    R = random_rotation(64, torch.Generator().manual_seed(7))
    train = InMemoryLabelled(axis_blobs(R, 16, 1.0), R)
    args = ("head.type=both", "finetune.train.epochs=2", "finetune.train.checkpoint_every=2",
            "finetune.augment.inplane_deg=30", "finetune.train.batch_size=16")  # fmt: skip
    cfg = _cfg(*args, size=16)
    run_finetune(cfg, tmp_path / "straight", train_data=train)
    ref = HeadPoseModel.from_pretrained(tmp_path / "straight").state_dict()

    calls = {"n": 0}
    original = FinetuneTask.train_step

    def crash_at_step_5(self, model, batch, ctx):
        calls["n"] += 1
        if calls["n"] == 6:
            raise KeyboardInterrupt("simulated interruption")
        return original(self, model, batch, ctx)

    monkeypatch.setattr(FinetuneTask, "train_step", crash_at_step_5)
    with pytest.raises(KeyboardInterrupt):
        run_finetune(cfg, tmp_path / "crashed", train_data=train)
    assert not (tmp_path / "crashed" / "model").exists()
    monkeypatch.setattr(FinetuneTask, "train_step", original)
    summary = run_finetune(cfg, tmp_path / "crashed", train_data=train)
    assert summary["resumed_from"] == 4 and summary["steps"] == 8
    got = HeadPoseModel.from_pretrained(tmp_path / "crashed").state_dict()
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=0, atol=1e-6, msg=k)


@pytest.mark.slow
def test_probe_epoch_keeps_the_pretrained_encoder_and_stem_freeze(tmp_path):
    torch.manual_seed(0)
    enc = Encoder(EncoderSpec(input_size=16))
    enc.save_pretrained(tmp_path / "pre" / "encoder")
    R = random_rotation(64, torch.Generator().manual_seed(8))
    train = InMemoryLabelled(axis_blobs(R, 16, 1.0), R)
    base = ("head.type=rotation6d", f"finetune.encoder={tmp_path / 'pre'}",
            "finetune.train.batch_size=16", *NO_AUG)  # fmt: skip
    cfg = _cfg(*base, "finetune.probe_epochs=1", "finetune.train.epochs=1", size=16)
    run_finetune(cfg, tmp_path / "probe", train_data=train)
    m = HeadPoseModel.from_pretrained(tmp_path / "probe")
    ref = {k: v for k, v in enc.state_dict().items() if not k.startswith("projection")}
    for k, v in ref.items():  # weights AND BatchNorm statistics untouched
        assert torch.equal(m.encoder.state_dict()[k], v), k
    # the head did train (its last bias starts at the identity's 6D vector)
    assert not torch.equal(m.head.mlp[-1].bias, torch.tensor([1.0, 0, 0, 0, 1.0, 0]))

    cfg = _cfg(*base, "finetune.freeze=[backbone.conv1,backbone.bn1]", "finetune.train.epochs=1",
               size=16)  # fmt: skip
    run_finetune(cfg, tmp_path / "stem", train_data=train)
    m = HeadPoseModel.from_pretrained(tmp_path / "stem")
    assert torch.equal(m.encoder.backbone.conv1.weight, enc.backbone.conv1.weight)
    assert torch.equal(m.encoder.backbone.bn1.weight, enc.backbone.bn1.weight)
    assert not torch.equal(m.encoder.backbone.layer1[0].conv1.weight,
                           enc.backbone.layer1[0].conv1.weight)


# --------------------------------------------------------------------------- CLI


def _cli_args(store: Path, out: Path, *extra: str) -> list[str]:
    return ["finetune", str(REPO / "configs" / "finetune_small.yaml"), "--out", str(out),
            f"finetune.train_store={store}", "finetune.encoder=", "encoder.input_size=16",
            "finetune.train.epochs=1", "finetune.train.batch_size=16", "finetune.probe_epochs=0",
            "finetune.train.progress=false",
            *([] if "head.type=binned" in extra else ["head.hidden=16"]), *extra]  # fmt: skip


@pytest.mark.slow
def test_cli_finetune_on_a_store_end_to_end(blob_store, tmp_path, capsys):
    out = tmp_path / "cli"
    assert main(_cli_args(blob_store, out, "finetune.val_fraction=0.25")) == 0
    text = capsys.readouterr().out
    assert "finetune: 6 steps on 1 process(es)" in text and "chance" in text
    summary = json.loads((out / "summary.json").read_text())
    assert summary["evaluation"]["val/chance_geodesic_deg"] > 90
    m = HeadPoseModel.from_pretrained(out)
    info = m.training_summary["train_data"]
    assert info["path"] == str(blob_store) and info["kind"] == "labelled"
    # the store's attributes name no crop preset, and the saved record says so
    assert m.crop["crop_preset"] is None and m.crop["resize_mode"] == "center"
    assert (out / "config.yaml").is_file() and (out / "metrics.jsonl").is_file()


def test_cli_errors_are_one_line(blob_store, tmp_path, capsys):
    cases = [
        (["finetune.train_store="], 2, "finetune.train_store: no store given"),
        ([f"finetune.train_store={tmp_path / 'missing.h5'}"], 1, "store not found"),
        (["finetune.out_of_range=clip"], 2,
         "key 'finetune.out_of_range': Invalid value 'clip', expected one of"),
        (["finetune.train.batch_size=1000"], 1, "fewer than one batch"),
        ([f"finetune.encoder={tmp_path / 'noenc'}"], 1, "no such encoder directory"),
        (["finetune.bogus=1"], 2, "finetune.bogus"),
    ]
    for extra, code, message in cases:
        rc = main(_cli_args(blob_store, tmp_path / "err", *extra))
        err = capsys.readouterr().err
        assert rc == code, (extra, err)
        assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "err" / "model").exists()


# --------------------------------------------------------------------------- 2 processes


@pytest.mark.slow
def test_two_process_accelerate_run(blob_store, tmp_path):
    out = tmp_path / "ddp"
    env = dict(os.environ, ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1")
    accelerate = Path(sys.executable).with_name("accelerate")
    args = [str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines",
            "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "clerf",
            *_cli_args(blob_store, out, "finetune.probe_epochs=1", "finetune.train.epochs=2",
                       "finetune.train.find_unused_parameters=true",
                       "finetune.val_fraction=0.25")]  # fmt: skip
    res = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2
    # 128 - 32 held out = 96 images / 2 ranks / batch 16 = 3 steps per epoch
    assert summary["steps"] == 6 and summary["images_seen"] == 6 * 2 * 16
    assert summary["evaluation"]["val/geodesic_deg"] > 0
    stats = summary["rank_param_stats"]
    assert len(stats) == 2 and stats[0] == stats[1]
    HeadPoseModel.from_pretrained(out)


def test_finetune_can_start_from_the_encoder_of_an_earlier_finetune(blob_store, tmp_path):
    """Supervised pretraining: finetune.encoder = a fine-tune output (its head is dropped)."""
    first = tmp_path / "first"
    run_finetune(_cfg(*NO_AUG, f"finetune.train_store={blob_store}", "finetune.train.epochs=1"),
                 first)  # fmt: skip
    src = HeadPoseModel.from_pretrained(first)
    cfg = _cfg(*NO_AUG, f"finetune.train_store={blob_store}", f"finetune.encoder={first}",
               "finetune.train.epochs=1", "finetune.encoder_lr_scale=0", "head.type=binned")
    task = FinetuneTask(cfg)
    model = task.build_model()
    for (k, a), b in zip(src.encoder.backbone.state_dict().items(),
                         model.encoder.backbone.state_dict().values(), strict=True):  # fmt: skip
        assert torch.equal(a, b), k
    assert model.head_config["type"] == "binned"


@pytest.mark.parametrize("how", ["val_store", "val_fraction", "stream"])
def test_only_the_main_process_reads_or_renders_the_held_out_set(blob_store, monkeypatch, how):
    from clerf.finetune import FinetuneData

    over = {"val_store": [f"finetune.train_store={blob_store}",
                          f"finetune.val_store={blob_store}"],
            "val_fraction": [f"finetune.train_store={blob_store}", "finetune.val_fraction=0.25"],
            "stream": ["finetune.stream.enabled=true", "finetune.stream.val_size=4",
                       "finetune.stream.epoch_size=8", "generator.resolution=16"]}[how]
    cfg = _cfg(*over, size=16)
    monkeypatch.setenv("RANK", "0")
    main_data = FinetuneData.from_config(cfg)
    assert main_data.val_images is not None and main_data.val_images.shape[0] >= 4
    monkeypatch.setenv("RANK", "1")  # another rank of the launch: nothing held
    other = FinetuneData.from_config(cfg)
    assert other.val_images is None and other.val_rotations is None
    assert len(other.train) == len(main_data.train)  # the same training split on every rank
    # a held-out set too small is an error on every rank, not on the main one alone
    bad = {"val_store": "finetune.val_max_images=1", "val_fraction": "finetune.val_fraction=0.01",
           "stream": "finetune.stream.val_size=1"}[how]
    with pytest.raises((ConfigError, DataError)):
        FinetuneData.from_config(_cfg(*over, bad, size=16))


@pytest.mark.slow
def test_an_error_on_one_rank_ends_the_two_process_job_with_the_one_line_error(tmp_path):
    """One planted out-of-range label with out_of_range=error: only the rank whose batch holds
    it raises. The job must end (not hang), non-zero, clerf's one-line error first in the
    output, and no model written."""
    import time

    R = rotation_from_euler(torch.zeros(32), torch.linspace(-60, 60, 32), torch.zeros(32))
    R[5] = rotation_from_euler(torch.tensor([0.0]), torch.tensor([150.0]), torch.tensor([0.0]))[0]
    store = _write_store(tmp_path / "planted.h5", axis_blobs(R, 16), R)
    out = tmp_path / "ddp"
    env = dict(os.environ, ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1")
    accelerate = Path(sys.executable).with_name("accelerate")
    args = [str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines",
            "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "clerf",
            *_cli_args(store, out, "head.type=binned", "finetune.out_of_range=error",
                       "finetune.val_fraction=0", "finetune.train.batch_size=8",
                       *NO_AUG)]  # fmt: skip
    t0 = time.perf_counter()
    res = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    elapsed = time.perf_counter() - t0
    assert res.returncode != 0
    first = next(line for line in (res.stdout + res.stderr).splitlines()
                 if "error" in line.lower())  # fmt: skip
    assert first.startswith("clerf finetune: error:") and "outside the head's bins" in first, first
    assert not (out / "model").exists() and not (out / "summary.json").exists()
    assert elapsed < 60, f"the job took {elapsed:.0f} s to end"


@pytest.mark.parametrize("head,limit", [("sphere", 0), ("rotation6d", 0), ("binned", 0),
                                        ("both", 0)])
def test_host_syncs_per_training_step_are_bounded(blob_store, tmp_path, head, limit):
    """Scalar reads of tensors inside a fine-tune step from a store, outside the logging
    window: none, for every head (binned heads weigh the labels outside their bins 0 and count
    them on the device; only the ``error`` and ``resample`` policies read, by design); none per
    image (69 per step of 16 images were counted before: 64 of them per image)."""
    from clerf.devices import SyncsPerCall
    from clerf.training import Trainer

    cfg = _cfg(f"finetune.train_store={blob_store}", f"head.type={head}",
               *(["head.sphere_points=64"] if head == "sphere" else []),
               "finetune.train.log_every=1000", "finetune.train.epochs=1",
               "finetune.train.checkpoint_epochs=0", "finetune.train.tensorboard=false",
               size=16)  # fmt: skip
    with SyncsPerCall(Trainer, "train_micro_batch") as syncs:
        run_finetune(cfg, tmp_path / head)
    inner = syncs.counts[:-1]  # the last step closes the logging window (one read for the window)
    assert len(inner) >= 5
    assert max(sum(c.values()) for c in inner) <= limit, inner[:2]


def test_finetune_trains_under_bf16_mixed_precision_on_cpu(blob_store, tmp_path):
    """A bf16 fine-tune (CPU autocast): finite losses that go down, float32 head outputs, the
    precision recorded."""
    cfg = _cfg(*NO_AUG, f"finetune.train_store={blob_store}", "finetune.train.epochs=2",
               "finetune.train.mixed_precision=bf16", "finetune.train.tensorboard=false",
               "head.type=sphere", "head.sphere_points=64", size=16)  # fmt: skip
    summary = run_finetune(cfg, tmp_path)
    recs = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in recs if "loss" in r]
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0]
    prov = json.loads((tmp_path / "provenance.json").read_text())
    assert prov["mixed_precision_used"] == "bf16" and summary["steps"] == 16


def test_mix_generated_adds_new_generated_images_to_every_batch(blob_store, tmp_path):
    """finetune.mix_generated=k: each step trains on the store's batch + k generated images,
    new ones at every step (ids from the step), recorded in the model's training data."""
    cfg = _cfg(*NO_AUG, f"finetune.train_store={blob_store}", "finetune.mix_generated=8",
               "generator.resolution=16", "triplets.poses=uniform", "finetune.train.epochs=1",
               "head.type=sphere", "head.sphere_points=64", size=16)  # fmt: skip
    task = FinetuneTask(cfg)
    model = task.build_model()
    loader = task.train_loader(_ctx(cfg))
    batch = next(iter(loader))
    seen = []
    for step in (0, 1):
        ctx = _ctx(cfg)
        ctx.step, ctx.micro_step = step, 0
        mixed = task._with_generated(batch, ctx)
        assert mixed["images"].shape[0] == batch["images"].shape[0] + 8
        torch.testing.assert_close(mixed["images"][:16], batch["images"])
        seen.append(mixed["images"][16:])
        loss, _ = task.train_step(model, batch, ctx)
        assert torch.isfinite(loss)
    assert not torch.equal(seen[0], seen[1])  # new generated images at the next step
    summary = run_finetune(cfg, tmp_path / "mix")
    assert summary["steps"] == 8
    with pytest.raises(ConfigError, match="mix_generated"):
        _cfg(f"finetune.train_store={blob_store}", "finetune.mix_generated=8",
             "finetune.stream.enabled=true")
    with pytest.raises(ConfigError, match="generator.resolution"):
        FinetuneTask(_cfg(f"finetune.train_store={blob_store}", "finetune.mix_generated=8",
                          "generator.resolution=32", size=16))
