"""Vector index at scale: usearch HNSW in f32 / f16 / i8, i8 with exact re-scoring, and exact numpy
(and faiss HNSW when a Python with faiss is given), on 384-d vectors shaped like real embeddings.

Data: NOT i.i.d. Gaussian (in 384-d those are near-equidistant and recall against exact measures
noise). Points come from a Gaussian mixture in a 24-d latent space (one cluster per ~100 points,
per-cluster spreads), mapped to 384-d by a fixed random projection plus a little isotropic noise,
then L2-normalised: low intrinsic dimension and clusters, as sentence embeddings have. Queries are
held-out points from the same distribution. The 10th/11th exact-neighbour cosine gap is reported so
the difficulty of recall@10 is visible.

Two int8 encodings are compared:
- "i8": usearch casts float vectors itself (fixed scale: each unit vector component * 127).
- "i8 max-abs": we pass int8 codes scaled per vector so its largest component is +-127. The cosine
  metric is scale-invariant, so nothing else changes, but the codes use the full int8 range
  (a 384-d unit vector's components are mostly < 0.2, so the fixed scale wastes ~2.5 bits).

    .venv/bin/python bench/index_scale.py [--sizes 10000 100000] [--million] [--faiss-python PY]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _common  # noqa: F401  (puts the repo on sys.path)
import numpy as np
from _common import peak_rss_mib, percentile_ms, write_results

DIM = 384
K = 10
DEFAULTS = {"connectivity": 16, "expansion_add": 128, "expansion_search": 64}  # usearch 2.x defaults


def clustered_vectors(n: int, seed: int = 0, latent: int = 24, noise: float = 0.02) -> np.ndarray:
    rng = np.random.default_rng(seed)
    clusters = max(8, n // 100)
    proj = rng.standard_normal((latent, DIM)).astype(np.float32) / np.sqrt(latent)
    centres = rng.standard_normal((clusters, latent)).astype(np.float32)
    spread = rng.uniform(0.3, 0.6, clusters).astype(np.float32)
    out = np.empty((n, DIM), np.float32)
    for start in range(0, n, 100_000):  # in chunks, so 1M does not need several GiB of temporaries
        m = min(100_000, n - start)
        lab = rng.integers(0, clusters, m)
        z = centres[lab] + rng.standard_normal((m, latent)).astype(np.float32) * spread[lab, None]
        x = z @ proj + rng.standard_normal((m, DIM)).astype(np.float32) * noise
        out[start:start + m] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def maxabs_codes(v: np.ndarray) -> np.ndarray:
    return np.round(v / np.abs(v).max(axis=1, keepdims=True) * 127).astype(np.int8)


def exact_topk(q: np.ndarray, x: np.ndarray, k: int = K, chunk: int = 256) -> tuple[np.ndarray, np.ndarray]:
    keys = np.empty((len(q), k), np.int64)
    sims = np.empty((len(q), k + 1), np.float32)
    for s in range(0, len(q), chunk):
        sc = q[s:s + chunk] @ x.T
        part = np.argpartition(-sc, k + 1, axis=1)[:, : k + 1]
        ps = np.take_along_axis(sc, part, 1)
        order = np.argsort(-ps, axis=1)
        keys[s:s + chunk] = np.take_along_axis(part, order, 1)[:, :k]
        sims[s:s + chunk] = np.take_along_axis(ps, order, 1)
    return keys, sims


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(f[:K].tolist()) & set(t.tolist())) / K for f, t in zip(found, truth, strict=True)]))


def time_queries(fn, queries: np.ndarray) -> tuple[list[float], np.ndarray]:
    """One query at a time (an interactive search), single-threaded."""
    lat, keys = [], np.empty((len(queries), K), np.int64)
    for i, q in enumerate(queries):
        t = time.perf_counter()
        keys[i] = fn(q)
        lat.append(time.perf_counter() - t)
    return lat, keys


def build_usearch(x, dtype: str, conn: int, ea: int, threads: int, codes=None):
    from usearch.index import Index

    idx = Index(ndim=DIM, metric="cos", dtype=dtype, connectivity=conn, expansion_add=ea)
    t = time.perf_counter()
    idx.add(np.arange(len(x), dtype=np.uint64), codes if codes is not None else x, threads=threads)
    return idx, time.perf_counter() - t


def usearch_size(idx, tmp: Path, name: str) -> int:
    path = tmp / f"{name}.usearch"
    idx.save(str(path))
    size = path.stat().st_size
    path.unlink()
    return size


def run_faiss(py: str, x: np.ndarray, q: np.ndarray, tmp: Path, threads: int) -> dict | None:
    """faiss lives outside .venv (never installed there): run it in the given interpreter."""
    np.save(tmp / "x.npy", x)
    np.save(tmp / "q.npy", q)
    script = f"""
