"""Experiment configuration: the typed schema, YAML loading, dotted overrides, provenance.

One YAML file per experiment under ``configs/``; every key is checked against the typed schema
below (OmegaConf structured configs). An unknown key or a wrong type is a
:class:`~clerf.errors.ConfigError` naming the key, the file and what was expected.
Overrides on the command line use dotted keys: ``train.lr=1e-4``.

Each stage owns one section. Add a section as a dataclass here, with defaults that make sense on
a 2-core CPU machine, ``Literal[...]`` types for keys with a fixed set of values and a
``validate(self, path)`` method for the other checks (``docs/components.md``), and document it in
docs/configuration.md.
"""

from __future__ import annotations

import datetime as _dt
import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, is_dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from clerf.errors import ConfigError
from clerf.geometry import HOPENET_BINS, PROTOCOL_MAX_ABS_ANGLE
from clerf.registry import Registry, check_choices
from clerf.registry import need as _need
from clerf.versions import CONVENTIONS_VERSION, __version__

# --------------------------------------------------------------------------- vocabularies

# A section's string choices are the ``Literal`` types of its fields: OmegaConf checks them when a
# config is loaded, the section's ``validate`` (:func:`clerf.registry.check_choices`) when it is
# built in Python. A stage that needs the choices imports the type (``typing.get_args``).

#: ``train.optimizer``
Optimizer = Literal["adamw", "sgd"]
#: ``train.schedule``: the learning-rate shape after warm-up
Schedule = Literal["cosine", "linear", "constant"]
#: ``train.mixed_precision`` (``no`` as accelerate spells it)
MixedPrecision = Literal["auto", "no", "fp16", "bf16"]
#: ``augment.padding``: what a warp fills outside the image with
Padding = Literal["zeros", "border", "reflection"]
#: ``evaluate.protocols``: the evaluation protocols (``clerf.evaluation.protocols``)
EvaluateProtocol = Literal["standard", "rotated", "flipped", "lowres", "full_range"]
#: ``finetune.out_of_range``: what happens to labels outside a binned head's bins
OutOfRangePolicy = Literal["drop", "resample", "error"]
#: ``prepare.resize``: how a crop becomes a square image (``clerf.data.crop.resize_square``)
ResizeMode = Literal["center", "hopenet", "6drepnet", "stretch"]
#: ``prepare.verify_images``: the image check of a dataset scan (``clerf.data.base``)
VerifyMode = Literal["full", "header", "none"]
#: ``prepare.biwi_signs`` and ``prepare.biwi_channels``: how a BIWI ``.npz`` is stored
BiwiSigns = Literal["fsanet", "mirrored"]
BiwiChannels = Literal["bgr", "rgb"]
#: ``pretrain.loss.name``: the metric-learning loss (``clerf.losses``)
LossName = Literal["circle", "triplet"]
#: ``store.compression``: HDF5 compression of the stores (``triplets/store``)
Compression = Literal["none", "lzf", "gzip"]
#: ``triplets.negatives``: how negative rotations are drawn (``triplets.rules``)
NegativeSampling = Literal["poses", "uniform"]
#: ``pipeline.stages``: the stages ``clerf pipeline`` runs, in this order
PipelineStage = Literal["generate", "pretrain", "finetune", "evaluate"]

# --------------------------------------------------------------------------- schema sections


@dataclass
class GeneratorConfig:
    """Which pose-conditioned renderer makes the images (``generators/``)."""

    #: registry name (``procedural``, ``eg3d``, ``panohead``) or ``package.module:ClassName``
    name: str = "procedural"
    #: images are rendered at this size (pixels, square)
    resolution: int = 64
    #: ``auto`` (CUDA when available), ``cpu``, ``cuda``, ``cuda:1`` ...
    device: str = "auto"
    #: generator-specific parameters, validated by the generator itself
    params: dict[str, Any] = field(default_factory=dict)


@dataclass
class TripletsConfig:
    """How ``clerf generate`` samples triplets (``triplets/``; rules in ``docs/triplets.md``)."""

    #: number of triplets (anchor, positive, negative); the store holds 3x as many images
    count: int = 1000
    #: anchor poses: ``uniform`` (Haar over SO(3)), ``euler_box`` or ``lookat``
    poses: str = "euler_box"
    #: euler_box ranges in degrees, [low, high] (300W-LP-like defaults)
    pitch_range: list[float] = field(default_factory=lambda: [-60.0, 60.0])
    yaw_range: list[float] = field(default_factory=lambda: [-90.0, 90.0])
    roll_range: list[float] = field(default_factory=lambda: [-45.0, 45.0])
    #: lookat: largest angle (deg) between the camera direction and the frontal one
    max_camera_angle: float = 90.0
    #: lookat: in-plane image rotation range (deg, clockwise on screen), [low, high]
    inplane_range: list[float] = field(default_factory=lambda: [-180.0, 180.0])
    #: minimum geodesic distance (deg) between anchor and negative rotations, in [0, 180]
    delta: float = 30.0
    #: negative rotations: ``poses`` (the anchor sampler, rejection) or ``uniform`` (Haar
    #: measure restricted to >= delta from the anchor, sampled constructively)
    negatives: NegativeSampling = "poses"
    #: true: the negative shows the anchor's identity (hard negative); false: another identity
    hard_negatives: bool = True
    #: identities are drawn from [0, num_identities); at least 2 (the positive differs)
    num_identities: int = 1000
    #: triplets per seeded sampling block: triplet t depends only on (seed, t, sampling_block)
    sampling_block: int = 256
    #: ``clerf real-anchor``: triplets per real image (each with its own rendered identities and
    #: negative), so a small labelled set still gives a pretraining budget of any size
    anchor_repeats: int = 1

    def validate(self, path: str = "triplets") -> None:
        """The ``Literal`` choices (for a section built in Python; OmegaConf checks loaded ones)."""
        check_choices(self, path)


