"""300W-LP (Zhu et al., 3DDFA): the protocol-1 training set.

Layout (as distributed)::

    300W_LP/
      AFW/  AFW_Flip/  HELEN/  HELEN_Flip/  IBUG/  IBUG_Flip/  LFPW/  LFPW_Flip/
        <name>.jpg + <name>.mat    (Pose_Para 1x7 radians, pt2d 2x68)
      landmarks/                   (ignored)

The ``_Flip`` folders hold the mirrored images **with mirrored labels** already: they are read
as they are and never flipped a second time. 61,225 images per side, 122,450 in all.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from clerf.data.base import PROTOCOL_MAX_ABS_ANGLE, RealDataset, register_dataset
from clerf.errors import DataError

__all__ = ["W300LP", "W300LP_SUBSETS"]

#: All subset folders, in the order they are read.
W300LP_SUBSETS: tuple[str, ...] = (
    "AFW", "AFW_Flip", "HELEN", "HELEN_Flip", "IBUG", "IBUG_Flip", "LFPW", "LFPW_Flip",
)  # fmt: skip


@register_dataset("300wlp", "300w_lp", "w300lp")
class W300LP(RealDataset):
    """300W-LP loader.

    Args:
        root: the ``300W_LP`` directory.
        subsets: folders to read (default: all eight); each must exist.
        (others): see :class:`~clerf.data.base.RealDataset`.
    """

    default_split = "train"

    def __init__(
        self,
        root: str | Path,
        max_abs_angle: float | None = PROTOCOL_MAX_ABS_ANGLE,
        skip_bad: bool = False,
        verify_images: str = "header",
        subsets: Sequence[str] | None = None,
    ) -> None:
        super().__init__(root, max_abs_angle, skip_bad, verify_images)
        self.subsets = tuple(subsets) if subsets else W300LP_SUBSETS
        unknown = [s for s in self.subsets if s not in W300LP_SUBSETS]
        if unknown:
            raise DataError(
                f"300W-LP: unknown subset(s) {unknown} (known: {', '.join(W300LP_SUBSETS)})"
            )

    def params(self) -> dict[str, Any]:
        return {"subsets": list(self.subsets)}

    def _scan(self) -> None:
        if not self.root.is_dir():
            raise DataError(f"{self.root}: 300W-LP directory not found")
        missing = [s for s in self.subsets if not (self.root / s).is_dir()]
        if missing:
            present = sorted(p.name for p in self.root.iterdir() if p.is_dir())
            raise DataError(
                f"{self.root}: not a 300W-LP tree: missing subset folder(s) {', '.join(missing)} "
                f"(found folders: {', '.join(present) or 'none'}; expected "
                f"{', '.join(W300LP_SUBSETS)}; choose fewer with subsets=[...])"
            )
        for subset in self.subsets:
            self._scan_pairs(self.root / subset, subset, f"{subset}/", "*")
        if self.report.scanned + self.report.skipped_bad == 0:
            raise DataError(
                f"{self.root}: no .jpg/.mat pairs in the 300W-LP subset folders "
                f"{', '.join(self.subsets)}"
            )
