"""One SGD step of clerf's real training loop, for the gradient-equivalence tests.

    python tests/ddp_equivalence_run.py {finetune,pretrain} STORE OUT BATCH ACCUM [KEY=VALUE ...]
    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 ... \
        tests/ddp_equivalence_run.py {finetune,pretrain} STORE OUT BATCH ACCUM

Trains the stage's own task (FinetuneTask / PretrainTask, its loss and loader, clerf's fit)
for exactly one optimizer step of plain SGD (no momentum, no weight decay, constant lr) and
writes the parameters after it to ``OUT/params.pt``. BatchNorm layers are replaced by
identities (per-process batch statistics would differ from the whole batch's by design, and
SyncBatchNorm does not run on gloo); augmentation is off (its generator is seeded by the
process index). So one process at batch 2b, two at batch b, and one at batch b with
``grad_accum`` 2 must end on the same parameters. ``CLERF_TEST_BREAK=scale`` multiplies the
loss by (process index + 1), ``CLERF_TEST_BREAK=gather`` detaches the other ranks' embeddings:
the check that the tests can fail. ``CLERF_TEST_EMPTY_RANK=r`` makes rank r find no usable pair.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
from torch import nn


def _strip_batchnorm(module: nn.Module) -> nn.Module:
    for name, child in module.named_children():
        if isinstance(child, nn.modules.batchnorm._BatchNorm):
            setattr(module, name, nn.Identity())
        else:
            _strip_batchnorm(child)
    return module


def _common(stage: str, batch: int, accum: int) -> list[str]:
    t = f"{stage}.train"
    return [f"{t}.optimizer=sgd", f"{t}.momentum=0", f"{t}.weight_decay=0", f"{t}.lr=0.05",
            f"{t}.schedule=constant", f"{t}.warmup_steps=0", f"{t}.max_steps=1",
            f"{t}.batch_size={batch}", f"{t}.grad_accum={accum}", f"{t}.progress=false",
            f"{t}.tensorboard=false", f"{t}.mixed_precision=no", f"{t}.checkpoint_every=0",
            f"{stage}.augment.enabled=false", "encoder.input_size=32",
            "encoder.embedding_dim=16", "encoder.projection_hidden=32", "seed=0"]


def main() -> None:
    stage, store, out, batch, accum = sys.argv[1:6]
    extra = sys.argv[6:]  # further config overrides
    batch_i, accum_i = int(batch), int(accum)
    from clerf.config import load_config
    from clerf.training import fit

    broken = os.environ.get("CLERF_TEST_BREAK", "")
    if stage == "finetune":
        from clerf.finetune import FinetuneTask

        cfg = load_config(None, [*_common("finetune", batch_i, accum_i),
                                 f"finetune.train_store={store}", "finetune.val_fraction=0",
                                 "finetune.head_lr_scale=1", "head.type=rotation6d",
                                 "head.hidden=16", *extra])  # fmt: skip
        base = FinetuneTask
    else:
        from clerf.pretrain import PretrainTask

        cfg = load_config(None, [*_common("pretrain", batch_i, accum_i),
                                 f"pretrain.train_store={store}", "pretrain.val_store=",
                                 "pretrain.loss.gather_distributed=true", *extra])  # fmt: skip
        base = PretrainTask
        empty_rank = os.environ.get("CLERF_TEST_EMPTY_RANK")
        if empty_rank is not None and os.environ.get("RANK", "0") == empty_rank:
            # this rank finds no usable pair (the loss's early return) while the others do
            import clerf.losses as losses

            def no_pairs(pos, neg):
                e = pos.new_zeros(0, dtype=torch.long)
                return e, e, e, e

            losses.pairs_from_masks = no_pairs
        if broken == "gather":
            import clerf.losses as losses

            real_gather = losses._gather_with_grad
            losses._gather_with_grad = lambda t: real_gather(t).detach()

    class Task(base):  # type: ignore[misc, valid-type]
        def build_model(self):
            model = _strip_batchnorm(super().build_model())
            Path(out).mkdir(parents=True, exist_ok=True)
            if os.environ.get("RANK", "0") == "0":  # the parameters before the step
                torch.save({k: v.detach().clone() for k, v in model.state_dict().items()},
                           Path(out) / "params0.pt")  # fmt: skip
            return model

        def train_step(self, model, batch, ctx):
            loss, logs = super().train_step(model, batch, ctx)
            if broken == "scale":
                loss = loss * (ctx.accelerator.process_index + 1)
            return loss, logs

        def save_artifacts(self, model, out_dir, summary):
            self.trained_model = model  # the unwrapped model after the step (main process)

    task = Task(cfg)
    fit(task, cfg, out, section=stage)
    from accelerate import PartialState

    if PartialState().is_main_process:

        model = task.trained_model if hasattr(task, "trained_model") else None
        assert model is not None
        torch.save({k: v.detach().clone() for k, v in model.state_dict().items()},
                   Path(out) / "params.pt")  # fmt: skip


if __name__ == "__main__":
    main()