@dataclass
class StoreConfig:
    """How stores are laid out on disk (``triplets/SCHEMA.md``)."""

    #: ``none``, ``lzf`` or ``gzip``
    compression: Compression = "none"
    #: gzip level 1-9
    compression_level: int = 4
    #: images per HDF5 chunk, per commit and per render call (multiple of 3 for triplet stores)
    chunk_images: int = 96

    def validate(self, path: str = "store") -> None:
        """The ``Literal`` choices (for a section built in Python; OmegaConf checks loaded ones)."""
        check_choices(self, path)


@dataclass
class EncoderSpec:
    """Everything that rebuilds an encoder (``clerf.models.encoder.Encoder``), saved in its
    ``config.json``: the ``encoder`` section without the weights it starts from."""

    #: backbone (``clerf/models/backbones.py``): torchvision's ``resnet18``, ``resnet34``,
    #: ``resnet50``, or a timm convolutional model by name (``repvgg_a0``,
    #: ``mobilenetv3_small_100``; ``timm/NAME`` forces timm)
    arch: str = "resnet18"
    #: dimension of the L2-normalised embedding
    embedding_dim: int = 128
    #: hidden width of the 2-layer projection MLP; 0 = a single linear layer
    projection_hidden: int = 512
    #: square input size (pixels) the encoder is trained and used at
    input_size: int = 64
    #: per-channel normalisation applied inside the encoder to images in [0, 1]
    mean: list[float] = field(default_factory=lambda: [0.485, 0.456, 0.406])
    std: list[float] = field(default_factory=lambda: [0.229, 0.224, 0.225])
    #: zero (after normalisation) everything outside a centred disk of this radius, as a
    #: fraction of the image size (0 = off): hides the empty corners of rotated images
    circle_mask: float = 0.44

    def __post_init__(self) -> None:
        self.mean = [float(x) for x in self.mean]
        self.std = [float(x) for x in self.std]
        self.circle_mask = float(self.circle_mask)
        self.validate()

    def validate(self, path: str = "encoder") -> None:
        """``ConfigError`` naming ``path.key``; the architecture is looked up among the
        backbones (``clerf/models/backbones.py``, imported by name: it sits above this module)."""
        import importlib

        backbones = importlib.import_module("clerf.models.backbones")
        if not backbones.is_backbone(self.arch):
            raise backbones.unknown_backbone(self.arch, f"{path}.arch")
        _need(self.embedding_dim >= 1, f"{path}.embedding_dim", ">= 1", self.embedding_dim)
        _need(self.projection_hidden >= 0, f"{path}.projection_hidden", ">= 0",
              self.projection_hidden)  # fmt: skip
        _need(self.input_size >= 16, f"{path}.input_size", ">= 16 pixels", self.input_size)
        for name in ("mean", "std"):
            v = list(getattr(self, name))
            _need(len(v) == 3, f"{path}.{name}", "3 numbers (RGB)", v)
        _need(min(self.std) > 0, f"{path}.std", "positive numbers", list(self.std))
        _need(self.circle_mask == 0.0 or 0.25 <= self.circle_mask <= 0.75, f"{path}.circle_mask",
              "0 (off) or a radius in [0.25, 0.75] of the image size", self.circle_mask)

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> EncoderSpec:
        """The spec of a config section (``cfg.encoder``) or a saved ``config.json`` dict."""
        from dataclasses import fields

        return EncoderSpec(**{f.name: (list(cfg[f.name]) if f.name in ("mean", "std")
                                       else cfg[f.name])
                              for f in fields(EncoderSpec) if f.name in cfg})  # fmt: skip


@dataclass
class EncoderConfig(EncoderSpec):
    """The ``encoder`` section: the backbone + projection head (:class:`EncoderSpec`) and what
    its backbone starts from."""

    #: null = random; a torchvision weight name (``IMAGENET1K_V1``), ``pretrained`` (timm's
    #: default tag) or a saved state dict's path (offline, loaded strictly)
    weights: str | None = None


@dataclass
class AugmentConfig:
    """On-device augmentation (``clerf.augment``); geometric labels composed exactly.

    Each stage has its own copy (``pretrain.augment``, ``finetune.augment``).
    """

    #: master switch (false = only uint8 -> float and resize)
    enabled: bool = True
    #: in-plane rotation angle uniform in [-inplane_deg, inplane_deg] (clockwise on screen)
    inplane_deg: float = 180.0
    #: probability of applying the in-plane rotation
    p_inplane: float = 1.0
    p_hflip: float = 0.5
    p_vflip: float = 0.0
    #: isotropic scale factor range (label-preserving framing jitter; >= 1 keeps the centred
    #: disk of encoder.circle_mask covered by image content after any in-plane rotation)
    scale: list[float] = field(default_factory=lambda: [1.0, 1.15])
    #: max translation as a fraction of the image size (label-preserving, small)
    translate: float = 0.04
    #: ``zeros``, ``border`` or ``reflection`` (reflection mirrors face parts: avoid)
    padding: Padding = "zeros"
    #: colour jitter strengths (factors sampled in [1 - s, 1 + s]; hue in [-h, h] of a turn)
    brightness: float = 0.3
    contrast: float = 0.3
    saturation: float = 0.3
    hue: float = 0.02
    p_grayscale: float = 0.1
    p_blur: float = 0.2
    #: Gaussian blur sigma range (pixels of the output image)
    blur_sigma: list[float] = field(default_factory=lambda: [0.2, 1.5])
    p_noise: float = 0.2
    #: Gaussian noise std on [0, 1] images
    noise_std: float = 0.03

    def validate(self, path: str = "augment") -> None:
        """``ConfigError`` naming ``path.key`` (the choices again for configs built in Python)."""
        check_choices(self, path)

        def need(ok: bool, key: str, what: str) -> None:
            _need(ok, f"{path}.{key}", what, getattr(self, key))

        for key in ("p_inplane", "p_hflip", "p_vflip", "p_grayscale", "p_blur", "p_noise"):
            need(0.0 <= float(getattr(self, key)) <= 1.0, key, "a probability in [0, 1]")
        need(0.0 <= float(self.inplane_deg) <= 180.0, "inplane_deg", "0..180")
        lo, hi = (float(v) for v in self.scale)
        need(0 < lo <= hi, "scale", "[low, high] with 0 < low <= high")
        need(0.0 <= float(self.translate) <= 0.5, "translate", "0..0.5")
        for key in ("brightness", "contrast", "saturation"):
            need(0.0 <= float(getattr(self, key)) < 1.0, key, "0 <= value < 1")
        need(0.0 <= float(self.hue) <= 0.5, "hue", "0..0.5 (a fraction of a turn)")
        slo, shi = (float(v) for v in self.blur_sigma)
        need(0 < slo <= shi, "blur_sigma", "[low, high] > 0")
        need(float(self.noise_std) >= 0, "noise_std", ">= 0")


