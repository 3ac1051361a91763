"""Upgrading an existing index in place to the lean layout (schema v7), from every earlier version.

Each old store is made by running that version's own schema steps and inserting rows the way its
code wrote them (helpers_old_store); what the upgraded store must hold is derived from what went
in, not from the code under test.
"""

from __future__ import annotations

import json
import sqlite3

import numpy as np
import pytest
from helpers_old_store import DIM, LEAN_VERSION, make_old_store

from edge_t2t.index import schema, snapshot_writer, vindex
from edge_t2t.index.indexdir import IndexDir
from edge_t2t.index.store import STORE_FILE, NewText, Store
from edge_t2t.index.verify import verify_index
from edge_t2t.records import Feature, Variant


def _fts_keys(st: Store, word: str) -> list[int]:
    return sorted(r[0] for r in st.conn.execute("SELECT rowid FROM texts_fts WHERE texts_fts MATCH ?", (word,)))


@pytest.mark.parametrize("version", range(1, LEAN_VERSION))
def test_every_old_version_upgrades_in_place(tmp_path, version):
    ix = tmp_path / "ix"
    old = make_old_store(ix, version)
    live = old.live()
    with Store(ix) as st:
        c = st.conn
        assert c.execute("PRAGMA user_version").fetchone()[0] == schema.SCHEMA_VERSION
        assert not c.execute("SELECT name FROM sqlite_master WHERE name IN ('variants_v6', 'variants_fts')").fetchall()
        # each variant once, with the fields its rows repeated
        want_variants = sorted({(r.image_id, r.ordinal, r.one_sentence, r.features, r.caption) for r in live})
        assert sorted(c.execute("SELECT image_id, ordinal, one_sentence, features, caption FROM variants")) == want_variants
        assert st.variants_of(live[0].image_id)[0] == Variant(
            live[0].one_sentence, (Feature(f"tank{0}", "west", "large"),), live[0].caption)
        # each text once, under its old key
        got = c.execute("SELECT t.id, v.image_id, v.ordinal, t.field, t.text FROM texts t "
                        "JOIN variants v ON v.id = t.variant_id ORDER BY t.id").fetchall()
        assert got == [(r.key, r.image_id, r.ordinal, r.field, r.text) for r in live]
        # no snapshot to hold them: every vector is kept, bit for bit, as pending
        keys, image_ids, vecs = st.pending_in(0)
        assert keys.tolist() == [r.key for r in live] and image_ids.tolist() == [r.image_id for r in live]
        assert np.array_equal(vecs, np.stack([r.vector for r in live]))
        # the key sequence carries on past the deleted key
        assert st.last_key() == old.max_key_used
        # full-text index on the texts' new home, in step with them
        assert _fts_keys(st, "boats") == [r.key for r in live if "boats" in r.text.lower()]
        c.execute("INSERT INTO texts_fts(texts_fts, rank) VALUES ('integrity-check', 1)")
        # R*Tree (v5+) untouched
        if old.chip_image_id is not None:
            assert c.execute("SELECT image_id FROM chips_rtree").fetchall() == [(old.chip_image_id,)]
        # space given back: VACUUM ran (incremental auto-vacuum now on) and info's figures are recorded
        assert c.execute("PRAGMA auto_vacuum").fetchone()[0] == 2
        up = st.get_meta("upgrade")
        assert st.get_meta(schema.VACUUM_PENDING) is None
        assert up["schema"] == LEAN_VERSION and up["images"] == 4 and up["vectors_kept_pending"] == len(live)
        assert up["bytes_before"] > 0 and up["bytes_after"] > 0
        # new texts: keys after every old one; deletes logged and mirrored in the full-text index
        with st.transaction():
            new = st.add_texts(live[0].image_id, [NewText(7, "sentence", Variant("x"), "boats again", np.eye(DIM)[0])])
        assert new[0] == old.max_key_used + 1
        with st.transaction():
            st.remove_images([live[0].image_id])
        gone = [r.key for r in live if r.image_id == live[0].image_id] + new
        logged_before = old.deleted_keys if version >= 3 else []  # the log (v3) carries over
        assert sorted(st.deletions_after(0)[1].tolist()) == sorted(logged_before + gone)
        assert _fts_keys(st, "boats") == [r.key for r in live if "boats" in r.text.lower() and r.key not in gone]
    rep = verify_index(ix, check_models=False)
    assert rep.ok, rep.problems
    assert rep.checks["vectors"]["state"] == "missing"  # every vector pending, no snapshot yet
    # A writer builds the snapshot from the pending vectors and drops them: each vector once.
    with IndexDir.open_writer(ix) as w:
        w.open_vectors(DIM, "i8")
        assert w.store.pending_keys(10**9).size == 0
    rep = verify_index(ix, check_models=False)
    assert rep.ok and rep.checks["vectors"]["state"] == "match", rep.problems


def test_the_snapshot_keeps_the_vectors_it_holds_and_the_others_stay_pending(tmp_path):
    """A v6 index whose snapshot holds its first texts: the upgrade drops the SQLite copies of
    those (same key, image, vector) and keeps the later ones pending; searches and verify agree."""
    ix = tmp_path / "ix"
    old = make_old_store(ix, 6)
    live = old.live()
    held = live[: len(live) - 4]  # the last 4 texts were committed after the snapshot's save
    conn = sqlite3.connect(ix / STORE_FILE, isolation_level=None)
    store_id = "s" * 32
    conn.execute("INSERT INTO meta VALUES ('store_id', ?), ('vector_generation', '1')", (json.dumps(store_id),))
    conn.close()
    snapshot_writer.build(ix, np.array([r.key for r in held]), np.array([r.image_id for r in held]),
                 np.stack([r.vector for r in held]), DIM, "i8", store_id=store_id)
    assert vindex.read_manifest(ix)["exact"]  # the old layout: an i8 graph and its float16 copy
    with Store(ix) as st:
        assert st.pending_in(0)[0].tolist() == [r.key for r in live[-4:]]
        assert st.get_meta("upgrade")["vectors_kept_pending"] == 4
    rep = verify_index(ix, check_models=False)
    assert rep.ok and rep.checks["vectors"]["state"] == "stale", rep.problems
    with IndexDir.open_writer(ix) as w:
        w.open_vectors(DIM, "i8")
        w.checkpoint(force=True)
        assert w.store.pending_keys(10**9).size == 0
    rep = verify_index(ix, check_models=False)
    assert rep.ok and rep.checks["vectors"]["state"] == "match", rep.problems

