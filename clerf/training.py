"""THE training loop of clerf: one implementation that every training stage configures.

A stage (``clerf.pretrain``, ``clerf.finetune``) describes *what* to train by implementing a
:class:`Task`; :func:`fit` does the *how*, identically for all stages:

* accelerate for the device, DDP (``accelerate launch``), mixed precision and gradient
  accumulation; nothing here calls ``.cuda()``;
* AdamW or SGD over the task's parameter groups (each group may carry ``lr_scale``), a linear
  warm-up then a cosine / linear / constant schedule (per optimizer step);
* full-state checkpoints (model, optimizer, scheduler, RNG of every process, loop position) under
  ``OUT/checkpoints/step_XXXXXXXX``, written to a temporary folder and renamed, so a killed run
  never leaves a checkpoint that looks complete. They hold no pickle, so a shared or downloaded
  checkpoint cannot run code; :mod:`clerf.checkpoint` holds the format, its writer and reader;
* **automatic resume**: calling :func:`fit` again with the same ``OUT`` continues from the newest
  checkpoint (mid-epoch too: the batches already seen in that epoch are skipped);
* a tqdm bar on the main process (loss, images/s, ETA), metrics as JSON lines in
  ``OUT/metrics.jsonl`` (and TensorBoard through accelerate's tracker when it is installed);
* the task's evaluation every ``eval_every`` epochs; the resolved config and provenance in
  ``OUT/config.yaml`` / ``OUT/provenance.json``; ``OUT/summary.json`` at the end.

The configuration is the stage's ``train`` section (:class:`clerf.config.TrainConfig`), found at
``cfg[section].train``.

Writing a task (e.g. fine-tuning)::

    class FinetuneTask(Task):
        def __init__(self, cfg): self.cfg = cfg
        def build_model(self): return HeadPoseModel(...)
        def train_loader(self, ctx): return make_loader(LabelledDataset(...), rank=ctx.rank, ...)
        def train_step(self, model, batch, ctx):
            images, R = self.augment(batch["images"], batch["rotations"], generator=ctx.generator)
            loss, logs = model(images) ...
            return loss, logs
        def evaluate(self, model, ctx): return {"val/geodesic_deg": ...}
        def save_artifacts(self, model, out, summary): model.save_pretrained(out / "model")

    summary = fit(FinetuneTask(cfg), cfg, out, section="finetune")

Determinism: :func:`fit` seeds everything from ``cfg.seed`` (same initial weights on every rank)
and gives each step a fresh ``torch.Generator`` seeded from ``(seed, rank, step, micro-step)`` in
``ctx.generator``: a task that draws its augmentation from it gets the same random choices after
a resume as in an uninterrupted run.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import os
import time
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_args

import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

from clerf.checkpoint import (
    LoopState,
    checkpoint_step,
    find_checkpoints,
    load_checkpoint,
    save_checkpoint,
)
from clerf.config import (
    Schedule,
    TrainConfig,
    comparable,
    config_differences,
    effective_mixed_precision,
    provenance,
    save_resolved,
    section_config,
    to_dict,
)
from clerf.errors import ConfigError, DataError, TrainingDiverged
from clerf.files import write_text_atomic

__all__ = [
    "Task",
    "Trainer",
    "StepContext",
    "fit",
    "build_optimizer",
    "lr_lambda",
]

log = logging.getLogger("clerf.training")

#: ``train`` keys that may differ when a run is resumed: the length of training (extending a run
#: is a legitimate resume) and display-only settings (they change nothing that is computed)
RESUME_MAY_CHANGE = ("epochs", "max_steps", "progress")



# --------------------------------------------------------------------------- the plug-in interface


@dataclass
class StepContext:
    """What the loop tells a task. One instance per :func:`fit` call, updated as it goes.

    Attributes:
        accelerator: the ``accelerate.Accelerator`` (device, ``num_processes``, ``gather``...).
        cfg: the whole experiment config (read-only ``DictConfig``).
        train_cfg: ``cfg[section].train``.
        out: the output directory.
        epoch: current epoch, 0-based.
        step: optimizer steps done so far (global step; what checkpoints are named after).
        micro_step: micro-batches done in this epoch (``grad_accum`` of them per step).
        generator: a ``torch.Generator`` on ``device`` reseeded for every micro-batch from
            ``(seed, rank, step, micro_step)``; draw augmentation randomness from it.
        extra: free slot where a task may keep per-run values (not checkpointed).
    """

    accelerator: Any
    cfg: DictConfig
    train_cfg: DictConfig
    out: Path
    epoch: int = 0
    step: int = 0
    micro_step: int = 0
    generator: torch.Generator | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def rank(self) -> int:
        return self.accelerator.process_index

    @property
    def world_size(self) -> int:
        return self.accelerator.num_processes

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def seed(self) -> int:
        return int(self.cfg.seed)


class Task(ABC):
    """What a training stage trains; :func:`fit` calls these hooks in this order.

    1. :meth:`build_model` once (on every process, after seeding: same initial weights).
    2. :meth:`param_groups` once, on the raw model, to build the optimizer.
    3. :meth:`train_loader` once; the loader yields THIS process's share of each epoch (the task
       shards by ``ctx.rank`` / ``ctx.world_size``; the loop does not re-shard). If its
       ``batch_sampler`` or ``sampler`` has ``set_epoch``, the loop calls it every epoch. It must
       have a ``len`` (batches per epoch) and the same length on every rank.
    4. Per epoch: :meth:`on_epoch_start` (freeze/unfreeze schedules), then for every batch
       (already moved to the device) :meth:`train_step` inside ``accelerator.accumulate``.
    5. Every ``eval_every`` epochs and at the end: :meth:`evaluate` on the **main process only**,
       with the unwrapped model in ``eval()`` mode under ``torch.no_grad()``; it must not use
       collective operations.
    6. At the end, on the main process: :meth:`save_artifacts` with the unwrapped model.
    """

    @abstractmethod
    def build_model(self) -> nn.Module:
        """Return a fresh model (its own initialisation or pretrained weights)."""

    def param_groups(self, model: nn.Module, ctx: StepContext) -> list[dict[str, Any]]:
        """Optimizer parameter groups. Default: one group with every trainable parameter.

        Each group is a dict with ``params`` and optionally ``lr_scale`` (multiplies
        ``train.lr``; HopeNet: heads at 5x), ``weight_decay`` and ``name`` (for the logs).
        Parameters frozen for the whole run should simply be left out. To freeze for *some*
        epochs under DDP, set ``train.find_unused_parameters: true`` and toggle
        ``requires_grad`` in :meth:`on_epoch_start` (parameters without a gradient are skipped
        by the optimizer).
        """
        return [{"params": [p for p in model.parameters() if p.requires_grad], "name": "all"}]

    @abstractmethod
    def train_loader(self, ctx: StepContext) -> Iterable[Mapping[str, Any]]:
        """This process's training batches (dicts of tensors, on the CPU is fine)."""

    @abstractmethod
    def train_step(
        self, model: nn.Module, batch: Mapping[str, Any], ctx: StepContext
    ) -> tuple[Tensor, dict[str, float]]:
        """Forward one batch: ``(scalar loss, logs)``; the loop does backward and the step.

        ``model`` is the wrapped (DDP) model: call it, do not reach into ``.module``. Logs are
        floats (or 0-d tensors) averaged over the logging interval, e.g. counters of dropped
        samples; a ``(value, present)`` pair of tensors counts only where ``present`` is 1 (a
        step that has nothing to report for that key, decided on the device).
        """

    def log_keys(self, model: nn.Module) -> tuple[str, ...]:
        """The names of every log :meth:`train_step` may return, fixed for the run (``model``
        is the raw model). A step may leave some out (e.g. a batch whose labels were all
        dropped has no loss parts): such a key's mean is over the steps that had it. The
        logging window reduces this one key set over processes, so ranks never disagree on
        it; a step that returns an undeclared key is an error. Default: none."""
        return ()

    def evaluate(self, model: nn.Module, ctx: StepContext) -> dict[str, float]:
        """Cheap check of progress (main process only, no collectives). Default: nothing."""
        return {}

    def on_epoch_start(self, epoch: int, model: nn.Module, ctx: StepContext) -> None:
        """Called at the start of every epoch (also the first one after a resume)."""
        return None

    def save_artifacts(self, model: nn.Module, out: Path, summary: dict[str, Any]) -> None:
        """Write the stage's product (e.g. ``out/encoder``) from the unwrapped model."""
        return None

    def count_images(self, batch: Mapping[str, Any]) -> int:
        """Images in a batch, for images/s. Default: ``batch["images"]`` minus ``(C, H, W)``."""
        images = batch.get("images") if isinstance(batch, Mapping) else None
        if isinstance(images, Tensor) and images.ndim >= 4:
            return int(math.prod(images.shape[:-3]))
        return 0


