"""The fine-tune stage: encoder + pose head trained on labelled images -> ``HeadPoseModel``.

``run_finetune(cfg, out)`` plugs :class:`FinetuneTask` into the shared training loop
(:func:`clerf.training.fit`: accelerate, checkpoints, automatic resume, logs, progress, mixed
precision) and writes:

* ``OUT/model/``: the :class:`~clerf.models.pose_model.HeadPoseModel` (``config.json`` +
  ``model.safetensors``), loadable with ``HeadPoseModel.from_pretrained(OUT)``;
* ``OUT/checkpoints/`` (full training state), ``OUT/metrics.jsonl``, ``OUT/config.yaml``,
  ``OUT/provenance.json``, ``OUT/summary.json`` (from the loop).

Configuration: the ``head`` section (which head), ``finetune`` (data, encoder source,
freezing, learning-rate scales, out-of-range policy, ``finetune.augment``, ``finetune.train``)
and ``encoder`` (only for a fresh encoder; a pretrained one brings its own config).

Each step, on the device: a batch of uint8 images and rotations from the store; a geometric
augmentation is drawn (:meth:`clerf.augment.PoseAugment.sample_geometric`) and the labels are
composed exactly (:func:`clerf.augment.compose_rotation`). For binned heads, samples whose
composed label falls outside the bins are handled by ``finetune.out_of_range``:

* ``drop``: they are excluded from the loss;
* ``resample``: their geometric transform is redrawn up to ``resample_tries`` times, and those
  still outside are dropped;
* ``error``: the step fails with a one-line error naming the count and a value.

Every image still goes through the network (so batch statistics and the DDP graph do not depend on
the labels); only the loss skips dropped samples: they weigh 0 in every term (a mask on the
device, no boolean indexing and no host read; their clamped bin index never counts), which
equals the loss of the kept rows alone (tested). ``drop`` costs no host sync per step; ``error``
reads one count per step, ``resample`` one per redraw round. The counts are logged every step
(``out_of_range``: labels outside the bins before any redraw, ``dropped``: excluded from the
loss) and totalled in the model's training summary.

Freezing: ``finetune.freeze`` lists encoder parameter prefixes frozen for the whole run (HopeNet
freezes the stem: ``backbone.conv1``, ``backbone.bn1``); the first ``finetune.probe_epochs`` train
the head alone on a frozen encoder (BatchNorm statistics fixed), then everything trains.
Learning rates: ``finetune.train.lr`` times ``encoder_lr_scale`` for the encoder and
``head_lr_scale`` for the head (HopeNet: heads at 5x).

Evaluation (each ``eval_every`` epochs, main process): the held-out images (``val_store``, or the
last ``val_fraction`` of the training store) without augmentation; mean and median geodesic error,
MAEV, Euler MAE (via :mod:`clerf.evaluation.metrics`) and ``chance_geodesic_deg``, the mean
geodesic distance between held-out labels (the error of guessing another sample's pose).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from torch import Tensor, nn

from clerf.augment import GeometricParams, PoseAugment, compose_rotation, to_float_images
from clerf.config import FinetuneConfig, head_config, section_config
from clerf.data_sources import InMemoryLabelled, held_out_set, stage_stream, training_source
from clerf.errors import ConfigError, DataError
from clerf.geometry import chance_geodesic
from clerf.models.encoder import ENCODER_KIND, Encoder, EncoderSpec, build_encoder
from clerf.models.pose_model import HeadPoseModel, head_pose_model_dir
from clerf.training import StepContext, Task, fit

__all__ = [
    "FinetuneTask",
    "run_finetune",
    "InMemoryLabelled",  # re-exported from clerf.data_sources
    "crop_protocol",
    "evaluate_rotations",
]



# --------------------------------------------------------------------------- data helpers


def crop_protocol(data_info: Mapping[str, Any]) -> dict[str, Any]:
    """The crop protocol of the training images, for the saved model's preprocessing record.

    ``data_info`` is the training source's ``describe()`` (``triplets.store.DataSource``): a
    store of cropped photos names its ``crop_preset`` and ``resize`` (``clerf prepare`` writes
    them), a rendered store or stream its ``generator`` (whole heads: preset ``none``). Returns
    the :data:`clerf.models.pose_model.CROP_KEYS`; ``crop_preset`` is None when the source
    names none (inference then uses its default crop and says so).
    """
    from clerf.data.crop import CROP_PRESETS, RESIZE_MODES

    preset = data_info.get("crop_preset")
    resize = data_info.get("resize")
    resize = resize if resize in RESIZE_MODES else "center"
    if preset in CROP_PRESETS:
        return {"crop_preset": preset, "resize_mode": resize,
                "crop_source": "training data (its crop_preset)"}
    if preset is None and data_info.get("generator"):
        return {"crop_preset": "none", "resize_mode": resize,
                "crop_source": "training data (rendered images: whole heads, no crop)"}
    why = "names no crop preset" if preset is None else f"names an unknown crop preset {preset!r}"
    return {"crop_preset": None, "resize_mode": resize, "crop_source": f"training data ({why})"}


# --------------------------------------------------------------------------- evaluation helpers


def evaluate_rotations(R_pred: Tensor, R_true: Tensor) -> dict[str, float]:
    """Held-out figures (degrees): geodesic mean/median, MAEV, Euler MAE where meaningful."""
    from clerf.evaluation.metrics import compute_errors, summarize

    s = summarize(compute_errors(torch.arange(R_true.shape[0]), R_pred, R_true))
    out = {
        "geodesic_deg": s["geodesic"]["mean"],
        "geodesic_median_deg": s["geodesic"]["median"],
        "maev_deg": s["maev"],
        "under_15deg": s["under"]["15"],
    }
    if s["euler"].get("n", 0):
        out.update({f"euler_mae_{k}_deg": s["euler"][k] for k in ("yaw", "pitch", "roll", "mean")})
        out["euler_n"] = float(s["euler"]["n"])
    return out


def _replace_params(p: GeometricParams, idx: Tensor, new: GeometricParams) -> GeometricParams:
    """``p`` with the transforms of samples ``idx`` replaced by ``new`` (same length as idx)."""
    out = {}
    for f in fields(GeometricParams):
        t = getattr(p, f.name).clone()
        t[idx] = getattr(new, f.name).to(t.device)
        out[f.name] = t
    return GeometricParams(**out)


# --------------------------------------------------------------------------- the task


class OutOfRangePolicy:
    """Labels that leave a binned head's range after augmentation (module docstring):
    ``error``, ``drop`` or ``resample`` (redraw their transform up to ``tries`` times).

    ``counts`` totals the labels seen, those out of range before any redraw, and those dropped.
    """

    def __init__(self, policy: str, tries: int, augment: PoseAugment) -> None:
        self.policy, self.tries, self.augment = policy, tries, augment
        self.counts = {"labels": 0, "out_of_range": 0, "dropped": 0}

    def draw(self, R: Tensor, head: Any, generator: torch.Generator
             ) -> tuple[GeometricParams, Tensor, int]:  # fmt: skip
        """Draw transforms; redraw per the policy. Returns (params, in-range mask, count of
        labels outside the bins before any redraw). For a head without bounds the mask is
        None and the count 0; without redraws the count is -1 (= the drops, read once with
        them by :meth:`dropped`)."""
        n = R.shape[0]
        params = self.augment.sample_geometric(n, generator, device=R.device)
        if not head.bounded:  # every label is learnable: nothing to check or count
            return params, None, 0
        ok = head.in_range(compose_rotation(R, params.to(R.device)))
        if self.policy != "resample":
            return params, ok, -1  # counted with the drops, on the device
        n_out = int((~ok).sum())
        if self.policy == "resample":
            for _ in range(self.tries):
                bad = (~ok).nonzero()[:, 0]
                if bad.numel() == 0:
                    break
                new = self.augment.sample_geometric(bad.numel(), generator, device=R.device)
                params = _replace_params(params, bad.to(params.angle.device), new)
                ok[bad] = head.in_range(compose_rotation(R[bad], new.to(R.device)))
        return params, ok, n_out

    def dropped(self, R: Tensor, params: GeometricParams, ok: Tensor | None) -> int | Tensor:
        """How many labels are left out of the loss: under ``drop`` and ``resample`` a count
        on the device (no host read: it is logged with the window); under ``error`` any is an
        error, which costs the policy's one host read per step."""
        if ok is None:
            return 0
        if self.policy != "error":
            return (~ok).sum()
        n_drop = int((~ok).sum())
        if n_drop:
            from clerf.models.heads import euler_targets

            e = euler_targets(compose_rotation(R, params.to(R.device))[~ok][:1])[0].tolist()
            raise DataError(
                f"finetune: {n_drop} label(s) of this batch lie outside the head's bins after "
                f"augmentation (e.g. pitch, yaw, roll = {e[0]:.1f}, {e[1]:.1f}, {e[2]:.1f} deg); "
                "set finetune.out_of_range=drop or resample, or narrow finetune.augment"
            )
        return n_drop

    def record(self, n: int, n_out: int | Tensor, n_drop: int | Tensor) -> None:
        """Add a step's counts (device tensors stay on the device until :meth:`totals`)."""
        self.counts["labels"] += n
        self.counts["out_of_range"] = self.counts["out_of_range"] + n_out
        self.counts["dropped"] = self.counts["dropped"] + n_drop

    def totals(self) -> dict[str, int]:
        """The counts as integers (one host read, at the end of the run)."""
        return {k: int(v) for k, v in self.counts.items()}


