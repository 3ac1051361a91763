"""The vector snapshot beside the store: dtypes, exact copy or not, search modes, atomic saves,
merges and compaction."""

from __future__ import annotations

import os

import numpy as np
import pytest

from edge_t2t.index import snapshot_writer, vindex
from edge_t2t.index.store import NewText, Store
from edge_t2t.modes import VECTOR_MODES
from edge_t2t.records import Variant

DIM = 32


def clustered(n_clusters=20, per=5, seed=0):
    """Unit vectors in tight clusters: each cluster's members are each other's nearest neighbours."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_clusters, DIM))
    vecs = np.repeat(centres, per, axis=0) + 0.05 * rng.normal(size=(n_clusters * per, DIM))
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    return vecs.astype(np.float32), np.repeat(np.arange(n_clusters), per)


def fill_store(path, vecs, groups) -> Store:
    st = Store(path, create=True)
    st.set_meta("dim", DIM)
    with st.transaction():
        ids = {}
        for g in sorted(set(groups.tolist())):
            ids[g] = st.put_image(f"/img/{g:03d}.jpg", sha256=str(g))
        for i, (v, g) in enumerate(zip(vecs, groups, strict=True)):
            st.add_texts(ids[g], [NewText(i, "joined", Variant(f"t{i}"), f"t{i}", v)])
    return st


def build_from(st: Store, path, dtype="i8", exact_copy=True) -> snapshot_writer.VectorWriter:
    keys, image_ids, vecs = st.pending_in(0)
    return snapshot_writer.build(path, keys, image_ids, vecs, DIM, dtype, exact_copy=exact_copy)


def unit(v):
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


def stored_as(vecs, dtype, exact_copy):
    """What exact search scores for a layout, by its definition (vindex docstring): float16 for an
    i8 index's copy and an f16 graph, float32 for f32, int8 codes (largest component +-127) as unit
    vectors for an i8 index without the copy."""
    if dtype == "f32":
        return vecs
    if dtype == "i8" and not exact_copy:
        return unit(np.round(vecs / np.abs(vecs).max(axis=1, keepdims=True) * 127))
    return vecs.astype(np.float16).astype(np.float32)


def all_modes(snap, q, k):
    return {mode: snap.search(q, k, mode=mode) for mode in VECTOR_MODES}


@pytest.mark.parametrize(("dtype", "exact_copy"), [("f32", True), ("f16", True), ("i8", True), ("i8", False)])
def test_dtype_round_trip_and_modes_agree(tmp_path, dtype, exact_copy):
    vecs, groups = clustered()
    st = fill_store(tmp_path, vecs, groups)
    keys, image_ids, stored = st.pending_in(0)
    build_from(st, tmp_path, dtype, exact_copy)
    snap = vindex.Snapshot.open(tmp_path)
    assert snap.dtype == dtype and snap.dim == DIM and len(snap) == len(keys) and snap.generation == 1
    # each vector once: a float16 copy only beside an i8 graph (unless left out)
    assert (snap.exact is not None) == (dtype == "i8" and exact_copy)
    files = {p.name.split(".")[0] for p in tmp_path.iterdir()}
    assert ("exact" in files) == (dtype == "i8" and exact_copy)
    want = stored_as(vecs, dtype, exact_copy)
    np.testing.assert_array_equal(snap.vectors_at(np.arange(len(keys))), want)
    q = vecs[::7]
    ex = snap.search(q, 5, mode="exact")
    rs = snap.search(q, 5, mode="rescore")
    hn = snap.search(q, 5, mode="hnsw")
    truth = q @ want.T
    for i in range(len(q)):
        # exact mode returns the top 5 of the stored values, with their scores
        top = np.argsort(-truth[i], kind="stable")[:5]
        assert ex[i].keys.tolist() == keys[top].tolist()
        np.testing.assert_allclose(ex[i].scores, truth[i][top], atol=1e-5)
        # re-scoring the graph's candidates gives exact scores for the same keys
        assert rs[i].keys.tolist() == ex[i].keys.tolist()
        np.testing.assert_allclose(rs[i].scores, ex[i].scores, atol=1e-5)
        # the graph's own scores are approximate (quantised for i8), but close
        assert hn[i].keys[0] == ex[i].keys[0]
        assert abs(hn[i].scores[0] - ex[i].scores[0]) < (0.05 if dtype == "i8" else 5e-3)
        # candidates carry their image ids
        assert set(hn[i].image_ids.tolist()) <= set(image_ids.tolist())
    st.close()


def test_search_on_empty_and_k_larger_than_n(tmp_path):
    vecs, groups = clustered(2, 2)
    st = fill_store(tmp_path, vecs, groups)
    build_from(st, tmp_path)
    snap = vindex.Snapshot.open(tmp_path)
    for mode in VECTOR_MODES:
        (c,) = snap.search(vecs[:1], 100, mode=mode)
        assert len(c.keys) == 4 and len(set(c.keys.tolist())) == 4
    st.close()
    empty = tmp_path / "empty"
    snapshot_writer.build(empty, np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros((0, DIM), np.float32), DIM, "i8")
    for mode in VECTOR_MODES:
        assert len(vindex.Snapshot.open(empty).search(vecs[:1], 5, mode=mode)[0].keys) == 0


def test_an_update_appends_and_never_disturbs_an_open_reader(tmp_path):
    vecs, groups = clustered(6, 4)
    st = fill_store(tmp_path, vecs[:12], groups[:12])
    build_from(st, tmp_path)
    old = vindex.Snapshot.open(tmp_path)
    base = tmp_path / old.manifest["base"]
    base_bytes = base.read_bytes()
    rows_inode = (tmp_path / old.manifest["rows"]).stat().st_ino
    old_results = all_modes(old, vecs[:3], 5)

    w = snapshot_writer.VectorWriter.from_manifest(tmp_path, DIM, "i8")
    keys, image_ids, _ = st.pending_in(0)
    w.add(np.arange(100, 112), np.full(12, 99), vecs[12:])
    w.remove(keys[:2])
    w.save()
    new = vindex.Snapshot.open(tmp_path)
    assert new.generation == 2 and len(new) == 22 and new.manifest["tail_count"] == 12
    # the base graph was not rewritten and the row file was appended to, not replaced
    assert base.read_bytes() == base_bytes and new.manifest["base"] == old.manifest["base"]
    assert (tmp_path / new.manifest["rows"]).stat().st_ino == rows_inode
    # the reader that opened generation 1 still sees exactly generation 1
    for mode, cands in all_modes(old, vecs[:3], 5).items():
        for a, b in zip(cands, old_results[mode], strict=True):
            assert a.keys.tolist() == b.keys.tolist()
    # generation 2: removed keys never come back, new ones are found, in every mode
    for mode, cands in all_modes(new, vecs[12:15], 5).items():
        for c in cands:
            assert not set(keys[:2].tolist()) & set(c.keys.tolist()), mode
            assert c.keys[0] >= 100 and len(c.keys) == 5, mode
    for mode, (c,) in all_modes(new, vecs[:1], 30).items():
        assert len(c.keys) == 22 and not set(keys[:2].tolist()) & set(c.keys.tolist()), mode
    st.close()


def test_rows_appended_after_the_manifest_are_cut_off(tmp_path):
    """A writer killed after appending but before its manifest leaves extra rows: readers ignore
    them and the next writer truncates them before appending its own."""
    vecs, groups = clustered(3, 2)
    st = fill_store(tmp_path, vecs, groups)
    build_from(st, tmp_path)
    w = snapshot_writer.VectorWriter.from_manifest(tmp_path, DIM, "i8")
    w.add([50, 51], [7, 7], vecs[:2])  # appended, never saved: the "kill"
    assert len(vindex.Snapshot.open(tmp_path)) == 6
    w2 = snapshot_writer.VectorWriter.from_manifest(tmp_path, DIM, "i8")
    w2.add([60], [8], vecs[2:3])
    w2.save()
    snap = vindex.Snapshot.open(tmp_path)
    assert snap.rows[:, 0].tolist() == [*range(1, 7), 60]
    assert (tmp_path / snap.manifest["rows"]).stat().st_size == 7 * 16
    st.close()


def test_a_failed_save_leaves_the_previous_generation(tmp_path, monkeypatch):
    vecs, groups = clustered(3, 2)
    st = fill_store(tmp_path, vecs, groups)
    build_from(st, tmp_path)
    before = (tmp_path / vindex.MANIFEST_FILE).read_bytes()
    w = snapshot_writer.VectorWriter.from_manifest(tmp_path, DIM, "i8")
    w.remove([1])
    w.add([10], [3], vecs[:1])
    real_replace = os.replace

    def fail_manifest(src, dst):
        if str(dst).endswith(vindex.MANIFEST_FILE):
            raise OSError("disk full")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", fail_manifest)
    with pytest.raises(OSError):
        w.save()
    monkeypatch.undo()
    assert (tmp_path / vindex.MANIFEST_FILE).read_bytes() == before
    snap = vindex.Snapshot.open(tmp_path)
    assert snap.generation == 1 and len(snap) == 6
    assert 1 in snap.search(vecs[:1], 6, mode="exact")[0].keys.tolist()
    w.save()
    assert len(vindex.Snapshot.open(tmp_path)) == 6 and not list(tmp_path.glob("*.tmp"))
    st.close()


@pytest.mark.parametrize("exact_copy", [True, False])
def test_tail_merges_into_base_and_dead_rows_compact(tmp_path, monkeypatch, exact_copy):
    """Merging and compacting move each vector as stored (graph codes and copy alike: nothing is
    quantised twice), with no SQLite copy to fall back on."""
    from edge_t2t.index.indexdir import IndexDir

    monkeypatch.setattr(snapshot_writer, "TAIL_MAX", 8)
    monkeypatch.setattr(snapshot_writer, "DEAD_MIN", 6)
    vecs, groups = clustered(10, 4)
    st = fill_store(tmp_path, vecs[:8], groups[:8])
    st.set_meta("dtype", "i8")
    st.set_meta("exact_copy", exact_copy)
    st.close()
    with IndexDir.open_writer(tmp_path) as ix:
        ix.open_vectors(DIM, "i8")
        base0 = ix.writer.base_name
        with ix.store.transaction():
            image = ix.store.put_image("/img/new.jpg")
            ix.store.add_texts(image, [NewText(i, "joined", Variant(f"n{i}"), f"n{i}", v) for i, v in enumerate(vecs[8:])])
        ix.checkpoint(force=True)  # 32 tail rows > 8: merged into a new base
        m = vindex.read_manifest(tmp_path)
        assert m["base"] != base0 and m["tail"] is None and m["base_count"] == 40
        assert ix.store.pending_keys(10**6).size == 0  # each vector once: in the snapshot
        merged = vindex.Snapshot.open(tmp_path)
        np.testing.assert_array_equal(merged.vectors_at(np.arange(40)), stored_as(vecs, "i8", exact_copy))
        with ix.store.transaction():
            ix.store.remove_images([image])
        before_compaction = vindex.read_manifest(tmp_path)
        ix.checkpoint(force=True)  # 32 dead > max(6, 4): compacted by a rebuild
        m = vindex.read_manifest(tmp_path)
        # while the writer works, the previous generation's files stay for readers that read its manifest
        assert set(m["previous"]) == set(vindex.manifest_files(before_compaction))
        assert all((tmp_path / n).is_file() for n in m["previous"])
        assert m["dead"] is None and m["n_rows"] == 8 and m["live"] == 8
        # the snapshot applied the 32 deletions and the store forgot them (pruned up to what it saw)
        assert m["deletions_seen"] == 32 and ix.store.last_deletion() == 0
        assert ix.store.deletions_after(0)[1].size == 0
    snap = vindex.Snapshot.open(tmp_path)
    np.testing.assert_array_equal(snap.vectors_at(np.arange(8)), stored_as(vecs[:8], "i8", exact_copy))
    np.testing.assert_array_equal(snap.graph_values(snap.rows[:, 0])[0],
                                  np.round(vecs[:8] / np.abs(vecs[:8]).max(axis=1, keepdims=True) * 127))
    ex = snap.search(vecs[:8], 3, mode="exact")
    for mode in ("hnsw", "rescore"):
        for a, b in zip(snap.search(vecs[:8], 3, mode=mode), ex, strict=True):
            assert a.keys[0] == b.keys[0]
    names = {p.name for p in tmp_path.iterdir()} - {"store.sqlite", "store.sqlite-wal", "store.sqlite-shm"}
    # the writer done, only this generation's files remain: the compaction's old epoch went with it
    assert names == {vindex.MANIFEST_FILE, *vindex.manifest_files(m)}
    assert "rows.1.i64" in m["previous"] and "rows.1.i64" not in names


def test_a_reader_of_a_released_generation_reads_the_newer_one(tmp_path, monkeypatch):
    """A reader that read the manifest just before a writer saved and released the previous
    generation finds its graph gone and opens the newer generation instead of failing."""
    from edge_t2t.index.indexdir import IndexDir

    monkeypatch.setattr(snapshot_writer, "TAIL_MAX", 8)
    vecs, groups = clustered(10, 4)
    fill_store(tmp_path, vecs[:8], groups[:8]).close()
    with IndexDir.open_writer(tmp_path) as ix:
        ix.open_vectors(DIM, "i8")
    seen = vindex.read_manifest(tmp_path)  # the reader's manifest, base graph only
    with IndexDir.open_writer(tmp_path) as ix:
        ix.open_vectors(DIM, "i8")
        with ix.store.transaction():
            image = ix.store.put_image("/img/new.jpg")
            ix.store.add_texts(image, [NewText(i, "joined", Variant(f"n{i}"), f"n{i}", v) for i, v in enumerate(vecs[8:])])
        ix.checkpoint(force=True)  # 32 tail rows > 8: a new base graph
    assert not (tmp_path / seen["base"]).exists()
    with pytest.raises(FileNotFoundError):
        vindex.Snapshot(tmp_path, seen)
    monkeypatch.setattr(vindex, "read_manifest", _first_then_current(seen, vindex.read_manifest))
    snap = vindex.Snapshot.open(tmp_path)
    assert snap.generation > seen["generation"] and len(snap) == 40


def _first_then_current(first: dict, read):
    """read_manifest as a reader sees it when a save lands right after its first read."""
    calls = []

    def reader(index_dir):
        calls.append(index_dir)
        return first if len(calls) == 1 else read(index_dir)

    return reader


@pytest.mark.parametrize("mode", VECTOR_MODES)
def test_asking_for_every_vector_returns_every_vector(tmp_path, mode):
    """HNSW can leave nodes unreachable (a 100-image index once answered `search -k 1000` with 99):
    asking for as many candidates as there are vectors is answered by brute force, in every mode."""
    rng = np.random.default_rng(3)
    vecs = rng.normal(size=(600, DIM)).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    st = fill_store(tmp_path, vecs, np.arange(600))
    build_from(st, tmp_path, "i8")
    snap = vindex.Snapshot.open(tmp_path)
    (found,) = snap.search(vecs[:1], len(snap), mode=mode)
    assert sorted(found.keys.tolist()) == sorted(st.pending_in(0)[0].tolist())


def test_a_graph_that_comes_back_short_falls_back_to_brute_force(tmp_path, monkeypatch):
    """Even a whole-graph walk may miss live keys: the k best then come from the exact copy."""
    vecs, groups = clustered()
    st = fill_store(tmp_path, vecs, groups)
    build_from(st, tmp_path, "i8")
    snap = vindex.Snapshot.open(tmp_path)
    walk = snap._graph_candidates
    monkeypatch.setattr(snap, "_graph_candidates", lambda codes, fetch: [(k[:3], d[:3]) for k, d in walk(codes, fetch)])
    (got,) = snap.search(vecs[:1], 10, mode="hnsw")
    (want,) = snap.search(vecs[:1], 10, mode="exact")
    assert got.keys.tolist() == want.keys.tolist()