# --------------------------------------------------------------------------- optimizer & schedule


def base_lr(train_cfg: DictConfig, world_size: int = 1) -> float:
    """``train.lr``, times the number of processes under ``train.lr_scaling: linear``."""
    scale = world_size if str(train_cfg.get("lr_scaling", "none")) == "linear" else 1
    return float(train_cfg.lr) * scale


def build_optimizer(groups: list[dict[str, Any]], train_cfg: DictConfig,
                    world_size: int = 1) -> torch.optim.Optimizer:  # fmt: skip
    """AdamW or SGD over ``groups``; each group's lr is ``base_lr * group.get('lr_scale', 1)``
    (:func:`base_lr`: ``train.lr``, scaled by the number of processes if asked). With
    ``train.weight_decay_exempt: norm_bias`` each group's 1-D tensors (norm weights, biases)
    get no weight decay, unless the group sets its own ``weight_decay``."""
    lr = base_lr(train_cfg, world_size)
    exempt = str(train_cfg.get("weight_decay_exempt", "none")) == "norm_bias"
    torch_groups = []
    for i, g in enumerate(groups):
        params = [p for p in g["params"]]
        if not params:
            continue
        name = str(g.get("name", f"group{i}"))
        wd = float(g.get("weight_decay", train_cfg.weight_decay))
        parts = [(name, params, wd)]
        if exempt and "weight_decay" not in g:
            # timm's param_groups_weight_decay rule: no decay for 1-D tensors (BatchNorm
            # weights, every bias, the 6D head's identity bias)
            decay = [p for p in params if p.ndim > 1]
            rest = [p for p in params if p.ndim <= 1]
            parts = [(name, decay, wd), (f"{name}_no_decay", rest, 0.0)]
        for part_name, part, part_wd in parts:
            if part:
                torch_groups.append({"params": part, "lr": lr * float(g.get("lr_scale", 1.0)),
                                     "weight_decay": part_wd, "name": part_name})
    if not torch_groups:
        raise ConfigError("training: the task has no trainable parameters")
    name = str(train_cfg.optimizer).lower()
    # train.fused_optimizer: torch's fused kernel where torch has it for every parameter
    fused = bool(train_cfg.get("fused_optimizer", False)) and all(
        p.device.type in ("cpu", "cuda") and p.dtype.is_floating_point
        for g in torch_groups for p in g["params"]) or None  # fmt: skip
    if name == "adamw":
        return torch.optim.AdamW(torch_groups, lr=lr, fused=fused)
    if name == "sgd":
        momentum = float(train_cfg.momentum)
        # Nesterov needs momentum: plain SGD at momentum 0 (torch refuses the combination)
        return torch.optim.SGD(torch_groups, lr=lr, momentum=momentum, nesterov=momentum > 0,
                               fused=fused)  # fmt: skip
    raise ConfigError(f"train.optimizer: expected 'adamw' or 'sgd', got '{train_cfg.optimizer}'")


