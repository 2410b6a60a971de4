"""The on-disk training checkpoint of clerf: its layout, writer, reader and RNG serialisation.

This module is the one home of the checkpoint format; :mod:`clerf.training` calls
:func:`save_checkpoint` every ``checkpoint_every`` steps and :func:`load_checkpoint` on resume.

Layout of a run's output directory ``OUT``::

    OUT/checkpoints/
        step_00000016/              one complete checkpoint per saved optimizer step (8 digits)
            model.safetensors       the unwrapped model's state dict (safetensors; metadata
                                    ``{"format": CHECKPOINT_FORMAT}``)
            optimizer.bin           ``optimizer.state_dict()``            (torch.save)
            scheduler.bin           the LR scheduler's ``state_dict()``   (torch.save)
            scaler.bin              the grad scaler's ``state_dict()``, only with fp16 scaling
            rng_state_<rank>.bin    one per process: that rank's Python, NumPy, torch CPU and
                                    (when CUDA is initialised) CUDA generator states
            loop_state.json         the loop position, written LAST: marks the folder complete
        .step_00000024.tmp/         a checkpoint being written; never resumed from

``loop_state.json`` is a JSON object
``{"format": "clerf-checkpoint-2", "step", "epoch", "micro_step", "images", "accelerator_step"}``:
``step`` counts optimizer steps, ``micro_step`` the micro-batches already done in ``epoch`` (a
mid-epoch resume skips them), ``images`` the images seen, ``accelerator_step`` accelerate's
gradient-accumulation counter.

An RNG file holds a dict of plain values (nothing to unpickle)::

    {"python": [version: int, internal state: int64 tensor (625,), gauss: float | None],
     "numpy":  [kind: str, keys: int64 tensor (624,), pos: int, has_gauss: int, cached: float],
     "torch":  uint8 tensor (torch.get_rng_state()),
     "cuda":   [uint8 tensor per device]}             # only when CUDA was initialised

Guarantees:

* **no pickle**: every ``.bin`` file holds only tensors, numbers, strings, lists and dicts and is
  read with ``torch.load(weights_only=True)``; the weights are safetensors, the position JSON. A
  shared or downloaded checkpoint cannot run code (accelerate's ``save_state`` writes ``.pkl``
  files, so it is not used).
* **atomic**: a checkpoint is written under ``.step_XXXXXXXX.tmp``, ``loop_state.json`` last, then
  renamed; :func:`find_checkpoints` only lists ``step_<digits>`` folders holding
  ``loop_state.json``, so a run killed mid-write (even ``kill -9``) resumes from the previous one.
* **strict reading**: every failure is one :class:`~clerf.errors.DataError` line naming the
  unreadable file (foreign, corrupt, truncated, of an older format whose checkpoints were
  pickles) and saying what to do instead. A ``loop_state.json`` whose ``format`` is not
  :data:`CHECKPOINT_FORMAT` is refused.
* only the newest ``keep`` checkpoints are kept.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from clerf.errors import DataError

__all__ = [
    "CHECKPOINT_DIR",
    "CHECKPOINT_FORMAT",
    "CHECKPOINT_PREFIX",
    "LOOP_FILE",
    "MODEL_FILE",
    "OPTIMIZER_FILE",
    "SCALER_FILE",
    "SCHEDULER_FILE",
    "CheckpointReader",
    "LoopState",
    "checkpoint_step",
    "find_checkpoints",
    "load_checkpoint",
    "rng_file",
    "rng_state",
    "save_checkpoint",
    "set_rng_state",
]

#: checkpoints live in ``OUT/checkpoints/step_XXXXXXXX``
CHECKPOINT_DIR = "checkpoints"
CHECKPOINT_PREFIX = "step_"

#: ``format`` in ``loop_state.json`` of checkpoints that hold no pickle (:func:`save_checkpoint`)
CHECKPOINT_FORMAT = "clerf-checkpoint-2"
MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.bin"
SCHEDULER_FILE = "scheduler.bin"
SCALER_FILE = "scaler.bin"
LOOP_FILE = "loop_state.json"


def checkpoint_step(ckpt: Path) -> int:
    """The optimizer step of the checkpoint folder ``ckpt`` (``step_00000016`` -> 16)."""
    return int(ckpt.name[len(CHECKPOINT_PREFIX):])


def find_checkpoints(out: str | Path) -> list[Path]:
    """Complete checkpoints under ``out/checkpoints``, oldest first (temporary ones ignored)."""
    d = Path(out) / CHECKPOINT_DIR
    if not d.is_dir():
        return []
    found = []
    for p in d.iterdir():
        digits = p.name[len(CHECKPOINT_PREFIX):]
        if p.is_dir() and p.name.startswith(CHECKPOINT_PREFIX) and digits.isdigit():
            if (p / LOOP_FILE).is_file():
                found.append(p)
    return sorted(found, key=checkpoint_step)


class LoopState:
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


def rng_file(rank: int) -> str:
    """The file of rank ``rank``'s random states in a checkpoint folder."""
    return f"rng_state_{rank}.bin"


def rng_state() -> dict[str, Any]:
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


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore this process's random states from what :func:`rng_state` returned."""
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


