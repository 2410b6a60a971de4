"""The clerf HDF5 store: schema, resumable writer, validating reader, torch datasets and loaders.

Modules: :mod:`~triplets.store.schema` (names, attributes, digests, file state),
:mod:`~triplets.store.writer` (:class:`StoreWriter`), :mod:`~triplets.store.entry` (entry files
over shards or sources), :mod:`~triplets.store.reader` (:func:`open_store`, label checks,
verification) and :mod:`~triplets.store.loader` (datasets, sampler, :func:`make_loader`).

One schema family serves two kinds of store (full description in ``triplets/SCHEMA.md``):

* ``kind="triplets"``: rendered anchor/positive/negative images; triplet ``t`` is the images
  ``3t, 3t+1, 3t+2`` (anchor, positive, negative) and the ``triplets`` table says so explicitly.
* ``kind="labelled"``: single labelled images (real datasets prepared by ``clerf prepare``).

Every image has a uint8 ``(3, H, W)`` RGB array, a float32 rotation ``(3, 3)`` (rows = head axes
in camera coordinates, ``docs/conventions.md``), Euler degrees ``(pitch, yaw, roll)`` derived
from it with :func:`clerf.geometry.euler_from_rotation`, and an int64 identity.

Writing (:class:`StoreWriter`) is resumable: the image axis is cut into commit chunks of ``chunk``
images (also the HDF5 chunk), each chunk's data is written and flushed before its entry in the
progress record is set and flushed, and the completion marker is only set by
:meth:`StoreWriter.finalize`. A process killed at any moment leaves a file whose committed chunks
are whole; reopening with ``resume=True`` rewrites only the missing chunks.

Reading (:func:`open_store`, :class:`TripletDataset`, :class:`LabelledDataset`,
:func:`make_loader`) validates the file once, then opens h5py lazily in each process (DataLoader
workers never share a handle) and reads contiguous slices only: h5py fancy indexing is a hundred
times slower (measured with h5py on this project's 2-core machines).
"""

from __future__ import annotations

from triplets.store.entry import EntrySource, write_entry_file, write_virtual_entry
from triplets.store.loader import (
    BatchDataset,
    BlockBatchSampler,
    DataSource,
    LabelledDataset,
    TripletDataset,
    make_loader,
)
from triplets.store.reader import Store, check_labels, content_hash, open_store, verify_store
from triplets.store.schema import (
    COMPRESSIONS,
    EULER_ORDER,
    KINDS,
    SCHEMA_NAME,
    SCHEMA_VERSION,
    ExtraSpec,
    canonical_json,
    fingerprint_difference,
    store_state,
)
from triplets.store.writer import StoreWriter

__all__ = [
    "DataSource",
    "EntrySource",
    "write_virtual_entry",
    "SCHEMA_NAME",
    "SCHEMA_VERSION",
    "KINDS",
    "COMPRESSIONS",
    "EULER_ORDER",
    "ExtraSpec",
    "StoreWriter",
    "Store",
    "open_store",
    "check_labels",
    "verify_store",
    "store_state",
    "content_hash",
    "canonical_json",
    "fingerprint_difference",
    "write_entry_file",
    "TripletDataset",
    "LabelledDataset",
    "BlockBatchSampler",
    "BatchDataset",
    "make_loader",
]