def lr_lambda(
    total_steps: int, warmup_steps: int = 0, schedule: Schedule = "cosine", min_ratio: float = 0.0
):
    """Multiplier of the base lr at optimizer step ``s`` (0-based), as a function.

    Linear warm-up from ``1 / (warmup + 1)`` to 1 over ``warmup_steps``, then ``cosine`` /
    ``linear`` decay to ``min_ratio`` at ``total_steps`` (or ``constant``).
    """
    if schedule not in get_args(Schedule):
        raise ConfigError(f"train.schedule: expected one of {', '.join(get_args(Schedule))}, "
                          f"got '{schedule}'")  # fmt: skip
    total = max(int(total_steps), 1)
    warm = max(int(warmup_steps), 0)

    def f(step: int) -> float:
        if step < warm:
            return (step + 1) / (warm + 1)
        if schedule == "constant":
            return 1.0
        t = min(max(step - warm, 0) / max(total - warm, 1), 1.0)
        shape = 0.5 * (1.0 + math.cos(math.pi * t)) if schedule == "cosine" else 1.0 - t
        return min_ratio + (1.0 - min_ratio) * shape

    return f


# --------------------------------------------------------------------------- logging


class _MetricLog:
    """JSON lines on the main process (+ accelerate trackers when initialised)."""

    def __init__(self, accelerator, path: Path, use_trackers: bool) -> None:
        self.acc = accelerator
        self.path = path
        self.use_trackers = use_trackers

    def write(self, record: dict[str, Any]) -> None:
        if not self.acc.is_main_process:
            return
        rec = {k: _to_float(v) for k, v in record.items()}
        with self.path.open("a") as fh:
            fh.write(json.dumps(rec) + "\n")
        if self.use_trackers:
            nums = {k: v for k, v in rec.items() if isinstance(v, (int, float)) and k != "step"}
            self.acc.log(nums, step=int(rec.get("step", 0)))


def _to_float(v: Any) -> Any:
    if isinstance(v, Tensor):
        return float(v.detach().float().mean())
    return v


def _tensorboard_available() -> bool:
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        return False
    return True


# --------------------------------------------------------------------------- the loop