@dataclass
class TrainConfig:
    """The shared training loop (``clerf.training.fit``); each stage has its own copy."""

    epochs: int = 2
    #: stop after this many optimizer steps (0 = run all epochs)
    max_steps: int = 0
    #: per process; for pretraining a batch of triplets (3 images each)
    batch_size: int = 16
    grad_accum: int = 1
    #: ``adamw`` or ``sgd``
    optimizer: Optimizer = "adamw"
    lr: float = 1e-3
    weight_decay: float = 0.05
    momentum: float = 0.9
    #: ``cosine``, ``linear`` or ``constant`` after warm-up
    schedule: Schedule = "cosine"
    #: linear warm-up length in optimizer steps
    warmup_steps: int = 0
    #: the schedule decays to lr * min_lr_ratio
    min_lr_ratio: float = 0.01
    #: clip the gradient norm (0 = off)
    grad_clip: float = 0.0
    #: ``auto`` (follow the launcher: ``accelerate launch --mixed_precision`` or its config
    #: file; ``no`` without one), or ``no``, ``fp16``, ``bf16``, which win over the launcher
    mixed_precision: MixedPrecision = "auto"
    #: force the CPU even when an accelerator is present
    cpu: bool = False
    num_workers: int = 0
    #: also checkpoint every N optimizer steps (0 = off)
    checkpoint_every: int = 0
    #: checkpoint at the end of every N-th epoch (0 = off; the end of training always is)
    checkpoint_epochs: int = 1
    #: how many checkpoints to keep (the newest)
    keep_checkpoints: int = 2
    #: log averaged metrics every N optimizer steps
    log_every: int = 10
    #: run the task's evaluation every N epochs (0 = only at the end)
    eval_every: int = 1
    #: tqdm progress bar on the main process
    progress: bool = True
    #: also log through accelerate's TensorBoard tracker when tensorboard is installed
    tensorboard: bool = True
    #: DDP option; needed when a task freezes parameters during training
    find_unused_parameters: bool = False
    channels_last: bool = False
    #: ``none``: weight decay on every parameter (the measured figures so far); ``norm_bias``:
    #: none on 1-D tensors (BatchNorm weights, biases; timm's ``param_groups_weight_decay``)
    weight_decay_exempt: Literal["none", "norm_bias"] = "none"
    #: torch's fused AdamW / SGD kernel (one pass over all parameters) where every parameter
    #: is on a CPU or CUDA device: the same update up to float rounding, so off by default
    #: (published figures reproduce bit for bit); measured on a 2-core CPU (AVX2): the
    #: ResNet-18 AdamW step 5-8 ms instead of 15-20, under 2% of a 64 px training step
    fused_optimizer: bool = False
    #: ``batch_size`` is per process, so the effective batch is batch_size x processes x
    #: grad_accum: ``linear`` multiplies ``lr`` by the number of processes (the linear scaling
    #: rule), ``none`` keeps it as written
    lr_scaling: Literal["none", "linear"] = "none"
    #: BatchNorm statistics over all processes (SyncBatchNorm; CUDA/NCCL only) when there are
    #: several: contrastive ``gather_distributed`` then compares embeddings normalised alike
    sync_batchnorm: bool = False

    def validate(self, path: str = "train") -> None:
        """``ConfigError`` naming ``path.key`` (the choices again for configs built in Python)."""
        check_choices(self, path)

        def need(ok: bool, key: str, what: str) -> None:
            _need(ok, f"{path}.{key}", what, getattr(self, key))

        need(self.epochs >= 1 or self.max_steps >= 1, "epochs",
             "an integer >= 1 (or max_steps >= 1)")  # fmt: skip
        need(self.max_steps >= 0, "max_steps", "an integer >= 0")
        need(self.batch_size >= 1, "batch_size", "an integer >= 1")
        need(self.grad_accum >= 1, "grad_accum", "an integer >= 1")
        need(self.lr > 0, "lr", "a positive number")
        need(self.weight_decay >= 0, "weight_decay", "a number >= 0")
        need(self.warmup_steps >= 0, "warmup_steps", "an integer >= 0")
        need(0 <= self.min_lr_ratio <= 1, "min_lr_ratio", "a number in [0, 1]")
        need(self.keep_checkpoints >= 1, "keep_checkpoints", "an integer >= 1")
        need(self.num_workers >= 0, "num_workers", "an integer >= 0")
        need(self.checkpoint_every >= 0, "checkpoint_every", "an integer >= 0")
        need(self.checkpoint_epochs >= 0, "checkpoint_epochs", "an integer >= 0")


@dataclass
class LossConfig:
    """Metric-learning loss and the pose-based pair labelling (``clerf.losses``)."""

    #: ``circle`` (pytorch-metric-learning CircleLoss) or ``triplet`` (TripletMarginLoss)
    name: LossName = "circle"
    #: CircleLoss margin m and scale gamma
    m: float = 0.25
    gamma: float = 64.0
    #: TripletMarginLoss margin
    margin: float = 0.2
    #: ``auto`` (circle: avg_nonzero, triplet: mean), ``mean`` or ``avg_nonzero``
    reducer: Literal["auto", "mean", "avg_nonzero"] = "auto"
    #: pairs within eps deg (geodesic, composed rotations) are positives
    eps_deg: float = 5.0
    #: pairs beyond delta deg are negatives; in between: ignored
    delta_deg: float = 30.0
    #: label every pair of the batch by pose (true), or only the triplet table's pairs (false)
    batch_pairs: bool = True
    #: under DDP, compare local anchors with the embeddings of all ranks
    gather_distributed: bool = False
    #: cap on triplets for the triplet loss (random subset; 0 = all)
    max_triplets: int = 20000

    def validate(self, path: str = "loss") -> None:
        """The ``Literal`` choices (for a section built in Python; OmegaConf checks loaded ones)."""
        check_choices(self, path)


