"""The writer's side of the vector snapshot (the format is vindex.py's): append rows, add to the
tail graph, record removals, and save numbered generations, each one's manifest written last.
Only the holder of the index lock (indexdir.IndexDir) writes.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from ..errors import StoreError
from ..modes import DTYPES
from .quantise import exact_dtype, graph_codes, graph_dtype
from .vindex import (
    EXPANSION_ADD,
    FORMAT,
    LEGACY_FILES,
    MANIFEST_FILE,
    graph_get,
    manifest_files,
    map_rows,
    new_graph,
    read_manifest,
    usearch_index_class,
)

# The tail graph is merged into the base once it holds more than this many keys. Each save rewrites
# the tail, so this bounds a save's cost; each merge loads and rewrites the base (O(N) bytes, but
# once per TAIL_MAX texts: ~10 KB written per text at 1M texts, small beside inserting it).
TAIL_MAX = 50_000
# Dead rows are compacted away (full rebuild) past this many and a tenth of all rows.
DEAD_MIN = 10_000
DEAD_FRACTION = 0.10
# Above this many vectors a full build uses every CPU: usearch's parallel insertion is not
# deterministic, which matters for small test indexes (see VectorWriter.add), not for a rebuild
# of an archive whose single-threaded build would take many minutes.
PARALLEL_BUILD_MIN = 50_000


def _load_graph(path: Path):
    """A saved graph, loaded to be added to (connectivity is in the file; expansion_add is not)."""
    graph = usearch_index_class().restore(str(path))
    if graph is None:
        raise StoreError(f"{path} is unreadable: run 'edge-t2t verify --repair --index {path.parent}'")
    graph.expansion_add = EXPANSION_ADD
    return graph


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _save_graph(path: Path, graph) -> None:
    """A generation's graph goes to a new name (nothing reads it before the manifest names it);
    a temp name + os.replace still keeps a torn save from ever sitting under the final name."""
    tmp = path.with_name(path.name + ".tmp")
    graph.save(str(tmp))
    _fsync_path(tmp)
    os.replace(tmp, path)


def _save_npy(path: Path, array: np.ndarray) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        np.save(fh, array)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _write_manifest(index_dir: Path, manifest: dict) -> None:
    tmp = index_dir / (MANIFEST_FILE + ".tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(manifest, fh, indent=1)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, index_dir / MANIFEST_FILE)
    _fsync_path(index_dir)  # the rename itself must survive a power cut


class VectorWriter:
    """The writer's side of the snapshot: append rows, add to the tail graph, record removals,
    and save() a new generation. Only the holder of the index lock uses it.

    `exact_copy`: whether a new epoch keeps the float16 copy beside an i8 graph (see the module
    docstring); a writer continuing a saved generation keeps that generation's layout."""

    def __init__(self, index_dir: str | os.PathLike, dim: int, dtype: str, manifest: dict | None = None,
                 exact_copy: bool = True):
        if dtype not in DTYPES:
            raise StoreError(f"unknown vector dtype {dtype!r}: use one of {', '.join(DTYPES)}")
        self.dir = Path(index_dir)
        self.dim = dim
        self.dtype = dtype
        self.dir.mkdir(parents=True, exist_ok=True)
        m = manifest or {}
        self.generation = int(m.get("generation", 0))
        self.epoch = int(m.get("epoch", self.generation + 1))
        self.rows_name = m.get("rows") or f"rows.{self.epoch}.i64"
        if "exact" in m:  # a saved generation: its layout
            self.exact_name = m["exact"]
        else:
            self.exact_name = f"exact.{self.epoch}.f16" if exact_copy and dtype == "i8" else None
        self.n_rows = int(m.get("n_rows", 0))
        self.max_key = int(m.get("max_key", -1))  # keys are SQLite rowids (>= 1); quantcost uses 0..n-1
        self.deletions_seen = int(m.get("deletions_seen", 0))
        self.base_name = m.get("base")
        self.base_count = int(m.get("base_count", 0))
        self.base_max_key = int(m.get("base_max_key", 0))
        self.previous = manifest_files(manifest)
        self.store_id = m.get("store_id", "")
        self.tail = _load_graph(self.dir / m["tail"]) if m.get("tail") else new_graph(dim, dtype)
        self.dead = np.load(self.dir / m["dead"]) if m.get("dead") else np.zeros(0, np.int64)
        # Cut off rows a killed writer appended after the last manifest.
        for name, width in self._appendable():
            path = self.dir / name
            with open(path, "ab") as fh:
                if fh.tell() != self.n_rows * width:
                    fh.truncate(self.n_rows * width)
        self.dirty = manifest is None

    def _appendable(self) -> list[tuple[str, int]]:
        """(file name, bytes per row) of the files rows are appended to."""
        out = [(self.rows_name, 16)]
        if self.exact_name:
            out.append((self.exact_name, self.dim * np.dtype(exact_dtype(self.dtype)).itemsize))
        return out

    @classmethod
    def from_manifest(cls, index_dir, dim: int, dtype: str, store_id: str = "") -> VectorWriter | None:
        """A writer continuing the saved snapshot, or None when there is none that fits (another
        dimension, dtype or store)."""
        m = read_manifest(index_dir)
        if m is None or int(m["dim"]) != dim or m["dtype"] != dtype or m.get("store_id", "") != store_id:
            return None
        try:
            return cls(index_dir, dim, dtype, m)
        except (OSError, ValueError, RuntimeError, KeyError):
            return None

    def __len__(self) -> int:
        return self.n_rows - len(self.dead)

    def holds_keys(self, keys: np.ndarray) -> np.ndarray:
        """Which of `keys` the appended rows hold, not removed."""
        keys = np.asarray(keys, np.int64)
        if not self.n_rows or not len(keys):
            return np.zeros(len(keys), bool)
        rows = map_rows(self.dir / self.rows_name, self.n_rows, 2, np.int64)[:, 0]
        pos = np.minimum(np.searchsorted(rows, keys), self.n_rows - 1)
        dead = np.isin(keys, self.dead) if len(self.dead) else np.zeros(len(keys), bool)
        return (np.asarray(rows[pos]) == keys) & ~dead

    def _append(self, keys, image_ids, vectors, values=None) -> tuple[np.ndarray, np.ndarray]:
        """Append rows (sorted by key) to the row file (and the exact copy); return (keys, graph
        values) sorted. `vectors` are float32; `values`, when given, are what the graph holds
        already (a rebuild from a graph: its codes, unchanged). Every key must be larger than any
        stored key, which AUTOINCREMENT keys are."""
        keys = np.asarray(keys, dtype=np.int64)
        order = np.argsort(keys, kind="stable")
        keys = keys[order]
        if keys[0] <= self.max_key:
            raise StoreError(f"vector key {int(keys[0])} is not newer than the snapshot's {self.max_key}; "
                             f"run 'edge-t2t verify --repair --index {self.dir}'")
        image_ids = np.broadcast_to(np.asarray(image_ids, np.int64), order.shape)[order]
        vectors = np.ascontiguousarray(vectors, dtype=np.float32).reshape(len(order), self.dim)[order]
        values = graph_codes(vectors, self.dtype) if values is None else np.asarray(values)[order]
        with open(self.dir / self.rows_name, "ab") as fh:
            fh.write(np.stack([keys, image_ids], axis=1).tobytes())
        if self.exact_name:
            with open(self.dir / self.exact_name, "ab") as fh:
                fh.write(vectors.astype(exact_dtype(self.dtype)).tobytes())
        self.n_rows += len(keys)
        self.max_key = int(keys[-1])
        self.dirty = True
        return keys, values

    def add(self, keys, image_ids, vectors) -> None:
        if len(keys) == 0:
            return
        keys, values = self._append(keys, image_ids, vectors)
        # One thread: usearch's parallel insertion is nondeterministic and, on small graphs, left
        # true neighbours unreachable (13 of 100 builds of a 100-vector test set missed one of the
        # top 5; 0 of 100 single-threaded). The same texts must give the same index and results,
        # e.g. after a resumed run.
        self.tail.add(keys.astype(np.uint64), values, threads=1)

    def remove(self, keys) -> None:
        keys = np.asarray(list(keys), dtype=np.int64)
        keys = keys[keys <= self.max_key]  # a key never saved needs no tombstone
        if len(keys) == 0:
            return
        self.dead = np.union1d(self.dead, keys)
        self.dirty = True

    def needs_compaction(self) -> bool:
        return len(self.dead) > max(DEAD_MIN, DEAD_FRACTION * self.n_rows)

    def needs_merge(self) -> bool:
        return len(self.tail) > TAIL_MAX

    def merge_tail(self) -> None:
        """Insert the tail graph's vectors (its own values: nothing is quantised twice) into the
        base graph, and start an empty tail."""
        base = _load_graph(self.dir / self.base_name) if self.base_name else new_graph(self.dim, self.dtype)
        keys = np.sort(np.asarray(self.tail.keys, dtype=np.int64))
        threads = 0 if len(keys) + self.base_count >= PARALLEL_BUILD_MIN else 1
        for start in range(0, len(keys), 65_536):
            chunk = keys[start : start + 65_536]
            values, _ = graph_get(self.tail, chunk, self.dim, graph_dtype(self.dtype))
            base.add(chunk.astype(np.uint64), values, threads=threads)
        self._set_base(base)

    def _set_base(self, base) -> None:
        self.base_name = f"base.{self.generation + 1}.usearch"
        _save_graph(self.dir / self.base_name, base)
        self.base_count = len(base)
        self.base_max_key = self.max_key
        self.tail = new_graph(self.dim, self.dtype)
        self.dirty = True

    def save(self, deletions_seen: int | None = None) -> dict:
        """Make the current state generation g+1: fsync the appended files, write the tail graph and
        the dead list, then replace the manifest. Returns the manifest."""
        if deletions_seen is not None:
            self.deletions_seen = deletions_seen
        g = self.generation + 1
        for name, _ in self._appendable():
            _fsync_path(self.dir / name)
        tail_name = dead_name = None
        if len(self.tail):
            tail_name = f"tail.{g}.usearch"
            _save_graph(self.dir / tail_name, self.tail)
        if len(self.dead):
            dead_name = f"dead.{g}.npy"
            _save_npy(self.dir / dead_name, self.dead)
        manifest = {
            "format": FORMAT, "generation": g, "epoch": self.epoch, "store_id": self.store_id,
            "dim": self.dim, "dtype": self.dtype,
            "rows": self.rows_name, "exact": self.exact_name, "n_rows": self.n_rows,
            "base": self.base_name, "base_count": self.base_count, "base_max_key": self.base_max_key,
            "tail": tail_name, "tail_count": len(self.tail), "dead": dead_name, "dead_count": int(len(self.dead)),
            "live": len(self), "max_key": self.max_key, "deletions_seen": self.deletions_seen,
            "previous": [n for n in self.previous if n not in (self.rows_name, self.exact_name)],
        }  # fmt: skip
        _write_manifest(self.dir, manifest)
        keep = set(manifest_files(manifest)) | set(manifest["previous"])
        self._remove_unnamed(keep)
        self.previous = manifest_files(manifest)
        self.generation = g
        self.dirty = False
        return manifest

    def release_previous(self) -> None:
        """Delete the previous generation's files, kept by save() for readers that read its manifest
        a moment earlier, once the writer is done: a reader that read it then finds a file gone
        and reads the newer manifest (Snapshot.open), and one that already opened it keeps its
        maps. Without this, the last merge of a run leaves the old base graph on disk until the
        next run's save (the size of the whole graph)."""
        self._remove_unnamed(set(self.previous))

    def _remove_unnamed(self, keep: set[str]) -> None:
        """Delete snapshot files (and temp files of a killed save) that neither this generation nor
        the previous one names, and the files of the layout before generations."""
        for p in self.dir.iterdir():
            ours = p.name.startswith(("rows.", "exact.", "base.", "tail.", "dead.", MANIFEST_FILE + "."))
            if p.name in LEGACY_FILES or (ours and p.name not in keep):
                p.unlink(missing_ok=True)