def _set_epoch(loader: Any, epoch: int) -> None:
    for obj in (loader, getattr(loader, "batch_sampler", None), getattr(loader, "sampler", None)):
        if obj is not None and hasattr(obj, "set_epoch"):
            obj.set_epoch(epoch)
            return


class _SkipSampler(torch.utils.data.Sampler):
    """The wrapped sampler without its first ``n`` items (batches, for ``batch_size=None``)."""

    def __init__(self, sampler: Any, n: int) -> None:
        self.sampler, self.n = sampler, n

    def __iter__(self) -> Iterator[Any]:
        return itertools.islice(iter(self.sampler), self.n, None)

    def __len__(self) -> int:
        return max(len(self.sampler) - self.n, 0)


def _skip(loader: Any, n: int) -> Iterator[Any]:
    """Iterate ``loader`` without its first ``n`` batches, without reading them when possible.

    A DataLoader whose sampler yields whole batches (``batch_size=None``, the store loaders) is
    rebuilt around a skipping sampler; one with a ``batch_sampler`` goes through accelerate's
    ``skip_first_batches``; anything else is iterated and the batches dropped.
    """
    if n <= 0:
        return iter(loader)
    DataLoader = torch.utils.data.DataLoader
    if isinstance(loader, DataLoader) and loader.batch_size is None:
        return iter(DataLoader(
            loader.dataset, batch_size=None, sampler=_SkipSampler(loader.sampler, n),
            num_workers=loader.num_workers, collate_fn=loader.collate_fn,
            pin_memory=loader.pin_memory, worker_init_fn=loader.worker_init_fn,
        ))  # fmt: skip
    if isinstance(loader, DataLoader) and loader.batch_sampler is not None:
        from accelerate import skip_first_batches

        return iter(skip_first_batches(loader, n))
    it = iter(loader)
    for _ in range(n):
        next(it, None)
    return it


def _step_seed(seed: int, rank: int, step: int, micro: int) -> int:
    # A fixed mixing of the loop position: the same step draws the same augmentation after a
    # resume; different ranks and micro-batches draw different ones.
    return (seed * 1_000_003 + rank * 7_919 + step * 104_729 + micro * 31) % (2**63 - 1)


def _mixed_precision(tc: DictConfig, section: str) -> str:
    """The precision to train in, said aloud when it is not what the config alone implies."""
    asked = str(tc.mixed_precision)
    used = effective_mixed_precision(asked)
    launcher = os.environ.get("ACCELERATE_MIXED_PRECISION")
    if asked == "auto" and used != "no":
        log.warning("%s.train.mixed_precision=auto: training in %s as the launcher says "
                    "(accelerate launch --mixed_precision or its config file); set "
                    "%s.train.mixed_precision=no for float32", section, used, section)
    elif asked != "auto" and launcher and launcher != asked:
        log.warning("%s.train.mixed_precision=%s wins over the launcher's %s", section, asked,
                    launcher)
    return used


def _allow_precision(precision: str) -> None:
    """Let this process's next ``Accelerator`` use ``precision``. accelerate keeps one
    ``AcceleratorState`` per process and refuses another precision once it exists, so two
    stages of one process (``clerf pipeline``: a bf16 pretraining, then a float32 fine-tune)
    would fail; the state is reset then, the process group (``PartialState``) kept."""
    from accelerate.state import AcceleratorState

    state = AcceleratorState._shared_state
    if state and str(state.get("_mixed_precision", precision)) != precision:
        AcceleratorState._reset_state(reset_partial_state=False)


def saved_run_config(out: Path) -> dict[str, Any]:
    """The config of the run in ``out`` as comparisons see it (:func:`clerf.config.comparable`),
    with the precision it actually trained in (``mixed_precision_used`` of its provenance)
    where recorded: ``auto`` then means what it meant for that run, not what it means now."""
    old = comparable(to_dict(OmegaConf.load(out / "config.yaml")))
    prov_file = out / "provenance.json"
    prov = json.loads(prov_file.read_text()) if prov_file.is_file() else {}
    used, stage = prov.get("mixed_precision_used"), prov.get("stage")
    if used and isinstance(old.get(stage), dict) and isinstance(old[stage].get("train"), dict):
        old[stage] = {**old[stage], "train": {**old[stage]["train"], "mixed_precision": used}}
    return old


def _check_resume_config(out: Path, cfg: DictConfig, section: str) -> None:
    """A run in ``out`` with a different config is an error (except the length of training)."""
    saved = out / "config.yaml"
    if not saved.is_file() or not find_checkpoints(out):
        return
    old = saved_run_config(out)
    new = comparable(to_dict(cfg))
    for key in RESUME_MAY_CHANGE:
        for d in (old, new):
            d.get(section, {}).get("train", {}).pop(key, None)
    diffs = [key for key, _, _ in config_differences(old, new)]
    if diffs:
        shown = ", ".join(diffs[:6]) + (" ..." if len(diffs) > 6 else "")
        raise ConfigError(
            f"{out} holds a run with a different config (keys: {shown}); "
            "resume with the same config, or give a new --out"
        )


