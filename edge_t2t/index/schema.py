"""The store's schema: each version's SQL (or Python) step and `migrate`, which brings a store
file up to the current version, one transaction per step. store.py opens the file and runs it.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from ..errors import StoreError

_V1 = """
        CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
        CREATE TABLE descriptions (
            id INTEGER PRIMARY KEY,
            model TEXT NOT NULL, mmproj TEXT NOT NULL, family TEXT NOT NULL,
            prompt_version TEXT NOT NULL, test_model INTEGER NOT NULL, constrained INTEGER NOT NULL,
            UNIQUE (model, mmproj, family, prompt_version, test_model, constrained)
        );
        CREATE TABLE images (
            id INTEGER PRIMARY KEY,
            path TEXT NOT NULL UNIQUE,
            size INTEGER, mtime_ns INTEGER, sha256 TEXT NOT NULL DEFAULT '',
            width INTEGER, height INTEGER,
            status TEXT NOT NULL CHECK (status IN ('ok', 'failed')),
            error TEXT,
            source TEXT NOT NULL DEFAULT '',  -- 'vlm' or 'captions'
            desc_hash TEXT NOT NULL DEFAULT '',  -- of the imported descriptions: re-import only on change
            description_id INTEGER REFERENCES descriptions(id),
            indexed_at REAL NOT NULL
        );
        CREATE INDEX images_sha256 ON images(sha256);
        -- One row per embedded text; its id is the usearch key. AUTOINCREMENT so a deleted key is
        -- never reused (a stale usearch file can then never map a key to the wrong text).
        CREATE TABLE variants (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            image_id INTEGER NOT NULL REFERENCES images(id) ON DELETE CASCADE,
            ordinal INTEGER NOT NULL,
            field TEXT NOT NULL,
            one_sentence TEXT NOT NULL, features TEXT NOT NULL, caption TEXT NOT NULL,
            text TEXT NOT NULL,
            vector BLOB NOT NULL
        );
        CREATE INDEX variants_image ON variants(image_id);
        CREATE TABLE runs (
            id INTEGER PRIMARY KEY,
            started REAL NOT NULL, finished REAL,
            status TEXT NOT NULL,
            counts TEXT NOT NULL DEFAULT '{}',
            stage_seconds TEXT NOT NULL DEFAULT '{}',
            args TEXT NOT NULL DEFAULT '{}'
        );
"""


# v2: where the VLM files that wrote each description set lived and their sha256, so `verify` can
# tell when a model file changed under the index. NULL for imported captions (no model file).
# The files are part of a description set's identity (a model replaced under the same name is
# another set), and SQLite cannot change a table's UNIQUE constraint in place, so the table is
# rebuilt as SQLite documents it (create, copy, drop, rename; migrate() turns foreign keys off
# around it). The new uniqueness is an expression index: a plain UNIQUE treats NULLs as distinct,
# so every imported batch would get a row of its own.
_V2 = """
        CREATE TABLE descriptions_v2 (
            id INTEGER PRIMARY KEY,
            model TEXT NOT NULL, mmproj TEXT NOT NULL, family TEXT NOT NULL,
            prompt_version TEXT NOT NULL, test_model INTEGER NOT NULL, constrained INTEGER NOT NULL,
            model_path TEXT, model_sha256 TEXT, mmproj_path TEXT, mmproj_sha256 TEXT
        );
        INSERT INTO descriptions_v2 (id, model, mmproj, family, prompt_version, test_model, constrained)
            SELECT id, model, mmproj, family, prompt_version, test_model, constrained FROM descriptions;
        DROP TABLE descriptions;
        ALTER TABLE descriptions_v2 RENAME TO descriptions;
        CREATE UNIQUE INDEX descriptions_identity ON descriptions (
            model, mmproj, family, prompt_version, test_model, constrained,
            IFNULL(model_path, ''), IFNULL(model_sha256, ''), IFNULL(mmproj_path, ''), IFNULL(mmproj_sha256, '')
        );