@dataclass
class FinetuneData:
    """The fine-tune stage's data: the training source and the held-out images.

    Training images come from ``train_data``, a stream (``finetune.stream``) or
    ``finetune.train_store``; held-out images from ``val_data``, the stream's own held-out
    set, ``finetune.val_store`` or the last ``finetune.val_fraction`` of the training store
    (resolved by :mod:`clerf.data_sources`); the held-out set is capped at ``val_max_images``.
    """

    train: Any
    info: dict[str, Any]
    val_images: Tensor | None = None
    val_rotations: Tensor | None = None
    chance_deg: float = float("nan")

    @classmethod
    def from_config(cls, cfg: DictConfig, train_data: Any = None,
                    val_data: Mapping[str, Tensor] | None = None) -> FinetuneData:  # fmt: skip
        fc = cfg.finetune
        # the held-out set comes from the stream only when training on the configured stream
        streaming = train_data is None and bool(fc.stream.enabled)
        train_data = training_source(cfg, "finetune", train_data)
        # a source of the user's own without describe() (the protocol's newest method) still
        # trains: its crop is then unknown and inference says so
        describe = getattr(train_data, "describe", None)
        info = dict(describe()) if callable(describe) else {"source": type(train_data).__name__}
        val_data, train_data = held_out_set(cfg, "finetune", train_data, streaming=streaming,
                                            val_data=val_data)  # fmt: skip
        cap = int(fc.val_max_images)
        data = cls(train=train_data, info=info)
        if val_data is not None:
            cap = cap or val_data["images"].shape[0]
            data.val_images = val_data["images"][:cap]
            data.val_rotations = val_data["rotations"][:cap].float()
            data.chance_deg = chance_geodesic(data.val_rotations, max_n=2048)
        return data