def fit(task: Task, cfg: DictConfig, out: str | Path, section: str) -> dict[str, Any]:
    """Train ``task`` with ``cfg[section].train``; write everything under ``out``; resume if any.

    Args:
        task: the stage's :class:`Task`.
        cfg: the whole experiment config (saved resolved as ``out/config.yaml``).
        out: output directory (created). A previous run there is resumed from its newest
            complete checkpoint; a finished run is not trained again (its final evaluation and
            artefacts are redone). Raising ``epochs`` / ``max_steps`` extends a finished run.
        section: the config section of the stage (``"pretrain"``, ``"finetune"``).

    Returns:
        The summary dict (also ``out/summary.json``): steps, epochs, images, seconds,
        images/s, final logged metrics, the evaluation, the last checkpoint, ``resumed_from``.

    Raises:
        ConfigError: bad ``train`` values, or ``out`` holds a run with another config.
    """
    return Trainer(task, cfg, out, section).fit()


class _Window:
    """Step metrics of one logging window over a fixed key set: tensors summed on the device,
    floats on the host, read back and reduced over processes once per window."""

    def __init__(self, device: torch.device, keys: Iterable[str] = ()) -> None:
        self.device = device
        # float64 where the device has it (exact enough to match a host-side sum)
        self.dtype = torch.float32 if device.type == "mps" else torch.float64
        self.keys = tuple(dict.fromkeys(("loss", *keys)))
        self.index = {k: i for i, k in enumerate(self.keys)}
        self.reset()

    def note_finite(self, loss: Tensor, step: int) -> None:
        """Remember on the device the first step whose loss is not finite (no host read)."""
        bad = ~torch.isfinite(loss).all()
        step_t = torch.full((), float(step), dtype=self.dtype, device=self.device)  # a fill
        self.first_bad = torch.where(bad & (self.first_bad < 0), step_t, self.first_bad)

    def first_nonfinite(self, accelerator) -> int | None:
        """The first step with a non-finite loss on any process since the last call, or None;
        one reduced read (every process must call it at the same point)."""
        flag = self.first_bad.to(accelerator.device)[None]
        if accelerator.num_processes > 1:  # every rank's value, so that all decide alike
            flag = accelerator.gather(flag)
        bad = [v for v in flag.tolist() if v >= 0]
        self.first_bad = torch.full((), -1.0, dtype=self.dtype, device=self.device)
        return int(min(bad)) if bad else None

    def reset(self) -> None:
        k = len(self.keys)
        self.first_bad = getattr(self, "first_bad", None)
        if self.first_bad is None:
            self.first_bad = torch.full((), -1.0, dtype=self.dtype, device=self.device)
        self.sums = torch.zeros(k, dtype=self.dtype, device=self.device)
        self.dev_counts = torch.zeros(k, dtype=self.dtype, device=self.device)
        self.host_sums = [0.0] * k
        self.counts = [0] * k
        self.n = 0
        self.images = 0
        self.t0 = time.perf_counter()
        self.paused = 0.0  # seconds of evaluation and checkpointing inside the window

    def add(self, loss: Tensor, logs: Mapping[str, Any], images: int) -> None:
        for k, v in (("loss", loss), *logs.items()):
            i = self.index.get(k)
            if i is None:
                raise RuntimeError(f"training: the task logged '{k}', which its log_keys() "
                                   f"does not declare ({', '.join(self.keys)})")  # fmt: skip
            if isinstance(v, tuple):  # (value, present): a weight on the device, 0 or 1
                value, present = (t.detach().float().mean().to(self.dtype) for t in v)
                self.sums[i] += torch.where(present > 0, value * present, 0.0)
                self.dev_counts[i] += present
                continue
            if isinstance(v, Tensor):  # as a host-side float(v.float().mean()) would be
                self.sums[i] += v.detach().float().mean().to(self.dtype)
            else:
                self.host_sums[i] += float(v)
            self.counts[i] += 1
        self.n += 1
        self.images += images

    def means(self, accelerator) -> dict[str, float]:
        """Per key: its sum over the window's steps and all processes over the number of
        steps that logged it (a key no step logged is left out)."""
        host = torch.tensor([self.host_sums, self.counts], dtype=self.dtype)
        total = torch.stack([self.sums, host[0].to(self.device)]).sum(0)
        counts = host[1].to(self.device) + self.dev_counts
        both = torch.cat([total, counts]).to(accelerator.device)
        both = accelerator.reduce(both, reduction="sum").tolist()
        k = len(self.keys)
        return {key: both[i] / both[k + i] for i, key in enumerate(self.keys) if both[k + i]}

    def seconds(self) -> float:
        return time.perf_counter() - self.t0 - self.paused


