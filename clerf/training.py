"""THE training loop of clerf: one implementation that every training stage configures.

A stage (``clerf.pretrain``, ``clerf.finetune``) describes *what* to train by implementing a
:class:`Task`; :func:`fit` does the *how*, identically for all stages:

* accelerate for the device, DDP (``accelerate launch``), mixed precision and gradient
  accumulation; nothing here calls ``.cuda()``;
* AdamW or SGD over the task's parameter groups (each group may carry ``lr_scale``), a linear
  warm-up then a cosine / linear / constant schedule (per optimizer step);
* full-state checkpoints (model, optimizer, scheduler, RNG of every process, loop position) under
  ``OUT/checkpoints/step_XXXXXXXX``, written to a temporary folder and renamed, so a killed run
  never leaves a checkpoint that looks complete. They hold no pickle: the model is safetensors,
  the loop position JSON, everything else plain tensors and numbers read back with
  ``torch.load(weights_only=True)`` (accelerate's ``save_state``/``load_state`` unpickle its
  ``.pkl`` files, so they are not used); a shared or downloaded checkpoint cannot run code;
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
import math
import os
import shutil
import time
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

from clerf.config import config_differences, provenance, save_resolved, to_dict
from clerf.errors import ConfigError, DataError, TrainingDiverged
from clerf.files import write_text_atomic

__all__ = [
    "Task",
    "StepContext",
    "fit",
    "build_optimizer",
    "lr_lambda",
    "find_checkpoints",
    "CHECKPOINT_DIR",
]

#: ``train`` keys that may differ when a run is resumed: the length of training (extending a run
#: is a legitimate resume) and display-only settings (they change nothing that is computed)
RESUME_MAY_CHANGE = ("epochs", "max_steps", "progress")

#: checkpoints live in ``OUT/checkpoints/step_XXXXXXXX``
CHECKPOINT_DIR = "checkpoints"
_PREFIX = "step_"


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
        samples.
        """

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


def build_optimizer(groups: list[dict[str, Any]], train_cfg: DictConfig) -> torch.optim.Optimizer:
    """AdamW or SGD over ``groups``; each group's lr is ``train.lr * group.get('lr_scale', 1)``."""
    torch_groups = []
    for i, g in enumerate(groups):
        params = [p for p in g["params"]]
        if not params:
            continue
        tg = {
            "params": params,
            "lr": float(train_cfg.lr) * float(g.get("lr_scale", 1.0)),
            "weight_decay": float(g.get("weight_decay", train_cfg.weight_decay)),
            "name": str(g.get("name", f"group{i}")),
        }
        torch_groups.append(tg)
    if not torch_groups:
        raise ConfigError("training: the task has no trainable parameters")
    name = str(train_cfg.optimizer).lower()
    if name == "adamw":
        return torch.optim.AdamW(torch_groups, lr=float(train_cfg.lr))
    if name == "sgd":
        return torch.optim.SGD(
            torch_groups, lr=float(train_cfg.lr), momentum=float(train_cfg.momentum), nesterov=True
        )
    raise ConfigError(f"train.optimizer: expected 'adamw' or 'sgd', got '{train_cfg.optimizer}'")


def lr_lambda(
    total_steps: int, warmup_steps: int = 0, schedule: str = "cosine", min_ratio: float = 0.0
):
    """Multiplier of the base lr at optimizer step ``s`` (0-based), as a function.

    Linear warm-up from ``1 / (warmup + 1)`` to 1 over ``warmup_steps``, then ``cosine`` /
    ``linear`` decay to ``min_ratio`` at ``total_steps`` (or ``constant``).
    """
    if schedule not in ("cosine", "linear", "constant"):
        raise ConfigError(
            f"train.schedule: expected 'cosine', 'linear' or 'constant', got '{schedule}'"
        )
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


# --------------------------------------------------------------------------- checkpoints