"""

# The provenance columns that v2 added (see _V2), in the order put_image/provenance use them.
MODEL_FILE_COLUMNS = ("model_path", "model_sha256", "mmproj_path", "mmproj_sha256")
# v8's (see DEVICE_MIGRATION): where the descriptions were made.
DEVICE_COLUMNS = ("backend", "device")
PROVENANCE_COLUMNS = MODEL_FILE_COLUMNS + DEVICE_COLUMNS

# v3: the keys of deleted texts, in order, so an `index` run brings the vector snapshot up to date
# by reading what changed since its last save (seq > the manifest's deletions_seen) instead of
# comparing every key. The trigger also fires for rows that ON DELETE CASCADE removes. The writer
# prunes rows its saved snapshot has applied.
_V3 = """
        CREATE TABLE variant_deletions (seq INTEGER PRIMARY KEY AUTOINCREMENT, key INTEGER NOT NULL);
        CREATE TRIGGER variants_deleted AFTER DELETE ON variants
            BEGIN INSERT INTO variant_deletions(key) VALUES (old.id); END;
"""

# v4: full-text search (FTS5, BM25) over the embedded texts, for `search --mode lexical|hybrid`
# (edge_t2t/query/lexical.py). An external-content table reads its text from `variants`, so no text is
# stored twice; triggers keep its index in step inside the same transactions as the variant rows
# (a cascade from `images` fires them too). 'rebuild' fills it for a store migrated from an older version.
# porter stemming: "tank" finds "tanks", "building" finds "buildings".
_V4 = """
        CREATE VIRTUAL TABLE variants_fts USING fts5(
            text, content='variants', content_rowid='id', tokenize='porter unicode61'
        );
        INSERT INTO variants_fts(variants_fts) VALUES ('rebuild');
        CREATE TRIGGER variants_fts_insert AFTER INSERT ON variants BEGIN
            INSERT INTO variants_fts(rowid, text) VALUES (new.id, new.text);
        END;
        CREATE TRIGGER variants_fts_delete AFTER DELETE ON variants BEGIN
            INSERT INTO variants_fts(variants_fts, rowid, text) VALUES ('delete', old.id, old.text);
        END;
        CREATE TRIGGER variants_fts_update AFTER UPDATE OF text ON variants BEGIN
            INSERT INTO variants_fts(variants_fts, rowid, text) VALUES ('delete', old.id, old.text);
            INSERT INTO variants_fts(rowid, text) VALUES (new.id, new.text);
        END;
"""

# v5, scenes (issue 13): a large image is cut into chips; each chip is an `images` row named
# SCENE#x,y,w,h (so ranking, JSON and caching treat it as an image) and a `chips` row saying where
# it is: its scene, pixel window, no-data share, bounds in the scene's CRS and its WGS84 outline.
# chips_rtree indexes the outlines' lon/lat boxes for `search --within/--near`. The scene file
# itself is a `scenes` row (the facts `index` needs to skip an unchanged scene).
SCENES_MIGRATION = """
        CREATE TABLE scenes (
            id INTEGER PRIMARY KEY,
            path TEXT NOT NULL UNIQUE,
            size INTEGER, mtime_ns INTEGER, sha256 TEXT NOT NULL DEFAULT '',
            width INTEGER NOT NULL, height INTEGER NOT NULL,
            crs TEXT,                       -- WKT; NULL: pixel windows only
            transform TEXT,                 -- JSON [a, b, c, d, e, f]; NULL without georeferencing
            chip INTEGER NOT NULL, overlap REAL NOT NULL,
            stretch TEXT NOT NULL DEFAULT '{}',
            chips_total INTEGER NOT NULL DEFAULT 0, chips_skipped INTEGER NOT NULL DEFAULT 0,
            notes TEXT NOT NULL DEFAULT '[]',
            status TEXT NOT NULL DEFAULT 'partial',  -- 'ok' once every chip is described
            indexed_at REAL NOT NULL
        );
        CREATE TABLE chips (
            image_id INTEGER PRIMARY KEY REFERENCES images(id) ON DELETE CASCADE,
            scene_id INTEGER NOT NULL REFERENCES scenes(id) ON DELETE CASCADE,
            x INTEGER NOT NULL, y INTEGER NOT NULL, w INTEGER NOT NULL, h INTEGER NOT NULL,
            nodata REAL NOT NULL DEFAULT 0,
            minx REAL, miny REAL, maxx REAL, maxy REAL,
            outline TEXT                    -- JSON closed ring of [lon, lat]; NULL without a CRS
        );
        CREATE INDEX chips_scene ON chips(scene_id);
        CREATE VIRTUAL TABLE chips_rtree USING rtree(image_id, min_lon, max_lon, min_lat, max_lat);
