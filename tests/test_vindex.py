"""The usearch index beside the store: dtypes, search modes, atomic saves, rebuilds from SQLite."""

from __future__ import annotations

import os

import numpy as np
import pytest

from edge_t2t import vindex
from edge_t2t.records import Variant
from edge_t2t.store import NewText, Store

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


@pytest.mark.parametrize("dtype", ["f32", "f16", "i8"])
def test_dtype_round_trip_and_modes_agree(tmp_path, dtype):
    vecs, groups = clustered()
    st = fill_store(tmp_path, vecs, groups)
    keys, image_ids, stored = st.all_vectors()
    w = vindex.VectorWriter(tmp_path, DIM, dtype)
    w.add(keys, image_ids, stored)
    w.save()
    state = vindex.on_disk_state(tmp_path)
    assert state["dtype"] == dtype and state["dim"] == DIM and state["count"] == len(keys)
    assert vindex.is_consistent(tmp_path, keys, DIM, dtype)
    assert not vindex.is_consistent(tmp_path, keys, DIM, "f32" if dtype != "f32" else "i8")
    exact_dtype = np.load(tmp_path / vindex.EXACT_FILE).dtype
    assert exact_dtype == (np.float32 if dtype == "f32" else np.float16)

    vi = vindex.VectorIndex(tmp_path)
    q = vecs[::7]
    ex = vi.search(q, 5, mode="exact")
    rs = vi.search(q, 5, mode="rescore")
    hn = vi.search(q, 5, mode="hnsw")
    truth = q @ vecs.T
    for i in range(len(q)):
        # exact mode returns the true top 5 with (f16-rounded) exact scores
        top = np.sort(truth[i])[::-1][:5]
        np.testing.assert_allclose(ex[i].scores, top, atol=2e-3)
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
    vindex.rebuild(tmp_path, st, DIM, "i8")
    vi = vindex.VectorIndex(tmp_path)
    for mode in vindex.MODES:
        (c,) = vi.search(vecs[:1], 100, mode=mode)
        assert len(c.keys) == 4 and len(set(c.keys.tolist())) == 4
    st.close()


def test_inconsistent_files_are_detected_and_rebuilt(tmp_path):
    vecs, groups = clustered(4, 3)
    st = fill_store(tmp_path, vecs, groups)
    assert not vindex.is_consistent(tmp_path, st.variant_keys(), DIM, "i8")  # nothing on disk yet
    w, rebuilt = vindex.VectorWriter.open(tmp_path, st, DIM, "i8")
    assert rebuilt and w.dirty
    w.save()
    assert vindex.is_consistent(tmp_path, st.variant_keys(), DIM, "i8")
    # SQLite moves on (an image removed) but the files were not saved: a mismatch.
    with st.transaction():
        st.remove_images([1])
    assert not vindex.is_consistent(tmp_path, st.variant_keys(), DIM, "i8")
    w2, rebuilt2 = vindex.VectorWriter.open(tmp_path, st, DIM, "i8")
    assert rebuilt2 and len(w2) == len(st.variant_keys())
    w2.save()
    assert vindex.is_consistent(tmp_path, st.variant_keys(), DIM, "i8")
    # A truncated usearch file is caught too.
    path = tmp_path / vindex.USEARCH_FILE
    path.write_bytes(path.read_bytes()[:100])
    assert not vindex.is_consistent(tmp_path, st.variant_keys(), DIM, "i8")
    st.close()


def test_remove_drops_keys_from_graph_and_exact_vectors(tmp_path):
    vecs, groups = clustered(3, 2)
    st = fill_store(tmp_path, vecs, groups)
    w, _ = vindex.VectorWriter.open(tmp_path, st, DIM, "f16")
    gone = w.keys[:2].tolist()
    w.remove(gone)
    w.save()
    vi = vindex.VectorIndex(tmp_path)
    for mode in vindex.MODES:
        (c,) = vi.search(vecs[:1], 10, mode=mode)
        assert not set(gone) & set(c.keys.tolist()) and len(c.keys) == 4
    st.close()


def test_save_is_atomic(tmp_path, monkeypatch):
    vecs, groups = clustered(3, 2)
    st = fill_store(tmp_path, vecs, groups)
    vindex.rebuild(tmp_path, st, DIM, "i8")
    before = {p.name: p.read_bytes() for p in vindex.files(tmp_path)}
    w, _ = vindex.VectorWriter.open(tmp_path, st, DIM, "i8")
    w.remove(w.keys[:1])

    def fail_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", fail_replace)
    with pytest.raises(OSError):
        w.save()
    monkeypatch.undo()
    # The old files are intact: a failed save never leaves a torn file under the real name.
    assert {p.name: p.read_bytes() for p in vindex.files(tmp_path)} == before
    w.save()
    assert not list(tmp_path.glob("*.tmp"))
    assert vindex.on_disk_state(tmp_path)["count"] == len(vecs) - 1
    st.close()