def find_checkpoints(out: str | Path) -> list[Path]:
    """Complete checkpoints under ``out/checkpoints``, oldest first (temporary ones ignored)."""
    d = Path(out) / CHECKPOINT_DIR
    if not d.is_dir():
        return []
    found = []
    for p in d.iterdir():
        if p.is_dir() and p.name.startswith(_PREFIX) and p.name[len(_PREFIX):].isdigit():
            if (p / "loop_state.json").is_file():
                found.append(p)
    return sorted(found, key=lambda p: int(p.name[len(_PREFIX):]))


class _LoopState:
    """Loop position, saved as ``loop_state.json`` (written last: marks a complete checkpoint)."""

    def __init__(self) -> None:
        self.step = 0
        self.epoch = 0
        self.micro_step = 0  # micro-batches done in ``epoch``
        self.images = 0

    def state_dict(self) -> dict[str, int]:
        return {
            "step": self.step, "epoch": self.epoch,
            "micro_step": self.micro_step, "images": self.images,
        }  # fmt: skip

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        self.step = int(state["step"])
        self.epoch = int(state["epoch"])
        self.micro_step = int(state["micro_step"])
        self.images = int(state.get("images", 0))


#: ``format`` in ``loop_state.json`` of checkpoints that hold no pickle (:func:`_save_checkpoint`)
CHECKPOINT_FORMAT = "clerf-checkpoint-2"
_MODEL_FILE = "model.safetensors"
_OPTIMIZER_FILE = "optimizer.bin"
_SCHEDULER_FILE = "scheduler.bin"
_SCALER_FILE = "scaler.bin"
_LOOP_FILE = "loop_state.json"


def _rng_file(rank: int) -> str:
    return f"rng_state_{rank}.bin"


