"""The one owner of an index directory: its lock, its SQLite store and its vector snapshot.

`index`, `search`, `info`, `verify`, `eval` and the demo open an index only through here.

- `IndexDir.open_reader(path)`: the store plus the current vector snapshot, opened in O(1); it
  never writes. Texts committed to SQLite after the snapshot was saved (an `index` run saves at
  most every 60 s, and a killed run does not save at all) keep their vectors in SQLite's pending
  table; they are read by key (`key > max_key`) and scored exactly beside the snapshot, so a
  search sees the last committed state. Texts deleted since the snapshot are dropped when their
  rows are looked up (search.rank_images).
- `IndexDir.open_writer(path)`: takes the lock, opens (or creates) the store and continues the
  saved snapshot: rows added after it are read from the pending table by key, rows deleted after
  it from the `variant_deletions` log, both in O(change). `checkpoint()` does that catching up and
  saves a new generation, then records the generation in SQLite's meta and drops the pending
  vectors the saved generation holds. Each vector is then stored once, in the snapshot.
- `rebuild()` makes a new snapshot of every stored text, each vector from the best source on disk:
  its pending vector, else the current snapshot's (when that is sound for the key), else the text
  embedded again with the recorded embedder (`verify --repair` after the snapshot was lost).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from ..errors import StoreError, warn
from ..modes import VECTOR_MODES
from . import snapshot_writer, vindex
from .lock import IndexLock
from .quantise import graph_codes
from .store import Store

# Embeds texts again (the recorded embedder's embed()) for a rebuild that finds no vector on disk.
Embed = Callable[[Sequence[str]], np.ndarray]

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

    def vectors_of(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(found, float32 vectors) of `keys` as `rescore` and `exact` score them: from the texts
        committed after the snapshot, else from the snapshot. found is False for a key neither
        holds (deleted, or a damaged snapshot: verify says which); its row is zero."""
        keys = np.asarray(keys, np.int64)
        dim = self.lag_vectors.shape[1] if self.snapshot is None else self.snapshot.dim
        out = np.zeros((len(keys), dim), np.float32)
        found = np.zeros(len(keys), bool)
        if len(self.lag_keys):
            pos = np.minimum(np.searchsorted(self.lag_keys, keys), len(self.lag_keys) - 1)
            found = self.lag_keys[pos] == keys
            out[found] = self.lag_vectors[pos[found]]
        if self.snapshot is not None and not found.all():
            rest = np.flatnonzero(~found)
            rows, live = self.snapshot.find(keys[rest])
            out[rest[live]] = self.snapshot.vectors_at(rows[live])
            found[rest[live]] = True
        return found, out

    def live_vectors(self, stored_keys: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(keys, image ids, float32 vectors as `rescore`/`exact` score them) of the texts whose
        keys are in `stored_keys` (the store's), by key."""
        stored_keys = np.asarray(stored_keys, np.int64)
        keys, image_ids, vectors = [self.lag_keys], [self.lag_image_ids], [self.lag_vectors]
        if self.snapshot is not None and len(stored_keys):
            rows, live = self.snapshot.find(stored_keys)
            keys.append(stored_keys[live])
            image_ids.append(np.asarray(self.snapshot.rows[rows[live], 1]))
            vectors.append(self.snapshot.vectors_at(rows[live]))
        keys_all = np.concatenate(keys)
        order = np.argsort(keys_all, kind="stable")
        return keys_all[order], np.concatenate(image_ids)[order], np.concatenate(vectors)[order]


class IndexDir:
    """An open index directory. Use as a context manager, or call close()."""

    def __init__(self, path: str | os.PathLike, store: Store, lock: IndexLock | None = None):
        self.path = Path(path)
        self.store = store
        self.lock = lock
        self.writer: snapshot_writer.VectorWriter | None = None
        self.rebuilt = False
        self.embedded_again = 0  # texts the last rebuild embedded again (their vectors were lost)
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
            if self.writer is not None and not self.writer.dirty:  # saved: nothing unsaved names old files
                self.writer.release_previous()
            self.store.close()
        finally:
            if self.lock is not None:
                self.lock.release()

    def __enter__(self) -> IndexDir:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- reading ----------------------------------------------------------------------------
    def _vector_meta(self) -> tuple[int, str, str]:
        """(dim, dtype, store id) the snapshot must have to be this store's."""
        return (int(self.store.get_meta("dim", 0) or 0), str(self.store.get_meta("dtype", "i8")),
                str(self.store.get_meta("store_id") or ""))

    def snapshot(self) -> vindex.Snapshot | None:
        """The saved snapshot, if it belongs to this store and fits its dimension and dtype."""
        return vindex.Snapshot.open_matching(self.path, *self._vector_meta())

    def search_vectors(self, warn=warn) -> SearchVectors:
        """The vectors a search ranks; O(1) plus the texts committed since the last save."""
        # SQLite's read snapshot is taken before the manifest is read: a writer prunes pending
        # vectors only after the manifest that holds them is out, so whatever this reads, every
        # committed text is in the snapshot or among the pending vectors past its last key.
        conn = self.store.conn
        conn.execute("BEGIN")
        try:
            conn.execute("SELECT 1 FROM meta LIMIT 1").fetchall()
            snap = self.snapshot()
            lag = self.store.pending_in(snap.max_key if snap is not None else 0)
        finally:
            conn.execute("COMMIT")
        vectors = SearchVectors(snap, lag)
        texts = self.store.text_count()
        if texts > len(vectors):
            # The snapshot is gone or another index's: the vectors of the texts it held are lost.
            lost = (f"the vector snapshot of {self.path} is missing or not this index's, so {texts - len(vectors)} of "
                    f"its {texts} texts have no vector: run 'edge-t2t verify --repair --index {self.path}' "
                    "(it embeds them again)")
            if len(vectors) == 0:
                raise StoreError(lost)
            warn(lost + "; searching the others")
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
        return {
            "generation": int(m["generation"]) if m else None,
            "vectors": int(m["live"]) if m and snap_ok else 0,
            "exact_copy": bool(m.get("exact")) if m and snap_ok else None,
            "texts_not_in_snapshot": self.store.text_count(max_key),
            "recorded_generation": self.store.get_meta("vector_generation"),
            "snapshot_matches_store": snap_ok,
        }

    # -- writing ----------------------------------------------------------------------------
    def _require_lock(self) -> None:
        if self.lock is None or not self.lock.held:
            raise StoreError(f"{self.path} is open read-only; writing needs IndexDir.open_writer")

    def open_vectors(self, dim: int, dtype: str, embed: Embed | None = None) -> snapshot_writer.VectorWriter:
        """Continue the saved snapshot (or rebuild it when there is none that fits) and bring it up
        to date with SQLite. `embed` re-embeds texts whose vectors are nowhere on disk (rebuild)."""
        self._require_lock()
        store_id = self.store.store_id()
        recorded = int(self.store.get_meta("vector_generation", 0) or 0)
        w = snapshot_writer.VectorWriter.from_manifest(self.path, dim, dtype, store_id)
        # A snapshot older than the one SQLite recorded was restored from elsewhere: the deletion
        # log and the pending vectors it would need have been pruned, so it cannot be caught up.
        if w is None or w.generation < recorded:
            self.rebuild(dim, dtype, embed)
        else:
            self.writer = w
            self._catch_up()
        return self.writer

    def _catch_up(self) -> None:
        w = self.writer
        last, removed = self.store.deletions_after(w.deletions_seen)
        w.remove(removed)
        w.deletions_seen = last
        for keys, image_ids, vecs in self.store.iter_pending(w.max_key):
            w.add(keys, image_ids, vecs)

    def rebuild(self, dim: int | None = None, dtype: str | None = None, embed: Embed | None = None,
                progress: Callable[[int, int], None] | None = None) -> int:
        """A new snapshot of every stored text (see the module docstring for where each vector
        comes from); returns the number of vectors. `progress(done, total)` after each chunk."""
        self._require_lock()
        dim = dim or int(self.store.get_meta("dim", 0) or 0)
        dtype = dtype or self.store.get_meta("dtype", "i8")
        store_id = self.store.store_id()
        last_deletion = self.store.last_deletion()
        total = self.store.text_count()
        recorded = int(self.store.get_meta("vector_generation", 0) or 0)
        try:
            snap = vindex.Snapshot.open_matching(self.path, dim, dtype, store_id, recorded)
        except vindex.SNAPSHOT_READ_ERRORS:
            snap = None
        self.embedded_again = 0
        done = 0

        def chunks():
            nonlocal done
            for keys, image_ids, texts in self.store.iter_texts(0, chunk=16_384):
                vecs = np.zeros((len(keys), dim), np.float32)
                have = np.zeros(len(keys), bool)
                pkeys, _, pvecs = self.store.pending_in(int(keys[0]) - 1, int(keys[-1]))
                pos = np.searchsorted(keys, pkeys)
                vecs[pos], have[pos] = pvecs, True
                from_snap = np.zeros(len(keys), bool)
                if snap is not None:
                    ok, svecs, svalues = snap.stored(keys, image_ids)
                    from_snap = ok & ~have
                    vecs[from_snap], have[from_snap] = svecs[from_snap], True
                if not have.all():
                    if embed is None:
                        raise StoreError(
                            f"{int((~have).sum())} stored texts of {self.path} have no vector on disk (the vector "
                            f"snapshot is missing or damaged): run 'edge-t2t verify --repair --index {self.path}', "
                            "which embeds them again with the recorded embedder")
                    todo = np.flatnonzero(~have)
                    vecs[todo] = embed([texts[i] for i in todo])
                    self.embedded_again += len(todo)
                values = graph_codes(vecs, dtype)
                if from_snap.any():
                    values[from_snap] = svalues[from_snap]  # the graph's own values: nothing quantised twice
                done += len(keys)
                if progress is not None:
                    progress(done, total)
                yield keys, image_ids, vecs, values

        self.writer = snapshot_writer.build_from(self.path, chunks(), total, dim, dtype, store_id=store_id,
                                                 deletions_seen=last_deletion, generation=recorded,
                                                 exact_copy=bool(self.store.get_meta("exact_copy", True)))
        self._record_generation()
        self.rebuilt = True
        return len(self.writer)

    def vectors_for(self, keys: np.ndarray) -> np.ndarray:
        """float32 vectors of stored texts (their pending vector, else the saved snapshot's), e.g. to
        copy an image's texts under another path."""
        keys = np.asarray(keys, np.int64)
        pending = self.store.pending_vectors(keys)
        rest = np.asarray([k for k in keys if int(k) not in pending], np.int64)
        found: dict[int, np.ndarray] = dict(pending)
        if len(rest):
            snap = self.snapshot()
            if snap is not None:
                rows, live = snap.find(rest)
                for key, vec in zip(rest[live], snap.vectors_at(rows[live]), strict=True):
                    found[int(key)] = vec
        lost = [int(k) for k in keys if int(k) not in found]
        if lost:
            raise StoreError(f"{len(lost)} stored texts of {self.path} have no vector on disk (keys {lost[:5]}): run "
                             f"'edge-t2t verify --repair --index {self.path}'")
        dim = int(self.store.get_meta("dim", 0) or 0)
        return np.stack([found[int(k)] for k in keys]) if len(keys) else np.zeros((0, dim), np.float32)

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
            w.merge_tail()
        if not w.dirty:
            return False
        w.save()
        self._record_generation()
        self._last_save = time.monotonic()
        return True

    def _record_generation(self) -> None:
        """SQLite's meta says which generation its rows match; deletions that generation applied
        are pruned from the log, and the pending vectors it holds from the pending table."""
        w = self.writer
        with self.store.transaction():
            self.store.set_meta("vector_generation", w.generation)
        self.store.prune_deletions(w.deletions_seen)
        # Pending vectors at or below the saved last key are normally all in it; one it lacks (a
        # store migrated beside a damaged snapshot) stays until a rebuild takes it in.
        pending = self.store.pending_keys(w.max_key)
        self.store.prune_pending(w.max_key, keep=pending[~w.holds_keys(pending)])