@dataclass
class StreamConfig:
    """Training data rendered on the fly by the ``generator`` section instead of read from
    ``train_store`` (``clerf/streaming.py``): every batch fresh, a batch depends only on
    ``(seed, step, rank)``. Poses (and, for pretraining, the triplet rules) come from the
    ``triplets`` section."""

    #: true: stream from the generator; false: read ``train_store``
    enabled: bool = False
    #: pose sampler of the streamed data: "" = ``triplets.poses``; or ``uniform``, ``euler_box``,
    #: ``lookat`` with the ``triplets`` section's ranges (e.g. a full-range stream beside an
    #: upright held-out store)
    poses: str = ""
    #: generator parameters of the stream, over ``generator.params`` (e.g. another style than
    #: the stores of the same pipeline)
    generator_params: dict[str, Any] = field(default_factory=dict)
    #: samples per epoch over all processes (images for fine-tuning, triplets for pretraining);
    #: sets the evaluation and checkpoint cadence, never repeats data
    epoch_size: int = 8192
    #: held-out images rendered once when no ``val_store`` is given (0 = none)
    val_size: int = 512
    #: the held-out set's generator seed is ``seed + val_seed_offset`` (other identities)
    val_seed_offset: int = 1_000_003


@dataclass
class PretrainConfig:
    """The contrastive stage (``clerf pretrain``)."""

    #: triplet store (HDF5, ``clerf generate``) to train on
    train_store: str | None = ""
    #: store (any kind) for the nearest-neighbour pose-retrieval check; "" or null = skip it
    #: (``str | None`` so that an empty command-line override, ``pretrain.val_store=``, works)
    val_store: str | None = ""
    #: number of held-out images used by the check (first ones of the store)
    val_size: int = 512
    #: apply a fixed, seeded geometric augmentation to the held-out images (full-range check)
    val_augment: bool = True
    #: render the training triplets on the fly instead of reading ``train_store``
    stream: StreamConfig = field(default_factory=StreamConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


@dataclass
class HeadBinsConfig:
    """Uniform angle bins of a binned Euler head (``docs/conventions.md`` section 5)."""

    #: left edge of bin 0, degrees (HopeNet: -99; full range: -180)
    start: float = HOPENET_BINS.start
    #: bin width, degrees
    width: float = HOPENET_BINS.width
    #: number of bins (HopeNet: 66 over [-99, 99); full range: 120 over [-180, 180))
    num_bins: int = HOPENET_BINS.num_bins

    def validate(self, path: str = "head.bins") -> None:
        from clerf.geometry import BinSpec

        try:
            BinSpec(start=float(self.start), width=float(self.width), num_bins=int(self.num_bins))
        except ValueError as exc:
            raise ConfigError(f"{path}: {exc}") from None


@dataclass
class HeadConfig:
    """The ``head`` section: ``type`` names a head registered in :data:`HEADS`; the section's
    other keys are that head's own config (its dataclass, a subclass of this one, declared beside
    the head in ``clerf/models/heads.py`` or a user's module). :func:`load_config` reads the type
    first, then types the section by it."""

    #: a registered head: ``binned`` (HopeNet multi-loss Euler bins), ``rotation6d`` (6D +
    #: Gram-Schmidt), ``both``, ``sphere`` (up and nose directions over a grid on the sphere)
    type: str = "binned"

    def validate(self, path: str = "head") -> None:
        """Checks beyond OmegaConf's types (ranges, combinations; the ``Literal`` choices again
        for configs built in Python): ``ConfigError`` naming ``path.key``. Subclasses extend it."""
        check_choices(self, path)

    def build(self, in_features: int) -> Any:
        """The head module on ``in_features`` encoder features."""
        raise NotImplementedError(f"{type(self).__qualname__}.build")


#: the pose heads by ``head.type``; the built-in ones register in ``clerf.models.heads``
HEADS: Registry[HeadConfig] = Registry("head", "head.type", builtins=("clerf.models.heads",))
#: the default ``head.type``
DEFAULT_HEAD = HeadConfig.type
#: keys of the one flat ``head`` section of clerf before heads owned their configs: models and
#: runs saved then carry all of them, whatever the type (dropped when the type has no such key)
LEGACY_HEAD_KEYS = frozenset({"bins", "alpha", "decode", "hidden", "loss", "binned_weight",
                              "rotation6d_weight", "predict_from", "sphere_points",
                              "sphere_sigma_deg"})  # fmt: skip


def head_config(values: Any, path: str = "head", legacy: bool = False) -> HeadConfig:
    """A validated head config (its registered dataclass) from a ``head`` section: a plain dict,
    a DictConfig, a head config instance or None (the default head). ``legacy``: accept the flat
    sections of models and runs saved before (:data:`LEGACY_HEAD_KEYS`)."""
    if isinstance(values, HeadConfig) and type(values) is not HeadConfig:
        check_config(OmegaConf.structured(values), path)
        return values
    head = HEADS.from_dict(to_dict(values), path, DEFAULT_HEAD,
                           ignore=LEGACY_HEAD_KEYS if legacy else ())
    check_config(OmegaConf.structured(head), path)
    return head


@dataclass
class FinetuneConfig:
    """The fine-tune stage (``clerf finetune``): encoder + pose head on labelled images."""

    #: labelled (or triplet) HDF5 store to train on; every image is a labelled sample
    train_store: str | None = None
    #: held-out store for the per-epoch evaluation; null/empty = hold out ``val_fraction`` instead
    val_store: str | None = None
    #: fraction of ``train_store`` (its last images, a contiguous block) held out when
    #: ``val_store`` is empty; 0 = no held-out evaluation
    val_fraction: float = 0.0
    #: at most this many held-out images are evaluated each epoch (0 = all)
    val_max_images: int = 1024
    #: encoder to start from: a pretrain output directory, a saved encoder directory, or a
    #: fine-tune output (its model's encoder, head dropped: supervised pretraining);
    #: null/empty (``finetune.encoder=`` on the command line) = a fresh encoder from the
    #: ``encoder`` section
    encoder: str | None = None
    #: first epochs train the head only, on a frozen encoder (linear probe); then everything
    probe_epochs: int = 0
    #: encoder parameter-name prefixes frozen for the whole run (HopeNet: the stem,
    #: ``["backbone.conv1", "backbone.bn1"]``)
    freeze: list[str] = field(default_factory=list)
    #: learning-rate multipliers on ``train.lr`` (HopeNet: heads at 5x)
    encoder_lr_scale: float = 1.0
    head_lr_scale: float = 5.0
    #: binned heads only: labels outside the bins after augmentation are ``drop``-ped from the
    #: loss, ``resample``-d (augmentation redrawn up to ``resample_tries`` times, then dropped), or
    #: an ``error``; dropped and resampled samples are counted in the logs
    out_of_range: OutOfRangePolicy = "drop"
    resample_tries: int = 3
    #: render the training images on the fly instead of reading ``train_store``
    stream: StreamConfig = field(default_factory=StreamConfig)
    #: generated images added to every batch of ``train_store`` (0 = none): rendered by the
    #: ``generator`` with ``stream.poses`` / ``stream.generator_params`` (``stream.enabled``
    #: stays false), new ones at every step; each batch then holds ``train.batch_size`` store
    #: images + this many generated ones
    mix_generated: int = 0
    #: on-device augmentation; a smaller in-plane range than pretraining by default, because the
    #: default head (HopeNet bins) only covers [-99, 99) deg
    augment: AugmentConfig = field(default_factory=lambda: AugmentConfig(inplane_deg=30.0))
    #: progressive resizing: the training images' size (px) at each epoch, one entry per epoch
    #: of ``train.epochs``, each from 32 to ``encoder.input_size``; images are resized
    #: (antialiased bilinear) after augmentation, so an epoch at 48 px costs about 3/4 of one
    #: at 64 px; end at ``input_size`` (the held-out evaluation, the saved model and inference
    #: use ``input_size``). Empty = ``input_size`` every epoch
    epoch_sizes: list[int] = field(default_factory=list)
    train: TrainConfig = field(default_factory=TrainConfig)

    def validate(self, path: str = "finetune") -> None:
        """The section's own keys (its ``stream``, ``augment`` and ``train`` check themselves):
        ``ConfigError`` naming ``path.key``."""
        import math

        check_choices(self, path)

        def need(ok: bool, key: str, what: str) -> None:
            _need(ok, f"{path}.{key}", what, getattr(self, key))

        need(self.resample_tries >= 0, "resample_tries", "an integer >= 0")
        need(self.probe_epochs >= 0, "probe_epochs", "an integer >= 0")
        need(0.0 <= self.val_fraction < 1.0, "val_fraction", "a number in [0, 1)")
        need(self.val_max_images >= 0, "val_max_images", "an integer >= 0")
        for key in ("encoder_lr_scale", "head_lr_scale"):
            value = float(getattr(self, key))
            need(math.isfinite(value) and value >= 0, key, "a number >= 0")
        need(self.mix_generated >= 0, "mix_generated", "an integer >= 0")
        need(not (self.mix_generated and self.stream.enabled), "mix_generated",
             "0 when finetune.stream.enabled is true (the whole batch is generated then)")
        sizes = [int(v) for v in self.epoch_sizes]
        need(all(v >= 32 for v in sizes), "epoch_sizes", "sizes of at least 32 px")
        need(not sizes or len(sizes) == int(self.train.epochs), "epoch_sizes",
             f"one size per epoch ({int(self.train.epochs)}: finetune.train.epochs) or []")


@dataclass
class PrepareConfig:
    """``clerf prepare``: a real dataset -> a labelled store (``clerf/data``, ``docs/data.md``)."""

    #: ``300wlp``, ``aflw2000``, ``biwi`` or ``pointing04``
    dataset: str = ""
    #: dataset directory (300W-LP, AFLW2000, Pointing'04) or ``.npz`` file (BIWI)
    root: str = ""
    #: ``train`` or ``test``; "" = the dataset's usual role (300W-LP train, others test)
    split: Literal["", "train", "test"] = ""
    #: crop preset (``hopenet_train``, ``hopenet_test``, ``hopenet_test_corrected``,
    #: ``train_rule_k02``, ``pointing04_box``, ``none``); "" = the split's preset (train:
    #: hopenet_train, test: hopenet_test, the peers' exact crop; BIWI: none; Pointing'04:
    #: pointing04_box)
    crop: str = ""
    #: stored images are resolution x resolution RGB
    resolution: int = 64
    #: ``center`` = ``hopenet`` (torchvision Resize(r) + CenterCrop(r), HopeNet's test
    #: transform), ``6drepnet`` (Resize(r*256/224) + CenterCrop(r), 6DRepNet's) or ``stretch``
    resize: ResizeMode = "center"
    #: protocol filter: keep samples with all |angles| <= this (deg); null = keep all
    #: (Pointing'04 keeps all 93 poses unless this is changed from 99)
    max_abs_angle: float | None = PROTOCOL_MAX_ABS_ANGLE
    #: BIWI is evaluated whole: apply ``max_abs_angle`` to BIWI only when this is true (the
    #: count beyond +-99 deg is logged and stored either way)
    biwi_filter: bool = False
    #: skip bad files with a counted warning instead of stopping
    skip_bad: bool = False
    #: image check during the scan: ``header`` (header + JPEG end marker), ``full`` (decode),
    #: ``none``
    verify_images: VerifyMode = "header"
    #: 300W-LP subset folders to read (empty = all eight); Pointing'04: people, as ``train``
    #: (1-10), ``val`` (11-12), ``test`` (13-15) or ``Person01`` ... (empty = all 15)
    subsets: list[str] = field(default_factory=list)
    #: BIWI .npz label signs: ``fsanet`` (300W-LP semantics) or ``mirrored``
    biwi_signs: BiwiSigns = "fsanet"
    #: BIWI .npz channel order as stored: ``bgr`` (FSA-Net's files) or ``rgb``
    biwi_channels: BiwiChannels = "bgr"
    #: images decoded in parallel by this many worker processes (0 = in this process)
    workers: int = 0
    #: a label budget: keep only this many of the kept images, spread evenly over identities,
    #: chosen with ``seed`` (0 = all)
    max_images: int = 0

    def validate(self, path: str = "prepare") -> None:
        """``ConfigError`` naming ``path.key``; which dataset and root are checked when
        ``clerf prepare`` runs (a config needs none)."""
        check_choices(self, path)

        def need(ok: bool, key: str, what: str) -> None:
            _need(ok, f"{path}.{key}", what, getattr(self, key))

        need(self.resolution > 0, "resolution", "a positive integer")
        need(self.workers >= 0, "workers", "an integer >= 0")
        need(self.max_images >= 0, "max_images", "an integer >= 0 (0 = all)")


@dataclass
class EvaluateConfig:
    """Evaluation protocols and report (``clerf evaluate``, ``clerf.evaluation``)."""

    #: any of ``standard``, ``rotated``, ``flipped``, ``lowres``, ``full_range``
    protocols: list[EvaluateProtocol] = field(default_factory=lambda: ["standard"])
    #: in-plane sweep of the rotated protocol, degrees clockwise on screen
    rotated_angles: list[float] = field(
        default_factory=lambda: [-90.0, -60.0, -30.0, -15.0, 15.0, 30.0, 60.0, 90.0, 180.0]
    )
    #: samples read per step (memory only; results do not depend on it)
    batch_size: int = 64
    #: fixed batch shape of every model call (last chunk zero-padded)
    model_batch: int = 32
    #: evaluate only the first N stored samples (0 = all)
    max_samples: int = 0
    #: Euler MAE over samples with true |pitch|, |roll| <= this (deg); the rest are counted
    euler_range_deg: float = PROTOCOL_MAX_ABS_ANGLE
    #: full range: N uniform SO(3) rotations rendered with this generator and seed
    full_range_n: int = 512
    full_range_seed: int = 0
    full_range_generator: str = "procedural"
    full_range_params: dict[str, Any] = field(default_factory=dict)
    #: render size for the full range (0 = the model's input size)
    full_range_resolution: int = 0
    #: a stored full-range set instead of rendering (a store path; "" = render)
    full_range_store: str = ""
    #: write PNG figures
    figures: bool = True
    #: force the CPU even when an accelerator is present
    cpu: bool = False

    def validate(self, path: str = "evaluate") -> None:
        """``ConfigError`` naming ``path.key`` (the protocols again for configs built in
        Python)."""
        check_choices(self, path)

        def need(ok: bool, key: str, what: str) -> None:
            _need(ok, f"{path}.{key}", what, getattr(self, key))

        need(self.batch_size > 0, "batch_size", "an integer > 0")
        need(len(self.protocols) > 0, "protocols", "at least one protocol")
        need(len(set(self.protocols)) == len(self.protocols), "protocols", "no duplicates")
        need(0 < self.euler_range_deg <= 180, "euler_range_deg", "a number in (0, 180]")
        need(self.model_batch > 0, "model_batch", "an integer > 0")
        need(self.max_samples >= 0, "max_samples", "an integer >= 0")


@dataclass
class PipelineConfig:
    """``clerf pipeline``: which stages run and how the held-out set is made."""

    #: stages in order; a subset skips the others (e.g. no ``pretrain``: a fresh encoder)
    stages: list[PipelineStage] = field(
        default_factory=lambda: ["generate", "pretrain", "finetune", "evaluate"]
    )
    #: triplets rendered for the held-out set (3 images each)
    test_count: int = 128
    #: the held-out set uses ``seed + test_seed_offset``: other identities and poses
    test_seed_offset: int = 1000
    #: triplets rendered for the validation store (3 images each) that training stages reading
    #: stores evaluate on each epoch; streaming stages render their own (``stream.val_size``).
    #: Never the test set: no choice is made on the images the figures are reported on.
    val_count: int = 64
    #: the validation store uses ``seed + val_seed_offset``: identities in neither train nor test
    val_seed_offset: int = 2000
    #: where the stores go (default ``OUT/data``); share it between runs that use the same data
    data_dir: str = ""

    def validate(self, path: str = "pipeline") -> None:
        """The ``Literal`` choices (for a section built in Python; OmegaConf checks loaded ones)."""
        check_choices(self, path)


@dataclass
class ExperimentConfig:
    """The whole experiment. Sections are filled in by the stages that read them."""

    name: str = "experiment"
    seed: int = 0
    generator: GeneratorConfig = field(default_factory=GeneratorConfig)
    prepare: PrepareConfig = field(default_factory=PrepareConfig)
    triplets: TripletsConfig = field(default_factory=TripletsConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)


# --------------------------------------------------------------------------- checks


def check_config(cfg: DictConfig, path: str = "") -> None:
    """Run every section's checks with its dotted path (once, when a config is loaded or
    derived; the stages rely on it): the ``validate`` method of each section's dataclass
    (training, augmentation, heads, bins, ...)."""

    def walk(node: DictConfig, path: str) -> None:
        kind = OmegaConf.get_type(node)
        if isinstance(kind, type) and callable(getattr(kind, "validate", None)):
            OmegaConf.to_object(node).validate(path or "config")  # type: ignore[union-attr]
        for key in node:
            value = node._get_node(key)
            if isinstance(value, DictConfig):
                walk(value, f"{path}.{key}" if path else str(key))

    walk(cfg, path)


S = TypeVar("S")


def section_config(cls: type[S], values: Any = None, path: str = "") -> S:
    """A checked section, an instance of its dataclass ``cls``, from a config section (typed or
    plain DictConfig), a mapping, an instance or None (the defaults): what a stage calls on a
    section it is given (configs built in code; :func:`load_config` has checked the ones it
    loaded). A bad key or value is a :class:`ConfigError` naming ``path.key``."""
    path = path or cls.__name__
    try:
        node = OmegaConf.structured(cls)
        if values is not None:
            node = OmegaConf.merge(node, values)
    except OmegaConfBaseException as exc:
        msg = str(exc).splitlines()[0].strip() if str(exc) else type(exc).__name__
        if isinstance(exc, ConfigKeyError):
            msg = f"unknown key ({msg})"
        raise ConfigError(f"{path}.{getattr(exc, 'full_key', '') or ''}: {msg}") from exc
    check_config(node, path)  # type: ignore[arg-type]
    return OmegaConf.to_object(node)  # type: ignore[return-value]


# --------------------------------------------------------------------------- loading


def _describe(exc: OmegaConfBaseException, source: str) -> str:
    key = getattr(exc, "full_key", None)
    msg = str(exc).splitlines()[0].strip() if str(exc) else exc.__class__.__name__
    if key:
        return f"{source}: key '{key}': {msg}"
    return f"{source}: {msg}"


def _merge(base: DictConfig, other: Any, source: str) -> DictConfig:
    try:
        return OmegaConf.merge(base, other)  # type: ignore[return-value]
    except OmegaConfBaseException as exc:
        msg = _describe(exc, source)
        key = str(getattr(exc, "full_key", "") or "")
        if isinstance(exc, ConfigKeyError) and key.startswith("head.") and key.count(".") == 1 \
                and "head" in base:  # fmt: skip
            kind = base.head.type
            msg += f" (the '{kind}' head's keys: {', '.join(HEADS.fields(kind))})"
        raise ConfigError(msg) from exc


def parse_overrides(overrides: list[str] | tuple[str, ...]) -> DictConfig:
    """Parse ``key.sub=value`` strings; a malformed one is a :class:`ConfigError`."""
    for item in overrides:
        if "=" not in item or item.startswith("="):
            raise ConfigError(
                f"override '{item}' is not of the form key=value (e.g. train.lr=1e-4)"
            )
    try:
        return OmegaConf.from_dotlist(list(overrides))
    except OmegaConfBaseException as exc:
        raise ConfigError(_describe(exc, "command-line override")) from exc


def _load_yaml(p: Path) -> DictConfig:
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        loaded = OmegaConf.load(p)
    except Exception as exc:  # yaml errors come in several types
        raise ConfigError(f"{p}: not valid YAML ({' '.join(str(exc).split())})") from exc
    if not isinstance(loaded, DictConfig):
        raise ConfigError(f"{p}: expected a mapping of config sections at the top level")
    if len(loaded) == 0:  # an empty file (or only comments) would silently run every default
        raise ConfigError(f"{p}: the config file is empty; expected config sections (e.g. "
                          "'triplets:'), see configs/ for examples")  # fmt: skip
    return loaded


def _load_chain(p: Path) -> list[tuple[Path, DictConfig]]:
    """The file and the files it builds on (``base: other.yaml``, relative to the file), base
    first, so that an experiment can state only how it differs from another."""
    chain: list[tuple[Path, DictConfig]] = []
    seen: set[Path] = set()
    while True:
        if p.resolve() in seen:
            raise ConfigError(f"{p}: 'base' files form a cycle")
        seen.add(p.resolve())
        loaded = _load_yaml(p)
        base = loaded.pop("base", None)
        chain.append((p, loaded))
        if base is None:
            return chain[::-1]
        if not isinstance(base, str):
            raise ConfigError(f"{p}: key 'base': expected a path to another YAML file")
        p = p.parent / base


def _spell_no(source: DictConfig) -> DictConfig:
    """``train.mixed_precision: no`` as meant: YAML (and a command-line override) reads a bare
    ``no`` as false, but the value accelerate and its launcher flag spell ``no`` is meant."""
    for name in list(source):
        section = source._get_node(name)
        train = section._get_node("train") if isinstance(section, DictConfig) else None
        if isinstance(train, DictConfig) and train._get_node("mixed_precision") is not None \
                and train._get_node("mixed_precision")._value() is False:  # fmt: skip
            train.mixed_precision = "no"
    return source


def _head_type(source: DictConfig) -> Any:
    head = source.get("head") if isinstance(source, DictConfig) else None
    return head.get("type") if isinstance(head, DictConfig) else None


def _type_head(cfg: DictConfig, sources: list[tuple[str, DictConfig]]
               ) -> list[tuple[str, DictConfig]]:  # fmt: skip
    """The two-step load of the ``head`` section (OmegaConf has no tagged unions): the last
    ``head.type`` the sources set picks the head's dataclass (:data:`HEADS`), which then types
    ``cfg.head``; keys that sources before a change of type set and the new type lacks are dropped
    (``head.type=rotation6d`` over a ``sphere`` file keeps ``hidden``, drops ``sphere_points``).
    Returns the sources to merge."""
    kind, where, changed = str(cfg.head.type), "", -1
    for i, (source, loaded) in enumerate(sources):
        t = _head_type(loaded)
        if t is not None and str(t) != kind:
            kind, where, changed = str(t), source, i
    cfg.head = HEADS.config_class(kind, where)()
    keep = set(HEADS.fields(kind))
    out = []
    for i, (source, loaded) in enumerate(sources):
        if i < changed and isinstance(loaded.get("head"), DictConfig):
            loaded = loaded.copy()
            head = loaded.head
            for key in [k for k in head if k not in keep]:
                del head[key]
        out.append((source, loaded))
    return out


def structured(values: Mapping[str, Any] | None = None, schema: type = ExperimentConfig
               ) -> DictConfig:  # fmt: skip
    """The typed, writable schema of a config with the head of ``values['head']['type']``
    (merged with ``values`` when given): what a resolved config dict is merged into again."""
    cfg = OmegaConf.structured(schema)
    if values is None:
        return cfg
    src = [("config", OmegaConf.create(dict(values)))]
    if "head" in cfg:
        src = _type_head(cfg, src)
    return _merge(cfg, _spell_no(src[0][1]), "config")


def load_config(
    path: str | Path | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    schema: type = ExperimentConfig,
    values: Mapping[str, Any] | None = None,
) -> DictConfig:
    """Load a YAML config (or the defaults when ``path`` is None), validate it, apply overrides.

    A file may start from another one with ``base: other.yaml`` (relative to the file); its keys
    then override the base's. ``overrides`` (``key.sub=value`` strings) come next, then
    ``values`` (``{"key.sub": value}``: what a command's flags set, merged as values so paths may
    hold any character). The whole result is checked once (:func:`check_config`).

    Returns a read-only, typed ``DictConfig`` (attribute access, ``OmegaConf.to_yaml`` works).

    Raises:
        ConfigError: missing or unreadable file, invalid YAML, unknown key, wrong type.
    """
    sources: list[tuple[str, DictConfig]] = []
    if path is not None:
        sources += [(str(p), loaded) for p, loaded in _load_chain(Path(path))]
    if overrides:
        sources.append(("command-line override", parse_overrides(overrides)))
    if values:  # command-line flags: thin aliases of dotted keys, merged as values (paths...)
        flags = OmegaConf.create({})
        for key, value in values.items():
            OmegaConf.update(flags, key, value, merge=True)
        sources.append(("command-line flag", flags))
    cfg = OmegaConf.structured(schema)
    if "head" in cfg:
        sources = _type_head(cfg, sources)
    for source, loaded in sources:
        cfg = _merge(cfg, _spell_no(loaded), source)
    try:
        OmegaConf.resolve(cfg)
    except OmegaConfBaseException as exc:
        raise ConfigError(_describe(exc, str(path or "config"))) from exc
    check_config(cfg)
    OmegaConf.set_readonly(cfg, True)
    return cfg


def to_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg, resolve=True)