def _rng_state() -> dict[str, Any]:
    """This process's random states as plain tensors, ints and floats (nothing to unpickle)."""
    import random

    import numpy as np

    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()  # noqa: NPY002 - restoring global state
    state: dict[str, Any] = {
        "python": [int(version), torch.tensor(internal, dtype=torch.int64),
                   None if gauss is None else float(gauss)],
        "numpy": [str(kind), torch.from_numpy(np.asarray(keys, dtype=np.int64)), int(pos),
                  int(has_gauss), float(cached)],
        "torch": torch.get_rng_state(),
    }  # fmt: skip
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: Mapping[str, Any]) -> None:
    import random

    import numpy as np

    version, internal, gauss = state["python"]
    random.setstate((int(version), tuple(int(x) for x in internal.tolist()), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind,  # noqa: NPY002 - restoring global state
                         keys.numpy().astype(np.uint32), int(pos), int(has_gauss),
                         float(cached)))  # fmt: skip
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _save_checkpoint(accelerator, out: Path, state: _LoopState, keep: int, model, optimizer,
                     scheduler) -> Path:  # fmt: skip
    """Write the full training state to ``out/checkpoints/step_XXXXXXXX`` without pickles.

    The model goes to safetensors; optimizer, scheduler and grad-scaler state dicts and each
    process's RNG states (plain tensors, ints, floats, strings) to ``torch.save`` files that
    :func:`_load_checkpoint` reads with ``weights_only=True``; the loop position to JSON. The
    folder is written under a temporary name and renamed once complete.
    """
    from safetensors.torch import save_file

    ckdir = out / CHECKPOINT_DIR
    final = ckdir / f"{_PREFIX}{state.step:08d}"
    tmp = ckdir / f".{final.name}.tmp"
    if accelerator.is_main_process:
        ckdir.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    accelerator.wait_for_everyone()
    torch.save(_rng_state(), tmp / _rng_file(accelerator.process_index))
    if accelerator.is_main_process:
        raw = accelerator.unwrap_model(model)
        weights = {k: v.detach().cpu().contiguous().clone() for k, v in raw.state_dict().items()}
        save_file(weights, str(tmp / _MODEL_FILE), metadata={"format": CHECKPOINT_FORMAT})
        torch.save(optimizer.state_dict(), tmp / _OPTIMIZER_FILE)
        torch.save(scheduler.state_dict(), tmp / _SCHEDULER_FILE)
        if accelerator.scaler is not None:
            torch.save(accelerator.scaler.state_dict(), tmp / _SCALER_FILE)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        # The JSON marker is written last, then the folder is renamed: a checkpoint folder
        # without loop_state.json, or a .tmp one, is never resumed from.
        loop = {"format": CHECKPOINT_FORMAT, **state.state_dict(),
                "accelerator_step": int(accelerator.step)}  # fmt: skip
        (tmp / _LOOP_FILE).write_text(json.dumps(loop))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in find_checkpoints(out)[: -max(int(keep), 1)]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def _load_checkpoint(accelerator, ckpt: Path, state: _LoopState, model, optimizer,
                     scheduler) -> None:  # fmt: skip
    """Restore what :func:`_save_checkpoint` wrote; nothing is unpickled.

    Raises:
        DataError: one line naming the unreadable file (foreign, corrupt, truncated, from an
            older clerf whose checkpoints were pickles) with what to do instead.
    """
    from clerf.models.io import load_state_strict, load_weights_file

    hint = (f"move {ckpt} aside to resume from an earlier checkpoint, or give a new --out to "
            "start fresh")  # fmt: skip

    def bad(path: Path, why: str) -> DataError:
        return DataError(f"{path}: {why}; {hint}")

    def first_sentence(exc: BaseException) -> str:
        text = " ".join(str(exc).split()) or exc.__class__.__name__
        return text.split(". ")[0][:160]

    def load_torch(path: Path) -> Any:
        if not path.is_file():
            raise bad(path, "missing from the checkpoint")
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # unpickling errors come in many types
            raise bad(path, "not a readable clerf checkpoint file (read with weights_only=True: "
                      f"{first_sentence(exc)})") from exc  # fmt: skip

    loop_file = ckpt / _LOOP_FILE
    try:
        loop = json.loads(loop_file.read_text())
        if not isinstance(loop, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as exc:
        raise bad(loop_file, f"not a readable loop state ({exc})") from exc
    if loop.get("format") != CHECKPOINT_FORMAT:
        raise bad(loop_file, f"format {loop.get('format')!r}, expected {CHECKPOINT_FORMAT!r} "
                  "(older clerf checkpoints hold pickles, which are never loaded)")  # fmt: skip
    try:
        state.load_state_dict(loop)
        acc_step = int(loop.get("accelerator_step", 0))
    except (KeyError, TypeError, ValueError) as exc:
        raise bad(loop_file, f"bad loop state ({exc!r})") from exc

    try:
        load_state_strict(accelerator.unwrap_model(model), load_weights_file(ckpt / _MODEL_FILE),
                          source=str(ckpt / _MODEL_FILE))  # fmt: skip
    except DataError as exc:
        raise DataError(f"{exc}; {hint}") from exc
    for path, obj in ((ckpt / _OPTIMIZER_FILE, optimizer), (ckpt / _SCHEDULER_FILE, scheduler),
                      (ckpt / _SCALER_FILE, accelerator.scaler)):  # fmt: skip
        if obj is None:
            continue
        sd = load_torch(path)
        try:
            obj.load_state_dict(sd)
        except Exception as exc:
            raise bad(path, f"does not match this run ({first_sentence(exc)})") from exc
    rng_path = ckpt / _rng_file(accelerator.process_index)
    if rng_path.is_file() or accelerator.process_index == 0:
        rng = load_torch(rng_path)
        try:
            _set_rng_state(rng)
        except Exception as exc:
            raise bad(rng_path, f"not valid random states ({exc!r})") from exc
    accelerator.step = acc_step


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


def _move(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, Mapping):
        return {k: _move(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(_move(v, device) for v in batch)
    return batch


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


def _check_resume_config(out: Path, cfg: DictConfig, section: str) -> None:
    """A run in ``out`` with a different config is an error (except the length of training)."""
    saved = out / "config.yaml"
    if not saved.is_file() or not find_checkpoints(out):
        return
    old = to_dict(OmegaConf.load(saved))
    new = to_dict(cfg)
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
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, ProjectConfiguration, set_seed

    if section not in cfg or "train" not in cfg[section]:
        raise ConfigError(f"training: config has no '{section}.train' section")
    tc = cfg[section].train
    _validate_train_cfg(tc, section)
    out = Path(out)

    trackers = ["tensorboard"] if (tc.tensorboard and _tensorboard_available()) else None
    accelerator = Accelerator(
        mixed_precision=str(tc.mixed_precision),
        gradient_accumulation_steps=int(tc.grad_accum),
        cpu=bool(tc.cpu),
        log_with=trackers,
        project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / "tb")),
        kwargs_handlers=[
            DistributedDataParallelKwargs(find_unused_parameters=bool(tc.find_unused_parameters))
        ],
    )
    # Every rank checks (and raises) before anything is written: an error on the main process
    # alone would leave the other ranks waiting forever.
    _check_resume_config(out, cfg, section)
    set_seed(int(cfg.seed))
    ctx = StepContext(accelerator=accelerator, cfg=cfg, train_cfg=tc, out=out)

    model = task.build_model()
    if tc.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(task.param_groups(model, ctx), tc)
    loader = task.train_loader(ctx)
    try:
        micro_per_epoch = len(loader)  # type: ignore[arg-type]
    except TypeError as exc:
        raise ConfigError(f"training: the {section} task's loader has no length") from exc
    if micro_per_epoch < int(tc.grad_accum):
        raise DataError(
            f"{section}: {micro_per_epoch} batch(es) per epoch per process, fewer than "
            f"train.grad_accum={tc.grad_accum}; use a smaller train.batch_size or more data"
        )
    steps_per_epoch = micro_per_epoch // int(tc.grad_accum)
    total_steps = int(tc.max_steps) or int(tc.epochs) * steps_per_epoch
    epochs = math.ceil(total_steps / steps_per_epoch)
    # The inputs are checked (model, optimizer, data): only now does anything appear in ``out``.
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        save_resolved(cfg, out)
        (out / "provenance.json").write_text(
            json.dumps(
                provenance(cfg, stage=section, world_size=accelerator.num_processes), indent=2
            )
        )
    accelerator.wait_for_everyone()
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lr_lambda(total_steps, int(tc.warmup_steps), str(tc.schedule), float(tc.min_lr_ratio)),
    )
    # The loader is the task's (already sharded) and the scheduler is stepped here once per
    # optimizer step, so neither goes through prepare() (which would shard and step it again).
    model, optimizer = accelerator.prepare(model, optimizer)
    state = _LoopState()

    saved = (model, optimizer, scheduler)  # what a checkpoint holds, besides RNG and loop state
    resumed_from = None
    ckpts = find_checkpoints(out)
    if ckpts:
        _load_checkpoint(accelerator, ckpts[-1], state, model, optimizer, scheduler)
        resumed_from = state.step
        if state.micro_step >= steps_per_epoch * int(tc.grad_accum):
            state.epoch, state.micro_step = state.epoch + 1, 0

    log = _MetricLog(accelerator, out / "metrics.jsonl", use_trackers=trackers is not None)
    if trackers:
        accelerator.init_trackers(section, config=_flat_numbers(to_dict(cfg)))
    if resumed_from is not None:
        log.write({"event": "resumed", "step": state.step, "epoch": state.epoch})
        accelerator.print(f"{section}: resuming from step {state.step} ({ckpts[-1]})")

    bar = None
    if tc.progress and accelerator.is_main_process and state.step < total_steps:
        from tqdm.auto import tqdm

        bar = tqdm(total=total_steps, initial=state.step, desc=section, unit="step",
                   dynamic_ncols=True)  # fmt: skip

    sums: dict[str, float] = {}
    n_logged = 0
    window_images, window_t0 = 0, time.perf_counter()
    paused = 0.0  # seconds of evaluation and checkpointing inside the current log window
    t_start = time.perf_counter()
    images_at_start = state.images
    last_logs: dict[str, Any] = {}
    evaluation: dict[str, float] = {}
    last_ckpt: Path | None = ckpts[-1] if ckpts else None
    world = accelerator.num_processes
    gen_device = accelerator.device

    def run_eval() -> dict[str, float]:
        res: dict[str, float] = {}
        if accelerator.is_main_process:
            raw = accelerator.unwrap_model(model)
            was_training = raw.training
            raw.eval()
            with torch.no_grad():
                res = {k: _to_float(v) for k, v in task.evaluate(raw, ctx).items()}
            raw.train(was_training)
            if res:
                log.write({"step": state.step, "epoch": state.epoch, **res})
        accelerator.wait_for_everyone()
        return res

    while state.step < total_steps and state.epoch < epochs:
        epoch = state.epoch
        ctx.epoch, ctx.step = epoch, state.step
        _set_epoch(loader, epoch)
        task.on_epoch_start(epoch, model, ctx)
        model.train()
        skip = state.micro_step
        batches = _skip(loader, skip)
        for micro in range(skip, steps_per_epoch * int(tc.grad_accum)):
            batch = next(batches, None)
            if batch is None:
                break
            batch = _move(batch, accelerator.device)
            ctx.micro_step, ctx.step = micro, state.step
            ctx.generator = torch.Generator(device=gen_device).manual_seed(
                _step_seed(int(cfg.seed), accelerator.process_index, state.step, micro)
            )
            with accelerator.accumulate(model):
                loss, logs = task.train_step(model, batch, ctx)
                if not torch.isfinite(loss.detach()).all():
                    raise TrainingDiverged(
                        f"{section}: non-finite loss at step {state.step} (epoch {epoch}); "
                        "lower train.lr or check the data"
                    )
                accelerator.backward(loss)
                if accelerator.sync_gradients and tc.grad_clip > 0:
                    accelerator.clip_grad_norm_(model.parameters(), float(tc.grad_clip))
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            n_img = task.count_images(batch) * world
            state.images += n_img
            window_images += n_img
            state.micro_step = micro + 1
            sums["loss"] = sums.get("loss", 0.0) + float(loss.detach())
            for k, v in logs.items():
                sums[k] = sums.get(k, 0.0) + float(_to_float(v))
            n_logged += 1
            if not accelerator.sync_gradients:
                continue
            if not accelerator.optimizer_step_was_skipped:
                scheduler.step()
            state.step += 1
            if bar is not None:
                bar.update(1)
            last_step = state.step >= total_steps
            if state.step % max(int(tc.log_every), 1) == 0 or last_step:
                means = torch.tensor([sums[k] / n_logged for k in sorted(sums)],
                                     device=accelerator.device)  # fmt: skip
                means = accelerator.reduce(means, reduction="mean")
                dt = time.perf_counter() - window_t0 - paused
                rec = dict(zip(sorted(sums), means.tolist(), strict=True))
                rec.update(
                    step=state.step, epoch=epoch, images=state.images,
                    img_per_s=window_images / dt if dt > 0 else 0.0,
                    lr=scheduler.get_last_lr()[0],
                )  # fmt: skip
                log.write(rec)
                last_logs = rec
                if bar is not None:
                    bar.set_postfix(loss=f"{rec['loss']:.4f}", img_s=f"{rec['img_per_s']:.0f}",
                                    epoch=epoch)  # fmt: skip
                sums, n_logged = {}, 0
                window_images, window_t0, paused = 0, time.perf_counter(), 0.0
            if tc.checkpoint_every and state.step % int(tc.checkpoint_every) == 0 and not last_step:
                t_pause = time.perf_counter()
                last_ckpt = _save_checkpoint(accelerator, out, state, tc.keep_checkpoints, *saved)
                paused += time.perf_counter() - t_pause
            if last_step:
                break
        # end of epoch
        epoch_done = state.micro_step >= steps_per_epoch * int(tc.grad_accum)
        finished = state.step >= total_steps
        if epoch_done:
            state.epoch, state.micro_step = epoch + 1, 0
        t_pause = time.perf_counter()
        if tc.eval_every and epoch_done and (epoch + 1) % int(tc.eval_every) == 0 and not finished:
            evaluation = run_eval()
        if not finished and epoch_done and tc.checkpoint_epochs \
                and (epoch + 1) % int(tc.checkpoint_epochs) == 0:  # fmt: skip
            last_ckpt = _save_checkpoint(accelerator, out, state, tc.keep_checkpoints, *saved)
        paused += time.perf_counter() - t_pause
    if bar is not None:
        bar.close()

    # Final: checkpoint (unless this exact step is saved), evaluation, artefacts, summary.
    if last_ckpt is None or int(last_ckpt.name[len(_PREFIX):]) != state.step:
        last_ckpt = _save_checkpoint(accelerator, out, state, tc.keep_checkpoints, *saved)
    evaluation = run_eval()
    # One (sum, sum of squares) of the parameters per rank: equal on all ranks unless DDP
    # failed to keep them in sync (recorded so multi-process runs can be checked afterwards).
    with torch.no_grad():
        params = [p.detach().double() for p in accelerator.unwrap_model(model).parameters()]
        stats = torch.stack([sum(p.sum() for p in params), sum((p * p).sum() for p in params)])
    rank_stats = accelerator.gather(stats.to(accelerator.device)[None]).cpu().tolist()
    elapsed = time.perf_counter() - t_start
    images_now = state.images - images_at_start
    summary = {
        "stage": section,
        "steps": state.step,
        "total_steps": total_steps,
        "epochs": state.epoch,
        "steps_per_epoch": steps_per_epoch,
        "images_seen": state.images,
        "world_size": world,
        "seconds_this_run": round(elapsed, 3),
        "img_per_s_this_run": round(images_now / elapsed, 2) if elapsed > 0 else 0.0,
        "resumed_from": resumed_from,
        "last_train_log": last_logs,
        "evaluation": evaluation,
        "checkpoint": str(last_ckpt),
        "rank_param_stats": rank_stats,
    }
    if accelerator.is_main_process:
        task.save_artifacts(accelerator.unwrap_model(model), out, summary)
        write_text_atomic(out / "summary.json", json.dumps(summary, indent=2))
    accelerator.wait_for_everyone()
    if trackers:
        accelerator.end_training()
    return summary


