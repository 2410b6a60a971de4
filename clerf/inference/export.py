"""ONNX export of a pose model, checked against torch with onnxruntime (``clerf export``).

The exported graph:

* input ``images``: float32 ``(B, 3, S, S)`` RGB in [0, 1], ``B`` dynamic, ``S`` = the model's
  input size; the per-channel normalisation ``(x - mean) / std`` happens **inside** the graph.
  Faces must be cut like the training crops (``clerf predict`` does it; the crop preset is in
  the metadata).
* outputs ``rotation`` ``(B, 3, 3)`` (``docs/conventions.md``: rows = head axes right, up,
  nose in camera coordinates x right, y up, z toward the viewer) and ``euler`` ``(B, 3)`` =
  pitch, yaw, roll in degrees from :func:`clerf.geometry.euler_from_rotation`.
* ``metadata_props``: ``clerf.input_size``, ``clerf.mean``, ``clerf.std``, ``clerf.input_range``,
  ``clerf.input_layout``, ``clerf.normalisation``, ``clerf.crop_preset``, ``clerf.resize_mode``,
  ``clerf.outputs``, ``clerf.euler_order``, ``clerf.version``, ``clerf.conventions_version``,
  ``clerf.exporter``, ``clerf.check``.

Exporter: torch's dynamo-based exporter (``torch.onnx.export(..., dynamo=True)``) first; the
legacy TorchScript exporter if that fails (``exporter="auto"``). Neither has an ONNX translation
of ``hypot`` (used by :func:`clerf.geometry.euler_from_rotation`); both get one here:
``sqrt(x * x + y * y)``, exact enough for unit-length rotation rows (the legacy one also lacks
``deg2rad``/``rad2deg``: multiplications by the constants).

Check: after writing, onnxruntime runs the file on seeded random images at two batch sizes that
differ from the export's example batch (so the dynamic batch axis is exercised) and the maximum
absolute difference to torch must be ``<= atol`` (default 1e-4) on the rotation matrices and
``<= euler_atol_deg`` (default 1e-2 deg, differences wrapped by 360, samples within 1 deg of
gimbal lock excluded) on the Euler angles; otherwise :class:`ExportCheckError` is raised and the
file is removed (nothing half-checked is left at ``out``).
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from clerf.errors import ClerfError
from clerf.files import replacing
from clerf.geometry import euler_from_rotation, wrap_degrees
from clerf.inference.model import PoseModel

__all__ = ["ExportCheckError", "PoseExportModule", "export_onnx", "check_onnx", "EXPORTERS"]

EXPORTERS = ("auto", "dynamo", "legacy")
OPSET = 18


class ExportCheckError(ClerfError):
    """onnxruntime's outputs differ from torch's beyond the tolerance (or the file won't run)."""


class PoseExportModule(nn.Module):
    """``images (B, 3, S, S) in [0, 1] -> (rotation (B, 3, 3), euler (B, 3) deg)``."""

    def __init__(self, model: PoseModel) -> None:
        super().__init__()
        from clerf.models.backbones import deploy_copy

        original = model.export_module()
        # re-parameterisable blocks (RepVGG, MobileOne) fused into plain convolutions, as
        # 6DRepNet deploys them; other models are copied unchanged
        self.net = deploy_copy(original).eval()
        self.reparameterized = any(a.shape != b.shape for a, b in zip(
            original.state_dict().values(), self.net.state_dict().values(), strict=False)) or \
            len(original.state_dict()) != len(self.net.state_dict())  # fmt: skip
        self._original = [original]  # not a submodule: not exported, not in the state dict

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        R = self.net(images)
        e = euler_from_rotation(R)
        return R, torch.stack([e.pitch, e.yaw, e.roll], dim=-1)


def _hypot_onnxscript(x, y):
    from onnxscript import opset18 as op

    return op.Sqrt(op.Add(op.Mul(x, x), op.Mul(y, y)))


def _export_dynamo(module: nn.Module, example: Tensor, out: Path) -> None:
    table = {torch.ops.aten.hypot.default: _hypot_onnxscript}
    prims = getattr(torch.ops, "prims", None)
    if prims is not None and hasattr(prims, "hypot"):
        table[prims.hypot.default] = _hypot_onnxscript
    batch = torch.export.Dim("batch", min=1, max=4096)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module, (example,), str(out), dynamo=True, opset_version=OPSET,
            input_names=["images"], output_names=["rotation", "euler"],
            dynamic_shapes={"images": {0: batch}}, custom_translation_table=table,
            external_data=False, verbose=False,
        )


