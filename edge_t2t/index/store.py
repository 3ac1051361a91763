"""The index's store of record: one SQLite file (`store.sqlite`) inside the index directory.

It holds every image, each description variant once (`variants`: summary, features, caption),
each embedded text once (`texts`: a short text and the variant it came from; its id is the vector
key), the embedder's identity and the run history. Vectors are not kept here at rest: each lives
once, in the vector snapshot beside the store (vindex.py), in the precision the index searches
with. Texts committed since the snapshot's last save keep their float32 vector in
`pending_vectors`, written in the same transaction as the text, until a saved snapshot holds it
(indexdir.py prunes them then), so a kill never loses a vector and a search sees every committed
text. If the snapshot is lost, `verify --repair` re-embeds the stored texts with the recorded
embedder (verify.py).

Writes happen in explicit transactions, one per batch of images, so a Ctrl-C or SIGKILL leaves
a consistent store and the next `index` run resumes where the last commit stopped.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np

from ..errors import StoreError
from ..records import Feature, Variant
from .schema import PROVENANCE_COLUMNS, VACUUM_PENDING, dir_bytes, migrate

STORE_FILE = "store.sqlite"
# Free pages (pruned pending vectors) are given back to the file system past this share of the file.
GIVE_BACK_FRACTION = 0.05


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
    """One stored text with its variant's fields as stored (features as JSON), to copy under
    another image (insert_texts); `key` is its vector key."""

    key: int
    ordinal: int
    field: str
    one_sentence: str
    features: str
    caption: str
    text: str


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
            # Incremental auto-vacuum: the pages of pruned pending vectors go back to the file
            # system (prune_pending). Set on a new file only (an old one gets it with the VACUUM of
            # _give_space_back): the pragma writes a page each time it runs, so a reader opening the
            # store would change it for every other reader.
            if not self.conn.execute("SELECT 1 FROM sqlite_master LIMIT 1").fetchone():
                self.conn.execute("PRAGMA auto_vacuum=INCREMENTAL")
            self.conn.execute("PRAGMA journal_mode=WAL")
            self.conn.execute("PRAGMA foreign_keys=ON")
            self.conn.execute("PRAGMA busy_timeout=30000")
            self.conn.execute("PRAGMA synchronous=NORMAL")
            migrate(self.conn)
            if self.get_meta(VACUUM_PENDING):
                self._give_space_back()
        except sqlite3.DatabaseError as exc:
            self.conn.close()  # the file opened but is not a store (or a newer one): nothing stays open
            raise StoreError(f"{self.path} is not a readable edge-t2t store ({exc}): delete {self.dir} and re-index") from exc
        except BaseException:
            self.conn.close()
            raise

    def close(self) -> None:
        self.conn.close()

    def _give_space_back(self) -> None:
        """VACUUM after a migration that freed most of the file (v7). VACUUM rather than a rebuild
        into a new file swapped in with os.replace: it is one SQLite transaction, so a kill leaves
        the migrated file whole (the marker, cleared only afterwards, makes the next open run it
        again), and processes that have the store open keep working, where a file replaced under
        them (its -wal and -shm belong to the old one) would not. Either way needs free space for
        a copy of the new, small store. Also turns on incremental auto-vacuum (see __init__)."""
        self.conn.execute("PRAGMA auto_vacuum=INCREMENTAL")  # an old file's mode changes with the VACUUM
        self.conn.execute("VACUUM")
        self.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        upgrade = self.get_meta("upgrade") or {}
        with self.transaction():
            self.conn.execute("DELETE FROM meta WHERE key = ?", (VACUUM_PENDING,))
            if upgrade:
                self.set_meta("upgrade", {**upgrade, "bytes_after": dir_bytes(self.dir)})

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

    def _each_in(self, sql: str, values: Iterable) -> Iterator[tuple]:
        """The rows of `sql` (its `{q}` a list of ? placeholders) for `values`, 500 at a time to stay
        under SQLite's bound-parameter limit."""
        values = list(values)
        for i in range(0, len(values), 500):
            chunk = values[i : i + 500]
            yield from self.conn.execute(sql.format(q=",".join("?" * len(chunk))), chunk)

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
        return {r[1]: ImageRow(*r) for r in self._each_in(
            f"SELECT {_IMAGE_COLUMNS} FROM images WHERE path IN ({{q}})", dict.fromkeys(paths))}

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
        """Delete images with their variants and texts; return the removed text keys."""
        keys: list[int] = []
        for image_id in image_ids:
            keys += [r[0] for r in self.conn.execute(
                "SELECT t.id FROM texts t JOIN variants v ON v.id = t.variant_id WHERE v.image_id = ?", (image_id,))]
            self.conn.execute("DELETE FROM images WHERE id = ?", (image_id,))
        return keys

    # -- variants and texts -------------------------------------------------------------------
    def _insert(self, image_id: int, rows: Iterable[tuple[int, str, str, str, str, str]], vectors: np.ndarray) -> list[int]:
        """(ordinal, field, one_sentence, features JSON, caption, text) rows of one image with their
        vectors: each variant once, each text once, each vector pending until a snapshot holds it."""
        variant_ids: dict[int, int] = {}
        keys = []
        for (ordinal, field, one, feats, cap, text), vec in zip(rows, vectors, strict=True):
            if ordinal not in variant_ids:
                variant_ids[ordinal] = int(self.conn.execute(
                    "INSERT INTO variants(image_id, ordinal, one_sentence, features, caption) VALUES (?, ?, ?, ?, ?)",
                    (image_id, ordinal, one, feats, cap)).lastrowid)
            key = int(self.conn.execute("INSERT INTO texts(variant_id, field, text) VALUES (?, ?, ?)",
                                        (variant_ids[ordinal], field, text)).lastrowid)
            self.conn.execute("INSERT INTO pending_vectors(key, vector) VALUES (?, ?)",
                              (key, np.ascontiguousarray(vec, dtype=np.float32).tobytes()))
            keys.append(key)
        return keys

    def add_texts(self, image_id: int, texts: list[NewText]) -> list[int]:
        rows = [(t.ordinal, t.field, t.variant.one_sentence, _features_json(t.variant), t.variant.caption, t.text)
                for t in texts]
        return self._insert(image_id, rows, [t.vector for t in texts])

    def description_of(self, image_id: int) -> tuple[int | None, str]:
        """(description_id, desc_hash) of an image, to carry over to a copy of it."""
        row = self.conn.execute("SELECT description_id, desc_hash FROM images WHERE id = ?", (image_id,)).fetchone()
        return (row[0], row[1]) if row else (None, "")

    def read_texts(self, image_id: int) -> list[StoredText]:
        """An image's stored texts, to re-insert under another image (see insert_texts)."""
        return [StoredText(*r) for r in self.conn.execute(
            "SELECT t.id, v.ordinal, t.field, v.one_sentence, v.features, v.caption, t.text "
            "FROM texts t JOIN variants v ON v.id = t.variant_id WHERE v.image_id = ? ORDER BY t.id",
            (image_id,),
        )]  # fmt: skip

    def insert_texts(self, image_id: int, rows: list[StoredText], vectors: np.ndarray) -> list[int]:
        """Another image's texts (read_texts) and their vectors under `image_id`: new keys."""
        return self._insert(image_id, (r[1:] for r in rows), vectors)

    def variants_of(self, image_id: int) -> list[Variant]:
        """The variants stored for an image, by ordinal (for reuse and `search --image`)."""
        return [Variant(one, tuple(Feature.from_any(f) for f in json.loads(feats)), cap) for one, feats, cap in
                self.conn.execute("SELECT one_sentence, features, caption FROM variants WHERE image_id = ? "
                                  "ORDER BY ordinal", (image_id,))]  # fmt: skip

    def features_of(self, image_ids: list[int]) -> Iterator[tuple[int, int, str]]:
        """(image id, ordinal, features JSON) of each variant of the given images, by image and
        ordinal: one row per variant (the structure score's input)."""
        yield from self._each_in("SELECT image_id, ordinal, features FROM variants WHERE image_id IN ({q}) "
                                 "ORDER BY image_id, ordinal", image_ids)

    def text_keys_of(self, image_ids: list[int]) -> tuple[np.ndarray, np.ndarray]:
        """(keys, image ids) of every text of the given images."""
        rows = sorted(self._each_in("SELECT t.id, v.image_id FROM texts t JOIN variants v ON v.id = t.variant_id "
                                    "WHERE v.image_id IN ({q})", image_ids))
        return (np.fromiter((r[0] for r in rows), np.int64, len(rows)),
                np.fromiter((r[1] for r in rows), np.int64, len(rows)))

    def texts_by_key(self) -> dict[int, str]:
        return dict(self.conn.execute("SELECT id, text FROM texts"))

    def iter_texts(self, after_key: int = 0, chunk: int = 4096) -> Iterator[tuple[np.ndarray, np.ndarray, list[str]]]:
        """(keys, image ids, texts) of every text past `after_key`, by key, `chunk` at a time (what
        a rebuild re-embeds)."""
        while True:
            rows = self.conn.execute(
                "SELECT t.id, v.image_id, t.text FROM texts t JOIN variants v ON v.id = t.variant_id "
                "WHERE t.id > ? ORDER BY t.id LIMIT ?", (int(after_key), int(chunk))).fetchall()
            if not rows:
                return
            yield (np.fromiter((r[0] for r in rows), np.int64, len(rows)),
                   np.fromiter((r[1] for r in rows), np.int64, len(rows)), [r[2] for r in rows])
            after_key = rows[-1][0]

    def text_count(self, after_key: int = 0) -> int:
        return int(self.conn.execute("SELECT COUNT(*) FROM texts WHERE id > ?", (int(after_key),)).fetchone()[0])

    def variant_keys(self) -> np.ndarray:
        return np.fromiter((r[0] for r in self.conn.execute("SELECT id FROM texts ORDER BY id")), dtype=np.int64)

    def last_key(self) -> int:
        """The largest text key ever handed out (deleted ones included)."""
        row = self.conn.execute("SELECT seq FROM sqlite_sequence WHERE name = 'texts'").fetchone()
        return int(row[0]) if row else 0

    # -- pending vectors ----------------------------------------------------------------------
    def pending_in(self, after_key: int, upto_key: int | None = None, limit: int | None = None,
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(keys, image_ids, float32 vectors) of the pending vectors with after_key < key (<=
        upto_key), by key: a range read on the primary key, so it costs what it returns."""
        dim = int(self.get_meta("dim", 0) or 0)
        sql = ("SELECT p.key, v.image_id, p.vector FROM pending_vectors p JOIN texts t ON t.id = p.key "
               "JOIN variants v ON v.id = t.variant_id WHERE p.key > ?")
        args = [int(after_key)]
        if upto_key is not None:
            sql, args = sql + " AND p.key <= ?", [*args, int(upto_key)]
        sql += " ORDER BY p.key"
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

    def iter_pending(self, after_key: int, upto_key: int | None = None, chunk: int = 65_536):
        """pending_in() in chunks of `chunk` texts, so a rebuild of a large index stays small."""
        while True:
            keys, image_ids, vecs = self.pending_in(after_key, upto_key, limit=chunk)
            if not len(keys):
                return
            yield keys, image_ids, vecs
            after_key = int(keys[-1])

    def pending_vectors(self, keys: np.ndarray) -> dict[int, np.ndarray]:
        """The pending vectors among `keys`."""
        return {key: np.frombuffer(blob, dtype=np.float32) for key, blob in
                self._each_in("SELECT key, vector FROM pending_vectors WHERE key IN ({q})", (int(k) for k in keys))}

    def pending_keys(self, upto_key: int) -> np.ndarray:
        return np.fromiter((r[0] for r in self.conn.execute(
            "SELECT key FROM pending_vectors WHERE key <= ? ORDER BY key", (int(upto_key),))), np.int64)

    def prune_pending(self, upto_key: int, keep: Iterable[int] = ()) -> None:
        """Forget the pending vectors a saved snapshot holds (keys <= upto_key, but `keep`). Their
        pages are reused by the next texts; once free pages pass GIVE_BACK_FRACTION of the file they
        go back to the file system (incremental auto-vacuum), which moves pages, so not every time:
        a small add to a large index leaves a few free pages rather than paying for the move."""
        keep = {int(k) for k in keep}
        with self.transaction():
            if not keep:
                gone = self.conn.execute("DELETE FROM pending_vectors WHERE key <= ?", (int(upto_key),)).rowcount
            else:
                drop = [int(k) for k in self.pending_keys(upto_key) if int(k) not in keep]
                for _ in self._each_in("DELETE FROM pending_vectors WHERE key IN ({q})", drop):
                    pass
                gone = len(drop)
        if gone:
            free = self.conn.execute("PRAGMA freelist_count").fetchone()[0]
            if free > GIVE_BACK_FRACTION * self.conn.execute("PRAGMA page_count").fetchone()[0]:
                # executescript() runs it to the end; a cursor stops after its first step (one page)
                self.conn.executescript("PRAGMA incremental_vacuum;")

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
        return {r[0]: VariantRow(*r) for r in self._each_in(
            "SELECT t.id, v.image_id, i.path, v.ordinal, t.field, t.text FROM texts t "
            "JOIN variants v ON v.id = t.variant_id JOIN images i ON i.id = v.image_id WHERE t.id IN ({q})",
            (int(k) for k in keys))}

    def image_paths(self) -> dict[int, str]:
        return dict(self.conn.execute("SELECT id, path FROM images"))

    def max_texts_per_image(self) -> int:
        """Texts of the image that has most (sizes search's over-fetch). Kept in meta by the
        indexer (an upper bound: deletions never lower it) so a search does not scan the table."""
        known = self.get_meta("max_texts_per_image")
        if known:
            return int(known)
        row = self.conn.execute("SELECT MAX(c) FROM (SELECT COUNT(*) c FROM texts t JOIN variants v "
                                "ON v.id = t.variant_id GROUP BY v.image_id)").fetchone()
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
            "variants": q("SELECT COUNT(*) FROM variants").fetchone()[0],
            "texts": q("SELECT COUNT(*) FROM texts").fetchone()[0],
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
