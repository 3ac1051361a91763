"""The vector index beside the store: an HNSW graph (usearch) plus exact vectors for re-scoring.

Files in the index directory, all derived from store.sqlite and rebuilt from it when missing or
inconsistent (different keys, count, dimension or dtype):

- `vectors.usearch`: HNSW graph, cosine metric, dtype chosen at creation (f32, f16 or i8) and
  always passed explicitly, because usearch's own default is a half-precision type.
- `exact.npy`: the vectors again, float16 (float32 when the index dtype is f32), memory-mapped at
  search time so i8 candidates can be re-scored exactly and `exact` mode can brute-force.
- `keys.npy`: (n, 2) int64 rows of (usearch key = variants.id, image id), sorted by key.

Every file is written to a temporary name and os.replace()d: usearch's save() overwrites in place,
so a crash mid-save would otherwise leave a torn graph.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import StoreError

USEARCH_FILE = "vectors.usearch"
EXACT_FILE = "exact.npy"
KEYS_FILE = "keys.npy"
DTYPES = ("f32", "f16", "i8")
MODES = ("hnsw", "rescore", "exact")
# Scoring uses np.einsum, not `@`: on a small shared machine OpenBLAS's threads spin against
# each other and a 2k x 384 matrix-vector product took 15 ms instead of 0.3 ms.
CACHE_F32_ELEMENTS = 64_000_000  # keep a float32 copy for exact mode up to 256 MB


def usearch_index_class():
    """usearch's Index class. onnxruntime must be imported first: importing it after usearch
    (usearch 2.26 / numkong, onnxruntime 1.2x) segfaults the process, so whichever of embedder
    and vector index a command touches first, this keeps the safe order."""
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        pass
    from usearch.index import Index

    return Index


def graph_input(vectors: np.ndarray, dtype: str) -> np.ndarray:
    """What is handed to usearch. For i8 we pass int8 codes scaled per vector so the largest
    component is +-127: usearch's own cast multiplies unit vectors by 127, and a 384-d unit
    vector's components are mostly < 0.2, which wastes ~2.5 of the 8 bits. Cosine is
    scale-invariant, so only the rounding error changes (recall@10 0.95 -> 0.99 without
    re-scoring in bench/index_scale.py)."""
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    if dtype != "i8":
        return vectors
    peak = np.abs(vectors).max(axis=1, keepdims=True)
    return np.round(vectors / np.maximum(peak, 1e-12) * 127).astype(np.int8)


def _exact_dtype(dtype: str):
    return np.float32 if dtype == "f32" else np.float16


def _new_index(ndim: int, dtype: str):
    Index = usearch_index_class()

    if dtype not in DTYPES:
        raise StoreError(f"unknown vector dtype {dtype!r}: use one of {', '.join(DTYPES)}")
    # i8 is only meaningful for cosine over L2-normalised vectors, which is what we store.
    return Index(ndim=ndim, metric="cos", dtype=dtype)


def _atomic_save_npy(path: Path, array: np.ndarray) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        np.save(fh, array)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _atomic_save_usearch(path: Path, index) -> None:
    tmp = path.with_name(path.name + ".tmp")
    index.save(str(tmp))
    os.replace(tmp, path)


def files(index_dir: str | os.PathLike) -> list[Path]:
    d = Path(index_dir)
    return [d / USEARCH_FILE, d / EXACT_FILE, d / KEYS_FILE]


def on_disk_state(index_dir: str | os.PathLike) -> dict | None:
    """What the files say: {'keys', 'dim', 'dtype', 'count'}; None when missing or unreadable."""
    Index = usearch_index_class()

    d = Path(index_dir)
    if not all(p.exists() for p in files(d)):
        return None
    try:
        meta = Index.metadata(str(d / USEARCH_FILE))
        keys = np.load(d / KEYS_FILE, mmap_mode="r")
        exact = np.load(d / EXACT_FILE, mmap_mode="r")
    except (OSError, ValueError, RuntimeError):
        return None
    if meta is None:
        return None
    dtype = str(meta["kind_scalar"].name).lower()
    if keys.ndim != 2 or exact.ndim != 2 or len(keys) != len(exact) or meta["count_present"] != len(keys):
        return None
    return {"keys": np.asarray(keys[:, 0]), "dim": int(meta["dimensions"]), "dtype": dtype, "count": len(keys)}


def is_consistent(index_dir: str | os.PathLike, store_keys: np.ndarray, dim: int, dtype: str) -> bool:
    state = on_disk_state(index_dir)
    if state is None:
        return False
    if state["dim"] != dim or state["dtype"] != dtype or state["count"] != len(store_keys):
        return False
    if not np.array_equal(state["keys"], np.sort(store_keys)):
        return False
    # The graph's own key set must match too (keys.npy could be newer than a torn usearch save).
    Index = usearch_index_class()

    view = Index.restore(str(Path(index_dir) / USEARCH_FILE), view=True)
    if view is None:
        return False
    graph_keys = np.sort(np.asarray(view.keys, dtype=np.int64)) if len(view) else np.zeros(0, np.int64)
    return bool(np.array_equal(graph_keys, state["keys"]))


class VectorWriter:
    """The in-memory index an `index` run adds to and removes from; save() after each commit."""

    def __init__(self, index_dir: str | os.PathLike, dim: int, dtype: str):
        self.dir = Path(index_dir)
        self.dim = dim
        self.dtype = dtype
        self.index = _new_index(dim, dtype)
        self.keys = np.zeros(0, np.int64)
        self.image_ids = np.zeros(0, np.int64)
        self.vectors = np.zeros((0, dim), np.float32)
        self.dirty = False

    @classmethod
    def open(cls, index_dir, store, dim: int, dtype: str) -> tuple[VectorWriter, bool]:
        """Load the vectors of `store`; return (writer, rebuilt) where rebuilt says whether the files
        on disk were missing or inconsistent with SQLite (and so must be saved again)."""
        keys, image_ids, vecs = store.all_vectors()
        w = cls(index_dir, dim, dtype)
        w.add(keys, image_ids, vecs)
        rebuilt = not is_consistent(index_dir, keys, dim, dtype)
        w.dirty = rebuilt
        return w, rebuilt

    def add(self, keys, image_ids, vectors) -> None:
        keys = np.asarray(keys, dtype=np.int64)
        if len(keys) == 0:
            return
        vectors = np.ascontiguousarray(vectors, dtype=np.float32).reshape(len(keys), self.dim)
        # One thread: usearch's parallel insertion is nondeterministic and, on small graphs, left
        # true neighbours unreachable (13 of 100 builds of a 100-vector test set missed one of the
        # top 5; 0 of 100 single-threaded). The same texts must give the same index and results,
        # e.g. after a resumed run; embedding, not insertion, dominates indexing time anyway.
        self.index.add(keys.astype(np.uint64), graph_input(vectors, self.dtype), threads=1)
        self.keys = np.concatenate([self.keys, keys])
        self.image_ids = np.concatenate([self.image_ids, np.broadcast_to(np.asarray(image_ids, np.int64), keys.shape)])
        self.vectors = np.concatenate([self.vectors, vectors])
        self.dirty = True

    def remove(self, keys) -> None:
        keys = np.asarray(list(keys), dtype=np.int64)
        if len(keys) == 0:
            return
        self.index.remove(keys.astype(np.uint64))
        keep = ~np.isin(self.keys, keys)
        self.keys, self.image_ids, self.vectors = self.keys[keep], self.image_ids[keep], self.vectors[keep]
        self.dirty = True

    def __len__(self) -> int:
        return len(self.keys)

    def save(self) -> None:
        """Write the three files atomically (each temp + os.replace)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        order = np.argsort(self.keys, kind="stable")
        _atomic_save_npy(self.dir / EXACT_FILE, self.vectors[order].astype(_exact_dtype(self.dtype)))
        _atomic_save_npy(self.dir / KEYS_FILE, np.stack([self.keys[order], self.image_ids[order]], axis=1))
        _atomic_save_usearch(self.dir / USEARCH_FILE, self.index)
        self.dirty = False