def _export_legacy(module: nn.Module, example: Tensor, out: Path) -> None:
    from torch.onnx import register_custom_op_symbolic

    def hypot(g, x, y):
        return g.op("Sqrt", g.op("Add", g.op("Mul", x, x), g.op("Mul", y, y)))

    def scaled(factor: float):
        def symbolic(g, x):
            return g.op("Mul", x, g.op("Constant", value_t=torch.tensor(factor)))
        return symbolic

    register_custom_op_symbolic("aten::hypot", hypot, OPSET)
    register_custom_op_symbolic("aten::deg2rad", scaled(math.pi / 180.0), OPSET)
    register_custom_op_symbolic("aten::rad2deg", scaled(180.0 / math.pi), OPSET)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module, (example,), str(out), dynamo=False, opset_version=OPSET,
            input_names=["images"], output_names=["rotation", "euler"],
            dynamic_axes={"images": {0: "batch"}, "rotation": {0: "batch"},
                          "euler": {0: "batch"}},
        )


def check_onnx(
    path: str | Path,
    module: nn.Module,
    input_size: int,
    batch_sizes: tuple[int, ...] = (1, 3),
    atol: float = 1e-4,
    euler_atol_deg: float = 1e-2,
    seed: int = 0,
) -> dict[str, Any]:
    """Run ``path`` with onnxruntime (CPU) and compare with ``module`` in torch.

    Returns ``{"rotation_max_abs", "euler_max_abs_deg", "batch_sizes", "atol", ...}``.

    Raises:
        ExportCheckError: a difference above tolerance, or onnxruntime cannot run the file.
    """
    import onnxruntime as ort

    try:
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own exception types
        raise ExportCheckError(f"{path}: onnxruntime cannot load the exported model: "
                               f"{' '.join(str(exc).split())[:300]}") from exc
    name = sess.get_inputs()[0].name
    g = torch.Generator().manual_seed(seed)
    worst_R, worst_e = 0.0, 0.0
    module = module.eval()
    for b in batch_sizes:
        x = torch.rand(b, 3, input_size, input_size, generator=g)
        with torch.inference_mode():
            R_t, e_t = module(x)
        try:
            R_o, e_o = sess.run(["rotation", "euler"], {name: x.numpy()})
        except Exception as exc:  # e.g. a batch size baked into the graph by tracing
            raise ExportCheckError(f"{path}: onnxruntime fails on a batch of {b}: "
                                   f"{' '.join(str(exc).split())[:300]}") from exc
        if R_o.shape != tuple(R_t.shape) or e_o.shape != tuple(e_t.shape):
            raise ExportCheckError(f"{path}: onnxruntime output shapes {R_o.shape}, {e_o.shape} "
                                   f"differ from torch's {tuple(R_t.shape)}, {tuple(e_t.shape)}")
        worst_R = max(worst_R, float(np.abs(R_o - R_t.numpy()).max()))
        ok = e_t[:, 1].abs() < 89.0  # pitch and roll are ill-conditioned near gimbal lock
        d = wrap_degrees(torch.from_numpy(e_o) - e_t).abs()[ok]
        worst_e = max(worst_e, float(d.max()) if d.numel() else 0.0)
    result = {"rotation_max_abs": worst_R, "euler_max_abs_deg": worst_e,
              "batch_sizes": list(batch_sizes), "atol": atol, "euler_atol_deg": euler_atol_deg,
              "inputs": f"uniform random images in [0, 1], seed {seed}"}
    if not worst_R <= atol or not worst_e <= euler_atol_deg:
        raise ExportCheckError(
            f"{path}: onnxruntime differs from torch: rotation max |diff| {worst_R:.3g} "
            f"(tolerance {atol:g}), euler max |diff| {worst_e:.3g} deg (tolerance "
            f"{euler_atol_deg:g})"
        )
    return result


