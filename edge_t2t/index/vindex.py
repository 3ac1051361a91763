"""The vector snapshot beside the store: HNSW graphs (usearch), each vector stored once. This
module is its format and its readers; snapshot_writer.py writes it.

SQLite is the store of record of the texts; these files hold their vectors, saved as numbered
*generations* (texts committed since the last save keep their vector in SQLite's pending table,
store.py). One save writes only what changed since the last one:

- `rows.<e>.i64`: (key = texts.id, image id) int64 pairs, appended in key order. Keys come
  from an AUTOINCREMENT column, so appending keeps the file sorted and a key's row is found by
  binary search.
- `base.<g>.usearch`: the big HNSW graph, rewritten only when the tail is merged into it.
- `tail.<g>.usearch`: a small graph of the keys added since the last merge, rewritten each save.
  A key lies in the base when it is <= the manifest's base_max_key, else in the tail.
- `exact.<e>.f16` (i8 indexes, unless built with `--no-exact-copy`): the vectors again in float16,
  row for row, appended; memory-mapped so `rescore` and `exact` searches score float16 vectors, as
  before the lean layout (issue 25: docs/performance.md's "Exact copy" gives the figures behind keeping
  it). Without it, and always for f16 and f32 graphs (whose vectors are the float16 / float32
  values themselves), those modes score the graph's own vectors (`Snapshot.vectors_at`).
  Indexes saved before issue 25 also have `exact.<e>.f16|f32` beside f16 and f32 graphs; they
  are read as before until the next rebuild drops the copy.
- `dead.<g>.npy`: sorted keys removed since the last compaction; their rows stay in the
  appendable files and their graph nodes stay in the graphs, and searches skip them.
- `manifest.json`: names the files of the current generation and how many rows of the appendable
  files belong to it. It is written last (after fsync of every file it names), to a temporary
  file that is fsync'd and os.replace()d, then the directory is fsync'd. A reader reads the
  manifest once and maps exactly what it names, so it never mixes two saves and never writes.

A crash at any point leaves the old or the new manifest. Bytes appended past the manifest's row
count are cut off by the next writer; files no manifest names are deleted by the next save (the
previous generation's files are kept, for readers that opened it a moment earlier).

Each save costs O(rows added + tail + removed keys), not O(N): the tail holds at most TAIL_MAX
keys (snapshot_writer). Past that it is merged into the base (the base graph is loaded, the tail's vectors inserted,
the base saved: O(N) bytes moved once per TAIL_MAX texts); the removed keys are compacted away (a
full rebuild, indexdir.py) when they pass a tenth of the rows.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import StoreError
from ..modes import DTYPES, VECTOR_MODES
from .quantise import exact_dtype, graph_codes, graph_dtype, unit_rows

MANIFEST_FILE = "manifest.json"
# What opening a damaged (or half-replaced) snapshot raises, each tried on a damaged file: usearch's
# restore RuntimeError ("File is corrupted...") or ValueError ("Not a dense USearch index!", "End of
# file reached!"); np.load EOFError / ValueError; np.memmap OSError / ValueError; an unusable graph
# view is our StoreError.
SNAPSHOT_READ_ERRORS = (RuntimeError, ValueError, EOFError, OSError, StoreError)
# The files of the single-snapshot layout that came before generations: removed by a rebuild.
LEGACY_FILES = ("vectors.usearch", "exact.npy", "keys.npy")
FORMAT = 1
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


# Graph shape: connectivity 8 and expansion_add 64 instead of usearch's 16 / 128 build a graph 3x
# faster (bench/index_scale.py: 100k i8 vectors 85 s -> 27 s, recall@10 0.994 -> 0.991 before
# re-scoring; 1M: 0.983 at expansion_search 64), and an update's cost is its insertions. A search
# asks for >= 4x its k (rescore), which widens the beam past expansion_search anyway.
CONNECTIVITY = 8
EXPANSION_ADD = 64


def new_graph(ndim: int, dtype: str):
    """An empty HNSW graph of the product's shape (also what eval's approximate scoring builds)."""
    if dtype not in DTYPES:
        raise StoreError(f"unknown vector dtype {dtype!r}: use one of {', '.join(DTYPES)}")
    # i8 is only meaningful for cosine over L2-normalised vectors, which is what we store.
    return usearch_index_class()(ndim=ndim, metric="cos", dtype=dtype, connectivity=CONNECTIVITY,
                                 expansion_add=EXPANSION_ADD)


def read_manifest(index_dir: str | os.PathLike) -> dict | None:
    """The current manifest, or None when there is none (no snapshot saved yet) or it is unreadable."""
    try:
        with open(Path(index_dir) / MANIFEST_FILE, encoding="utf-8") as fh:
            m = json.load(fh)
    except (OSError, ValueError):
        return None
    return m if isinstance(m, dict) and m.get("format") == FORMAT else None


def manifest_files(manifest: dict | None) -> list[str]:
    """The file names a manifest refers to."""
    if not manifest:
        return []
    return [manifest[k] for k in ("rows", "exact", "base", "tail", "dead") if manifest.get(k)]


def file_sizes(index_dir: str | os.PathLike) -> dict:
    """Bytes of the current snapshot: graphs, exact vectors, keys (+ dead list and manifest)."""
    d = Path(index_dir)
    m = read_manifest(d) or {}

    def size(name):
        return (d / name).stat().st_size if name and (d / name).exists() else 0

    return {
        "graph_bytes": size(m.get("base")) + size(m.get("tail")),
        "rescore_bytes": size(m.get("exact")),
        "keys_bytes": size(m.get("rows")) + size(m.get("dead")) + size(MANIFEST_FILE),
    }


def map_rows(path: Path, n: int, cols: int, dtype) -> np.ndarray:
    if n == 0:
        return np.zeros((0, cols), dtype)
    return np.memmap(path, dtype=dtype, mode="r", shape=(n, cols))


@dataclass
class Candidates:
    """One query's variant candidates, best first."""

    keys: np.ndarray  # int64 variant keys
    image_ids: np.ndarray  # int64
    scores: np.ndarray  # float32 cosine


