"""Pointing'04 (the Prima head pose image database): 15 people x 2 series x 93 poses.

Layout (as distributed): ``PersonNN/`` folders, each holding ``personNNSII<tilt><pan>.jpg`` with
``NN`` the person (01-15), ``S`` the series (1 or 2), ``II`` the pose index (00-92) and the two
angles signed in degrees, e.g. ``person01100-90+0.jpg`` (tilt -90, pan 0) or
``person01146+0+0.jpg`` (frontal). Beside each image a ``.txt`` holds the face box: a header
(the image's name, an empty line, ``Face``), then the box centre x, centre y, width and height in
pixels on lines 4-7.

Labels. The people looked at markers placed at pan (horizontal) and tilt (vertical) angles
around them: tilt in {0, +-15, +-30, +-60, +-90}, pan in 15 deg steps over [-90, 90], no roll.
The angles are read as the **azimuth and elevation of the gaze target**, so the facing axis (row 2
of the label matrix, camera coordinates x right / y up / z toward the viewer) is
``(-cos(tilt) sin(pan), sin(tilt), cos(tilt) cos(pan))`` and the head's left-right axis stays
horizontal (no roll of the head against gravity): ``R = Rx(tilt) @ Ry(pan)``
(:func:`pointing04_rotation`). Signs follow the images: positive pan turns the face toward the
image's left and positive tilt turns it up, the same sense as clerf's positive yaw and pitch
(docs/conventions.md section 2). Beyond the frontal row this is *not* ``pitch = tilt, yaw = pan``:
at tilt 60 / pan 90 the face points left and up, whose Euler triple is (90, 30, 90). The stored
``euler`` is the triple of that matrix. The markers' directions are coarse (15 deg steps, where
the person actually pointed their head is not measured): the labels are noisy.

Identity = the person (1-15): the study's fixed split is people 1-10 train, 11-12 validation,
13-15 test (``subsets``: ``train``, ``val``, ``test`` or folder names ``Person01`` ...).
All 93 poses are kept by default (no +-99 deg filter: every label is within it anyway).
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import torch

from clerf.data.base import RealDataset, RealSample, register_dataset
from clerf.errors import DataError
from clerf.geometry import euler_from_rotation, rot_x, rot_y

__all__ = [
    "Pointing04",
    "POINTING04_SPLITS",
    "POINTING04_POSES",
    "parse_pointing04_name",
    "pointing04_rotation",
    "read_pointing04_box",
]

#: the study's fixed subject split (people by number)
POINTING04_SPLITS: dict[str, tuple[int, ...]] = {
    "train": tuple(range(1, 11)),
    "val": (11, 12),
    "test": (13, 14, 15),
}
#: poses per person and series: 7 tilts x 13 pans + the two poles (tilt +-90, pan 0)
POINTING04_POSES = 93

log = logging.getLogger("clerf.data")

_NAME = re.compile(r"^person(\d{2})([12])(\d{2})([+-]\d{1,2})([+-]\d{1,2})$")
_TILTS = (-90, -60, -30, -15, 0, 15, 30, 60, 90)


def parse_pointing04_name(stem: str) -> tuple[int, int, int, float, float]:
    """``(person, series, index, tilt, pan)`` of a file stem such as ``person01100-90+0``.

    Raises:
        DataError: a name that is not a Pointing'04 image name, or angles off its grid.
    """
    m = _NAME.match(stem)
    if m is None:
        raise DataError(
            f"{stem}: not a Pointing'04 file name (expected personNNSII<tilt><pan>, e.g. "
            "person01100-90+0)"
        )
    person, series, index = int(m[1]), int(m[2]), int(m[3])
    tilt, pan = int(m[4]), int(m[5])
    if tilt not in _TILTS or pan % 15 or abs(pan) > 90 or (abs(tilt) == 90 and pan != 0):
        raise DataError(
            f"{stem}: tilt {tilt} / pan {pan} is not a Pointing'04 pose (tilt in "
            f"{_TILTS}, pan in 15 deg steps within +-90, pan 0 at tilt +-90)"
        )
    return person, series, index, float(tilt), float(pan)


def pointing04_rotation(tilt: torch.Tensor | float, pan: torch.Tensor | float) -> torch.Tensor:
    """Label matrix of a gaze target at elevation ``tilt`` and azimuth ``pan`` (degrees).

    ``Rx(tilt) @ Ry(pan)``: row 2 (the facing axis) is the target's direction
    ``(-cos t sin p, sin t, cos t cos p)``, row 0 (the head's left-right axis)
    ``(cos p, 0, sin p)`` stays horizontal. float64 for float inputs.
    """
    t = torch.as_tensor(tilt, dtype=torch.float64)
    p = torch.as_tensor(pan, dtype=torch.float64)
    return rot_x(t) @ rot_y(p)


def read_pointing04_box(path: Path) -> tuple[float, float, float, float]:
    """The face box of a Pointing'04 ``.txt`` as ``(x_min, y_min, x_max, y_max)`` pixels.

    Lines 4-7 (after the image name, an empty line and ``Face``) are centre x, centre y, width,
    height.

    Raises:
        DataError: unreadable file, missing lines, non-numbers or a non-positive size.
    """
    try:
        lines = path.read_text(encoding="ascii", errors="strict").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: unreadable face box file ({exc.__class__.__name__})") from None
    if len(lines) < 7:
        raise DataError(
            f"{path}: expected the face box (centre x, centre y, width, height) on lines 4-7, "
            f"the file has {len(lines)} line(s)"
        )
    try:
        cx, cy, w, h = (float(v.strip()) for v in lines[3:7])
    except ValueError:
        raise DataError(
            f"{path}: lines 4-7 must be numbers (centre x, centre y, width, height), got "
            f"{[v.strip() for v in lines[3:7]]}"
        ) from None
    if not (w > 0 and h > 0) or not all(map(torch.isfinite, torch.tensor([cx, cy, w, h]))):
        raise DataError(f"{path}: face box width and height must be positive, got {w} x {h}")
    return (cx - w / 2.0, cy - h / 2.0, cx + w / 2.0, cy + h / 2.0)


@register_dataset("pointing04", "prima", "pointing_04")
class Pointing04(RealDataset):
    """Pointing'04 loader. ``root``: the folder holding ``Person01`` ... ``Person15``.

    Args:
        subsets: which people: empty = all, or any of ``train`` (1-10), ``val`` (11-12),
            ``test`` (13-15) and folder names ``Person01`` ... (see :data:`POINTING04_SPLITS`).
        max_abs_angle: off (None) by default: all 93 poses are kept.
    """

    default_split = "test"
    default_crop = {"train": "pointing04_box", "test": "pointing04_box"}

    def __init__(
        self,
        root: str | Path,
        max_abs_angle: float | None = None,
        skip_bad: bool = False,
        verify_images: str = "header",
        subsets: list[str] | None = None,
    ) -> None:
        super().__init__(root, max_abs_angle, skip_bad, verify_images)
        self.people = self._people(list(subsets or []))
        #: people named by folder: their absence is an error (a split's, a warning)
        self.named = tuple(sorted(
            int(x[-2:]) for x in (subsets or []) if x not in POINTING04_SPLITS
        ))

    @staticmethod
    def _people(subsets: list[str]) -> tuple[int, ...]:
        if not subsets:
            return tuple(range(1, 16))
        people: set[int] = set()
        for s in subsets:
            if s in POINTING04_SPLITS:
                people.update(POINTING04_SPLITS[s])
                continue
            m = re.fullmatch(r"[Pp]erson(\d{2})", s)
            if m is None or not 1 <= int(m[1]) <= 15:
                raise DataError(
                    f"Pointing'04: unknown subset '{s}' (known: train, val, test, "
                    "Person01 ... Person15)"
                )
            people.add(int(m[1]))
        return tuple(sorted(people))

    def params(self) -> dict[str, object]:
        return {"people": list(self.people), "label_rule": "Rx(tilt) @ Ry(pan)"}

    def _scan(self) -> None:
        if not self.root.is_dir():
            raise DataError(f"{self.root}: Pointing'04 directory not found")
        folders = {int(p.name[-2:]): p for p in self.root.glob("Person[0-9][0-9]") if p.is_dir()}
        missing = [n for n in self.people if n not in folders]
        if len(missing) == len(self.people):
            raise DataError(
                f"{self.root}: no Pointing'04 person folder (expected Person01 ... Person15 "
                "holding person01100-90+0.jpg + .txt ...)"
            )
        named_missing = [n for n in missing if n in self.named]
        if named_missing:
            raise DataError(
                f"{self.root}: Pointing'04 folder(s) "
                f"{', '.join(f'Person{n:02d}' for n in named_missing)} not found"
            )
        if missing:
            log.warning("%s: %d of the %d Pointing'04 people asked for found (%s missing): "
                        "results will not be comparable", self.root,
                        len(self.people) - len(missing), len(self.people),
                        ", ".join(f"Person{n:02d}" for n in missing))
        for n in self.people:
            if n in folders:
                self._scan_person(folders[n], n)

    def _scan_person(self, folder: Path, number: int) -> None:
        subset = folder.name
        images = {p.stem: p for p in folder.glob("person*.jpg") if p.is_file()}
        boxes = {p.stem: p for p in folder.glob("person*.txt") if p.is_file()}
        for stem in sorted(set(images) | set(boxes)):
            where = images.get(stem) or boxes[stem]
            try:
                person, _, _, tilt, pan = parse_pointing04_name(stem)
                if person != number:
                    raise DataError(f"{where}: person {person:02d} inside folder {subset}")
                if stem not in boxes:
                    raise DataError(f"{where}: face box file {stem}.txt is missing")
                if stem not in images:
                    raise DataError(f"{where}: image {stem}.jpg is missing")
                box = read_pointing04_box(boxes[stem])
            except DataError as exc:
                msg = str(exc)
                err = exc if msg.startswith(str(folder)) else DataError(f"{where}: {msg}")
                self._bad(subset, err, where)
                continue
            e = euler_from_rotation(pointing04_rotation(tilt, pan))
            euler = (float(e.pitch), float(e.yaw), float(e.roll))
            self._consider(RealSample(
                f"{subset}/{stem}", subset, euler, image_path=images[stem], box=box,
                identity=person,
            ))
