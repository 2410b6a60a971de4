"""The HDF5 store (triplets.store): writer, resume, validation errors, readers, sampler."""

from __future__ import annotations

import json
import os

import h5py
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from clerf.errors import DataError
from clerf.geometry import euler_from_rotation, random_rotation
from triplets import store as store_mod
from triplets.store import (
    BlockBatchSampler,
    ExtraSpec,
    LabelledDataset,
    StoreWriter,
    TripletDataset,
    content_hash,
    make_loader,
    open_store,
    store_state,
    verify_store,
)

RES = 8


def _data(n, seed=0):
    rng = np.random.default_rng(seed)
    imgs = rng.integers(0, 256, (n, 3, RES, RES), dtype=np.uint8)
    rots = random_rotation(n, torch.Generator().manual_seed(seed), dtype=torch.float64).numpy()
    ids = rng.integers(0, 1000, n)
    return imgs, rots, ids


def _write(path, kind="triplets", n=30, chunk=6, compression="none", upto=None, **kw):
    imgs, rots, ids = _data(n)
    w = StoreWriter(path, kind, RES, n, chunk=chunk, compression=compression,
                    fingerprint={"k": 1}, **kw)
    for a, b in w.pending()[:upto]:
        w.write_chunk(a, imgs[a:b], rots[a:b], ids[a:b])
    if upto is None:
        w.finalize()
    else:
        w.close()
    return imgs, rots, ids


@pytest.mark.parametrize("compression", ["none", "lzf", "gzip"])
def test_roundtrip_schema_and_attrs(tmp_path, compression):
    p = tmp_path / "s.h5"
    imgs, rots, ids = _write(p, compression=compression, attrs={"generator": {"name": "x"}})
    s = open_store(p, verify=True)
    assert (s.kind, s.num_images, s.num_triplets, s.resolution) == ("triplets", 30, 10, RES)
    f = s.file
    assert np.array_equal(f["images"][:], imgs) and np.array_equal(f["identities"][:], ids)
    assert np.allclose(f["rotations"][:], rots, atol=1e-6)
    e = euler_from_rotation(torch.from_numpy(rots))
    assert np.allclose(f["euler"][:], torch.stack([e.pitch, e.yaw, e.roll], -1).numpy(), atol=1e-3)
    assert f["euler"].attrs["order"] == "pitch,yaw,roll" and f["euler"].attrs["units"] == "deg"
    assert np.array_equal(f["triplets"][:], np.arange(30).reshape(10, 3))
    assert f["images"].chunks == (6, 3, RES, RES)
    assert s.attrs["schema"] == "clerf-store" and s.attrs["schema_version"] == 1
    assert s.attrs["complete"] is True and s.attrs["triplet_layout"] == "interleaved"
    assert json.loads(s.attrs["generator"]) == {"name": "x"}
    assert s.attrs["compression"].startswith(compression)
    s.close()


def test_labelled_store_with_string_extra(tmp_path):
    p = tmp_path / "l.h5"
    imgs, rots, ids = _data(10)
    names = np.array([f"img{i:03d}.jpg" for i in range(10)], dtype=object)
    with StoreWriter(p, "labelled", RES, 10, chunk=4,
                     extra={"source": ExtraSpec((), h5py.string_dtype())}) as w:
        for a, b in w.pending():
            w.write_chunk(a, imgs[a:b], rots[a:b], ids[a:b], extra={"source": names[a:b]})
        with pytest.raises(DataError, match="missing extra dataset 'source'"):
            w.write_chunk(0, imgs[:4], rots[:4], ids[:4])
        w.finalize()
    s = open_store(p, verify=True)
    assert s.kind == "labelled" and s.num_triplets == 0
    assert s.file["source"][3].decode() == "img003.jpg"
    item = LabelledDataset(s)[7]
    assert item["image"].shape == (3, RES, RES) and int(item["identity"]) == ids[7]
    with pytest.raises(DataError, match="needs a triplet store"):
        TripletDataset(s)


def test_extras_declared_in_any_order_verify(tmp_path):
    """Digests must not depend on the order in which extra datasets were declared."""
    p = tmp_path / "order.h5"
    imgs, rots, ids = _data(8)
    extra = {"zeta": ExtraSpec((), np.int64), "alpha": ExtraSpec((2,), np.float32)}
    with StoreWriter(p, "labelled", RES, 8, chunk=4, extra=extra) as w:
        for a, b in w.pending():
            w.write_chunk(a, imgs[a:b], rots[a:b], ids[a:b], extra={
                "zeta": np.arange(a, b), "alpha": np.ones((b - a, 2), np.float32) * a})
        w.finalize()
    assert verify_store(open_store(p)) == 2