import json, time, os, numpy as np, faiss
faiss.omp_set_num_threads({threads})
x = np.load({str(tmp / 'x.npy')!r}); q = np.load({str(tmp / 'q.npy')!r})
idx = faiss.IndexHNSWFlat({DIM}, {DEFAULTS['connectivity']}, faiss.METRIC_INNER_PRODUCT)
idx.hnsw.efConstruction = {DEFAULTS['expansion_add']}
t = time.perf_counter(); idx.add(x); build = time.perf_counter() - t
idx.hnsw.efSearch = {DEFAULTS['expansion_search']}
faiss.omp_set_num_threads(1)
lat, keys = [], []
for v in q:
    t = time.perf_counter(); _, i = idx.search(v[None, :], {K}); lat.append(time.perf_counter() - t); keys.append(i[0])
np.save({str(tmp / 'fk.npy')!r}, np.asarray(keys))
faiss.write_index(idx, {str(tmp / 'f.index')!r})
print(json.dumps({{"build_s": build, "lat": lat, "bytes": os.path.getsize({str(tmp / 'f.index')!r}),
                  "version": faiss.__version__}}))
"""
    try:
        out = subprocess.run([py, "-c", script], capture_output=True, text=True, check=True, timeout=3600)
    except (OSError, subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
        print(f"faiss skipped: {exc}", file=sys.stderr)
        return None
    res = json.loads(out.stdout.strip().splitlines()[-1])
    res["keys"] = np.load(tmp / "fk.npy")
    return res


def bench_size(n: int, n_queries: int, threads: int, faiss_py: str | None, tmp: Path, es_sweep: list[int],
               compact: bool = False) -> list[dict]:
    rows: list[dict] = []
    t = time.perf_counter()
    data = clustered_vectors(n + n_queries, seed=n)
    q, x = data[:n_queries], data[n_queries:]
    del data
    print(f"[{n}] generated in {time.perf_counter() - t:.1f} s", flush=True)
    truth, sims = exact_topk(q, x)
    gap = float(np.median(sims[:, K - 1] - sims[:, K]))

    def row(name, build_s, size, lat, keys, settings, note=""):
        r = {
            "n": n, "config": name, "build_s": round(build_s, 2), "bytes": int(size),
            "bytes_per_vector": round(size / n, 1), "p50_ms": round(percentile_ms(lat, 50), 3),
            "p99_ms": round(percentile_ms(lat, 99), 3), "recall@10": round(recall(keys, truth[: len(keys)]), 4),
            "settings": settings, "note": note,
        }
        rows.append(r)
        print(f"[{n}] {name:<34} build {r['build_s']:>7.1f} s  {r['bytes_per_vector']:>7.1f} B/vec  "
              f"p50 {r['p50_ms']:.3f} ms  p99 {r['p99_ms']:.3f} ms  recall {r['recall@10']:.4f}", flush=True)

    # Exact numpy (brute force, f32 matrix in memory; f16 on disk would be half).
    def brute(v):
        s = x @ v
        top = np.argpartition(-s, K)[:K]
        return top[np.argsort(-s[top])]

    lat, keys = time_queries(brute, q[: min(200, n_queries)])
    row("exact numpy f32", 0.0, x.nbytes, lat, keys, {}, "brute force; 200 queries")

    f16 = x.astype(np.float16)
    codes_x, codes_q = maxabs_codes(x), maxabs_codes(q)
    # --compact (for 1M on 2 cores): only the small-graph int8 configs below, against exact numpy.
    full_configs = () if compact else (("f32", None), ("f16", None), ("i8", None), ("i8 max-abs", codes_x))
    for dtype, codes in full_configs:
        real = "i8" if dtype.startswith("i8") else dtype
        idx, build = build_usearch(x, real, DEFAULTS["connectivity"], DEFAULTS["expansion_add"], threads, codes)
        size = usearch_size(idx, tmp, real)
        qq = codes_q if codes is not None else q
        sweep = es_sweep if real == "i8" else [DEFAULTS["expansion_search"]]
        for es in sweep:
            idx.expansion_search = es
            settings = {**DEFAULTS, "expansion_search": es}
            lat, keys = time_queries(lambda v, idx=idx: idx.search(v, K, threads=1).keys, qq)
            row(f"usearch {dtype} es={es}", build, size, lat, keys, settings)
            if real == "i8":
                # Over-fetch 4k from the int8 graph, re-score exactly against f16 vectors kept beside it.
                def rescored(v, vf, idx=idx):
                    cand = idx.search(v, 4 * K, threads=1).keys.astype(np.int64)
                    s = f16[cand].astype(np.float32) @ vf
                    return cand[np.argsort(-s)[:K]]

                lat, keys = [], np.empty((len(q), K), np.int64)
                for i in range(len(q)):
                    t = time.perf_counter()
                    keys[i] = rescored(qq[i], q[i])
                    lat.append(time.perf_counter() - t)
                row(f"usearch {dtype} es={es} + f16 rescore x4", build, size + f16.nbytes, lat, keys,
                    {**settings, "oversample": 4}, "size counts the f16 re-scoring vectors")
        del idx
    # Smaller graph: fewer links per node to cut bytes/vector and build time, with wider search.
    for conn, ea in ((8, 64), (12, 96)):
        idx, build = build_usearch(x, "i8", conn, ea, threads, codes_x)
        size = usearch_size(idx, tmp, "i8c")
        for es in es_sweep:
            idx.expansion_search = es
            lat, keys = time_queries(lambda v, idx=idx: idx.search(v, K, threads=1).keys, codes_q)
            row(f"usearch i8 max-abs c={conn} ea={ea} es={es}", build, size, lat, keys,
                {"connectivity": conn, "expansion_add": ea, "expansion_search": es})
        del idx
    if faiss_py:
        res = run_faiss(faiss_py, x, q, tmp, threads)
        if res:
            row("faiss HNSWFlat f32", res["build_s"], res["bytes"], res["lat"], res["keys"],
                {"M": DEFAULTS["connectivity"], "efConstruction": DEFAULTS["expansion_add"],
                 "efSearch": DEFAULTS["expansion_search"]}, f"faiss {res['version']} (separate venv)")
    for r in rows:
        r["top10_gap_median"] = round(gap, 5)
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    ap.add_argument("--million", action="store_true", help="also 1,000,000 vectors (many minutes on 2 cores)")
    ap.add_argument("--queries", type=int, default=500)
    ap.add_argument("--threads", type=int, default=2, help="threads for index builds (queries use 1)")
    ap.add_argument("--es", type=int, nargs="+", default=[64, 128], help="expansion_search values for int8")
    ap.add_argument("--compact", action="store_true",
                    help="only the compact int8 graphs (c=8, c=12) against exact numpy; results go to "
                         "index_scale_compact.{json,md} (how 1M is run here: f32/f16 graphs take hours)")
    ap.add_argument("--faiss-python", default=None,
                    help="a Python interpreter that can import faiss (e.g. a /tmp venv); skipped when absent")
    args = ap.parse_args()
    faiss_py = args.faiss_python
    if faiss_py is None:
        try:
            import faiss  # noqa: F401

            faiss_py = sys.executable
        except ImportError:
            print("faiss is not importable here and no --faiss-python was given: faiss skipped", file=sys.stderr)
    sizes = args.sizes + ([1_000_000] if args.million else [])
    tmp = Path(tempfile.mkdtemp(prefix="index_scale_"))
    rows: list[dict] = []
    try:
        for n in sizes:
            rows += bench_size(n, args.queries, args.threads, None if args.compact else faiss_py, tmp, args.es,
                               compact=args.compact)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    peer = "exact" if args.compact else "f32"
    lines = [f"| n | config | build s | B/vector | p50 ms | p99 ms | recall@10 | vs {peer} p50 | vs {peer} size |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        peers = [b for b in rows if b["n"] == r["n"] and b["config"].startswith("usearch f32")]
        base = peers[0] if peers else next(b for b in rows if b["n"] == r["n"] and b["config"].startswith("exact"))
        lines.append(
            f"| {r['n']:,} | {r['config']} | {r['build_s']:.1f} | {r['bytes_per_vector']:.0f} | {r['p50_ms']:.3f} | "
            f"{r['p99_ms']:.3f} | {r['recall@10']:.4f} | {r['p50_ms'] / base['p50_ms']:.2f}x | "
            f"{r['bytes_per_vector'] / base['bytes_per_vector']:.2f}x |")
    gaps = ", ".join(f"{n:,}: {next(r['top10_gap_median'] for r in rows if r['n'] == n):.4f}" for n in sizes)
    lines += ["", f"dim {DIM}, k={K}, {args.queries} held-out queries one at a time on 1 thread (exact numpy: 200); "
              f"builds on {args.threads} threads. Median cosine gap between exact 10th and 11th neighbour: {gaps}. "
              "usearch defaults: connectivity 16, expansion_add 128, expansion_search 64. "
              "'i8 max-abs' = int8 codes scaled per vector (see the bench docstring). "
              + ("" if 1_000_000 in sizes else "1M vectors were NOT run (pass --million). ")
              + ("" if faiss_py else "faiss not run (not installed; pass --faiss-python).")]
    write_results("index_scale_compact" if args.compact else "index_scale", {"sizes": sizes, "queries": args.queries, "dim": DIM, "k": K,
                                  "usearch_defaults": DEFAULTS, "faiss": bool(faiss_py), "rows": rows,
                                  "peak_rss_mib": round(peak_rss_mib(), 1),
                                  "usearch_version": __import__("usearch").__version__}, "\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    raise SystemExit(main())