def save_checkpoint(accelerator, out: Path, state: LoopState, keep: int, model, optimizer,
                    scheduler) -> Path:  # fmt: skip
    """Write the full training state to ``out/checkpoints/step_XXXXXXXX`` without pickles.

    The model goes to safetensors; optimizer, scheduler and grad-scaler state dicts and each
    process's RNG states (plain tensors, ints, floats, strings) to ``torch.save`` files that
    :func:`load_checkpoint` reads with ``weights_only=True``; the loop position to JSON. The
    folder is written under a temporary name and renamed once complete.
    """
    from safetensors.torch import save_file

    ckdir = out / CHECKPOINT_DIR
    final = ckdir / f"{CHECKPOINT_PREFIX}{state.step:08d}"
    tmp = ckdir / f".{final.name}.tmp"
    if accelerator.is_main_process:
        ckdir.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    accelerator.wait_for_everyone()
    torch.save(rng_state(), tmp / rng_file(accelerator.process_index))
    if accelerator.is_main_process:
        raw = accelerator.unwrap_model(model)
        weights = {k: v.detach().cpu().contiguous().clone() for k, v in raw.state_dict().items()}
        save_file(weights, str(tmp / MODEL_FILE), metadata={"format": CHECKPOINT_FORMAT})
        torch.save(optimizer.state_dict(), tmp / OPTIMIZER_FILE)
        torch.save(scheduler.state_dict(), tmp / SCHEDULER_FILE)
        if accelerator.scaler is not None:
            torch.save(accelerator.scaler.state_dict(), tmp / SCALER_FILE)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        # The JSON marker is written last, then the folder is renamed: a checkpoint folder
        # without loop_state.json, or a .tmp one, is never resumed from.
        loop = {"format": CHECKPOINT_FORMAT, **state.state_dict(),
                "accelerator_step": int(accelerator.step)}  # fmt: skip
        (tmp / LOOP_FILE).write_text(json.dumps(loop))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in find_checkpoints(out)[: -max(int(keep), 1)]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


class CheckpointReader:
    """Reads a checkpoint folder written by :func:`save_checkpoint`; nothing is unpickled.

    Every failure is one :class:`DataError` line naming the unreadable file (foreign, corrupt,
    truncated, from an older clerf whose checkpoints were pickles) with what to do instead.
    """

    def __init__(self, ckpt: Path) -> None:
        self.ckpt = ckpt
        self.hint = (f"move {ckpt} aside to resume from an earlier checkpoint, or give a new "
                     "--out to start fresh")  # fmt: skip

    def bad(self, path: Path, why: str) -> DataError:
        return DataError(f"{path}: {why}; {self.hint}")

    @staticmethod
    def first_sentence(exc: BaseException) -> str:
        text = " ".join(str(exc).split()) or exc.__class__.__name__
        return text.split(". ")[0][:160]

    def torch_file(self, path: Path) -> Any:
        """A plain-tensor file, read with ``weights_only=True``."""
        if not path.is_file():
            raise self.bad(path, "missing from the checkpoint")
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # unpickling errors come in many types
            raise self.bad(path, "not a readable clerf checkpoint file (read with "
                           f"weights_only=True: {self.first_sentence(exc)})") from exc  # fmt: skip

    def loop_state(self) -> dict[str, Any]:
        loop_file = self.ckpt / LOOP_FILE
        try:
            loop = json.loads(loop_file.read_text())
            if not isinstance(loop, dict):
                raise ValueError("not a JSON object")
        except (OSError, ValueError) as exc:
            raise self.bad(loop_file, f"not a readable loop state ({exc})") from exc
        if loop.get("format") != CHECKPOINT_FORMAT:
            raise self.bad(loop_file, f"format {loop.get('format')!r}, expected "
                           f"{CHECKPOINT_FORMAT!r} (older clerf checkpoints hold pickles, which "
                           "are never loaded)")  # fmt: skip
        return loop

    def into(self, path: Path, obj: Any) -> None:
        """``obj.load_state_dict`` of the plain state dict in ``path``."""
        sd = self.torch_file(path)
        try:
            obj.load_state_dict(sd)
        except Exception as exc:
            raise self.bad(path, f"does not match this run ({self.first_sentence(exc)})") from exc


def load_checkpoint(accelerator, ckpt: Path, state: LoopState, model, optimizer,
                    scheduler) -> None:  # fmt: skip
    """Restore what :func:`save_checkpoint` wrote; nothing is unpickled.

    Raises:
        DataError: one line naming the unreadable file, with what to do instead.
    """
    from clerf.models.io import load_state_strict, load_weights_file

    reader = CheckpointReader(ckpt)
    loop = reader.loop_state()
    try:
        state.load_state_dict(loop)
        acc_step = int(loop.get("accelerator_step", 0))
    except (KeyError, TypeError, ValueError) as exc:
        raise reader.bad(ckpt / LOOP_FILE, f"bad loop state ({exc!r})") from exc
    try:
        load_state_strict(accelerator.unwrap_model(model), load_weights_file(ckpt / MODEL_FILE),
                          source=str(ckpt / MODEL_FILE))  # fmt: skip
    except DataError as exc:
        raise DataError(f"{exc}; {reader.hint}") from exc
    for path, obj in ((ckpt / OPTIMIZER_FILE, optimizer), (ckpt / SCHEDULER_FILE, scheduler),
                      (ckpt / SCALER_FILE, accelerator.scaler)):  # fmt: skip
        if obj is not None:
            reader.into(path, obj)
    rng_path = ckpt / rng_file(accelerator.process_index)
    if rng_path.is_file() or accelerator.process_index == 0:
        rng = reader.torch_file(rng_path)
        try:
            set_rng_state(rng)
        except Exception as exc:
            raise reader.bad(rng_path, f"not valid random states ({exc!r})") from exc
    accelerator.step = acc_step
