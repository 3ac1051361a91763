"""The vector snapshot beside the store: HNSW graphs (usearch), each vector stored once.

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
  before the lean layout (issue 25: the README's "Exact copy" gives the figures behind keeping
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
keys. Past that it is merged into the base (the base graph is loaded, the tail's vectors inserted,
the base saved: O(N) bytes moved once per TAIL_MAX texts); the removed keys are compacted away (a
full rebuild, indexdir.py) when they pass a tenth of the rows.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
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


def _map_rows(path: Path, n: int, cols: int, dtype) -> np.ndarray:
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


def _graph_get(graph, keys: np.ndarray, dim: int, dtype) -> tuple[np.ndarray, np.ndarray]:
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
        self.rows = _map_rows(self.dir / manifest["rows"], n, 2, np.int64)
        self.exact = _map_rows(self.dir / manifest["exact"], n, self.dim, exact_dtype(self.dtype)) \
            if manifest.get("exact") else None
        self.dead = np.load(self.dir / manifest["dead"]) if manifest.get("dead") else np.zeros(0, np.int64)
        Index = usearch_index_class()
        views = []
        for name in (manifest.get("base"), manifest.get("tail")):
            view = None
            if name:
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
                out[sel], found[sel] = _graph_get(graph, keys[sel], self.dim, out.dtype)
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
        rows = _map_rows(self.dir / self.rows_name, self.n_rows, 2, np.int64)[:, 0]
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
            values, _ = _graph_get(self.tail, chunk, self.dim, graph_dtype(self.dtype))
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