"""

# v6 (issue 14): an index on (image_id, ordinal), so the structure score of a search's candidate
# images reads one row per variant (retrieval.features_by_image: the features repeat on each of a
# variant's texts, 11 rows a variant in `sentences` mode) instead of every text row of the image.
VARIANT_ORDINAL_MIGRATION = """
        CREATE INDEX variants_image_ordinal ON variants(image_id, ordinal);
"""

# v7 (issue 25), the lean layout: each thing stored once. Up to v6 each embedded text was a row of
# `variants` carrying its variant's three fields (about 760 bytes, repeated on each of a variant's
# ~11 texts in `sentences` mode) and its float32 vector (1,536 bytes), which the snapshot held twice
# more. Now `variants` has one row per variant, `texts` one row per embedded text (the text and its
# variant; ids and the AUTOINCREMENT sequence carried over, so every vector key stays valid), and a
# text's vector stays in `pending_vectors` only until a saved snapshot holds it. The full-text
# index and the deletion log move to `texts` (external content must name the table the text
# lives in). The vectors the current snapshot already holds (same key, image and vector) are
# dropped; the others become pending, so nothing is lost whatever state the snapshot is in.
# Space is then given back by a VACUUM (Store._give_space_back; see there for why VACUUM).
LEAN_TABLES = [
    "DROP TABLE IF EXISTS variants_fts",
    "DROP TRIGGER IF EXISTS variants_fts_insert",
    "DROP TRIGGER IF EXISTS variants_fts_delete",
    "DROP TRIGGER IF EXISTS variants_fts_update",
    "DROP TRIGGER IF EXISTS variants_deleted",
    "ALTER TABLE variants RENAME TO variants_v6",
    """CREATE TABLE variants (
        id INTEGER PRIMARY KEY,
        image_id INTEGER NOT NULL REFERENCES images(id) ON DELETE CASCADE,
        ordinal INTEGER NOT NULL,
        one_sentence TEXT NOT NULL, features TEXT NOT NULL, caption TEXT NOT NULL,
        UNIQUE (image_id, ordinal)
    )""",
    # One row per embedded text; its id is the vector key. AUTOINCREMENT so a deleted key is never
    # reused (a stale snapshot can then never map a key to the wrong text).
    """CREATE TABLE texts (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        variant_id INTEGER NOT NULL REFERENCES variants(id) ON DELETE CASCADE,
        field TEXT NOT NULL,
        text TEXT NOT NULL
    )""",
    "CREATE INDEX texts_variant ON texts(variant_id)",
    """CREATE TABLE pending_vectors (
        key INTEGER PRIMARY KEY REFERENCES texts(id) ON DELETE CASCADE,
        vector BLOB NOT NULL
    )""",
    # Every row of a variant repeated its fields: the first row's are the variant's.
    """INSERT INTO variants(image_id, ordinal, one_sentence, features, caption)
        SELECT image_id, ordinal, one_sentence, features, caption FROM variants_v6
        WHERE id IN (SELECT MIN(id) FROM variants_v6 GROUP BY image_id, ordinal) ORDER BY image_id, ordinal""",
    """INSERT INTO texts(id, variant_id, field, text)
        SELECT o.id, n.id, o.field, o.text FROM variants_v6 o
        JOIN variants n ON n.image_id = o.image_id AND n.ordinal = o.ordinal ORDER BY o.id""",
    # Keys deleted above the largest kept one were used too: the sequence carries on from theirs.
    """UPDATE sqlite_sequence SET seq = MAX(seq, IFNULL((SELECT seq FROM sqlite_sequence WHERE name = 'variants_v6'), 0))
        WHERE name = 'texts'""",
    """INSERT INTO sqlite_sequence(name, seq) SELECT 'texts', seq FROM sqlite_sequence
        WHERE name = 'variants_v6' AND NOT EXISTS (SELECT 1 FROM sqlite_sequence WHERE name = 'texts')""",
]
LEAN_AFTER_VECTORS = [
    "DROP TABLE variants_v6",
    "DELETE FROM sqlite_sequence WHERE name = 'variants_v6'",
    """CREATE TRIGGER texts_deleted AFTER DELETE ON texts
        BEGIN INSERT INTO variant_deletions(key) VALUES (old.id); END""",
    """CREATE VIRTUAL TABLE texts_fts USING fts5(
        text, content='texts', content_rowid='id', tokenize='porter unicode61'
    )""",
    "INSERT INTO texts_fts(texts_fts) VALUES ('rebuild')",
    """CREATE TRIGGER texts_fts_insert AFTER INSERT ON texts BEGIN
        INSERT INTO texts_fts(rowid, text) VALUES (new.id, new.text);
    END""",
    """CREATE TRIGGER texts_fts_delete AFTER DELETE ON texts BEGIN
        INSERT INTO texts_fts(texts_fts, rowid, text) VALUES ('delete', old.id, old.text);
    END""",
    """CREATE TRIGGER texts_fts_update AFTER UPDATE OF text ON texts BEGIN
        INSERT INTO texts_fts(texts_fts, rowid, text) VALUES ('delete', old.id, old.text);
        INSERT INTO texts_fts(rowid, text) VALUES (new.id, new.text);
    END""",
]
_MIGRATION_CHUNK = 65_536  # vectors compared with the snapshot per step of the v7 migration


def lean_layout(conn: sqlite3.Connection) -> None:
    """Schema v6 -> v7 (see LEAN_TABLES). Runs inside migrate()'s transaction."""
    from . import vindex

    index_dir = Path(conn.execute("PRAGMA database_list").fetchone()[2]).parent
    meta = {k: json.loads(v) for k, v in conn.execute("SELECT key, value FROM meta")}
    bytes_before = dir_bytes(index_dir)
    for sql in LEAN_TABLES:
        conn.execute(sql)
    snap = None
    if meta.get("dim"):
        try:
            snap = vindex.Snapshot.open_matching(index_dir, int(meta["dim"]), str(meta.get("dtype", "i8")),
                                                 str(meta.get("store_id") or ""), int(meta.get("vector_generation") or 0))
        except vindex.SNAPSHOT_READ_ERRORS:
            snap = None  # unreadable: every vector stays, as pending
    after = 0
    while True:
        rows = conn.execute("SELECT id, image_id, vector FROM variants_v6 WHERE id > ? ORDER BY id LIMIT ?",
                            (after, _MIGRATION_CHUNK)).fetchall()
        if not rows:
            break
        after = rows[-1][0]
        held = np.zeros(len(rows), bool)
        if snap is not None:
            keys = np.fromiter((r[0] for r in rows), np.int64, len(rows))
            image_ids = np.fromiter((r[1] for r in rows), np.int64, len(rows))
            whole = [len(r[2]) == 4 * snap.dim for r in rows]
            if all(whole):
                vecs = np.frombuffer(b"".join(r[2] for r in rows), np.float32).reshape(len(rows), snap.dim)
                held = snap.holds(keys, image_ids, vecs)
        conn.executemany("INSERT INTO pending_vectors(key, vector) VALUES (?, ?)",
                         ((r[0], r[2]) for r, h in zip(rows, held, strict=True) if not h))
    for sql in LEAN_AFTER_VECTORS:
        conn.execute(sql)
    images = conn.execute("SELECT COUNT(*) FROM images WHERE status = 'ok'").fetchone()[0]
    if not images and not after:
        return  # a new store (or one without texts): nothing to report, nothing to give back
    upgrade = {"schema": 7, "at": time.time(), "images": images, "bytes_before": bytes_before,
               "vectors_kept_pending": conn.execute("SELECT COUNT(*) FROM pending_vectors").fetchone()[0]}
    conn.execute("INSERT INTO meta(key, value) VALUES ('upgrade', ?) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                 (json.dumps(upgrade),))
    conn.execute(f"INSERT OR REPLACE INTO meta(key, value) VALUES ('{VACUUM_PENDING}', 'true')")


def dir_bytes(index_dir: Path) -> int:
    """Bytes of the files of an index directory (what `info` divides by the images), without the
    -shm file: SQLite's shared-memory index exists only while a process has the store open."""
    return sum(p.stat().st_size for p in Path(index_dir).iterdir() if p.is_file() and not p.name.endswith("-shm"))


# v8 (issue 22): the llama.cpp backend and device that wrote each description set ("CPU" and "CPU", or
# e.g. "Vulkan" and "Vulkan0 (NVIDIA GeForce RTX 3060)"), so `info` and `verify` tell CPU-made from
# GPU-made descriptions. NULL for imported captions and for sets described before v8. Part of a
# set's identity: the same model on another device is another set (the caption cache still shares
# the descriptions: its key has no device).
DEVICE_MIGRATION = """
        ALTER TABLE descriptions ADD COLUMN backend TEXT;
        ALTER TABLE descriptions ADD COLUMN device TEXT;
        DROP INDEX descriptions_identity;
        CREATE UNIQUE INDEX descriptions_identity ON descriptions (
            model, mmproj, family, prompt_version, test_model, constrained,
            IFNULL(model_path, ''), IFNULL(model_sha256, ''), IFNULL(mmproj_path, ''), IFNULL(mmproj_sha256, ''),
            IFNULL(backend, ''), IFNULL(device, '')
        );
"""

# Set by a migration that frees much of the file; cleared once VACUUM has given the space back.
VACUUM_PENDING = "vacuum_pending"

# MIGRATIONS[i] takes a store from schema version i to i + 1 (version 0 = an empty file): an SQL
# script, or a function of the connection for steps that need Python (e.g. re-encoding blobs).
Migration = str | Callable[[sqlite3.Connection], None]
MIGRATIONS: list[Migration] = [_V1, _V2, _V3, _V4, SCENES_MIGRATION, VARIANT_ORDINAL_MIGRATION, lean_layout,
                               DEVICE_MIGRATION]
SCHEMA_VERSION = len(MIGRATIONS)


def migrate(conn: sqlite3.Connection, migrations: list[Migration] = MIGRATIONS) -> int:
    """Bring the schema up to len(migrations), one transaction per step; return the new version."""
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    if version > len(migrations):
        raise StoreError(
            f"the store was written by a newer edge-t2t (schema v{version}, this one knows "
            f"v{len(migrations)}): upgrade edge-t2t or index into another --index directory"
        )
    if version == len(migrations):
        return version
    # A step may rebuild a table that others reference (the only way to change a constraint):
    # SQLite's documented procedure runs it with foreign keys off, then checks them before the
    # commit. The pragma is a no-op inside a transaction, hence here, around all the steps.
    fk_was_on = conn.execute("PRAGMA foreign_keys").fetchone()[0]
    conn.execute("PRAGMA foreign_keys=OFF")
    try:
        for target in range(version + 1, len(migrations) + 1):
            step = migrations[target - 1]
            try:
                conn.execute("BEGIN IMMEDIATE")
                # Another process may have migrated while this one waited for the write lock.
                if conn.execute("PRAGMA user_version").fetchone()[0] >= target:
                    conn.execute("ROLLBACK")
                    continue
                if isinstance(step, str):
                    for sql in _statements(step):
                        conn.execute(sql)
                else:
                    step(conn)
                conn.execute(f"PRAGMA user_version = {target}")
                broken = conn.execute("PRAGMA foreign_key_check").fetchall()
                if broken:
                    raise StoreError(
                        f"schema step v{target} would leave {len(broken)} dangling reference(s) "
                        f"(first: table {broken[0][0]} row {broken[0][1]}); the store is unchanged: "
                        "report this, or re-index into a new --index directory"
                    )
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
    finally:
        if fk_was_on:
            conn.execute("PRAGMA foreign_keys=ON")
    return len(migrations)


def _statements(script: str) -> Iterator[str]:
    """The statements of an SQL script, one at a time (executescript() would commit the open
    transaction first); sqlite3.complete_statement knows a trigger's body from its end."""
    pending = ""
    for piece in script.split(";"):
        pending += piece + ";"
        if sqlite3.complete_statement(pending):
            if pending.strip(" \n;"):
                yield pending
            pending = ""
