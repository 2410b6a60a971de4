"""Tests of the shared training loop (clerf.training) with a toy task."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from clerf.checkpoint import find_checkpoints
from clerf.config import load_config
from clerf.errors import ConfigError, DataError
from clerf.training import StepContext, Task, fit, lr_lambda


class ToyTask(Task):
    """Linear regression on fixed data; noise drawn from ctx.generator (tests determinism)."""

    def __init__(self, n: int = 32, batch: int = 4, fail_at_step: int | None = None) -> None:
        g = torch.Generator().manual_seed(123)
        self.x = torch.randn(n, 8, generator=g)
        self.y = self.x @ torch.randn(8, 1, generator=g)
        self.batch = batch
        self.fail_at_step = fail_at_step
        self.epochs_started: list[int] = []
        self.saved = None

    def build_model(self) -> nn.Module:
        return nn.Linear(8, 1)

    def param_groups(self, model, ctx):
        return [{"params": [model.weight], "name": "w"},
                {"params": [model.bias], "name": "b", "lr_scale": 0.5, "weight_decay": 0.0}]

    def train_loader(self, ctx: StepContext):
        ds = torch.utils.data.TensorDataset(self.x, self.y)
        return torch.utils.data.DataLoader(ds, batch_size=self.batch, shuffle=False)

    def train_step(self, model, batch, ctx):
        if self.fail_at_step is not None and ctx.step == self.fail_at_step:
            raise KeyboardInterrupt("simulated kill")
        x, y = batch
        x = x + 0.01 * torch.randn(x.shape, generator=ctx.generator, device=x.device)
        loss = ((model(x) - y) ** 2).mean()
        return loss, {"n": float(x.shape[0])}

    def log_keys(self, model):
        return ("n",)

    def evaluate(self, model, ctx):
        return {"val/mse": float(((model(self.x) - self.y) ** 2).mean())}

    def on_epoch_start(self, epoch, model, ctx):
        self.epochs_started.append(epoch)

    def save_artifacts(self, model, out, summary):
        self.saved = {k: v.clone() for k, v in model.state_dict().items()}
        (out / "toy.json").write_text(json.dumps({"steps": summary["steps"]}))


def _cfg(*extra: str):
    base = ["pretrain.train.epochs=3", "pretrain.train.lr=0.2", "pretrain.train.log_every=1",
            "pretrain.train.progress=false", "pretrain.train.warmup_steps=2"]  # fmt: skip
    return load_config(overrides=base + list(extra))


def _records(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_fit_trains_logs_and_writes_artifacts(tmp_path):
    task = ToyTask()
    summary = fit(task, _cfg(), tmp_path, section="pretrain")
    assert summary["steps"] == 24 and summary["epochs"] == 3 and summary["steps_per_epoch"] == 8
    assert summary["resumed_from"] is None and summary["world_size"] == 1
    assert task.epochs_started == [0, 1, 2]
    recs = [r for r in _records(tmp_path) if "loss" in r]
    assert [r["step"] for r in recs] == list(range(1, 25))
    assert recs[-1]["loss"] < 0.2 * recs[0]["loss"]
    evals = [r for r in _records(tmp_path) if "val/mse" in r]
    assert len(evals) == 3  # after epochs 1 and 2, and the final one
    assert summary["evaluation"]["val/mse"] == pytest.approx(evals[-1]["val/mse"])
    for name in ("config.yaml", "provenance.json", "summary.json", "toy.json"):
        assert (tmp_path / name).is_file()
    assert [p.name for p in find_checkpoints(tmp_path)] == ["step_00000016", "step_00000024"]
    prov = json.loads((tmp_path / "provenance.json").read_text())
    assert prov["stage"] == "pretrain" and prov["conventions_version"]


def test_param_groups_get_their_lr_scale(tmp_path):
    task = ToyTask()
    fit(task, _cfg("pretrain.train.epochs=1", "pretrain.train.schedule=constant",
                   "pretrain.train.warmup_steps=0"), tmp_path, section="pretrain")  # fmt: skip
    rec = [r for r in _records(tmp_path) if "lr" in r][-1]
    assert rec["lr"] == pytest.approx(0.2)  # group 0; group 1 runs at half (checked below)
    opt_state = torch.load(find_checkpoints(tmp_path)[-1] / "optimizer.bin", weights_only=True)
    lrs = [g["lr"] for g in opt_state["param_groups"]]
    assert lrs == pytest.approx([0.2, 0.1])


def test_interrupted_run_resumes_to_the_same_weights(tmp_path):
    cfg = _cfg("pretrain.train.checkpoint_every=3")
    ref_task = ToyTask()
    fit(ref_task, cfg, tmp_path / "ref", section="pretrain")

    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        fit(ToyTask(fail_at_step=10), cfg, out, section="pretrain")  # dies mid-epoch 1
    assert [p.name for p in find_checkpoints(out)][-1] == "step_00000009"
    task = ToyTask()
    summary = fit(task, cfg, out, section="pretrain")
    assert summary["resumed_from"] == 9 and summary["steps"] == 24
    assert task.epochs_started == [1, 2]  # resumed inside epoch 1
    for k, v in ref_task.saved.items():
        assert torch.equal(v, task.saved[k]), k  # bit-exact: same data order, noise, lr
    assert any(r.get("event") == "resumed" and r["step"] == 9 for r in _records(out))


def test_finished_run_is_not_trained_again_and_can_be_extended(tmp_path):
    cfg = _cfg("pretrain.train.epochs=1")
    fit(ToyTask(), cfg, tmp_path, section="pretrain")
    again = fit(ToyTask(), cfg, tmp_path, section="pretrain")
    assert again["resumed_from"] == 8 and again["steps"] == 8
    longer = fit(ToyTask(), _cfg("pretrain.train.epochs=2"), tmp_path, section="pretrain")
    assert longer["resumed_from"] == 8 and longer["steps"] == 16


def test_resume_with_another_config_is_refused(tmp_path):
    fit(ToyTask(), _cfg("pretrain.train.epochs=1"), tmp_path, section="pretrain")
    with pytest.raises(ConfigError, match=r"different config \(keys: pretrain.train.lr\)"):
        fit(ToyTask(), _cfg("pretrain.train.epochs=1", "pretrain.train.lr=0.1"), tmp_path,
            section="pretrain")  # fmt: skip
    # a display-only setting never blocks a resume
    again = fit(ToyTask(), _cfg("pretrain.train.epochs=1", "pretrain.train.progress=true"),
                tmp_path, section="pretrain")  # fmt: skip
    assert again["resumed_from"] == 8


def test_incomplete_checkpoints_are_ignored(tmp_path):
    ck = tmp_path / "checkpoints"
    (ck / ".step_00000010.tmp").mkdir(parents=True)
    (ck / "step_00000012").mkdir()  # no loop_state.json: a save that did not finish
    (ck / "step_00000004").mkdir()
    (ck / "step_00000004" / "loop_state.json").write_text("{}")
    assert [p.name for p in find_checkpoints(tmp_path)] == ["step_00000004"]


def test_gradient_accumulation_counts_optimizer_steps(tmp_path):
    s = fit(ToyTask(), _cfg("pretrain.train.epochs=1", "pretrain.train.grad_accum=2"), tmp_path,
            section="pretrain")  # fmt: skip
    assert s["steps"] == 4 and s["steps_per_epoch"] == 4


def test_non_finite_loss_is_an_error(tmp_path):
    class NaNTask(ToyTask):
        def train_step(self, model, batch, ctx):
            loss, logs = super().train_step(model, batch, ctx)
            return loss * float("nan"), logs

    with pytest.raises(FloatingPointError, match="non-finite loss at step 0"):
        fit(NaNTask(), _cfg(), tmp_path, section="pretrain")


@pytest.mark.parametrize(
    "override, key",
    [("pretrain.train.lr=0", "lr"), ("pretrain.train.optimizer=adam", "optimizer"),
     ("pretrain.train.schedule=step", "schedule"), ("pretrain.train.grad_accum=0", "grad_accum"),
     ("pretrain.train.mixed_precision=fp8", "mixed_precision")],
)  # fmt: skip
def test_bad_train_values_name_the_key(tmp_path, override, key):
    with pytest.raises(ConfigError, match=f"pretrain.train.{key}"):
        fit(ToyTask(), _cfg(override), tmp_path, section="pretrain")


def test_too_few_batches_for_accumulation(tmp_path):
    from clerf.errors import DataError

    with pytest.raises(DataError, match="fewer than train.grad_accum=16"):
        fit(ToyTask(), _cfg("pretrain.train.grad_accum=16"), tmp_path, section="pretrain")


def test_sgd_and_constant_schedule(tmp_path):
    s = fit(ToyTask(), _cfg("pretrain.train.optimizer=sgd", "pretrain.train.lr=0.01",
                            "pretrain.train.schedule=constant"), tmp_path,
            section="pretrain")  # fmt: skip
    assert s["steps"] == 24


def test_lr_lambda_warmup_then_cosine():
    f = lr_lambda(total_steps=12, warmup_steps=2, schedule="cosine", min_ratio=0.1)
    assert f(0) == pytest.approx(1 / 3) and f(1) == pytest.approx(2 / 3)
    assert f(2) == pytest.approx(1.0)
    assert f(7) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert f(12) == pytest.approx(0.1) and f(100) == pytest.approx(0.1)
    lin = lr_lambda(10, 0, "linear", 0.0)
    assert lin(5) == pytest.approx(0.5)
    assert lr_lambda(10, 3, "constant")(9) == 1.0
    with pytest.raises(ConfigError, match="train.schedule"):
        lr_lambda(10, 0, "step")


def test_skip_does_not_read_skipped_batches_of_a_batch_sampler_loader():
    from clerf.training import _skip

    reads: list[list[int]] = []

    class Batches(torch.utils.data.Dataset):
        def __len__(self):
            return 6

        def __getitem__(self, idx):
            reads.append(idx)
            return torch.tensor(idx)

    batches = [[0, 1], [2, 3], [4, 5]]
    loader = torch.utils.data.DataLoader(Batches(), batch_size=None, sampler=batches)
    got = [b.tolist() for b in _skip(loader, 2)]
    assert got == [[4, 5]] and reads == [[4, 5]]
    plain = torch.utils.data.DataLoader(list(range(6)), batch_size=2)
    assert [b.tolist() for b in _skip(plain, 1)] == [[2, 3], [4, 5]]


class _Payload:
    """Unpickling this creates ``marker``: stands for any code a tampered checkpoint could run."""

    def __init__(self, marker) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        import pathlib

        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


def test_resume_never_unpickles_a_checkpoint(tmp_path):
    import pickle

    cfg = _cfg("pretrain.train.epochs=1")
    fit(ToyTask(), cfg, tmp_path, section="pretrain")
    ckpt = find_checkpoints(tmp_path)[-1]
    marker = tmp_path / "payload_ran"
    # Files accelerate's load_state unpickles: a checkpoint shared by others may hold them.
    for name in ("custom_checkpoint_0.pkl", "custom_checkpoint_1.pkl", "random_states_0.pkl"):
        (ckpt / name).write_bytes(pickle.dumps(_Payload(marker)))
    again = fit(ToyTask(), _cfg("pretrain.train.epochs=2"), tmp_path, section="pretrain")
    assert not marker.exists()
    assert again["resumed_from"] == 8 and again["steps"] == 16

    # A payload in a file the resume does read: refused in one line naming it, nothing run.
    ckpt = find_checkpoints(tmp_path)[-1]
    for name in ("optimizer.bin", "scheduler.bin", "rng_state_0.bin"):
        good = (ckpt / name).read_bytes()
        torch.save({"x": _Payload(marker)}, ckpt / name)
        with pytest.raises(DataError, match=rf"{name}: not a readable clerf checkpoint file.*"
                                            r"give a new --out"):  # fmt: skip
            fit(ToyTask(), _cfg("pretrain.train.epochs=3"), tmp_path, section="pretrain")
        assert not marker.exists()
        (ckpt / name).write_bytes(good)


@pytest.mark.parametrize("name", ["optimizer.bin", "model.safetensors", "loop_state.json"])
def test_truncated_or_foreign_checkpoint_is_one_line_naming_the_file(tmp_path, name):
    fit(ToyTask(), _cfg("pretrain.train.epochs=1"), tmp_path, section="pretrain")
    path = find_checkpoints(tmp_path)[-1] / name
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])
    with pytest.raises(DataError) as info:
        fit(ToyTask(), _cfg("pretrain.train.epochs=2"), tmp_path, section="pretrain")
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith(str(path)) and "earlier checkpoint" in msg


def test_checkpoint_of_an_older_format_is_refused_not_unpickled(tmp_path):
    fit(ToyTask(), _cfg("pretrain.train.epochs=1"), tmp_path, section="pretrain")
    loop = find_checkpoints(tmp_path)[-1] / "loop_state.json"
    state = json.loads(loop.read_text())
    del state["format"]
    loop.write_text(json.dumps(state))
    with pytest.raises(DataError, match="older clerf checkpoints hold pickles"):
        fit(ToyTask(), _cfg("pretrain.train.epochs=2"), tmp_path, section="pretrain")


def test_rng_states_round_trip_through_a_weights_only_file(tmp_path):
    import random

    import numpy as np

    from clerf.checkpoint import rng_state, set_rng_state

    torch.manual_seed(1), np.random.seed(2), random.seed(3)  # noqa: NPY002
    torch.save(rng_state(), tmp_path / "rng.bin")
    first = (torch.rand(3), np.random.rand(3), random.random())  # noqa: NPY002
    set_rng_state(torch.load(tmp_path / "rng.bin", weights_only=True))
    again = (torch.rand(3), np.random.rand(3), random.random())  # noqa: NPY002
    assert torch.equal(first[0], again[0]) and np.array_equal(first[1], again[1])
    assert first[2] == again[2]


class _SumOverRanks:
    """An accelerator stand-in whose reduce sums the tensors of several simulated ranks."""

    device = torch.device("cpu")

    def __init__(self, others):
        self.others = others  # the other ranks' tensors, in call order

    def reduce(self, t, reduction):
        assert reduction == "sum"
        return t + self.others.pop(0)


def test_window_means_use_one_key_set_and_per_key_counts():
    from clerf.training import _Window

    keys = ("ce_yaw", "dropped")
    # rank 1: a step whose labels were all dropped logs no loss part
    r1 = _Window(torch.device("cpu"), keys)
    r1.add(torch.tensor(1.0), {"ce_yaw": torch.tensor(4.0), "dropped": 0.0}, 8)
    r1.add(torch.tensor(3.0), {"dropped": 8.0}, 8)
    # rank 0: both steps logged everything
    r0 = _Window(torch.device("cpu"), keys)
    r0.add(torch.tensor(2.0), {"ce_yaw": torch.tensor(2.0), "dropped": 0.0}, 8)
    r0.add(torch.tensor(2.0), {"ce_yaw": torch.tensor(6.0), "dropped": 0.0}, 8)
    k = len(r1.keys)
    host1 = torch.tensor([r1.host_sums, r1.counts], dtype=torch.float64)
    other = torch.cat([r1.sums + host1[0], host1[1]])
    means = r0.means(_SumOverRanks([other]))
    assert means["loss"] == pytest.approx(8.0 / 4)
    assert means["ce_yaw"] == pytest.approx((2 + 6 + 4) / 3)  # not / 4: one step had none
    assert means["dropped"] == pytest.approx(8.0 / 4)
    assert len(other) == 2 * k  # every rank sends the same-length tensor, whatever it logged
    with pytest.raises(RuntimeError, match="'mae_yaw'.*log_keys"):
        r0.add(torch.tensor(1.0), {"mae_yaw": 1.0}, 8)


def test_mixed_precision_auto_follows_the_launcher_and_explicit_values_win(tmp_path, monkeypatch,
                                                                         caplog):
    """``accelerate launch --mixed_precision bf16`` sets ACCELERATE_MIXED_PRECISION: ``auto``
    (the default) follows it, an explicit value wins, the provenance says what was used."""
    one = ["pretrain.train.epochs=1"]
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    fit(ToyTask(), _cfg(*one), tmp_path / "plain", section="pretrain")
    prov = json.loads((tmp_path / "plain" / "provenance.json").read_text())
    assert prov["mixed_precision_used"] == "no"

    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")  # what the launcher exports
    with caplog.at_level("WARNING", logger="clerf.training"):
        fit(ToyTask(), _cfg(*one), tmp_path / "launcher", section="pretrain")
    prov = json.loads((tmp_path / "launcher" / "provenance.json").read_text())
    assert prov["mixed_precision_used"] == "bf16"
    assert "mixed_precision=auto: training in bf16" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="clerf.training"):
        fit(ToyTask(), _cfg(*one, "pretrain.train.mixed_precision=no"), tmp_path / "explicit",
            section="pretrain")
    prov = json.loads((tmp_path / "explicit" / "provenance.json").read_text())
    assert prov["mixed_precision_used"] == "no"
    assert "wins over the launcher's bf16" in caplog.text


def test_a_run_saved_with_no_resumes_under_auto_without_a_launcher(tmp_path, monkeypatch):
    from clerf.errors import ConfigError

    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    cfg_no = _cfg("pretrain.train.mixed_precision=no", "pretrain.train.checkpoint_every=3")
    with pytest.raises(KeyboardInterrupt):
        fit(ToyTask(fail_at_step=5), cfg_no, tmp_path, section="pretrain")
    summary = fit(ToyTask(), _cfg("pretrain.train.checkpoint_every=3"), tmp_path,
                  section="pretrain")  # auto = no here: the same run
    assert summary["resumed_from"] is not None
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")  # auto now means bf16: another run
    with pytest.raises(ConfigError, match="mixed_precision"):
        fit(ToyTask(), _cfg("pretrain.train.checkpoint_every=3", "pretrain.train.epochs=4"),
            tmp_path, section="pretrain")


def test_effective_batch_is_recorded_and_linear_lr_scaling_follows_the_processes(tmp_path):
    from clerf.training import base_lr, build_optimizer

    cfg = _cfg("pretrain.train.epochs=1", "pretrain.train.grad_accum=2",
               "pretrain.train.batch_size=4")  # what ToyTask's loader uses
    summary = fit(ToyTask(batch=4), cfg, tmp_path, section="pretrain")
    assert summary["effective_batch"] == 4 * 1 * 2  # batch x processes x grad_accum
    prov = json.loads((tmp_path / "provenance.json").read_text())
    assert prov["effective_batch"] == 8 and prov["lr_used"] == pytest.approx(0.2)
    tc = _cfg("pretrain.train.lr_scaling=linear").pretrain.train
    assert base_lr(tc, 4) == pytest.approx(0.8) and base_lr(cfg.pretrain.train, 4) == 0.2
    model = torch.nn.Linear(2, 1)
    opt = build_optimizer([{"params": [model.weight], "lr_scale": 0.5},
                           {"params": [model.bias]}], tc, world_size=3)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.3, 0.6])
    with pytest.raises(ConfigError, match="lr_scaling"):
        _cfg("pretrain.train.lr_scaling=sqrt")


def test_weight_decay_exempt_norm_bias_follows_timms_rule():
    from clerf.training import build_optimizer

    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4),
                                torch.nn.Flatten(), torch.nn.Linear(4, 2))  # fmt: skip
    groups = [{"params": list(model.parameters()), "name": "all"}]
    plain = build_optimizer(groups, _cfg().pretrain.train)
    assert [g["weight_decay"] for g in plain.param_groups] == [0.05]
    opt = build_optimizer(groups, _cfg("pretrain.train.weight_decay_exempt=norm_bias")
                          .pretrain.train)  # fmt: skip
    by_name = {g["name"]: g for g in opt.param_groups}
    assert by_name["all"]["weight_decay"] == 0.05 and by_name["all_no_decay"]["weight_decay"] == 0
    decayed = {id(p) for p in by_name["all"]["params"]}
    assert decayed == {id(model[0].weight), id(model[3].weight)}  # conv and linear weights only
    assert len(by_name["all_no_decay"]["params"]) == 4  # conv bias, BN weight and bias, fc bias


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_the_fused_optimizer_takes_the_same_steps_as_torchs_default(optimizer):
    # train.fused_optimizer: torch's fused kernel on a CPU; oracle: the default (foreach) update
    from clerf.training import build_optimizer

    tc = _cfg(f"pretrain.train.optimizer={optimizer}", "pretrain.train.momentum=0.9",
              "pretrain.train.fused_optimizer=true").pretrain.train
    assert build_optimizer([{"params": [torch.nn.Parameter(torch.ones(2))]}],
                           _cfg().pretrain.train).param_groups[0]["fused"] is None  # default
    torch.manual_seed(0)
    a = torch.nn.Linear(8, 3)
    b = torch.nn.Linear(8, 3)
    b.load_state_dict(a.state_dict())
    fused = build_optimizer([{"params": list(a.parameters())}], tc)
    assert fused.param_groups[0]["fused"] is True
    kind = torch.optim.AdamW if optimizer == "adamw" else torch.optim.SGD
    extra = {} if optimizer == "adamw" else {"momentum": 0.9, "nesterov": True}
    ref = kind(b.parameters(), lr=float(tc.lr), weight_decay=float(tc.weight_decay),
               foreach=True, **extra)  # fmt: skip
    x = torch.randn(16, 8, generator=torch.Generator().manual_seed(1))
    for _ in range(5):
        for m, opt in ((a, fused), (b, ref)):
            opt.zero_grad()
            m(x).square().mean().backward()
            opt.step()
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_syncs_per_call_counts_each_call_and_restores_the_method():
    from clerf.devices import SyncsPerCall

    class Owner:
        def step(self, x):
            return float(x.sum())  # one scalar read

    original = Owner.step
    with SyncsPerCall(Owner, "step") as s:
        Owner().step(torch.ones(3))
        Owner().step(torch.ones(3))
    assert s.counts == [{"__float__": 1}, {"__float__": 1}] and Owner.step is original
    with SyncsPerCall(Owner, "step", only={1}) as s:
        for _ in range(3):
            Owner().step(torch.ones(3))
    assert s.counts == [{}, {"__float__": 1}, {}]
