"""The index's store of record: one SQLite file (`store.sqlite`) inside the index directory.

It holds every image, every embedded variant text and its vector (float32 blob), the embedder's
identity and the run history. The vector snapshot beside it is a cache of the vectors that can always
be rebuilt from here (see vindex.py, indexdir.py): vectors live in SQLite because re-embedding would need the
embedder at rebuild time and could not be verified, while 1.5 KiB per text is cheap.

Writes happen in explicit transactions, one per batch of images, so a Ctrl-C or SIGKILL leaves
a consistent store and the next `index` run resumes where the last commit stopped.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np

from ..errors import StoreError
from ..records import Feature, Variant

STORE_FILE = "store.sqlite"
LOCK_FILE = "index.lock"


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
# v7's (see DEVICE_MIGRATION): where the descriptions were made.
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

# v7 (issue 22): the llama.cpp backend and device that wrote each description set ("CPU" and "CPU", or
# e.g. "Vulkan" and "Vulkan0 (NVIDIA GeForce RTX 3060)"), so `info` and `verify` tell CPU-made from
# GPU-made descriptions. NULL for imported captions and for sets described before v7. Part of a
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

# MIGRATIONS[i] takes a store from schema version i to i + 1 (version 0 = an empty file): an SQL
# script, or a function of the connection for steps that need Python (e.g. re-encoding blobs).
Migration = str | Callable[[sqlite3.Connection], None]
MIGRATIONS: list[Migration] = [_V1, _V2, _V3, _V4, SCENES_MIGRATION, VARIANT_ORDINAL_MIGRATION, DEVICE_MIGRATION]
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
                if isinstance(step, str):
                    # executescript() commits first, so the transaction opens inside the script.
                    conn.executescript(f"BEGIN IMMEDIATE;\n{step}\n;PRAGMA user_version = {target};")
                else:
                    conn.execute("BEGIN IMMEDIATE")
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


_IMAGE_COLUMNS = "id, path, size, mtime_ns, sha256, width, height, status, error, source, desc_hash"


@dataclass
class ImageRow:
    id: int
    path: str
    size: int | None
    mtime_ns: int | None
    sha256: str
    width: int | None
    height: int | None
    status: str
    error: str | None
    source: str
    desc_hash: str


@dataclass
class VariantRow:
    key: int
    image_id: int
    image: str
    ordinal: int
    field: str
    text: str


@dataclass
class NewText:
    """One text to store for an image: a variant (or one field of it) and its vector."""

    ordinal: int
    field: str  # 'joined', 'one_sentence', 'features' or 'caption'
    variant: Variant
    text: str
    vector: np.ndarray


class StoredText(NamedTuple):
    """One row of `variants` as stored (features as JSON, vector as float32 bytes)."""

    ordinal: int
    field: str
    one_sentence: str
    features: str
    caption: str
    text: str
    vector: bytes


def _features_json(v: Variant) -> str:
    return json.dumps([{"name": f.name, "position": f.position, "size": f.size} for f in v.features])


class Store:
    """An open store. Use as a context manager, or call close()."""

    def __init__(self, index_dir: str | os.PathLike, *, create: bool = False):
        self.dir = Path(index_dir)
        self.path = self.dir / STORE_FILE
        if not self.path.exists():
            if not create:
                raise StoreError(
                    f"no index at {self.dir} ({STORE_FILE} missing): build one with "
                    f"'edge-t2t index PATH --index {self.dir}' or point --index / EDGE_T2T_INDEX at one"
                )
            self.dir.mkdir(parents=True, exist_ok=True)
        # isolation_level=None: we issue BEGIN/COMMIT ourselves, one transaction per batch.
        try:
            self.conn = sqlite3.connect(self.path, isolation_level=None, timeout=30.0)
        except sqlite3.DatabaseError as exc:
            raise StoreError(f"{self.path} is not a readable edge-t2t store ({exc}): delete {self.dir} and re-index") from exc
        try:
            self.conn.execute("PRAGMA journal_mode=WAL")
            self.conn.execute("PRAGMA foreign_keys=ON")
            self.conn.execute("PRAGMA busy_timeout=30000")
            self.conn.execute("PRAGMA synchronous=NORMAL")
            migrate(self.conn)
        except sqlite3.DatabaseError as exc:
            self.conn.close()  # the file opened but is not a store (or a newer one): nothing stays open
            raise StoreError(f"{self.path} is not a readable edge-t2t store ({exc}): delete {self.dir} and re-index") from exc
        except BaseException:
            self.conn.close()
            raise

    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            yield self.conn
            self.conn.execute("COMMIT")
        except BaseException:
            # A Ctrl-C can land inside COMMIT itself; roll back only what is still open, so the
            # original exception (not "no transaction is active") is what propagates.
            if self.conn.in_transaction:
                self.conn.execute("ROLLBACK")
            raise

    # -- meta ---------------------------------------------------------------------------------
    def meta(self) -> dict:
        return {k: json.loads(v) for k, v in self.conn.execute("SELECT key, value FROM meta")}

    def get_meta(self, key: str, default=None):
        row = self.conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return json.loads(row[0]) if row else default

    def set_meta(self, key: str, value) -> None:
        self.conn.execute(
            "INSERT INTO meta(key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
            (key, json.dumps(value)),
        )

    def check_identity(self, identity: dict) -> None:
        """Refuse an embedder other than the one the stored vectors came from."""
        stored = self.get_meta("embedder_identity")
        if stored is None or stored == identity:
            return
        raise StoreError(
            f"{self.path} was built with embedder {_describe(stored)}, but the current one is "
            f"{_describe(identity)}: use the same embedder (--precision / EDGE_T2T_EMBEDDER) or "
            f"re-index into a new --index directory"
        )

    # -- images -------------------------------------------------------------------------------
    def images(self) -> dict[str, ImageRow]:
        """Image files (chips of scenes are left out: their files are the scenes, see scene_rows)."""
        rows = self.conn.execute(
            f"SELECT {_IMAGE_COLUMNS} FROM images "
            "WHERE id NOT IN (SELECT image_id FROM chips)"
        )
        return {r[1]: ImageRow(*r) for r in rows}

    def images_named(self, paths: Iterable[str]) -> dict[str, ImageRow]:
        """The stored images among `paths` (by the unique path index)."""
        paths = list(dict.fromkeys(paths))
        out: dict[str, ImageRow] = {}
        for i in range(0, len(paths), 500):  # stay under SQLite's bound-parameter limit
            chunk = paths[i : i + 500]
            for r in self.conn.execute(
                f"SELECT {_IMAGE_COLUMNS} FROM images "
                f"WHERE path IN ({','.join('?' * len(chunk))})",
                chunk,
            ):
                out[r[1]] = ImageRow(*r)
        return out

    def ok_image_with_sha(self, sha256: str, exclude_ids: Iterable[int] = ()) -> ImageRow | None:
        if not sha256:
            return None
        skip = set(exclude_ids)
        for r in self.conn.execute(
            f"SELECT {_IMAGE_COLUMNS} FROM images "
            "WHERE sha256 = ? AND status = 'ok' ORDER BY id",
            (sha256,),
        ):
            if r[0] not in skip:
                return ImageRow(*r)
        return None

    def _description_id(self, prov: dict | None) -> int | None:
        if not prov:
            return None
        # Model file paths/sha256 are None when unknown (imported captions): NULL, never ''.
        values = (
            prov.get("model", ""), prov.get("mmproj", ""), prov.get("family", ""),
            prov.get("prompt_version", ""), int(bool(prov.get("test_model"))), int(bool(prov.get("constrained", True))),
            *(str(prov[c]) if prov.get(c) else None for c in PROVENANCE_COLUMNS),
        )
        self.conn.execute(
            "INSERT OR IGNORE INTO descriptions(model, mmproj, family, prompt_version, test_model, constrained, "
            f"{', '.join(PROVENANCE_COLUMNS)}) VALUES ({', '.join('?' * len(values))})",
            values,
        )
        # IS, not =: it matches NULL to NULL, as the IFNULL() unique index does.
        return self.conn.execute(
            "SELECT id FROM descriptions WHERE model=? AND mmproj=? AND family=? AND prompt_version=? "
            f"AND test_model=? AND constrained=? AND {' AND '.join(f'{c} IS ?' for c in PROVENANCE_COLUMNS)}",
            values,
        ).fetchone()[0]

    def put_image(
        self, path: str, *, size=None, mtime_ns=None, sha256="", width=None, height=None,
        status="ok", error=None, source="", provenance: dict | None = None, desc_hash: str = "",
        description_id: int | None = None,
    ) -> int:
        """Insert or replace the image at `path` (its old texts go with it); return its id.

        `provenance` names the description set: model, mmproj, family, prompt_version, test_model,
        constrained, and (when a VLM wrote it) the MODEL_FILE_COLUMNS of its GGUF files and the
        DEVICE_COLUMNS of where it ran."""
        self.conn.execute("DELETE FROM images WHERE path = ?", (path,))
        cur = self.conn.execute(
            "INSERT INTO images(path, size, mtime_ns, sha256, width, height, status, error, source, "
            "desc_hash, description_id, indexed_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (path, size, mtime_ns, sha256, width, height, status, error, source, desc_hash,
             description_id if provenance is None else self._description_id(provenance), time.time()),
        )
        return int(cur.lastrowid)

    def remove_path(self, path: str) -> list[int]:
        """Delete the image stored at `path`, if any; return its removed variant keys."""
        row = self.conn.execute("SELECT id FROM images WHERE path = ?", (path,)).fetchone()
        return self.remove_images([row[0]]) if row else []

    def update_image_file(self, image_id: int, *, path: str, size, mtime_ns) -> None:
        """A moved/renamed or touched file whose content (sha256) did not change."""
        self.conn.execute(
            "UPDATE images SET path = ?, size = ?, mtime_ns = ? WHERE id = ?", (path, size, mtime_ns, image_id)
        )

    def remove_images(self, image_ids: Iterable[int]) -> list[int]:
        """Delete images with their texts; return the removed variant keys."""
        keys: list[int] = []
        for image_id in image_ids:
            keys += [r[0] for r in self.conn.execute("SELECT id FROM variants WHERE image_id = ?", (image_id,))]
            self.conn.execute("DELETE FROM images WHERE id = ?", (image_id,))
        return keys

    # -- variants -----------------------------------------------------------------------------
    def add_texts(self, image_id: int, texts: list[NewText]) -> list[int]:
        keys = []
        for t in texts:
            vec = np.ascontiguousarray(t.vector, dtype=np.float32)
            cur = self.conn.execute(
                "INSERT INTO variants(image_id, ordinal, field, one_sentence, features, caption, text, vector) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (image_id, t.ordinal, t.field, t.variant.one_sentence, _features_json(t.variant),
                 t.variant.caption, t.text, vec.tobytes()),
            )
            keys.append(int(cur.lastrowid))
        return keys

    def description_of(self, image_id: int) -> tuple[int | None, str]:
        """(description_id, desc_hash) of an image, to carry over to a copy of it."""
        row = self.conn.execute("SELECT description_id, desc_hash FROM images WHERE id = ?", (image_id,)).fetchone()
        return (row[0], row[1]) if row else (None, "")

    def read_texts(self, image_id: int) -> list[StoredText]:
        """An image's stored text rows, to re-insert under another image (see insert_texts)."""
        return [StoredText(*r) for r in self.conn.execute(
            "SELECT ordinal, field, one_sentence, features, caption, text, vector FROM variants "
            "WHERE image_id = ? ORDER BY id",
            (image_id,),
        )]  # fmt: skip

    def insert_texts(self, image_id: int, rows: list[StoredText]) -> tuple[list[int], np.ndarray]:
        keys = []
        for r in rows:
            cur = self.conn.execute(
                "INSERT INTO variants(image_id, ordinal, field, one_sentence, features, caption, text, vector) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (image_id, *r),
            )
            keys.append(int(cur.lastrowid))
        dim = int(self.get_meta("dim", 0) or 0)
        vecs = np.stack([np.frombuffer(r.vector, dtype=np.float32) for r in rows]) if rows else np.zeros((0, dim), np.float32)
        return keys, vecs

    def copy_texts(self, from_image: int, to_image: int) -> tuple[list[int], np.ndarray]:
        """Reuse another image's descriptions and vectors (same file content elsewhere)."""
        return self.insert_texts(to_image, self.read_texts(from_image))

    def variants_of(self, image_id: int) -> list[Variant]:
        """The distinct variants stored for an image, by ordinal (for reuse and `search --image`)."""
        out: dict[int, Variant] = {}
        for ordinal, one, feats, cap in self.conn.execute(
            "SELECT ordinal, one_sentence, features, caption FROM variants WHERE image_id = ? ORDER BY ordinal, id",
            (image_id,),
        ):
            if ordinal not in out:
                out[ordinal] = Variant(one, tuple(Feature.from_any(f) for f in json.loads(feats)), cap)
        return [out[o] for o in sorted(out)]

    def all_vectors(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(keys int64, image_ids int64, vectors float32 (n, dim)) ordered by key."""
        return self.vectors_in(0)  # keys start at 1 (AUTOINCREMENT)

    def variant_keys(self) -> np.ndarray:
        return np.fromiter((r[0] for r in self.conn.execute("SELECT id FROM variants ORDER BY id")), dtype=np.int64)

    def vectors_in(self, after_key: int, upto_key: int | None = None, limit: int | None = None,
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(keys, image_ids, vectors) of the texts with after_key < key (<= upto_key), by key: a
        range read on the primary key, so it costs what it returns."""
        dim = int(self.get_meta("dim", 0) or 0)
        sql, args = "SELECT id, image_id, vector FROM variants WHERE id > ?", [int(after_key)]
        if upto_key is not None:
            sql, args = sql + " AND id <= ?", [*args, int(upto_key)]
        sql += " ORDER BY id"
        if limit is not None:
            sql, args = sql + " LIMIT ?", [*args, int(limit)]
        rows = self.conn.execute(sql, args).fetchall()
        keys = np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))
        image_ids = np.fromiter((r[1] for r in rows), dtype=np.int64, count=len(rows))
        if rows:
            vecs = np.frombuffer(b"".join(r[2] for r in rows), dtype=np.float32).reshape(len(rows), -1)
        else:
            vecs = np.zeros((0, dim), np.float32)
        return keys, image_ids, vecs

    def iter_vectors(self, after_key: int, upto_key: int | None = None, chunk: int = 65_536):
        """vectors_in() in chunks of `chunk` texts, so a rebuild of a large index stays small."""
        while True:
            keys, image_ids, vecs = self.vectors_in(after_key, upto_key, limit=chunk)
            if not len(keys):
                return
            yield keys, image_ids, vecs
            after_key = int(keys[-1])

    def deletions_after(self, seq: int) -> tuple[int, np.ndarray]:
        """(last seq, keys) of the texts deleted after deletion number `seq`."""
        rows = self.conn.execute("SELECT seq, key FROM variant_deletions WHERE seq > ? ORDER BY seq", (int(seq),)).fetchall()
        last = rows[-1][0] if rows else self.last_deletion()
        return max(int(last), int(seq)), np.fromiter((r[1] for r in rows), dtype=np.int64, count=len(rows))

    def last_deletion(self) -> int:
        return int(self.conn.execute("SELECT IFNULL(MAX(seq), 0) FROM variant_deletions").fetchone()[0])

    def prune_deletions(self, upto_seq: int) -> None:
        """Forget deletions a saved snapshot has applied."""
        with self.transaction():
            self.conn.execute("DELETE FROM variant_deletions WHERE seq <= ?", (int(upto_seq),))

    def store_id(self) -> str:
        """A random id of this store, which its vector snapshot carries: files copied from another
        index are then never taken for this one's."""
        sid = self.get_meta("store_id")
        if not sid:
            import uuid

            sid = uuid.uuid4().hex
            with self.transaction():
                self.set_meta("store_id", sid)
        return str(sid)

    def variant_rows(self, keys: Iterable[int]) -> dict[int, VariantRow]:
        keys = [int(k) for k in keys]
        out: dict[int, VariantRow] = {}
        for i in range(0, len(keys), 500):  # stay under SQLite's bound-parameter limit
            chunk = keys[i : i + 500]
            q = ",".join("?" * len(chunk))
            for r in self.conn.execute(
                "SELECT v.id, v.image_id, i.path, v.ordinal, v.field, v.text FROM variants v "
                f"JOIN images i ON i.id = v.image_id WHERE v.id IN ({q})",
                chunk,
            ):
                out[r[0]] = VariantRow(*r)
        return out

    def image_paths(self) -> dict[int, str]:
        return dict(self.conn.execute("SELECT id, path FROM images"))

    def max_texts_per_image(self) -> int:
        """Texts of the image that has most (sizes search's over-fetch). Kept in meta by the
        indexer (an upper bound: deletions never lower it) so a search does not scan the table."""
        known = self.get_meta("max_texts_per_image")
        if known:
            return int(known)
        row = self.conn.execute("SELECT MAX(c) FROM (SELECT COUNT(*) c FROM variants GROUP BY image_id)").fetchone()
        return int(row[0] or 0)

    def note_texts_per_image(self, n: int) -> None:
        """Raise the recorded maximum texts per image to n (call inside the batch transaction)."""
        if n > int(self.get_meta("max_texts_per_image", 0) or 0):
            self.set_meta("max_texts_per_image", int(n))

    # -- runs and summary ---------------------------------------------------------------------
    def start_run(self, args: dict) -> int:
        cur = self.conn.execute(
            "INSERT INTO runs(started, status, args) VALUES (?, 'running', ?)", (time.time(), json.dumps(args))
        )
        return int(cur.lastrowid)

    def finish_run(self, run_id: int, status: str, counts: dict, stage_seconds: dict) -> None:
        self.conn.execute(
            "UPDATE runs SET finished = ?, status = ?, counts = ?, stage_seconds = ? WHERE id = ?",
            (time.time(), status, json.dumps(counts), json.dumps(stage_seconds), run_id),
        )

    def last_run(self) -> dict | None:
        r = self.conn.execute(
            "SELECT id, started, finished, status, counts, stage_seconds, args FROM runs ORDER BY id DESC LIMIT 1"
        ).fetchone()
        if not r:
            return None
        return {
            "id": r[0], "started": r[1], "finished": r[2], "status": r[3],
            "counts": json.loads(r[4]), "stage_seconds": json.loads(r[5]), "args": json.loads(r[6]),
        }

    def counts(self) -> dict:
        q = self.conn.execute
        return {
            "images_ok": q("SELECT COUNT(*) FROM images WHERE status = 'ok'").fetchone()[0],
            "images_failed": q("SELECT COUNT(*) FROM images WHERE status = 'failed'").fetchone()[0],
            "variants": q("SELECT COUNT(DISTINCT image_id || ':' || ordinal) FROM variants").fetchone()[0],
            "texts": q("SELECT COUNT(*) FROM variants").fetchone()[0],
        }

    def provenance(self) -> list[dict]:
        rows = self.conn.execute(
            "SELECT d.model, d.mmproj, d.family, d.prompt_version, d.test_model, d.constrained, "
            f"{', '.join('d.' + c for c in PROVENANCE_COLUMNS)}, COUNT(i.id) "
            "FROM descriptions d JOIN images i ON i.description_id = d.id GROUP BY d.id ORDER BY d.id"
        )
        keys = ("model", "mmproj", "family", "prompt_version", "test_model", "constrained", *PROVENANCE_COLUMNS, "images")
        return [dict(zip(keys, r, strict=True)) for r in rows]


