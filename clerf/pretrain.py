"""The contrastive pretraining stage: triplet store -> augmentation -> encoder -> Circle Loss.

``run_pretrain(cfg, out)`` trains :class:`~clerf.models.encoder.Encoder` on the triplet store
``cfg.pretrain.train_store`` with the shared loop (:func:`clerf.training.fit`) and writes:

* ``OUT/encoder/`` the pretrained encoder (``config.json`` + ``model.safetensors``), loadable with
  ``clerf.load_encoder(OUT)`` or ``Encoder.from_pretrained(OUT / "encoder")``;
* ``OUT/checkpoints/`` full training state (automatic resume), ``OUT/metrics.jsonl``,
  ``OUT/config.yaml``, ``OUT/provenance.json``, ``OUT/summary.json``.

Each step: a batch of ``B`` triplets ``(B, 3, 3, H, W)`` uint8 is augmented on the device
(:meth:`clerf.augment.PoseAugment.triplets`: anchor and positive share the geometric transform,
labels composed exactly), embedded (``3B`` images), and the loss (:mod:`clerf.losses`) labels
pairs by the geodesic distance of the composed rotations.

The representation check (each epoch): nearest-neighbour pose retrieval on the held-out store
``cfg.pretrain.val_store`` (its first ``val_size`` images, optionally with a fixed seeded
geometric augmentation so the full rotation range is probed): for every image, the image with
the most similar embedding among the others; its rotation's geodesic distance to the query's is
the error. Logged with two references: ``nn_oracle_deg`` (the closest rotation present, the best
any encoder could do) and ``nn_random_deg`` (a random neighbour, chance).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from torch import Tensor, nn

from clerf.augment import PoseAugment
from clerf.data_sources import InMemoryTriplets, held_out_set, training_source
from clerf.errors import ConfigError, DataError
from clerf.geometry import chance_geodesic, geodesic_distance
from clerf.losses import build_loss
from clerf.models.encoder import Encoder, build_encoder
from clerf.streaming import is_stream
from clerf.training import StepContext, Task, fit

__all__ = [
    "PretrainTask",
    "run_pretrain",
    "nn_pose_retrieval",
    "embed_images",
    "VAL_AUG_SEED",
    "InMemoryTriplets",  # re-exported from clerf.data_sources
]

#: seed of the fixed augmentation applied to the held-out images
VAL_AUG_SEED = 20_241_203


def nn_pose_retrieval(embeddings: Tensor, rotations: Tensor) -> dict[str, float]:
    """Leave-one-out nearest-neighbour pose retrieval (cosine similarity of embeddings).

    Args:
        embeddings: ``(N, D)`` (normalised or not: cosine similarity is used).
        rotations: ``(N, 3, 3)`` labels.

    Returns:
        ``nn_geodesic_deg`` (mean error of the nearest neighbour's rotation, degrees),
        ``nn_median_deg``, ``nn_within_15deg`` (fraction), ``nn_oracle_deg`` (mean distance to
        the closest rotation among the others) and ``nn_random_deg`` (mean distance to all
        others: a random neighbour's expected error). Order-independent.
    """
    n = embeddings.shape[0]
    if n < 2:
        raise ValueError("nn_pose_retrieval needs at least 2 images")
    z = torch.nn.functional.normalize(embeddings.double(), dim=-1)
    sim = z @ z.T
    eye = torch.eye(n, dtype=torch.bool, device=sim.device)
    sim = sim.masked_fill(eye, -float("inf"))
    nn_idx = sim.argmax(dim=1)
    R = rotations.double()
    err = geodesic_distance(R, R[nn_idx])
    d = geodesic_distance(R[:, None], R[None, :])
    oracle = d.masked_fill(eye, float("inf")).min(dim=1).values
    return {
        "nn_geodesic_deg": float(err.mean()),
        "nn_median_deg": float(err.median()),
        "nn_within_15deg": float((err <= 15.0).double().mean()),
        "nn_oracle_deg": float(oracle.mean()),
        "nn_random_deg": chance_geodesic(R),
    }


@torch.no_grad()
def embed_images(encoder: nn.Module, images: Tensor, batch_size: int = 256) -> Tensor:
    """Embeddings ``(N, D)`` of float images ``(N, 3, S, S)`` in [0, 1], in batches."""
    device = next(encoder.parameters()).device
    outs = [encoder(images[i:i + batch_size].to(device)).float().cpu()
            for i in range(0, images.shape[0], batch_size)]  # fmt: skip
    return torch.cat(outs)


class _Features(nn.Module):
    """An encoder's backbone features (before the projection) as a module, for embed_images."""

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, images: Tensor) -> Tensor:
        return self.encoder.features(images)


class PretrainTask(Task):
    """The contrastive stage as a :class:`clerf.training.Task`.

    Args:
        cfg: the experiment config (sections ``encoder`` and ``pretrain`` are read).
        train_data: optional source used instead of ``pretrain.train_store`` (a
            ``triplets.store.DataSource`` of triplets, e.g.
            :class:`clerf.data_sources.InMemoryTriplets`); for tests and benchmarks.
        val_data: optional ``{"images": (N, 3, H, W) uint8, "rotations": (N, 3, 3)}`` instead
            of ``pretrain.val_store``.

    Both are resolved by :mod:`clerf.data_sources` (:func:`~clerf.data_sources.training_source`,
    :func:`~clerf.data_sources.held_out_set`).
    """

    def __init__(self, cfg: DictConfig, train_data: Any = None,
                 val_data: Mapping[str, Tensor] | None = None) -> None:  # fmt: skip
        self.cfg = cfg
        pc = cfg.pretrain
        self.input_size = int(cfg.encoder.input_size)
        try:
            self.augment = PoseAugment(pc.augment, output_size=self.input_size,
                                       section="pretrain.augment")  # fmt: skip
            self.loss = build_loss(pc.loss)
        except ValueError as exc:
            raise ConfigError(f"pretrain: {exc}") from exc
        # the held-out set comes from the stream whenever it is enabled, even for passed data
        self.train_data = training_source(cfg, "pretrain", train_data)
        val_data, _ = held_out_set(cfg, "pretrain", self.train_data,
                                   streaming=bool(pc.stream.enabled), val_data=val_data)
        self.val_images, self.val_rotations = self._prepare_val(val_data)

    def _prepare_val(self, val: Mapping[str, Tensor] | None) -> tuple[Tensor | None, Tensor | None]:
        if val is None:
            return None, None
        n = min(int(self.cfg.pretrain.val_size), val["images"].shape[0])
        if n < 2:
            raise DataError("pretrain.val_store: needs at least 2 images for the check")
        images, R = val["images"][:n], val["rotations"][:n].float()
        if self.cfg.pretrain.val_augment:
            g = torch.Generator().manual_seed(VAL_AUG_SEED)
            x, R = self.augment(images, R, generator=g, photometric_aug=False)
        else:
            from clerf.augment import to_float_images

            x = to_float_images(images, self.input_size)
        return x, R

    # ----------------------------------------------------------------------- Task hooks

    def build_model(self) -> Encoder:
        try:
            return build_encoder(self.cfg.encoder)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"encoder: {exc}") from exc

    def train_loader(self, ctx: StepContext):
        from clerf.streaming import stage_loader

        return stage_loader(self.train_data, ctx, "pretrain.train_store")

    def log_keys(self, model: nn.Module) -> tuple[str, ...]:
        return ("pos_pairs", "neg_pairs", "table_pos_violations", "table_neg_dropped")

    def train_step(self, model: nn.Module, batch: Mapping[str, Any], ctx: StepContext):
        x, R = self.augment.triplets(batch["images"], batch["rotations"].float(), ctx.generator)
        b = x.shape[0]
        flat = x.reshape(3 * b, *x.shape[2:])
        if ctx.train_cfg.channels_last:
            flat = flat.contiguous(memory_format=torch.channels_last)
        emb = model(flat)
        loss, stats = self.loss(emb.float(), R, generator=ctx.generator)
        return loss, stats

    def evaluate(self, model: nn.Module, ctx: StepContext) -> dict[str, float]:
        if self.val_images is None:
            return {}
        from clerf.evaluation.probe import probe_features

        emb = embed_images(model, self.val_images)
        res = nn_pose_retrieval(emb, self.val_rotations)
        # the backbone features (what a pose head is trained on): kNN and a linear probe
        feats = embed_images(_Features(model), self.val_images)
        res.update({f"features_{k}": v for k, v in
                    probe_features(feats, self.val_rotations).items()})  # fmt: skip
        return {f"val/{k}": v for k, v in res.items()}

    def save_artifacts(self, model: nn.Module, out: Path, summary: dict[str, Any]) -> None:
        pc = self.cfg.pretrain
        training = {
            "stage": "pretrain",
            "train_store": None if is_stream(self.train_data) else str(pc.train_store),
            "train_data": (self.train_data.describe() if is_stream(self.train_data)
                           else {"source": "store", "path": str(pc.train_store)}),
            "val_store": str(pc.val_store),
            "steps": summary["steps"],
            "epochs": summary["epochs"],
            "images_seen": summary["images_seen"],
            "world_size": summary["world_size"],
            "loss": dict(name=pc.loss.name, eps_deg=pc.loss.eps_deg, delta_deg=pc.loss.delta_deg),
            "evaluation": summary["evaluation"],
            "seed": int(self.cfg.seed),
        }
        model.save_pretrained(out / "encoder", training=training)


def run_pretrain(cfg: DictConfig, out: str | Path, train_data: Any = None,
                 val_data: Mapping[str, Tensor] | None = None) -> dict[str, Any]:  # fmt: skip
    """Run (or resume) the contrastive stage; returns the training summary.

    See the module docstring for what is written under ``out``.
    """
    task = PretrainTask(cfg, train_data=train_data, val_data=val_data)
    return fit(task, cfg, out, section="pretrain")