def empty_candidates() -> Candidates:
    return Candidates(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32))


# How far a stored vector may lie from the one it stands for and still be that vector: float16
# round-off stays well under EXACT_TOLERANCE per component; an i8 graph keeps about 2 decimal
# digits, but its vector must still point the same way.
EXACT_TOLERANCE = 2e-3
GRAPH_MIN_COSINE = 0.98


def graph_get(graph, keys: np.ndarray, dim: int, dtype) -> tuple[np.ndarray, np.ndarray]:
    """(values, found) of `keys` in one graph, in its own dtype; rows of keys it lacks are zero."""
    got = graph.get(np.asarray(keys, np.uint64)) if len(keys) else ()
    found = np.fromiter((g is not None for g in got), bool, len(keys))
    out = np.zeros((len(keys), dim), dtype)
    if found.any():
        out[found] = np.stack([g for g in got if g is not None])
    return out, found


class Snapshot:
    """One saved generation, opened read-only in O(1): the manifest is read once and the files it
    names are memory-mapped (graphs as usearch views), so a later save never shows through."""

    def __init__(self, index_dir: str | os.PathLike, manifest: dict):
        self.dir = Path(index_dir)
        self.manifest = manifest
        self.generation = int(manifest["generation"])
        self.dim = int(manifest["dim"])
        self.dtype = str(manifest["dtype"])
        self.max_key = int(manifest["max_key"])
        n = int(manifest["n_rows"])
        self.rows = map_rows(self.dir / manifest["rows"], n, 2, np.int64)
        self.exact = map_rows(self.dir / manifest["exact"], n, self.dim, exact_dtype(self.dtype)) \
            if manifest.get("exact") else None
        self.dead = np.load(self.dir / manifest["dead"]) if manifest.get("dead") else np.zeros(0, np.int64)
        Index = usearch_index_class()
        views = []
        for name in (manifest.get("base"), manifest.get("tail")):
            view = None
            if name:
                if not (self.dir / name).is_file():  # removed by a save since the manifest was read:
                    raise FileNotFoundError(self.dir / name)  # open() reads the newer manifest
                view = Index.restore(str(self.dir / name), view=True)
                if view is None:
                    raise StoreError(f"{self.dir / name} is unreadable: run 'edge-t2t verify --repair --index {self.dir}'")
            views.append(view)
        self.base, self.tail = views
        # Keys up to base_max_key were merged into the base; later ones sit in the tail.
        self.base_max_key = int(manifest.get("base_max_key", 0)) if self.base is not None else 0
        self.graphs = [g for g in views if g is not None]
        self.graph_sizes = [len(g) for g in self.graphs]  # usearch's len() is not free: once per open
        self._f32: np.ndarray | None = None
        self._live: np.ndarray | None = None

    @classmethod
    def open(cls, index_dir: str | os.PathLike) -> Snapshot | None:
        """The current snapshot, or None when none was saved. A save that lands between reading the
        manifest and opening its files cannot remove them (the previous generation's files are
        kept); only two saves in that instant can, and then the newer manifest is read."""
        for _ in range(3):
            manifest = read_manifest(index_dir)
            if manifest is None:
                return None
            try:
                return cls(index_dir, manifest)
            except FileNotFoundError:
                continue
        raise StoreError(f"the vector files in {index_dir} keep changing while being read; run the command again")

    @classmethod
    def open_matching(cls, index_dir: str | os.PathLike, dim: int, dtype: str, store_id: str,
                      min_generation: int = 0) -> Snapshot | None:
        """The current snapshot if it belongs to this store (its id), fits its dimension and dtype,
        and is not older than the generation the store recorded (files restored from elsewhere)."""
        snap = cls.open(index_dir)
        if snap is None or snap.dim != dim or snap.dtype != dtype or snap.manifest.get("store_id", "") != store_id \
                or snap.generation < min_generation:
            return None
        return snap

    def __len__(self) -> int:
        return len(self.rows) - len(self.dead)

    def live_mask(self) -> np.ndarray:
        if self._live is None:
            self._live = ~np.isin(np.asarray(self.rows[:, 0]), self.dead) if len(self.dead) else np.ones(len(self.rows), bool)
        return self._live

    def graph_values(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(values in the graphs' own dtype, found) of `keys`: int8 codes for i8."""
        keys = np.asarray(keys, np.int64)
        out = np.zeros((len(keys), self.dim), graph_dtype(self.dtype))
        found = np.zeros(len(keys), bool)
        in_base = keys <= self.base_max_key
        for graph, sel in ((self.base, in_base), (self.tail, ~in_base)):
            if graph is not None and sel.any():
                out[sel], found[sel] = graph_get(graph, keys[sel], self.dim, out.dtype)
        return out, found

    def vectors_at(self, rows: np.ndarray) -> np.ndarray:
        """float32 vectors of snapshot rows as `rescore` and `exact` score them: the exact copy
        when there is one, else the graphs' values (i8 codes as unit vectors)."""
        if self.exact is not None:
            return np.asarray(self.exact[rows], dtype=np.float32)
        values, _ = self.graph_values(np.asarray(self.rows[rows, 0]))
        return unit_rows(values) if self.dtype == "i8" else values.astype(np.float32)

    def _scores(self, q: np.ndarray) -> np.ndarray:
        """(queries, rows) exact cosines. The float32 copy of the exact vectors is kept while it is
        affordable; past that, rows are converted a chunk at a time so memory stays bounded."""
        if self._f32 is None and len(self.rows) * self.dim <= CACHE_F32_ELEMENTS:
            self._f32 = self.vectors_at(np.arange(len(self.rows)))
        if self._f32 is not None:
            return np.einsum("ij,kj->ki", self._f32, q)
        out = np.empty((len(q), len(self.rows)), np.float32)
        step = max(1, CACHE_F32_ELEMENTS // 8 // self.dim)
        for start in range(0, len(self.rows), step):
            chunk = self.vectors_at(np.arange(start, min(start + step, len(self.rows))))
            out[:, start : start + step] = np.einsum("ij,kj->ki", chunk, q)
        return out

    def rows_of(self, keys: np.ndarray) -> np.ndarray:
        return np.searchsorted(self.rows[:, 0], keys)

    def find(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(rows, live) of `keys`: live is False for a key the snapshot lacks or has removed."""
        keys = np.asarray(keys, np.int64)
        rows = np.minimum(self.rows_of(keys), max(len(self.rows) - 1, 0))
        live = np.asarray(self.rows[rows, 0]) == keys if len(self.rows) else np.zeros(len(keys), bool)
        return rows, live & ~self.is_dead(keys)

    def stored(self, keys: np.ndarray, image_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(ok, float32 vectors, graph values) the snapshot holds for these (key, image) pairs. ok
        where the key is live under that image, its graph has it, and an exact copy (if any)
        points the same way as the graph's vector (GRAPH_MIN_COSINE); elsewhere rows are zero."""
        keys = np.asarray(keys, np.int64)
        vectors = np.zeros((len(keys), self.dim), np.float32)
        values = np.zeros((len(keys), self.dim), graph_dtype(self.dtype))
        if not len(self.rows):
            return np.zeros(len(keys), bool), vectors, values
        rows, ok = self.find(keys)
        ok &= np.asarray(self.rows[rows, 1]) == np.asarray(image_ids, np.int64)
        at = np.flatnonzero(ok)
        values[at], found = self.graph_values(keys[at])
        graph_vecs = unit_rows(values[at]) if self.dtype == "i8" else values[at].astype(np.float32)
        if self.exact is not None:
            vectors[at] = np.asarray(self.exact[rows[at]], dtype=np.float32)
            found &= (graph_vecs * unit_rows(vectors[at])).sum(axis=1) >= GRAPH_MIN_COSINE
        else:
            vectors[at] = graph_vecs
        ok[at] = found
        return ok, vectors, values

    def holds(self, keys: np.ndarray, image_ids: np.ndarray, vectors: np.ndarray) -> np.ndarray:
        """Which of these (key, image, float32 vector) the snapshot holds (stored()) with a vector
        that stands for the same one (EXACT_TOLERANCE; GRAPH_MIN_COSINE for i8 codes)."""
        ok, stored, _ = self.stored(keys, image_ids)
        want = np.asarray(vectors, np.float32)
        if self.exact is None and self.dtype == "i8":
            same = (stored * unit_rows(want)).sum(axis=1) >= GRAPH_MIN_COSINE
        else:
            same = np.abs(stored - want).max(axis=1) <= EXACT_TOLERANCE
        return ok & same

    def is_dead(self, keys: np.ndarray) -> np.ndarray:
        if not len(self.dead):
            return np.zeros(len(keys), bool)
        pos = np.minimum(np.searchsorted(self.dead, keys), len(self.dead) - 1)
        return self.dead[pos] == keys

    def search(self, query_vecs: np.ndarray, k: int, mode: str = "rescore", oversample: int = 4) -> list[Candidates]:
        """Up to k variant candidates per query. hnsw: the graphs' (quantised) scores; rescore:
        fetch k*oversample from the graphs and re-score them with exact vectors; exact: brute force."""
        if mode not in VECTOR_MODES:
            raise StoreError(f"unknown search mode {mode!r}: use one of {', '.join(VECTOR_MODES)}")
        q = np.atleast_2d(np.asarray(query_vecs, dtype=np.float32))
        n = len(self)
        k = min(k, n)
        if n == 0 or k <= 0:
            return [empty_candidates() for _ in q]
        want = min(n, k * oversample) if mode == "rescore" else k
        if mode == "exact" or want >= n:
            # Asked for every vector: brute force is exact and costs no more than walking the whole graph.
            return self._search_exact(q, k)
        # Dead keys still sit in the graphs and are dropped here: fetch more until enough live remain.
        fetch = want + min(len(self.dead), want)
        codes = graph_codes(q, self.dtype)
        while True:
            found = self._graph_candidates(codes, fetch)
            if all(len(keys) >= want for keys, _ in found):
                break
            if fetch >= sum(self.graph_sizes):
                # HNSW can leave a few nodes unreachable, so even a whole-graph walk may come back
                # short of `want` live keys; brute force then gives the k best that do exist.
                return self._search_exact(q, k)
            fetch *= 2
        out = []
        for i, (keys, dists) in enumerate(found):
            rows = self.rows_of(keys)
            if mode == "rescore":
                scores = np.einsum("ij,j->i", self.vectors_at(rows), q[i])
            else:
                scores = 1.0 - dists
            order = np.lexsort((keys, -scores))[:k]
            out.append(Candidates(keys[order], np.asarray(self.rows[rows[order], 1]), scores[order].astype(np.float32)))
        return out

    def _graph_candidates(self, codes: np.ndarray, fetch: int) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per query: (live keys, distances) of up to `fetch` nearest per graph."""
        per_graph = []
        for g, size in zip(self.graphs, self.graph_sizes, strict=True):
            if not size:
                continue
            m = g.search(codes, min(fetch, size))
            keys = np.atleast_2d(np.asarray(m.keys))  # a one-row query comes back 1-D
            dists = np.atleast_2d(np.asarray(m.distances))
            counts = np.atleast_1d(np.asarray(getattr(m, "counts", keys.shape[1])))
            per_graph.append((keys, dists, counts))
        out = []
        for i in range(len(codes)):
            keys = np.concatenate([kk[i][: int(c[i])] for kk, _, c in per_graph] or [np.zeros(0)]).astype(np.int64)
            dists = np.concatenate([dd[i][: int(c[i])] for _, dd, c in per_graph] or [np.zeros(0)]).astype(np.float32)
            alive = ~self.is_dead(keys)
            out.append((keys[alive], dists[alive]))
        return out

    def _search_exact(self, q: np.ndarray, k: int) -> list[Candidates]:
        scores = self._scores(q)
        live = self.live_mask()
        if not live.all():
            scores[:, ~live] = -np.inf
        out = []
        total = len(self.rows)
        for row in scores:
            top = np.argpartition(-row, k - 1)[:k] if k < total else np.arange(total)
            top = top[np.isfinite(row[top])]
            top = top[np.lexsort((self.rows[top, 0], -row[top]))]
            out.append(Candidates(np.asarray(self.rows[top, 0]), np.asarray(self.rows[top, 1]), row[top]))
        return out


def exact_candidates(keys: np.ndarray, image_ids: np.ndarray, vectors: np.ndarray, query_vecs: np.ndarray, k: int) -> list[Candidates]:
    """Brute-force candidates over a few vectors held in memory (rows newer than the snapshot)."""
    q = np.atleast_2d(np.asarray(query_vecs, dtype=np.float32))
    if not len(keys):
        return [empty_candidates() for _ in q]
    scores = np.einsum("ij,kj->ki", np.asarray(vectors, np.float32), q)
    out = []
    for row in scores:
        top = np.lexsort((keys, -row))[:k]
        out.append(Candidates(keys[top], image_ids[top], row[top].astype(np.float32)))
    return out


def merge_candidates(a: Candidates, b: Candidates, k: int) -> Candidates:
    keys = np.concatenate([a.keys, b.keys])
    scores = np.concatenate([a.scores, b.scores])
    image_ids = np.concatenate([a.image_ids, b.image_ids])
    top = np.lexsort((keys, -scores))[:k]
    return Candidates(keys[top], image_ids[top], scores[top])