def to_dict(cfg: Any) -> dict[str, Any]:
    """A section as a plain dict: a DictConfig (interpolations resolved), a config dataclass,
    any mapping, or ``None`` (an empty dict)."""
    if cfg is None:
        return {}
    if isinstance(cfg, DictConfig):
        return OmegaConf.to_container(cfg, resolve=True) or {}  # type: ignore[return-value]
    if is_dataclass(cfg) and not isinstance(cfg, type):
        return asdict(cfg)
    return dict(cfg)


def save_resolved(cfg: DictConfig, directory: str | Path, filename: str = "config.yaml") -> Path:
    """Write the resolved config next to a stage's outputs; returns the path."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    out = d / filename
    out.write_text(to_yaml(cfg))
    return out


#: keys that change how a run looks, not what it computes: never a reason to redo a stage
DISPLAY_KEYS = frozenset({"progress", "log_every", "tensorboard"})


def config_differences(old: Any, new: Any, ignore: frozenset[str] | set[str] = frozenset(),
                       prefix: str = "") -> list[tuple[str, Any, Any]]:  # fmt: skip
    """Every dotted key whose value differs between two nested dicts: ``(key, old, new)``,
    sorted by key. A key missing on one side counts as ``None``; dict keys named in ``ignore``
    are skipped at any depth. The one config comparison of clerf (resume, pipeline stages,
    store fingerprints)."""
    if isinstance(old, dict) and isinstance(new, dict):
        out: list[tuple[str, Any, Any]] = []
        for k in sorted((set(old) | set(new)) - set(ignore), key=str):
            out += config_differences(old.get(k), new.get(k), ignore, f"{prefix}{k}.")
        return out
    return [] if old == new else [(prefix.rstrip("."), old, new)]


def effective_mixed_precision(value: str) -> str:
    """The precision a ``train.mixed_precision`` value trains in: ``auto`` follows the launcher
    (``ACCELERATE_MIXED_PRECISION``, which ``accelerate launch`` sets from ``--mixed_precision``
    or its config file), ``no`` without one; explicit values as they are."""
    import os

    if str(value) != "auto":
        return str(value)
    return os.environ.get("ACCELERATE_MIXED_PRECISION", "no") or "no"


def comparable(config: dict[str, Any]) -> dict[str, Any]:
    """A config dict as run comparisons see it: each ``*.train.mixed_precision`` replaced by the
    precision it trains in (a run saved with ``no`` resumes under ``auto`` without a
    launcher, and the reverse)."""
    out = dict(config)
    head = config.get("head")
    if isinstance(head, dict) and set(head) & LEGACY_HEAD_KEYS and head.get("type") in HEADS:
        # a run saved with the flat head section of before compares by its type's own keys
        keep = set(HEADS.fields(head["type"]))
        out["head"] = {k: v for k, v in head.items() if k in keep}
    for name, section in config.items():
        if isinstance(section, dict) and isinstance(section.get("train"), dict) \
                and "mixed_precision" in section["train"]:  # fmt: skip
            train = dict(section["train"])
            train["mixed_precision"] = effective_mixed_precision(train["mixed_precision"])
            out[name] = {**section, "train": train}
    return out


def first_difference(old: Any, new: Any, ignore: frozenset[str] | set[str] = frozenset()
                     ) -> str | None:  # fmt: skip
    """The first differing key with both values (``"key: old then, new now"``), or None."""
    diffs = config_differences(old, new, ignore)
    if not diffs:
        return None
    key, a, b = diffs[0]
    return f"{key}: {a!r} then, {b!r} now"


def provenance(cfg: DictConfig | None = None, **extra: Any) -> dict[str, Any]:
    """What made an artefact: clerf and conventions versions, seed, resolved config, time.

    Values are JSON-friendly; stores write them as attributes, checkpoints as JSON.
    """
    info: dict[str, Any] = {
        "clerf_version": __version__,
        "conventions_version": CONVENTIONS_VERSION,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    if cfg is not None:
        info["seed"] = int(cfg.seed) if "seed" in cfg else None
        info["config_yaml"] = to_yaml(cfg)
        info["config_json"] = json.dumps(to_dict(cfg), sort_keys=True)
    info.update(extra)
    return info