def build_from(index_dir, chunks: Iterable[tuple], total: int, dim: int, dtype: str, *, store_id: str = "",
               deletions_seen: int = 0, generation: int = 0, exact_copy: bool = True) -> VectorWriter:
    """A fresh snapshot (a new epoch of appendable files, everything in the base graph) of the
    (keys, image ids, float32 vectors[, graph values]) chunks, `total` rows in all, saved as the
    generation after `generation`. Chunks keep a rebuild of a large index within bounded memory."""
    previous = read_manifest(index_dir)
    generation = max(generation, int((previous or {}).get("generation", 0)))
    w = VectorWriter(index_dir, dim, dtype, {"generation": generation, "epoch": generation + 1, "store_id": store_id,
                                             "dim": dim, "dtype": dtype, "n_rows": 0}, exact_copy=exact_copy)
    w.previous = manifest_files(previous)
    base = new_graph(dim, dtype)
    threads = 0 if total >= PARALLEL_BUILD_MIN else 1
    for chunk in chunks:
        if len(chunk[0]):
            keys, values = w._append(*chunk)
            base.add(keys.astype(np.uint64), values, threads=threads)
    w._set_base(base)
    w.save(deletions_seen)
    return w


def build(index_dir, keys: np.ndarray, image_ids: np.ndarray, vectors: np.ndarray, dim: int, dtype: str,
          **kwargs) -> VectorWriter:
    """build_from() for vectors already in memory."""
    return build_from(index_dir, [(keys, image_ids, vectors)], len(keys), dim, dtype, **kwargs)