def rebuild(index_dir, store, dim: int, dtype: str) -> int:
    """Rebuild the files from SQLite's vectors; return the number of vectors."""
    w = VectorWriter(index_dir, dim, dtype)
    w.add(*store.all_vectors())
    w.save()
    return len(w)


@dataclass
class Candidates:
    """One query's variant candidates, best first."""

    keys: np.ndarray  # int64 variant keys
    image_ids: np.ndarray  # int64
    scores: np.ndarray  # float32 cosine


_REOPEN_TRIES = 50
_REOPEN_WAIT_S = 0.02


def wait_for_whole_files(index_dir: str | os.PathLike) -> bool:
    """True once the three vector files form one save. A writer replaces them one after the other,
    so a reader can land between two replaces; the set is whole again milliseconds later."""
    for _ in range(_REOPEN_TRIES):
        if on_disk_state(index_dir) is not None:
            return True
        time.sleep(_REOPEN_WAIT_S)
    return False


class _MixedFiles(Exception):
    """The graph and keys.npy come from two different saves."""


class VectorIndex:
    """A read-only, memory-mapped view for searching."""

    def __init__(self, index_dir: str | os.PathLike):
        self.dir = Path(index_dir)
        self._open_files()
        meta = usearch_index_class().metadata(str(self.dir / USEARCH_FILE))
        if meta is None:
            raise StoreError(f"{self.dir / USEARCH_FILE} is unreadable: run 'edge-t2t index --index {self.dir}' to rebuild it")
        self.dtype = str(meta["kind_scalar"].name).lower()

    def _open_files(self) -> None:
        """Map keys and exact vectors. A running `index` replaces the three files one after the
        other (exact, keys, graph: each atomically), so a reader can catch a mixed set; it then waits
        for the writer's next replace and maps again."""
        for _ in range(_REOPEN_TRIES):
            self.key_rows = np.load(self.dir / KEYS_FILE, mmap_mode="r")
            self.exact = np.load(self.dir / EXACT_FILE, mmap_mode="r")
            if len(self.key_rows) == len(self.exact):
                break
            time.sleep(_REOPEN_WAIT_S)
        else:
            raise StoreError(f"the vector files in {self.dir} keep changing while being read; run the search again")
        self._view = None
        self._f32: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.key_rows)

    @property
    def view(self):
        if self._view is None:
            Index = usearch_index_class()

            self._view = Index.restore(str(self.dir / USEARCH_FILE), view=True)
            if self._view is None:
                raise StoreError(f"{self.dir / USEARCH_FILE} is unreadable: run 'edge-t2t index --index {self.dir}' to rebuild it")
        return self._view

    def _exact_f32(self) -> np.ndarray:
        """The exact vectors as float32, converted once per open index while that is affordable."""
        if self._f32 is not None:
            return self._f32
        full = np.asarray(self.exact, dtype=np.float32)
        if full.size <= CACHE_F32_ELEMENTS:
            self._f32 = full
        return full

    def _rows_of(self, keys: np.ndarray) -> np.ndarray:
        return np.searchsorted(self.key_rows[:, 0], keys)

    def search(self, query_vecs: np.ndarray, k: int, mode: str = "rescore", oversample: int = 4) -> list[Candidates]:
        """Up to k variant candidates per query. hnsw: the graph's (quantised) scores; rescore:
        fetch k*oversample from the graph and re-score them with exact vectors; exact: brute force."""
        for _ in range(_REOPEN_TRIES):
            try:
                return self._search(query_vecs, k, mode, oversample)
            except _MixedFiles:
                time.sleep(_REOPEN_WAIT_S)  # the graph is newer than keys/exact: a writer is saving
                self._open_files()
        raise StoreError(f"the vector files in {self.dir} keep changing while being read; run the search again")

    def _search(self, query_vecs: np.ndarray, k: int, mode: str, oversample: int) -> list[Candidates]:
        if mode not in MODES:
            raise StoreError(f"unknown search mode {mode!r}: use one of {', '.join(MODES)}")
        q = np.atleast_2d(np.asarray(query_vecs, dtype=np.float32))
        n = len(self)
        k = min(k, n)
        if n == 0 or k <= 0:
            empty = Candidates(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32))
            return [empty for _ in q]
        if mode == "exact":
            scores = np.einsum("ij,kj->ki", self._exact_f32(), q)
            out = []
            for row in scores:
                top = np.argpartition(-row, k - 1)[:k] if k < n else np.arange(n)
                top = top[np.lexsort((self.key_rows[top, 0], -row[top]))]
                out.append(Candidates(np.asarray(self.key_rows[top, 0]), np.asarray(self.key_rows[top, 1]), row[top]))
            return out
        fetch = min(n, k * oversample) if mode == "rescore" else k
        matches = self.view.search(graph_input(q, self.dtype), fetch)
        all_keys = np.atleast_2d(np.asarray(matches.keys))  # a one-row query comes back 1-D
        all_dists = np.atleast_2d(np.asarray(matches.distances))
        counts = np.atleast_1d(np.asarray(getattr(matches, "counts", all_keys.shape[1])))
        out = []
        for i in range(len(q)):
            cnt = int(counts[i])
            keys = all_keys[i][:cnt].astype(np.int64)
            dists = all_dists[i][:cnt].astype(np.float32)
            rows = self._rows_of(keys)
            if len(rows) and (rows.max() >= len(self.key_rows) or (self.key_rows[rows, 0] != keys).any()):
                raise _MixedFiles  # keys the graph knows but keys.npy does not (yet)
            if mode == "rescore":
                scores = np.einsum("ij,j->i", np.asarray(self.exact[rows], dtype=np.float32), q[i])
            else:
                scores = 1.0 - dists
            order = np.lexsort((keys, -scores))[:k]
            out.append(Candidates(keys[order], np.asarray(self.key_rows[rows[order], 1]), scores[order].astype(np.float32)))
        return out
