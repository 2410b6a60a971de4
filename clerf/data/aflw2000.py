"""AFLW2000-3D: the protocol-1 test set.

Layout: one directory of 2,000 pairs ``image00002.jpg`` + ``image00002.mat`` (same ``.mat``
fields as 300W-LP; some ``pt2d`` entries are -1 = missing). The protocol keeps the samples whose
three angles are all within +-99 deg: 1,969 of the 2,000.
"""

from __future__ import annotations

import logging

from clerf.data.base import RealDataset, register_dataset
from clerf.errors import DataError

__all__ = ["AFLW2000", "AFLW2000_SIZE", "AFLW2000_PROTOCOL_SIZE"]

log = logging.getLogger("clerf.data")

AFLW2000_SIZE = 2000
#: samples left by the +-99 deg filter on the full set (the peers' published count;
#: docs/conventions.md section 6)
AFLW2000_PROTOCOL_SIZE = 1969


@register_dataset("aflw2000", "aflw2000-3d", "aflw2000_3d")
class AFLW2000(RealDataset):
    """AFLW2000-3D loader (``image*.jpg``/``.mat`` pairs directly under ``root``)."""

    default_split = "test"

    def _scan(self) -> None:
        if not self.root.is_dir():
            raise DataError(f"{self.root}: AFLW2000 directory not found")
        self._scan_pairs(self.root, "AFLW2000", "", "image*")
        total = self.report.scanned + self.report.skipped_bad
        if total == 0:
            raise DataError(
                f"{self.root}: no AFLW2000 pairs (expected image00002.jpg + image00002.mat ...)"
            )
        if total != AFLW2000_SIZE:
            log.warning(
                "%s: %d AFLW2000 samples found, the full set has %d: results will not be "
                "comparable with published numbers", self.root, total, AFLW2000_SIZE,
            )