def _describe(identity: dict) -> str:
    sha = str(identity.get("weights_sha256", ""))[:12]
    return f"{identity.get('name', '?')} (dim {identity.get('dim', '?')}, weights {sha}, {identity.get('pooling', '?')} pooling)"


# -- lock ---------------------------------------------------------------------------------------
def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


class IndexLock:
    """`index.lock`: an exclusive `fcntl.flock` on a descriptor held for the whole run, with the
    holder's pid written inside for messages. The kernel drops the lock when its holder dies,
    however it dies, so there is no stale lock to take over and no race between two processes
    that both saw the same dead pid. The file is unlinked on release; a process that locked a file
    just unlinked (by the previous holder) notices that the path no longer names its inode and
    locks again."""

    def __init__(self, index_dir: str | os.PathLike, *, wait: bool = False, poll_s: float = 0.5):
        self.path = Path(index_dir) / LOCK_FILE
        self.wait = wait
        self.poll_s = poll_s
        self.fd: int | None = None

    @property
    def held(self) -> bool:
        return self.fd is not None

    def holder(self) -> int:
        """The pid written in the lock file (0 when unknown)."""
        try:
            return int(self.path.read_text().strip() or 0)
        except (OSError, ValueError):
            return 0

    def acquire(self) -> None:
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_CREAT | os.O_RDWR, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                if not self.wait:
                    pid = self.holder()
                    raise StoreError(
                        f"{self.path.parent} is being indexed by process {pid or '?'} ({self.path}): wait for it, "
                        f"or pass --wait"
                    ) from None
                time.sleep(self.poll_s)
                continue
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if not same:  # the previous holder unlinked it between our open and our lock
                os.close(fd)
                continue
            os.ftruncate(fd, 0)
            os.write(fd, str(os.getpid()).encode())
            self.fd = fd
            return

    def is_locked(self) -> bool:
        """Whether some process holds the lock now (probed with a shared lock, released at once)."""
        import fcntl

        try:
            fd = os.open(self.path, os.O_RDONLY)
        except OSError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)
        return False

    def release(self) -> None:
        if self.fd is not None:
            self.path.unlink(missing_ok=True)  # while still locked: no one can hold this inode yet
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> IndexLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