def test_existing_files_policy_and_fingerprint(tmp_path):
    p = tmp_path / "s.h5"
    _write(p, upto=2)
    assert store_state(p) == "partial"
    with pytest.raises(DataError, match="use --resume"):
        _write(p)
    with pytest.raises(DataError, match=r"different configuration \(k: 1 then, 2 now\)"):
        StoreWriter(p, "triplets", RES, 30, chunk=6, fingerprint={"k": 2}, resume=True)
    with pytest.raises(DataError, match="chunk_images"):
        StoreWriter(p, "triplets", RES, 30, chunk=3, fingerprint={"k": 1}, resume=True)
    with pytest.raises(DataError, match=r"incomplete: 2 of 5 chunks committed"):
        open_store(p)
    w = StoreWriter(p, "triplets", RES, 30, chunk=6, fingerprint={"k": 1}, resume=True)
    assert w.pending() == [(12, 18), (18, 24), (24, 30)] and w.committed == 12
    with pytest.raises(DataError, match="cannot finalize, 3 of 5"):
        w.finalize()
    w.close()
    _write(p, resume=True)
    assert store_state(p) == "complete"
    with pytest.raises(DataError, match="already exists and is complete; use --overwrite"):
        _write(p, resume=True)
    _write(p, overwrite=True)


def test_overwrite_replaces_only_when_complete(tmp_path):
    p = tmp_path / "s.h5"
    _write(p)
    before = content_hash(p)
    w = StoreWriter(p, "triplets", RES, 30, chunk=6, fingerprint={"k": 2}, overwrite=True)
    imgs, rots, ids = _data(30, seed=5)
    a, b = w.pending()[0]
    w.write_chunk(a, imgs[a:b], rots[a:b], ids[a:b])
    w.close()  # a failure or kill before finalize: the old store is intact
    assert store_state(p) == "complete" and content_hash(p) == before
    w = StoreWriter(p, "triplets", RES, 30, chunk=6, fingerprint={"k": 2}, overwrite=True)
    for a, b in w.pending():
        w.write_chunk(a, imgs[a:b], rots[a:b], ids[a:b])
    assert w.finalize() == p and content_hash(p) != before
    assert sorted(q.name for q in tmp_path.iterdir()) == ["s.h5"]


def test_resumed_equals_uninterrupted(tmp_path):
    _write(tmp_path / "a.h5")
    _write(tmp_path / "b.h5", upto=3)
    _write(tmp_path / "b.h5", resume=True)
    assert content_hash(tmp_path / "a.h5") == content_hash(tmp_path / "b.h5")


def test_write_error_keeps_file_resumable(tmp_path, monkeypatch):
    p = tmp_path / "s.h5"
    imgs, rots, ids = _data(30)
    real = StoreWriter._write_arrays
    calls = {"n": 0}

    def failing(self, *args):
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError(28, "No space left on device")
        return real(self, *args)

    monkeypatch.setattr(StoreWriter, "_write_arrays", failing)
    w = StoreWriter(p, "triplets", RES, 30, chunk=6, fingerprint={"k": 1})
    with pytest.raises(DataError, match="No space left on device.*--resume"):
        for a, b in w.pending():
            w.write_chunk(a, imgs[a:b], rots[a:b], ids[a:b])
    monkeypatch.undo()
    assert store_state(p) == "partial"
    _write(p, resume=True)
    _write(tmp_path / "ref.h5")
    assert content_hash(p) == content_hash(tmp_path / "ref.h5")


def test_write_chunk_validates_inputs(tmp_path):
    imgs, rots, ids = _data(6)
    with StoreWriter(tmp_path / "s.h5", "labelled", RES, 6, chunk=3) as w:
        with pytest.raises(DataError, match="images must be uint8"):
            w.write_chunk(0, imgs[:3].astype(np.float32), rots[:3], ids[:3])
        bad = rots[:3].copy()
        bad[1] *= 2
        with pytest.raises(DataError, match=r"element \(1,\) is not a rotation"):
            w.write_chunk(0, imgs[:3], bad, ids[:3])
        with pytest.raises(ValueError, match="multiple of chunk"):
            w.write_chunk(1, imgs[:3], rots[:3], ids[:3])
    with pytest.raises(ValueError, match="multiples of 3"):
        StoreWriter(tmp_path / "t.h5", "triplets", RES, 30, chunk=4)
    with pytest.raises(ValueError, match="reserved"):
        StoreWriter(tmp_path / "t.h5", "labelled", RES, 30, attrs={"complete": True})


