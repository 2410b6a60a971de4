"""Triplet sampling and the HDF5 stores (``clerf generate``, ``clerf inspect``).

Modules (import what you need; this package import stays light, no h5py):

* :mod:`triplets.poses`: seeded pose samplers (uniform SO(3), Euler box, look-at x in-plane).
* :mod:`triplets.rules`: triplet rules (positive = anchor's rotation, another identity; negative
  >= ``delta`` deg away) and the deterministic block-seeded :class:`~triplets.rules.TripletSampler`.
* :mod:`triplets.store`: the store schema (``triplets/SCHEMA.md``), resumable
  :class:`~triplets.store.StoreWriter`, :func:`~triplets.store.open_store`, the torch datasets
  ``TripletDataset`` / ``LabelledDataset`` and :func:`~triplets.store.make_loader`.
* :mod:`triplets.generate`: the generate stage, :func:`~triplets.generate.run_generate`.
* :mod:`triplets.inspect`: validation report and figures for ``clerf inspect``.
"""
