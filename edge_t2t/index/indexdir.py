"""The one owner of an index directory: its lock, its SQLite store and its vector snapshot.

`index`, `search`, `info`, `verify`, `eval` and the demo open an index only through here.

- `IndexDir.open_reader(path)`: the store plus the current vector snapshot, opened in O(1); it
  never writes. Texts committed to SQLite after the snapshot was saved (an `index` run saves at
  most every 60 s, and a killed run does not save at all) are read by key (`id > max_key`) and
  scored exactly beside the snapshot, so a search sees the last committed state. Texts deleted
  since the snapshot are dropped when their rows are looked up (search.rank_images).
- `IndexDir.open_writer(path)`: takes the lock, opens (or creates) the store and continues the
  saved snapshot: rows added after it are read by key, rows deleted after it from the
  `variant_deletions` log, both in O(change). `checkpoint()` does that catching up and saves a
  new generation, then records the generation in SQLite's meta.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np

from ..errors import StoreError, warn
from ..modes import VECTOR_MODES
from . import vindex
from .store import IndexLock, Store

# An `index` run saves its snapshot at the end and at most this often while it runs.
CHECKPOINT_EVERY_S = 60.0


class SearchVectors:
    """What a search ranks: the snapshot's vectors plus the texts committed after it (scored
    exactly). Same interface as a snapshot: len() and search()."""

    def __init__(self, snapshot: vindex.Snapshot | None, lag: tuple[np.ndarray, np.ndarray, np.ndarray]):
        self.snapshot = snapshot
        self.lag_keys, self.lag_image_ids, self.lag_vectors = lag
        self.count = (len(snapshot) if snapshot is not None else 0) + len(self.lag_keys)

    def __len__(self) -> int:
        return self.count

    @property
    def lag(self) -> int:
        return len(self.lag_keys)

    def search(self, query_vecs: np.ndarray, k: int, mode: str = "rescore", oversample: int = 4) -> list[vindex.Candidates]:
        if mode not in VECTOR_MODES:
            raise StoreError(f"unknown search mode {mode!r}: use one of {', '.join(VECTOR_MODES)}")
        q = np.atleast_2d(np.asarray(query_vecs, dtype=np.float32))
        lag = vindex.exact_candidates(self.lag_keys, self.lag_image_ids, self.lag_vectors, q, k)
        if self.snapshot is None:
            return lag
        snap = self.snapshot.search(q, k, mode=mode, oversample=oversample)
        if not len(self.lag_keys):
            return snap
        return [vindex.merge_candidates(a, b, k) for a, b in zip(snap, lag, strict=True)]


class IndexDir:
    """An open index directory. Use as a context manager, or call close()."""

    def __init__(self, path: str | os.PathLike, store: Store, lock: IndexLock | None = None):
        self.path = Path(path)
        self.store = store
        self.lock = lock
        self.writer: vindex.VectorWriter | None = None
        self.rebuilt = False
        self._last_save = time.monotonic()

    # -- opening ----------------------------------------------------------------------------
    @classmethod
    def open_reader(cls, path: str | os.PathLike) -> IndexDir:
        return cls(path, Store(path))

    @classmethod
    def open_writer(cls, path: str | os.PathLike, *, wait: bool = False, create: bool = True) -> IndexDir:
        lock = IndexLock(path, wait=wait)
        lock.acquire()
        try:
            return cls(path, Store(path, create=create), lock)
        except BaseException:
            lock.release()
            raise

    def close(self) -> None:
        try:
            self.store.close()
        finally:
            if self.lock is not None:
                self.lock.release()

    def __enter__(self) -> IndexDir:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- reading ----------------------------------------------------------------------------
    def snapshot(self) -> vindex.Snapshot | None:
        """The saved snapshot, if it belongs to this store and fits its dimension and dtype."""
        snap = vindex.Snapshot.open(self.path)
        meta_dim = int(self.store.get_meta("dim", 0) or 0)
        if snap is None or snap.dim != meta_dim or snap.dtype != self.store.get_meta("dtype", "i8") or \
                snap.manifest.get("store_id", "") != (self.store.get_meta("store_id") or ""):
            return None
        return snap

    def search_vectors(self, warn=warn) -> SearchVectors:
        """The vectors a search ranks; O(1) plus the texts committed since the last save."""
        snap = self.snapshot()
        if snap is None and self.store.get_meta("dim") is not None:
            warn(f"{self.path} has no vector snapshot yet (or one of another index); scoring the stored texts "
                 f"exactly, which is slow on a large index: run 'edge-t2t verify --repair --index {self.path}'")
        lag = self.store.vectors_in(snap.max_key if snap is not None else 0)
        vectors = SearchVectors(snap, lag)
        if len(vectors) == 0:
            raise StoreError(
                f"the index at {self.path} is empty (no described images): add images with "
                f"'edge-t2t index PATH --index {self.path}'"
            )
        return vectors

    def vector_state(self) -> dict:
        """What `info` shows about the snapshot: generation, vectors, texts not yet in it."""
        m = vindex.read_manifest(self.path)
        snap_ok = self.snapshot() is not None if m else False
        max_key = int(m["max_key"]) if m and snap_ok else 0
        lag = self.store.conn.execute("SELECT COUNT(*) FROM variants WHERE id > ?", (max_key,)).fetchone()[0]
        return {
            "generation": int(m["generation"]) if m else None,
            "vectors": int(m["live"]) if m and snap_ok else 0,
            "texts_not_in_snapshot": int(lag),
            "recorded_generation": self.store.get_meta("vector_generation"),
            "snapshot_matches_store": snap_ok,
        }

    # -- writing ----------------------------------------------------------------------------
    def _require_lock(self) -> None:
        if self.lock is None or not self.lock.held:
            raise StoreError(f"{self.path} is open read-only; writing needs IndexDir.open_writer")

    def open_vectors(self, dim: int, dtype: str) -> vindex.VectorWriter:
        """Continue the saved snapshot (or rebuild it from SQLite when there is none that fits) and
        bring it up to date with SQLite."""
        self._require_lock()
        store_id = self.store.store_id()
        recorded = int(self.store.get_meta("vector_generation", 0) or 0)
        w = vindex.VectorWriter.from_manifest(self.path, dim, dtype, store_id)
        # A snapshot older than the one SQLite recorded was restored from elsewhere: the deletion
        # log it would need has been pruned, so it cannot be caught up.
        if w is None or w.generation < recorded:
            self.rebuild(dim, dtype)
        else:
            self.writer = w
            self._catch_up()
        return self.writer

    def _catch_up(self) -> None:
        w = self.writer
        last, removed = self.store.deletions_after(w.deletions_seen)
        w.remove(removed)
        w.deletions_seen = last
        keys, image_ids, vecs = self.store.vectors_in(w.max_key)
        w.add(keys, image_ids, vecs)

    def rebuild(self, dim: int | None = None, dtype: str | None = None) -> int:
        """A new snapshot of everything in SQLite; returns the number of vectors."""
        self._require_lock()
        dim = dim or int(self.store.get_meta("dim", 0) or 0)
        dtype = dtype or self.store.get_meta("dtype", "i8")
        last_deletion = self.store.last_deletion()
        total = self.store.conn.execute("SELECT COUNT(*) FROM variants").fetchone()[0]
        recorded = int(self.store.get_meta("vector_generation", 0) or 0)
        self.writer = vindex.build_from(self.path, self.store.iter_vectors(0), total, dim, dtype,
                                        store_id=self.store.store_id(), deletions_seen=last_deletion,
                                        generation=recorded)
        self._record_generation()
        self.rebuilt = True
        return len(self.writer)

    def checkpoint(self, *, force: bool = False) -> bool:
        """Catch the snapshot up with SQLite and save a new generation, if anything changed and
        (unless force) the last save was CHECKPOINT_EVERY_S ago. Returns whether it saved."""
        self._require_lock()
        if not force and time.monotonic() - self._last_save < CHECKPOINT_EVERY_S:
            return False
        self._catch_up()
        w = self.writer
        if w.needs_compaction():
            self.rebuild(w.dim, w.dtype)
            self._last_save = time.monotonic()
            return True
        if w.needs_merge():
            chunks = ((keys, vecs) for keys, _, vecs in self.store.iter_vectors(w.base_max_key, w.max_key))
            w.merge_tail(chunks, len(w.tail))
        if not w.dirty:
            return False
        w.save()
        self._record_generation()
        self._last_save = time.monotonic()
        return True

    def _record_generation(self) -> None:
        """SQLite's meta says which generation its rows match; deletions that generation applied
        are pruned from the log."""
        w = self.writer
        with self.store.transaction():
            self.store.set_meta("vector_generation", w.generation)
        self.store.prune_deletions(w.deletions_seen)