class Trainer:
    """The loop behind :func:`fit`: set-up, resume, epochs, logging windows, checkpoints and
    the finish. One instance per run; :meth:`fit` runs it."""

    def __init__(self, task: Task, cfg: DictConfig, out: str | Path, section: str) -> None:
        from accelerate import Accelerator
        from accelerate.utils import DistributedDataParallelKwargs, ProjectConfiguration, set_seed

        if section not in cfg or "train" not in cfg[section]:
            raise ConfigError(f"training: config has no '{section}.train' section")
        self.task, self.cfg, self.section = task, cfg, section
        self.tc = tc = cfg[section].train
        section_config(TrainConfig, tc, f"{section}.train")  # as load_config does (derived too)
        self.out = out = Path(out)
        self.trackers = ["tensorboard"] if (tc.tensorboard and _tensorboard_available()) else None
        precision = _mixed_precision(tc, section)
        _allow_precision(precision)
        self.accelerator = Accelerator(
            mixed_precision=precision,
            gradient_accumulation_steps=int(tc.grad_accum),
            cpu=bool(tc.cpu),
            log_with=self.trackers,
            project_config=ProjectConfiguration(project_dir=str(out),
                                                logging_dir=str(out / "tb")),  # fmt: skip
            kwargs_handlers=[DistributedDataParallelKwargs(
                find_unused_parameters=bool(tc.find_unused_parameters))],  # fmt: skip
        )
        # Every rank checks (and raises) before anything is written: an error on the main
        # process alone would leave the other ranks waiting forever.
        _check_resume_config(out, cfg, section)
        set_seed(int(cfg.seed))
        self.ctx = StepContext(accelerator=self.accelerator, cfg=cfg, train_cfg=tc, out=out)
        self.state = LoopState()
        self.last_logs: dict[str, Any] = {}
        self.evaluation: dict[str, float] = {}

    # ------------------------------------------------------------------ set-up and resume

    def setup(self) -> None:
        """Model, optimizer, data and schedule; the config and provenance once all are valid."""
        tc, acc, section = self.tc, self.accelerator, self.section
        model = self.task.build_model()
        if tc.channels_last:
            model = model.to(memory_format=torch.channels_last)
        if tc.sync_batchnorm and acc.num_processes > 1:
            if acc.device.type != "cuda":
                raise ConfigError(f"{section}.train.sync_batchnorm: SyncBatchNorm needs CUDA "
                                  f"devices (NCCL), not {acc.device.type}")  # fmt: skip
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        optimizer = build_optimizer(self.task.param_groups(model, self.ctx), tc,
                                    acc.num_processes)  # fmt: skip
        self.loader = self.task.train_loader(self.ctx)
        try:
            micro_per_epoch = len(self.loader)  # type: ignore[arg-type]
        except TypeError as exc:
            raise ConfigError(f"training: the {section} task's loader has no length") from exc
        if micro_per_epoch < int(tc.grad_accum):
            raise DataError(
                f"{section}: {micro_per_epoch} batch(es) per epoch per process, fewer than "
                f"train.grad_accum={tc.grad_accum}; use a smaller train.batch_size or more data"
            )
        self.steps_per_epoch = micro_per_epoch // int(tc.grad_accum)
        self.micro_per_epoch = self.steps_per_epoch * int(tc.grad_accum)
        self.total_steps = int(tc.max_steps) or int(tc.epochs) * self.steps_per_epoch
        self.epochs = math.ceil(self.total_steps / self.steps_per_epoch)
        self.effective_batch = int(tc.batch_size) * acc.num_processes * int(tc.grad_accum)
        # The inputs are checked (model, optimizer, data): only now does anything appear in out.
        acc.wait_for_everyone()
        if acc.is_main_process:
            self.out.mkdir(parents=True, exist_ok=True)
            save_resolved(self.cfg, self.out)
            info = provenance(self.cfg, stage=section, world_size=acc.num_processes)
            info["mixed_precision_used"] = str(acc.mixed_precision)
            info["effective_batch"] = self.effective_batch
            info["lr_used"] = base_lr(tc, acc.num_processes)
            (self.out / "provenance.json").write_text(json.dumps(info, indent=2))
        acc.wait_for_everyone()
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer,
            lr_lambda(self.total_steps, int(tc.warmup_steps), str(tc.schedule),
                      float(tc.min_lr_ratio)),  # fmt: skip
        )
        # The loader is the task's (already sharded) and the scheduler is stepped here once per
        # optimizer step, so neither goes through prepare() (which would shard and step it again).
        self.model, self.optimizer = acc.prepare(model, optimizer)

    def resume(self) -> None:
        """Continue from the newest complete checkpoint in ``out``, if any."""
        ckpts = find_checkpoints(self.out)
        self.resumed_from: int | None = None
        self.last_ckpt: Path | None = ckpts[-1] if ckpts else None
        if ckpts:
            load_checkpoint(self.accelerator, ckpts[-1], self.state, self.model, self.optimizer,
                            self.scheduler)  # fmt: skip
            self.resumed_from = self.state.step
            if self.state.micro_step >= self.micro_per_epoch:
                self.state.epoch, self.state.micro_step = self.state.epoch + 1, 0
        self.log = _MetricLog(self.accelerator, self.out / "metrics.jsonl",
                              use_trackers=self.trackers is not None)  # fmt: skip
        if self.trackers:
            self.accelerator.init_trackers(self.section, config=_flat_numbers(to_dict(self.cfg)))
        if self.resumed_from is not None:
            self.log.write({"event": "resumed", "step": self.state.step, "epoch": self.state.epoch})
            self.accelerator.print(f"{self.section}: resuming from step {self.state.step} "
                                   f"({ckpts[-1]})")  # fmt: skip

    # ------------------------------------------------------------------ the loop

    def fit(self) -> dict[str, Any]:
        self.setup()
        self.resume()
        self.bar = None
        if self.tc.progress and self.accelerator.is_main_process \
                and self.state.step < self.total_steps:  # fmt: skip
            from tqdm.auto import tqdm

            self.bar = tqdm(total=self.total_steps, initial=self.state.step, desc=self.section,
                            unit="step", dynamic_ncols=True)  # fmt: skip
        self.window = _Window(self.accelerator.device,
                              self.task.log_keys(self.accelerator.unwrap_model(self.model)))
        self.t_start = time.perf_counter()
        self.images_at_start = self.state.images
        while self.state.step < self.total_steps and self.state.epoch < self.epochs:
            self.run_epoch(self.state.epoch)
        if self.bar is not None:
            self.bar.close()
        return self.finish()

    def run_epoch(self, epoch: int) -> None:
        """The rest of ``epoch`` (all of it unless resumed mid-epoch), then its evaluation and
        checkpoint when due."""
        state, tc, ctx = self.state, self.tc, self.ctx
        ctx.epoch, ctx.step = epoch, state.step
        _set_epoch(self.loader, epoch)
        self.task.on_epoch_start(epoch, self.model, ctx)
        self.model.train()
        skip = state.micro_step
        batches = _skip(self.loader, skip)
        for micro in range(skip, self.micro_per_epoch):
            batch = next(batches, None)
            if batch is None:
                break
            if self.train_micro_batch(epoch, micro, batch) and state.step >= self.total_steps:
                break
        epoch_done = state.micro_step >= self.micro_per_epoch
        finished = state.step >= self.total_steps
        if epoch_done:
            state.epoch, state.micro_step = epoch + 1, 0
        t_pause = time.perf_counter()
        if tc.eval_every and epoch_done and (epoch + 1) % int(tc.eval_every) == 0 and not finished:
            self.evaluation = self.evaluate()
        if not finished and epoch_done and tc.checkpoint_epochs \
                and (epoch + 1) % int(tc.checkpoint_epochs) == 0:  # fmt: skip
            self.checkpoint()
        self.window.paused += time.perf_counter() - t_pause

    def train_micro_batch(self, epoch: int, micro: int, batch: Any) -> bool:
        """Forward and backward one micro-batch; returns whether an optimizer step completed."""
        from accelerate.utils import send_to_device

        acc, state, tc, ctx = self.accelerator, self.state, self.tc, self.ctx
        batch = send_to_device(batch, acc.device, non_blocking=True)
        ctx.micro_step, ctx.step = micro, state.step
        ctx.generator = torch.Generator(device=acc.device).manual_seed(
            _step_seed(int(self.cfg.seed), acc.process_index, state.step, micro)
        )
        with acc.accumulate(self.model):
            loss, logs = self.task.train_step(self.model, batch, ctx)
            # Noted on the device, read with the logging window (no host sync per step); the
            # window is checked before any checkpoint, so no non-finite state is ever saved.
            self.window.note_finite(loss.detach(), state.step)
            acc.backward(loss)
            if acc.sync_gradients and tc.grad_clip > 0:
                acc.clip_grad_norm_(self.model.parameters(), float(tc.grad_clip))
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        n_img = self.task.count_images(batch) * acc.num_processes
        state.images += n_img
        state.micro_step = micro + 1
        self.window.add(loss, logs, n_img)
        if not acc.sync_gradients:
            return False
        if not acc.optimizer_step_was_skipped:
            self.scheduler.step()
        state.step += 1
        if self.bar is not None:
            self.bar.update(1)
        last_step = state.step >= self.total_steps
        if state.step % max(int(tc.log_every), 1) == 0 or last_step:
            self.log_window(epoch)
        if tc.checkpoint_every and state.step % int(tc.checkpoint_every) == 0 and not last_step:
            t_pause = time.perf_counter()
            self.checkpoint()
            self.window.paused += time.perf_counter() - t_pause
        return True

    def check_finite(self) -> None:
        """Raise on every process alike if any process saw a non-finite loss since the last
        check (one reduced read)."""
        first = self.window.first_nonfinite(self.accelerator)
        if first is not None:
            raise TrainingDiverged(
                f"{self.section}: non-finite loss at step {first}; lower train.lr or check "
                "the data"
            )

    def log_window(self, epoch: int) -> None:
        """Means of the window's step metrics over steps and processes, images/s, lr."""
        dt = self.window.seconds()
        self.check_finite()
        rec: dict[str, Any] = self.window.means(self.accelerator)
        rec.update(
            step=self.state.step, epoch=epoch, images=self.state.images,
            img_per_s=self.window.images / dt if dt > 0 else 0.0,
            lr=self.scheduler.get_last_lr()[0],
        )  # fmt: skip
        self.log.write(rec)
        self.last_logs = rec
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{rec['loss']:.4f}", img_s=f"{rec['img_per_s']:.0f}",
                                 epoch=epoch)  # fmt: skip
        self.window.reset()

    def checkpoint(self) -> None:
        self.check_finite()
        self.last_ckpt = save_checkpoint(self.accelerator, self.out, self.state,
                                         self.tc.keep_checkpoints, self.model, self.optimizer,
                                         self.scheduler)  # fmt: skip

    def evaluate(self) -> dict[str, float]:
        """The task's evaluation on the main process (logged); the other ranks wait."""
        acc = self.accelerator
        res: dict[str, float] = {}
        if acc.is_main_process:
            raw = acc.unwrap_model(self.model)
            was_training = raw.training
            raw.eval()
            with torch.no_grad():
                res = {k: _to_float(v) for k, v in self.task.evaluate(raw, self.ctx).items()}
            raw.train(was_training)
            if res:
                self.log.write({"step": self.state.step, "epoch": self.state.epoch, **res})
        acc.wait_for_everyone()
        return res

    # ------------------------------------------------------------------ the end

    def finish(self) -> dict[str, Any]:
        """Final checkpoint (unless this exact step is saved), evaluation, artefacts, summary."""
        acc, state = self.accelerator, self.state
        if self.last_ckpt is None or checkpoint_step(self.last_ckpt) != state.step:
            self.checkpoint()
        self.evaluation = self.evaluate()
        # One (sum, sum of squares) of the parameters per rank: equal on all ranks unless DDP
        # failed to keep them in sync (recorded so multi-process runs can be checked afterwards).
        with torch.no_grad():
            params = [p.detach().double() for p in acc.unwrap_model(self.model).parameters()]
            stats = torch.stack([sum(p.sum() for p in params),
                                 sum((p * p).sum() for p in params)])  # fmt: skip
        rank_stats = acc.gather(stats.to(acc.device)[None]).cpu().tolist()
        elapsed = time.perf_counter() - self.t_start
        images_now = state.images - self.images_at_start
        summary = {
            "stage": self.section,
            "steps": state.step,
            "total_steps": self.total_steps,
            "epochs": state.epoch,
            "steps_per_epoch": self.steps_per_epoch,
            "images_seen": state.images,
            "world_size": acc.num_processes,
            "effective_batch": self.effective_batch,
            "seconds_this_run": round(elapsed, 3),
            "img_per_s_this_run": round(images_now / elapsed, 2) if elapsed > 0 else 0.0,
            "resumed_from": self.resumed_from,
            "last_train_log": self.last_logs,
            "evaluation": self.evaluation,
            "checkpoint": str(self.last_ckpt),
            "rank_param_stats": rank_stats,
        }
        if acc.is_main_process:
            self.task.save_artifacts(acc.unwrap_model(self.model), self.out, summary)
            write_text_atomic(self.out / "summary.json", json.dumps(summary, indent=2))
        acc.wait_for_everyone()
        if self.trackers:
            acc.end_training()
        return summary


def _flat_numbers(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, Mapping):
            flat.update(_flat_numbers(v, f"{prefix}{k}/"))
        elif isinstance(v, (int, float, str, bool)):
            flat[f"{prefix}{k}"] = v
    return flat
