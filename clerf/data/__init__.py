"""Real head pose datasets (300W-LP, AFLW2000, BIWI), the protocol crop, prepared stores.

* :mod:`clerf.data.crop`: the one protocol crop function and its named presets.
* :mod:`clerf.data.mat`: reading ``.mat`` labels and images.
* :mod:`clerf.data.base`: samples, the +-99 deg protocol filter, scan reports, the registry.
* :mod:`clerf.data.w300lp`, :mod:`clerf.data.aflw2000`, :mod:`clerf.data.biwi`: the loaders.
* :mod:`clerf.data.prepare`: ``clerf prepare``, a dataset -> a labelled HDF5 store.
* CLERF's real-anchor triplets over a prepared store: :mod:`triplets.real_anchor`.

Importing this package is light (no h5py, no generators).
"""

from clerf.data.base import (
    PROTOCOL_MAX_ABS_ANGLE,
    RealDataset,
    RealSample,
    ScanReport,
    available_datasets,
    dataset_class,
    open_dataset,
    rotations_of,
    within_protocol,
)
from clerf.data.crop import (
    CROP_PRESETS,
    CropPreset,
    crop_box,
    crop_image,
    get_preset,
    landmark_box,
    protocol_crop,
    resize_square,
    sample_k,
)

__all__ = [
    "PROTOCOL_MAX_ABS_ANGLE",
    "RealDataset",
    "RealSample",
    "ScanReport",
    "available_datasets",
    "dataset_class",
    "open_dataset",
    "rotations_of",
    "within_protocol",
    "CROP_PRESETS",
    "CropPreset",
    "crop_box",
    "crop_image",
    "get_preset",
    "landmark_box",
    "protocol_crop",
    "resize_square",
    "sample_k",
]
