"""The SQLite store of record: schema and migrations, round trips, transactions, the index lock."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from edge_t2t.errors import StoreError
from edge_t2t.index import schema
from edge_t2t.index import store as store_mod
from edge_t2t.index.lock import IndexLock
from edge_t2t.index.store import NewText, Store
from edge_t2t.records import Feature, Variant


def _variant(i: int) -> Variant:
    return Variant(f"scene {i}", (Feature("river", "west", "large"),), f"caption {i}")


def _add_image(st: Store, path: str, n: int = 2, sha: str = "") -> tuple[int, list[int]]:
    rng = np.random.default_rng(len(path))
    with st.transaction():
        image_id = st.put_image(path, size=10, mtime_ns=1, sha256=sha or path, provenance={"model": "m"})
        texts = [NewText(i, "joined", _variant(i), _variant(i).joined_text(), rng.normal(size=8)) for i in range(n)]
        keys = st.add_texts(image_id, texts)
    return image_id, keys


def test_new_store_has_current_schema_wal_and_foreign_keys(tmp_path):
    with Store(tmp_path / "ix", create=True) as st:
        assert st.conn.execute("PRAGMA user_version").fetchone()[0] == schema.SCHEMA_VERSION
        assert st.conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert st.conn.execute("PRAGMA foreign_keys").fetchone()[0] == 1
        tables = {r[0] for r in st.conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        assert {"meta", "images", "variants", "texts", "pending_vectors", "descriptions", "runs"} <= tables


def test_missing_store_names_the_directory_and_the_fix(tmp_path):
    with pytest.raises(StoreError, match="edge-t2t index"):
        Store(tmp_path / "nothing")


def test_migrates_from_v0_and_to_a_later_version_keeping_data(tmp_path):
    path = tmp_path / "s.sqlite"
    conn = sqlite3.connect(path, isolation_level=None)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == 0  # hand-made v0: an empty file
    assert schema.migrate(conn, schema.MIGRATIONS[:1]) == 1
    conn.execute("INSERT INTO meta VALUES ('k', '1')")

    def py_step(c):  # a Python step, as a later schema change would add
        c.execute("ALTER TABLE images ADD COLUMN note TEXT NOT NULL DEFAULT ''")

    sql_step = "CREATE TABLE tags (image_id INTEGER, tag TEXT);"  # and an SQL step
    later = schema.SCHEMA_VERSION + 2
    assert schema.migrate(conn, schema.MIGRATIONS + [py_step, sql_step]) == later
    assert conn.execute("PRAGMA user_version").fetchone()[0] == later
    assert conn.execute("SELECT value FROM meta WHERE key='k'").fetchone()[0] == "1"
    cols = {r[1] for r in conn.execute("PRAGMA table_info(images)")}
    assert "note" in cols
    conn.execute("INSERT INTO tags VALUES (1, 'x')")
    # A store newer than this code is refused, not silently used.
    with pytest.raises(StoreError, match="newer edge-t2t"):
        schema.migrate(conn)


def test_v1_store_migrates_to_v2_keeping_rows_and_ids(tmp_path):
    """A store written by the v1 schema (model names only) gains the VLM file columns; its images
    keep pointing at their description rows, and new sets are told apart by their files."""
    ix = tmp_path / "ix"
    ix.mkdir()
    conn = sqlite3.connect(ix / store_mod.STORE_FILE, isolation_level=None)
    conn.execute("PRAGMA foreign_keys=ON")
    assert schema.migrate(conn, schema.MIGRATIONS[:1]) == 1
    conn.execute("INSERT INTO meta VALUES ('dim', '8')")
    conn.execute("INSERT INTO descriptions VALUES (7, 'm.gguf', 'p.gguf', 'llava-1.5', 'v1', 0, 1)")
    conn.execute("INSERT INTO descriptions VALUES (9, 'imported:coco', '', '', '', 0, 0)")
    conn.execute("INSERT INTO images(id, path, sha256, status, source, description_id, indexed_at) "
                 "VALUES (3, '/x/a.jpg', 'aa', 'ok', 'vlm', 7, 1.0), (4, '/x/b.jpg', 'bb', 'ok', 'captions', 9, 1.0)")
    conn.execute("INSERT INTO variants(image_id, ordinal, field, one_sentence, features, caption, text, vector) "
                 "VALUES (3, 0, 'joined', 's', '[]', 'c', 't', ?)", (np.ones(8, np.float32).tobytes(),))
    conn.close()

    with Store(ix) as st:
        assert st.conn.execute("PRAGMA user_version").fetchone()[0] == schema.SCHEMA_VERSION >= 2
        assert st.conn.execute("PRAGMA foreign_keys").fetchone()[0] == 1  # restored after the rebuild
        assert not st.conn.execute("PRAGMA foreign_key_check").fetchall()
        cols = {r[1] for r in st.conn.execute("PRAGMA table_info(descriptions)")}
        assert set(schema.MODEL_FILE_COLUMNS) <= cols
        prov = {p["model"]: p for p in st.provenance()}
        assert prov["m.gguf"]["images"] == 1 and prov["imported:coco"]["images"] == 1
        assert all(prov["m.gguf"][c] is None for c in schema.MODEL_FILE_COLUMNS)
        assert st.description_of(3)[0] == 7 and st.description_of(4)[0] == 9
        assert st.counts()["texts"] == 1 and st.get_meta("dim") == 8
        v1 = {"model": "m.gguf", "mmproj": "p.gguf", "family": "llava-1.5", "prompt_version": "v1", "test_model": False}
        files = {"model_path": "/models/m.gguf", "model_sha256": "a" * 64,
                 "mmproj_path": "/models/p.gguf", "mmproj_sha256": "b" * 64}
        with st.transaction():
            # Same names, no files: the migrated row (NULLs match NULLs, no duplicate).
            assert st.conn.execute("SELECT description_id FROM images WHERE id = ?",
                                   (st.put_image("/x/c.jpg", provenance=v1),)).fetchone()[0] == 7
            with_files = st.put_image("/x/d.jpg", provenance={**v1, **files})
            again = st.put_image("/x/e.jpg", provenance={**v1, **files})
            other = st.put_image("/x/f.jpg", provenance={**v1, **files, "model_sha256": "c" * 64})
        ids = [st.description_of(i)[0] for i in (with_files, again, other)]
        assert ids[0] == ids[1] and len({7, ids[0], ids[2]}) == 3  # a replaced model file is another set
        got = [p for p in st.provenance() if p["model_sha256"] == "a" * 64]
        assert len(got) == 1 and got[0]["images"] == 2 and got[0]["mmproj_path"] == "/models/p.gguf"


def test_failed_migration_rolls_back(tmp_path):
    conn = sqlite3.connect(tmp_path / "s.sqlite", isolation_level=None)
    schema.migrate(conn)

    def broken(c):
        c.execute("CREATE TABLE half (x)")
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        schema.migrate(conn, schema.MIGRATIONS + [broken])
    assert conn.execute("PRAGMA user_version").fetchone()[0] == schema.SCHEMA_VERSION
    assert not conn.execute("SELECT name FROM sqlite_master WHERE name='half'").fetchall()


def test_migration_that_leaves_dangling_references_is_refused(tmp_path):
    """Steps run with foreign keys off (so a table can be rebuilt); the check before the commit
    still refuses one that breaks a reference."""
    conn = sqlite3.connect(tmp_path / "s.sqlite", isolation_level=None)
    conn.execute("PRAGMA foreign_keys=ON")
    schema.migrate(conn)

    def dangling(c):
        c.execute("INSERT INTO images(path, status, description_id, indexed_at) VALUES ('/x', 'ok', 999, 0)")

    with pytest.raises(StoreError, match="dangling"):
        schema.migrate(conn, schema.MIGRATIONS + [dangling])
    assert conn.execute("PRAGMA user_version").fetchone()[0] == schema.SCHEMA_VERSION
    assert conn.execute("SELECT COUNT(*) FROM images").fetchone()[0] == 0
    assert conn.execute("PRAGMA foreign_keys").fetchone()[0] == 1


def test_texts_and_vectors_round_trip_and_cascade_on_delete(tmp_path):
    with Store(tmp_path, create=True) as st:
        st.set_meta("dim", 8)
        a, keys_a = _add_image(st, "/x/a.jpg", 3)
        b, keys_b = _add_image(st, "/x/b.jpg", 2)
        keys, image_ids, vecs = st.pending_in(0)
        assert keys.tolist() == sorted(keys_a + keys_b)
        assert vecs.shape == (5, 8) and vecs.dtype == np.float32
        assert image_ids.tolist().count(a) == 3
        assert [v.one_sentence for v in st.variants_of(a)] == ["scene 0", "scene 1", "scene 2"]
        assert st.variants_of(a)[0].features == (Feature("river", "west", "large"),)
        rows = st.variant_rows(keys_b)
        assert {r.image for r in rows.values()} == {"/x/b.jpg"}
        assert st.counts() == {"images_ok": 2, "images_failed": 0, "variants": 5, "texts": 5}
        with st.transaction():
            removed = st.remove_images([a])
        assert sorted(removed) == sorted(keys_a)
        assert st.pending_in(0)[0].tolist() == sorted(keys_b)  # pending vectors go with their texts
        assert st.conn.execute("SELECT COUNT(*) FROM variants").fetchone()[0] == 2
        # Keys are never reused after a delete (AUTOINCREMENT): a stale vector file cannot alias.
        _, keys_c = _add_image(st, "/x/c.jpg", 1)
        assert keys_c[0] > max(keys_a + keys_b)


def test_each_variant_and_each_text_is_stored_once(tmp_path):
    """Schema v7: a variant's fields are one row however many texts it has; a text row holds the
    text and its variant, nothing repeated."""
    v = Variant("a harbour", (Feature("tank", "west", "large"), Feature("boat", "east", "small")), "Boats. Tanks.")
    texts = [NewText(0, "one_sentence", v, "a harbour", np.ones(4, np.float32) / 2),
             NewText(0, "feature", v, "large tank in the west", np.ones(4, np.float32) / 2),
             NewText(0, "sentence", v, "Boats.", np.ones(4, np.float32) / 2),
             NewText(1, "one_sentence", Variant("a port"), "a port", np.ones(4, np.float32) / 2)]
    with Store(tmp_path, create=True) as st:
        st.set_meta("dim", 4)
        with st.transaction():
            image = st.put_image("/x/a.jpg")
            keys = st.add_texts(image, texts)
        assert st.conn.execute("SELECT image_id, ordinal, one_sentence, caption FROM variants ORDER BY ordinal").fetchall() \
            == [(image, 0, "a harbour", "Boats. Tanks."), (image, 1, "a port", "")]
        assert [r[0] for r in st.conn.execute("SELECT text FROM texts ORDER BY id")] == [t.text for t in texts]
        assert {c[1] for c in st.conn.execute("PRAGMA table_info(texts)")} == {"id", "variant_id", "field", "text"}
        assert st.variants_of(image) == [v, Variant("a port")]
        assert list(st.features_of([image])) == [(image, 0, json.dumps([
            {"name": "tank", "position": "west", "size": "large"}, {"name": "boat", "position": "east", "size": "small"}])),
            (image, 1, "[]")]
        assert st.text_keys_of([image])[0].tolist() == keys


def test_insert_texts_copies_descriptions_under_new_keys(tmp_path):
    with Store(tmp_path, create=True) as st:
        st.set_meta("dim", 8)
        a, keys_a = _add_image(st, "/x/a.jpg", 2)
        vecs = np.eye(8, dtype=np.float32)[:2]
        with st.transaction():
            b = st.put_image("/x/copy.jpg", sha256="/x/a.jpg")
            keys = st.insert_texts(b, st.read_texts(a), vecs)
        assert len(keys) == 2 and min(keys) > max(keys_a)
        assert np.array_equal(st.pending_in(max(keys_a))[2], vecs)
        assert st.variants_of(b) == st.variants_of(a)


def test_pruned_pending_vectors_give_their_pages_back(tmp_path):
    """A saved snapshot holds the vectors: pruning them shrinks the file (incremental auto-vacuum),
    except the keys asked to be kept."""
    with Store(tmp_path, create=True) as st:
        st.set_meta("dim", 384)
        rng = np.random.default_rng(0)
        with st.transaction():
            image = st.put_image("/x/a.jpg")
            keys = st.add_texts(image, [NewText(0, "sentence", Variant("v"), f"text {i}", rng.normal(size=384))
                                        for i in range(2000)])
        st.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        assert st.conn.execute("PRAGMA auto_vacuum").fetchone()[0] == 2  # incremental
        full = st.path.stat().st_size
        assert full > 2000 * 384 * 4  # the float32 vectors are in the file
        st.prune_pending(keys[-1], keep=keys[:2])
        st.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        assert st.pending_keys(keys[-1]).tolist() == keys[:2]
        assert st.path.stat().st_size < full - 1990 * 384 * 4


def test_transaction_rolls_back_on_error(tmp_path):
    with Store(tmp_path, create=True) as st:
        with pytest.raises(KeyboardInterrupt), st.transaction():
            st.put_image("/x/a.jpg")
            raise KeyboardInterrupt
        assert st.images() == {}


def test_identity_mismatch_names_both_embedders(tmp_path):
    with Store(tmp_path, create=True) as st:
        st.set_meta("embedder_identity", {"name": "model-a", "dim": 384, "weights_sha256": "aa", "pooling": "mean"})
        st.check_identity({"name": "model-a", "dim": 384, "weights_sha256": "aa", "pooling": "mean"})
        with pytest.raises(StoreError) as err:
            st.check_identity({"name": "model-b", "dim": 768, "weights_sha256": "bb", "pooling": "cls"})
        assert "model-a" in str(err.value) and "model-b" in str(err.value)


def test_runs_are_recorded(tmp_path, monkeypatch):
    import edge_t2t.index.store as store_mod

    clock = iter([1000.0, 1003.5])  # the start, then the finish: each stamp must land in its own column
    monkeypatch.setattr(store_mod.time, "time", lambda: next(clock))
    with Store(tmp_path, create=True) as st:
        run = st.start_run({"paths": ["x"]})
        st.finish_run(run, "ok", {"added": 3}, {"embed": 1.5})
        monkeypatch.undo()
        last = st.last_run()
        assert last["status"] == "ok" and last["counts"]["added"] == 3 and last["stage_seconds"] == {"embed": 1.5}
        assert (last["started"], last["finished"]) == (1000.0, 1003.5)


def test_lock_refuses_a_live_holder_and_names_its_pid(tmp_path):
    with IndexLock(tmp_path):
        assert (tmp_path / "index.lock").read_text() == str(__import__("os").getpid())
        with pytest.raises(StoreError, match=str(__import__("os").getpid())):
            IndexLock(tmp_path).acquire()
    assert not (tmp_path / "index.lock").exists()


def test_a_lock_file_left_by_a_dead_process_is_no_lock(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()  # its pid is now free (dead)
    (tmp_path / "index.lock").write_text(str(proc.pid))
    with IndexLock(tmp_path) as lock:
        assert lock.held


def test_the_kernel_frees_the_lock_of_a_killed_holder(tmp_path):
    """flock on a held descriptor: while the holder lives every other taker is refused (with its
    pid); SIGKILL frees it, with no stale-pid guessing that could let two writers in."""
    code = ("import sys, time; from edge_t2t.index.lock import IndexLock; IndexLock(sys.argv[1]).acquire(); "
            "print('locked', flush=True); time.sleep(60)")
    holder = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        for _ in range(3):
            with pytest.raises(StoreError, match=f"process {holder.pid}"):
                IndexLock(tmp_path).acquire()
        assert IndexLock(tmp_path).is_locked()
    finally:
        holder.kill()
        holder.wait()
    assert not IndexLock(tmp_path).is_locked()
    takers = [IndexLock(tmp_path), IndexLock(tmp_path)]
    takers[0].acquire()
    with pytest.raises(StoreError):  # exactly one of two new takers gets it
        takers[1].acquire()
    takers[0].release()


def test_deleted_texts_are_logged_for_the_vector_snapshot(tmp_path):
    """Schema v3: every deleted text's key is logged (cascades from images too), so a writer catches
    its snapshot up by reading the log, not by comparing every key."""
    with Store(tmp_path, create=True) as st:
        st.set_meta("dim", 4)
        with st.transaction():
            a = st.put_image("/a.jpg")
            ka = st.add_texts(a, [NewText(i, "joined", Variant(f"t{i}"), f"t{i}", np.ones(4, np.float32) / 2) for i in range(3)])
            b = st.put_image("/b.jpg")
            kb = st.add_texts(b, [NewText(0, "joined", Variant("u"), "u", np.ones(4, np.float32) / 2)])
        assert st.deletions_after(0)[0] == 0 and st.deletions_after(0)[1].size == 0
        with st.transaction():
            st.conn.execute("DELETE FROM texts WHERE id = ?", (ka[0],))
            st.remove_images([b])
            st.put_image("/a.jpg")  # replaces /a.jpg: its remaining texts cascade away
        last, keys = st.deletions_after(0)
        assert sorted(keys.tolist()) == sorted([*ka, *kb]) and last == 4
        assert st.deletions_after(2)[1].tolist() == keys[2:].tolist()
        st.prune_deletions(3)
        assert st.deletions_after(0)[1].tolist() == keys[3:].tolist()
        keys_in, _, vecs = st.pending_in(0)
        assert keys_in.size == 0 and vecs.shape == (0, 4)


def test_wait_blocks_until_the_holder_releases(tmp_path):
    first = IndexLock(tmp_path)
    first.acquire()
    released = []

    def release_later():
        time.sleep(0.5)
        released.append(time.monotonic())
        first.release()

    threading.Thread(target=release_later).start()
    with IndexLock(tmp_path, wait=True, poll_s=0.05):
        got = time.monotonic()
    assert released and got >= released[0]


def test_opening_a_store_writes_nothing(tmp_path):
    """Readers open the store all the time (serve: one per thread): an open must not write, or every
    other reader sees the store change (PRAGMA data_version) and opens it again, and again."""
    with Store(tmp_path, create=True) as st, st.transaction():
        st.put_image("/x/a.jpg")
    watcher = sqlite3.connect(tmp_path / "store.sqlite", isolation_level=None)
    before = watcher.execute("PRAGMA data_version").fetchone()[0]
    for _ in range(3):
        Store(tmp_path).close()
    assert watcher.execute("PRAGMA data_version").fetchone()[0] == before
    assert watcher.execute("PRAGMA auto_vacuum").fetchone()[0] == 2  # incremental, set when the file was new
    watcher.close()