def test_open_store_errors(tmp_path):
    with pytest.raises(DataError, match="store not found"):
        open_store(tmp_path / "nope.h5")
    txt = tmp_path / "t.h5"
    txt.write_text("hello")
    with pytest.raises(DataError, match="not an HDF5 file"):
        open_store(txt)
    foreign = tmp_path / "f.h5"
    with h5py.File(foreign, "w") as f:
        f["data"] = np.zeros(3)
    with pytest.raises(DataError, match=r"not a clerf store.*\['data'\]"):
        open_store(foreign)
    p = tmp_path / "s.h5"
    _write(p)
    with h5py.File(p, "r+") as f:
        del f["euler"]
    with pytest.raises(DataError, match="dataset 'euler' is missing"):
        open_store(p)
    with h5py.File(p, "r+") as f:
        f.attrs["schema_version"] = 99
    with pytest.raises(DataError, match="unsupported schema_version 99"):
        open_store(p)


def test_truncated_file_is_refused(tmp_path):
    p = tmp_path / "s.h5"
    _write(p, n=300, chunk=30)
    size = p.stat().st_size
    with open(p, "r+b") as fh:
        fh.truncate(size // 2)
    with pytest.raises(DataError, match="truncated or corrupt"):
        open_store(p)
    assert "unreadable" in store_state(p)


def test_verify_detects_corrupted_bytes(tmp_path):
    p = tmp_path / "s.h5"
    _write(p)
    with h5py.File(p, "r") as f:
        offset = f["images"].id.get_chunk_info(2).byte_offset
    with open(p, "r+b") as fh:
        fh.seek(offset + 5)
        b = fh.read(1)
        fh.seek(offset + 5)
        fh.write(bytes([b[0] ^ 0xFF]))
    open_store(p)  # structure still fine
    with pytest.raises(DataError, match="chunk 2 .* does not match its recorded digest"):
        open_store(p, verify=True)


def test_read_rows_matches_numpy_fancy_indexing(tmp_path):
    p = tmp_path / "s.h5"
    imgs, _, _ = _write(p, n=60, chunk=9)
    s = open_store(p)
    rng = np.random.default_rng(0)
    for _ in range(20):
        rows = rng.integers(0, 60, rng.integers(1, 40))
        assert np.array_equal(s.read_rows("images", rows), imgs[rows])
    with pytest.raises(IndexError):
        s.read_rows("images", np.array([60]))


def test_triplet_dataset_batches(tmp_path):
    p = tmp_path / "s.h5"
    imgs, rots, ids = _write(p, n=60, chunk=12)
    ds = TripletDataset(p)
    assert len(ds) == 20 and ds.block_size == 4
    b = ds.read_batch([7, 0, 19, 7])
    assert b["images"].shape == (4, 3, 3, RES, RES) and b["images"].dtype == torch.uint8
    assert b["rotations"].shape == (4, 3, 3, 3) and b["rotations"].dtype == torch.float32
    assert b["identities"].shape == (4, 3) and b["index"].tolist() == [7, 0, 19, 7]
    assert np.array_equal(b["images"].numpy(), imgs.reshape(20, 3, 3, RES, RES)[[7, 0, 19, 7]])
    assert np.array_equal(b["identities"].numpy(), ids.reshape(20, 3)[[7, 0, 19, 7]])
    one = ds[5]
    assert one["images"].shape == (3, 3, RES, RES) and int(one["index"]) == 5
    # plain DataLoader (auto-collation through __getitems__) gives the same data
    plain = next(iter(torch.utils.data.DataLoader(ds, batch_size=4, shuffle=False)))
    assert torch.equal(plain["images"], ds.read_batch([0, 1, 2, 3])["images"])


def test_make_loader_with_workers_sees_each_triplet_once(tmp_path):
    p = tmp_path / "s.h5"
    imgs, _, _ = _write(p, n=90, chunk=9, compression="lzf")
    ds = TripletDataset(p)
    assert ds.store.file  # a handle opened in the parent must not be used by the workers
    loader = make_loader(ds, batch_size=4, seed=3, num_workers=2)
    seen = []
    for batch in loader:
        idx = batch["index"].numpy()
        seen.extend(idx.tolist())
        assert np.array_equal(batch["images"].numpy(), imgs.reshape(30, 3, 3, RES, RES)[idx])
    assert sorted(seen) == list(range(30))
    loader.sampler.set_epoch(1)
    again = [i for b in loader for i in b["index"].tolist()]
    assert sorted(again) == list(range(30)) and again != seen


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 300), batch=st.integers(1, 40), block=st.integers(1, 20),
       world=st.integers(1, 4), drop=st.booleans(), buf=st.integers(1, 4), seed=st.integers(0, 9))