class FinetuneTask(Task):
    """The fine-tune stage as a :class:`clerf.training.Task`; see the module docstring.

    Args:
        cfg: the experiment config (sections ``head``, ``finetune``, ``encoder``).
        train_data: optional dataset used instead of ``finetune.train_store`` (anything with
            ``__len__``, ``block_size`` and ``read_batch(indices)`` returning
            ``{"images": (B, 3, H, W) uint8, "rotations": (B, 3, 3)}``, e.g.
            :class:`clerf.data_sources.InMemoryLabelled`).
        val_data: optional ``{"images", "rotations"}`` tensors instead of ``val_store`` /
            ``val_fraction``.
    """

    def __init__(self, cfg: DictConfig, train_data: Any = None,
                 val_data: Mapping[str, Tensor] | None = None) -> None:  # fmt: skip
        self.cfg = cfg
        fc = cfg.finetune
        self._validate(cfg)
        self.encoder_spec = self._encoder_spec()
        self.input_size = int(self.encoder_spec.input_size)
        try:
            self.augment = PoseAugment(fc.augment, output_size=self.input_size,
                                       section="finetune.augment")  # fmt: skip
        except ValueError as exc:
            raise ConfigError(f"finetune: {exc}") from exc
        self.out_of_range = OutOfRangePolicy(str(fc.out_of_range), int(fc.resample_tries),
                                             self.augment)  # fmt: skip
        self.keep_frozen = tuple(str(p) for p in fc.freeze)
        self.epoch_sizes = [int(v) for v in fc.get("epoch_sizes") or []]
        if any(v > self.input_size for v in self.epoch_sizes):
            raise ConfigError(
                f"finetune.epoch_sizes: expected sizes up to the encoder's input_size "
                f"{self.input_size}, got {self.epoch_sizes}"
            )
        data = FinetuneData.from_config(cfg, train_data, val_data)
        self.train_data, self.data_info = data.train, data.info
        self.val_images, self.val_rotations = data.val_images, data.val_rotations
        self.chance_deg = data.chance_deg
        self.mix = None
        if int(fc.mix_generated):
            self.mix = stage_stream(cfg, "finetune")  # generated images added to each batch
            res = self.data_info.get("resolution")
            if res is not None and int(res) != int(cfg.generator.resolution):
                raise ConfigError(
                    f"finetune.mix_generated: the training store holds {res} px images but "
                    f"generator.resolution is {cfg.generator.resolution}; make them equal"
                )
            self.data_info = {**self.data_info, "mix_generated": int(fc.mix_generated),
                              "mix_source": self.mix.describe()}
    # ----------------------------------------------------------------------- setup

    @staticmethod
    def _validate(cfg: DictConfig) -> None:
        # the config's own checks (load_config ran them; configs built in code get them here)
        section_config(FinetuneConfig, cfg.finetune, "finetune")
        head_config(cfg.head)

    def _encoder_spec(self) -> EncoderSpec:
        src = self.cfg.finetune.encoder or ""
        if not src:
            try:
                return EncoderSpec.from_config(self.cfg.encoder)
            except (TypeError, ValueError) as exc:
                raise ConfigError(f"encoder: {exc}") from exc
        from clerf.models.encoder import resolve_encoder_dir
        from clerf.models.io import read_model_config

        model_dir = head_pose_model_dir(src)
        if model_dir is not None:  # a fine-tune output: start from its model's encoder
            from clerf.models.pose_model import MODEL_KIND

            meta = read_model_config(model_dir, MODEL_KIND).get("encoder", {})
        else:
            meta = read_model_config(resolve_encoder_dir(src), ENCODER_KIND)
        try:
            return EncoderSpec.from_config(meta)
        except (ConfigError, TypeError) as exc:
            raise DataError(f"finetune.encoder: {src}: invalid encoder config ({exc})") from exc

    # ----------------------------------------------------------------------- Task hooks

    def build_model(self) -> HeadPoseModel:
        src = self.cfg.finetune.encoder or ""
        if src and head_pose_model_dir(src) is not None:
            # supervised pretraining: the encoder of an earlier fine-tune (its head is dropped)
            encoder = HeadPoseModel.from_pretrained(src).encoder.train()
        elif src:
            encoder = Encoder.from_pretrained(src)
        else:
            try:
                encoder = build_encoder(self.cfg.encoder)
            except (TypeError, ValueError) as exc:
                raise ConfigError(f"encoder: {exc}") from exc
        model = HeadPoseModel(encoder, self.cfg.head)
        names = [n for n, _ in model.encoder.named_parameters()]
        for pre in self.keep_frozen:
            if not any(n.startswith(pre) for n in names):
                raise ConfigError(
                    f"finetune.freeze: '{pre}' matches no encoder parameter (names look like "
                    f"{', '.join(names[:3])}, ...)"
                )
        # Frozen for the whole run before DDP wraps the model: DDP then ignores them. A zero
        # encoder lr freezes the whole encoder (BatchNorm statistics included).
        whole = float(self.cfg.finetune.encoder_lr_scale) == 0
        model.set_encoder_frozen(whole, keep_frozen=self.keep_frozen)
        return model

    def param_groups(self, model: nn.Module, ctx: StepContext) -> list[dict[str, Any]]:
        fc = self.cfg.finetune
        if fc.probe_epochs > 0 and ctx.world_size > 1 and not ctx.train_cfg.find_unused_parameters:
            raise ConfigError(
                "finetune.probe_epochs > 0 under several processes needs "
                "finetune.train.find_unused_parameters=true"
            )
        enc = [p for p in model.encoder.parameters() if p.requires_grad]
        head = list(model.head.parameters())
        groups = [{"params": head, "lr_scale": float(fc.head_lr_scale), "name": "head"}]
        if enc and float(fc.encoder_lr_scale) > 0:
            groups.insert(0, {"params": enc, "lr_scale": float(fc.encoder_lr_scale),
                              "name": "encoder"})  # fmt: skip
        return groups

    def train_loader(self, ctx: StepContext):
        from clerf.streaming import stage_loader

        return stage_loader(self.train_data, ctx, "finetune.train_store")

    def on_epoch_start(self, epoch: int, model: nn.Module, ctx: StepContext) -> None:
        raw = ctx.accelerator.unwrap_model(model)
        fc = self.cfg.finetune
        if float(fc.encoder_lr_scale) == 0:
            return  # frozen for the whole run (build_model)
        probe = epoch < int(fc.probe_epochs)
        raw.set_encoder_frozen(probe, keep_frozen=self.keep_frozen)
        if ctx.is_main and epoch == int(fc.probe_epochs) and epoch > 0:
            ctx.accelerator.print(f"finetune: epoch {epoch}: probe done, encoder unfrozen")

    def log_keys(self, model: nn.Module) -> tuple[str, ...]:
        # the head's loss parts (absent from a step whose labels were all dropped) + counters
        return (*model.head.loss_keys, "out_of_range", "dropped")

    def _with_generated(self, batch: Mapping[str, Any], ctx: StepContext) -> dict[str, Any]:
        """``batch`` + ``finetune.mix_generated`` new generated images. Their stream ids are
        a function of (optimizer step, micro-step, rank) only: new images at every step,
        disjoint over processes, the same after a resume."""
        k = int(self.cfg.finetune.mix_generated)
        accum = int(ctx.train_cfg.grad_accum)
        world, rank = ctx.accelerator.num_processes, ctx.accelerator.process_index
        g = (ctx.step * accum + ctx.micro_step % accum) * world + rank
        gen = self.mix.read_batch(range(g * k, (g + 1) * k))
        device = batch["images"].device
        images = torch.cat([batch["images"], gen["images"].to(device)])
        R = torch.cat([batch["rotations"].float(), gen["rotations"].float().to(device)])
        return {**batch, "images": images, "rotations": R}

    def train_step(self, model: nn.Module, batch: Mapping[str, Any], ctx: StepContext):
        raw = ctx.accelerator.unwrap_model(model)
        if self.mix is not None:
            batch = self._with_generated(batch, ctx)
        images, R = batch["images"], batch["rotations"].float()
        params, ok, n_out = self.out_of_range.draw(R, raw.head, ctx.generator)
        n = R.shape[0]
        n_drop = self.out_of_range.dropped(R, params, ok)
        if n_out < 0:  # no redraw: the labels out of range are the dropped ones
            n_out = n_drop
        x, R_aug = self.augment(images, R, generator=ctx.generator, params=params)
        if self.epoch_sizes:  # progressive resizing: this epoch's size (labels unchanged)
            x = to_float_images(x, self.epoch_sizes[min(ctx.epoch, len(self.epoch_sizes) - 1)])
        if ctx.train_cfg.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        out = model(x)
        self.out_of_range.record(n, n_out, n_drop)
        if ok is None:
            loss, parts = raw.loss(out, R_aug)
            logs: dict[str, Any] = {k: v.detach() for k, v in parts.items()}  # summed on device
        else:
            # Labels outside the bins weigh 0 (no boolean indexing, no host read). A step whose
            # labels were all dropped has a zero loss with zero gradients (every process still
            # takes part in the backward) and leaves its loss parts out of the window's means.
            w = ok.to(torch.float32)
            loss, parts = raw.loss(out, R_aug, weight=w)
            present = (w.sum() > 0).to(torch.float32)
            logs = {k: (v.detach(), present) for k, v in parts.items()}
        logs.update(out_of_range=n_out if isinstance(n_out, Tensor) else float(n_out),
                    dropped=n_drop if isinstance(n_drop, Tensor) else float(n_drop))
        return loss, logs

    @torch.no_grad()
    def predict_val(self, model: HeadPoseModel, batch_size: int = 128) -> Tensor:
        """Predicted rotations ``(N, 3, 3)`` of the held-out images (no augmentation)."""
        device = next(model.parameters()).device
        outs = []
        for i in range(0, self.val_images.shape[0], batch_size):
            x = to_float_images(self.val_images[i:i + batch_size].to(device), self.input_size)
            outs.append(model.rotations(x).float().cpu())
        return torch.cat(outs)

    def evaluate(self, model: nn.Module, ctx: StepContext) -> dict[str, float]:
        if self.val_images is None:
            return {}
        from clerf.evaluation.probe import probe_features

        R = self.predict_val(model)
        res = {f"val/{k}": v for k, v in evaluate_rotations(R, self.val_rotations).items()}
        res["val/chance_geodesic_deg"] = self.chance_deg
        # the encoder alone: kNN pose retrieval and a linear probe on its frozen features
        feats = self.val_features(model)
        res.update({f"val/features_{k}": v for k, v in
                    probe_features(feats, self.val_rotations).items()})  # fmt: skip
        return res

    @torch.no_grad()
    def val_features(self, model: HeadPoseModel, batch_size: int = 128) -> Tensor:
        """Encoder features ``(N, F)`` of the held-out images (no augmentation)."""
        device = next(model.parameters()).device
        outs = []
        for i in range(0, self.val_images.shape[0], batch_size):
            x = to_float_images(self.val_images[i:i + batch_size].to(device), self.input_size)
            outs.append(model.encoder.features(x).float().cpu())
        return torch.cat(outs)

    def save_artifacts(self, model: nn.Module, out: Path, summary: dict[str, Any]) -> None:
        fc = self.cfg.finetune
        training = {
            "stage": "finetune",
            "train_data": self.data_info,
            "val_store": fc.val_store or None,
            "val_fraction": float(fc.val_fraction),
            "encoder_source": fc.encoder or "fresh",
            "steps": summary["steps"],
            "epochs": summary["epochs"],
            "images_seen": summary["images_seen"],
            "world_size": summary["world_size"],
            "out_of_range_policy": self.out_of_range.policy,
            "out_of_range_counts_this_run_main_process": self.out_of_range.totals(),
            "evaluation": summary["evaluation"],
            "seed": int(self.cfg.seed),
        }
        # The crop protocol of the training *store or stream* (mixed-in generated images do not
        # change how photos must be cut at inference).
        model.crop = crop_protocol(self.data_info)
        model.save_pretrained(out / "model", training=training)


def run_finetune(cfg: DictConfig, out: str | Path, train_data: Any = None,
                 val_data: Mapping[str, Tensor] | None = None) -> dict[str, Any]:  # fmt: skip
    """Run (or resume) the fine-tune stage; returns the training summary (``OUT/summary.json``).

    See the module docstring for what is read and written.
    """
    task = FinetuneTask(cfg, train_data=train_data, val_data=val_data)
    return fit(task, cfg, out, section="finetune")