def _set_metadata(path: Path, meta: dict[str, str]) -> None:
    import onnx

    m = onnx.load(str(path))
    del m.metadata_props[:]
    for k, v in meta.items():
        entry = m.metadata_props.add()
        entry.key, entry.value = k, v
    m.producer_name = "clerf"
    onnx.save(m, str(path))


def export_onnx(
    model: PoseModel,
    out: str | Path,
    exporter: str = "auto",
    atol: float = 1e-4,
    euler_atol_deg: float = 1e-2,
) -> dict[str, Any]:
    """Export ``model`` to ONNX at ``out`` (module docstring), check it, return a summary.

    The file is written under a temporary name, checked, then renamed to ``out``: a failed
    export or check never leaves (or replaces) a file at ``out``.

    Raises:
        ExportCheckError: the check failed.
        ClerfError: both exporters failed (the message names their errors).
    """
    from clerf.versions import CONVENTIONS_VERSION, __version__

    if exporter not in EXPORTERS:
        raise ClerfError(f"--exporter must be one of {', '.join(EXPORTERS)}, got '{exporter}'")
    out = Path(out)
    if out.suffix.lower() != ".onnx":
        raise ClerfError(f"--out: expected a .onnx file name, got '{out}'")
    if out.is_dir():
        raise ClerfError(f"--out: {out} is a directory")
    out.parent.mkdir(parents=True, exist_ok=True)
    module = PoseExportModule(model.to("cpu")).eval()
    s = model.input_size
    example = torch.rand(2, 3, s, s, generator=torch.Generator().manual_seed(1))
    errors: list[str] = []
    used = None
    with replacing(out, suffix=".onnx") as tmp:  # the .onnx file appears only when checked
        for name in (("dynamo", "legacy") if exporter == "auto" else (exporter,)):
            try:
                (_export_dynamo if name == "dynamo" else _export_legacy)(module, example, tmp)
                used = name
                break
            except Exception as exc:  # exporters raise many types; keep the first line
                errors.append(f"{name}: {type(exc).__name__}: "
                              f"{' '.join(str(exc).split())[:200]}")
        if used is None:
            raise ClerfError("ONNX export failed (" + "; ".join(errors) + ")")
        check = check_onnx(tmp, module, s, atol=atol, euler_atol_deg=euler_atol_deg)
        if module.reparameterized:  # the fused graph computes what the trained one does
            with torch.no_grad():
                before = module._original[0].eval()(example)
                diff = float((module.net(example) - before).abs().max())
            check = {**check, "reparameterized": True, "reparam_max_abs_diff": diff}
            if not diff <= atol:
                raise ExportCheckError(f"re-parameterising the backbone changed the rotations by "
                                       f"up to {diff:.3g} (> {atol})")  # fmt: skip
        meta = {
            "clerf.input_size": str(s),
            "clerf.input_layout": "NCHW float32, RGB",
            "clerf.input_range": "[0, 1]",
            "clerf.normalisation": "inside the graph: (x - mean) / std per channel",
            "clerf.mean": json.dumps(model.mean),
            "clerf.std": json.dumps(model.std),
            "clerf.crop_preset": model.crop_preset,
            "clerf.resize_mode": model.resize_mode,
            "clerf.outputs": "rotation (B, 3, 3): rows = head axes (right, up, nose) in camera "
                             "coordinates (x right, y up, z toward the viewer); euler (B, 3): "
                             "pitch, yaw, roll in degrees",
            "clerf.euler_order": "R = Rz(roll) @ Ry(yaw) @ Rx(pitch); yaw in [-90, 90]",
            "clerf.version": __version__,
            "clerf.conventions_version": CONVENTIONS_VERSION,
            "clerf.exporter": used,
            "clerf.check": json.dumps(check),
        }
        _set_metadata(tmp, meta)
    return {"path": str(out), "exporter": used, "opset": OPSET, "check": check,
            "fallback_errors": errors, "metadata": meta}