def _flat_numbers(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, Mapping):
            flat.update(_flat_numbers(v, f"{prefix}{k}/"))
        elif isinstance(v, (int, float, str, bool)):
            flat[f"{prefix}{k}"] = v
    return flat


def _validate_train_cfg(tc: DictConfig, section: str) -> None:
    def need(cond: bool, key: str, what: str) -> None:
        if not cond:
            raise ConfigError(f"{section}.train.{key}: expected {what}, got {tc[key]!r}")

    need(tc.epochs >= 1 or tc.max_steps >= 1, "epochs", "an integer >= 1 (or max_steps >= 1)")
    need(tc.max_steps >= 0, "max_steps", "an integer >= 0")
    need(tc.batch_size >= 1, "batch_size", "an integer >= 1")
    need(tc.grad_accum >= 1, "grad_accum", "an integer >= 1")
    need(tc.lr > 0, "lr", "a positive number")
    need(tc.weight_decay >= 0, "weight_decay", "a number >= 0")
    need(tc.warmup_steps >= 0, "warmup_steps", "an integer >= 0")
    need(0 <= tc.min_lr_ratio <= 1, "min_lr_ratio", "a number in [0, 1]")
    need(tc.mixed_precision in ("no", "fp16", "bf16"), "mixed_precision", "'no', 'fp16' or 'bf16'")
    need(tc.optimizer in ("adamw", "sgd"), "optimizer", "'adamw' or 'sgd'")
    need(tc.schedule in ("cosine", "linear", "constant"), "schedule",
         "'cosine', 'linear' or 'constant'")  # fmt: skip
    need(tc.keep_checkpoints >= 1, "keep_checkpoints", "an integer >= 1")
    need(tc.num_workers >= 0, "num_workers", "an integer >= 0")
    need(tc.checkpoint_every >= 0, "checkpoint_every", "an integer >= 0")
    need(tc.checkpoint_epochs >= 0, "checkpoint_epochs", "an integer >= 0")