def test_block_sampler_properties(n, batch, block, world, drop, buf, seed):
    if n < world:
        return
    shares = []
    for rank in range(world):
        s = BlockBatchSampler(n, batch, block, seed=seed, rank=rank, world_size=world,
                              drop_last=drop, buffer_blocks=buf)
        batches = list(s)
        assert len(batches) == len(s)
        assert all(len(b) == batch for b in batches[:-1])
        if drop:
            assert all(len(b) == batch for b in batches)
        buffers = -(-batch // (buf * block)) + 1  # buffers one batch can overlap
        padded = not drop and n % world
        for b in batches:  # so a batch touches few HDF5 chunks
            # (+1: the one short last block shifts buffer boundaries off block boundaries)
            assert padded or len({i // block for i in b}) <= buffers * (buf + 1)
        shares.append([i for b in batches for i in b])
        again = BlockBatchSampler(n, batch, block, seed=seed, rank=rank, world_size=world,
                                  drop_last=drop, buffer_blocks=buf)
        assert list(again) == batches  # deterministic in (seed, epoch)
    lengths = {len(BlockBatchSampler(n, batch, block, rank=r, world_size=world,
                                     drop_last=drop)) for r in range(world)}
    assert len(lengths) == 1  # every DDP rank does the same number of steps
    orders = [BlockBatchSampler(n, batch, block, seed=seed, rank=r, world_size=world,
                                drop_last=drop, buffer_blocks=buf).order() for r in range(world)]
    flat = np.concatenate(orders)
    if drop or n % world == 0:
        assert len(set(flat.tolist())) == len(flat)  # disjoint shares
    else:
        assert set(flat.tolist()) == set(range(n))  # padded: everything covered
    if drop:
        assert len(flat) == (n // world) * world


def test_block_sampler_unshuffled_and_epochs():
    s = BlockBatchSampler(10, 4, 3, shuffle=False)
    assert list(s) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    s = BlockBatchSampler(100, 10, 5, seed=1)
    e0 = s.order().tolist()
    s.set_epoch(1)
    assert s.order().tolist() != e0 and sorted(s.order().tolist()) == list(range(100))
    with pytest.raises(ValueError, match="rank 2"):
        BlockBatchSampler(10, 2, 2, rank=2, world_size=2)


def test_store_pickles_without_handle(tmp_path):
    import pickle

    p = tmp_path / "s.h5"
    _write(p)
    s = open_store(p)
    assert s.file
    s2 = pickle.loads(pickle.dumps(s))
    assert s2._file is None and s2.read_range(0, 3)["images"].shape == (3, 3, RES, RES)
    assert os.getpid() == s._pid
    assert store_mod.SCHEMA_VERSION == 1


def test_entry_file_over_shards_keeps_a_given_triplet_table(tmp_path):
    from triplets.store import write_entry_file

    imgs, rots, ids = _data(12)
    shards = []
    for i, (lo, hi) in enumerate(((0, 6), (6, 12))):
        p = tmp_path / f"shard-{i}.h5"
        w = StoreWriter(p, "shard", RES, hi - lo, chunk=6, fingerprint={"k": 1},
                        attrs={"shard_index": i, "shard_start": lo, "shard_stop": hi})
        w.write_chunk(0, imgs[lo:hi], rots[lo:hi], ids[lo:hi])
        w.finalize()
        shards.append(p)
    interleaved = write_entry_file(tmp_path / "a.h5", shards, {"kind": "triplets"})
    s = open_store(interleaved)
    assert s.num_triplets == 4 and s.attrs["triplet_layout"] == "interleaved"
    table = np.array([[0, 5, 11], [3, 4, 7]])
    custom = write_entry_file(tmp_path / "b.h5", shards, {"kind": "triplets"}, triplets=table)
    s = open_store(custom)
    # a given table is the store's table (it used to be stamped "interleaved" and ignored)
    assert s.num_triplets == 2 and s.attrs["triplet_layout"] == "table"
    np.testing.assert_array_equal(s.file["triplets"][:], table)
    np.testing.assert_array_equal(s.file["images"][11], imgs[11])
