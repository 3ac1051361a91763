"""Index growth: what an update and a query cost as an archive grows from 1k to 1M texts.

Everything goes through the code the CLI runs: `Indexer.run` on a captions file (lock, SQLite,
the vector snapshot's incremental save), `search.open_for_search` + `search.rank_images` (the
in-process query: open the snapshot, rank, read the winning rows), and `edge-t2t search` as a
subprocess. Only the embedder is replaced, by a deterministic clustered vector source (each text
hashes to one of 2,000 cluster centres plus two rows of a fixed noise table), so that a million
texts take minutes, not hours. It carries the real int8 embedder's identity so that the CLI's
query, embedded by the real model, is accepted: the CLI figures time the path, the rankings
against synthetic vectors mean nothing.

Measured:
- growth: the index is grown by `index --captions` runs (5 texts per image, text mode joined);
  texts/s of each run, and of the whole growth;
- at 1k, 10k, 100k and 1M texts: adding 1,000 texts (200 images) in a fresh process, timed inside
  (Indexer.run) and as the whole process, with its peak RSS; in-process search p50 / p99 (query
  already embedded, k = 10, default mode); `edge-t2t search` from process start to printed
  results, with its peak RSS;
- bytes on disk per image for each text mode, measured on synthetic scenes' structured
  descriptions (bench --scenes images) and scaled linearly to 100k images.

    .venv/bin/python bench/index_growth.py                 # 1k .. 1M (about 15 min on 2 cores)
    .venv/bin/python bench/index_growth.py --max-texts 100000 --quick
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
import zlib
from pathlib import Path

import numpy as np
from _common import ROOT, percentile_ms, write_results

DIM = 384
N_CLUSTERS = 2000
SIZES = (1_000, 10_000, 100_000, 1_000_000)
TEXTS_PER_IMAGE = 5
ADD_TEXTS = 1_000
QUERIES = 200


class ClusteredVectors:
    """A stand-in for the Embedder: same attributes, deterministic clustered unit vectors."""

    def __init__(self, identity: dict, manifest: dict, dim: int = DIM, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.centres = rng.standard_normal((N_CLUSTERS, dim)).astype(np.float32)
        self.noise = rng.standard_normal((4096, dim)).astype(np.float32)
        self.dim, self.name, self.precision, self.max_tokens = dim, identity.get("name", "clustered"), "int8", 256
        self.identity, self.manifest = identity, manifest
        self.truncated = 0

    def embed(self, texts, batch_size: int = 64) -> np.ndarray:
        if isinstance(texts, str):
            texts = [texts]
        h = np.fromiter((zlib.crc32(t.encode()) for t in texts), dtype=np.uint64, count=len(texts))
        v = self.centres[h % N_CLUSTERS] + 0.45 * self.noise[(h >> 11) % 4096] + 0.3 * self.noise[(h >> 21) % 4096]
        return (v / np.linalg.norm(v, axis=1, keepdims=True)).astype(np.float32)


def real_identity() -> tuple[dict, dict]:
    from edge_t2t.embedder import Embedder

    emb = Embedder(precision="int8")
    return emb.identity, getattr(emb, "manifest", {})


def write_captions(path: Path, start: int, n_images: int) -> None:
    """Images start..start+n-1, 5 short caption variants each (RSICD-like lengths)."""
    with open(path, "w") as fh:
        for i in range(start, start + n_images):
            variants = [f"scene {i} view {j}: a {('river', 'road', 'field', 'harbour', 'runway')[(i + j) % 5]} "
                        f"near {('trees', 'houses', 'tanks', 'a bridge', 'a lake')[(i * 7 + j) % 5]} "
                        f"in the {('north', 'south', 'east', 'west', 'centre')[(i * 3 + j) % 5]}"
                        for j in range(TEXTS_PER_IMAGE)]
            fh.write(json.dumps({"image": f"img{i:07d}.jpg", "variants": variants}) + "\n")


def index_run(index_dir: Path, captions: Path, emb) -> tuple[float, dict]:
    from edge_t2t.indexer import Indexer

    t0 = time.perf_counter()
    s = Indexer(index_dir, embedder=emb, text_mode="joined", batch_size=256).run([], captions_file=captions)
    return time.perf_counter() - t0, s.to_dict()


def child(args) -> int:
    """`--child-add INDEX CAPTIONS`: one add run in its own process (for its time and peak RSS)."""
    t_start = time.perf_counter()
    identity, manifest = json.loads(Path(args.identity).read_text())
    emb = ClusteredVectors(identity, manifest)
    seconds, summary = index_run(Path(args.child_add[0]), Path(args.child_add[1]), emb)
    print(json.dumps({"run_seconds": seconds, "process_seconds": time.perf_counter() - t_start,
                      "texts_added": summary["texts_added"], "stage_seconds": summary["stage_seconds"]}))
    return 0


def run_measured(argv: list[str]) -> tuple[float, float, subprocess.CompletedProcess]:
    """(wall seconds, peak RSS MiB, result) of one child process, from fork to exit (os.wait4
    gives that child's own resource usage)."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(argv, stdout=out, stderr=err, text=True, cwd=ROOT)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        return wall, usage.ru_maxrss / 1024, subprocess.CompletedProcess(argv, proc.returncode, out.read(), err.read())


def search_in_process(index_dir: Path, emb, n_queries: int) -> dict:
    from edge_t2t import search as S

    q = emb.embed([f"query {i}: a runway near a lake in the east" for i in range(n_queries)])
    t_open = time.perf_counter()
    store, vectors = S.open_for_search(index_dir)
    open_s = time.perf_counter() - t_open
    try:
        S.rank_images(store, vectors, q[:1], 10)  # warm: views mapped, page cache
        seconds = []
        for row in q:
            t0 = time.perf_counter()
            hits = S.rank_images(store, vectors, row[None, :], 10)
            seconds.append(time.perf_counter() - t0)
            assert len(hits) == 10
    finally:
        store.close()
    return {"open_ms": open_s * 1000, "p50_ms": percentile_ms(seconds, 50), "p99_ms": percentile_ms(seconds, 99)}


def search_cli(index_dir: Path, repeats: int) -> dict:
    walls, rss = [], 0.0
    for i in range(repeats):
        argv = [sys.executable, "-m", "edge_t2t", "search", f"a runway near a lake {i}", "--index", str(index_dir),
                "-k", "10", "--json"]
        wall, peak, res = run_measured(argv)
        assert res.returncode == 0 and len(res.stdout.splitlines()) == 10, res.stderr[-2000:]
        walls.append(wall)
        rss = max(rss, peak)
    return {"p50_s": float(np.median(walls)), "max_s": float(max(walls)), "peak_rss_mib": rss}


def bytes_per_image(work: Path, emb, n_images: int) -> dict:
    """Bytes on disk per image for each text mode, on the synthetic scenes' structured descriptions."""
    from edge_t2t.indexer import Indexer
    from edge_t2t.scenes import describe, make_scenes

    caps = work / "scenes.jsonl"
    with open(caps, "w") as fh:
        for i, scene in enumerate(make_scenes(n_images, seed=7, size=32)):
            rec = describe(scene, seed=7).to_dict()
            rec["image"] = f"scene{i:06d}.png"
            fh.write(json.dumps(rec) + "\n")
    out = {}
    for mode in ("joined", "fields", "sentences"):
        d = work / f"bytes-{mode}"
        s = Indexer(d, embedder=emb, text_mode=mode).run([], captions_file=caps)
        sizes = {p.name: p.stat().st_size for p in d.iterdir() if p.is_file()}
        total = sum(sizes.values())
        sqlite_bytes = sum(v for k, v in sizes.items() if k.startswith("store.sqlite"))
        out[mode] = {
            "images": s.added, "texts": s.texts_added, "texts_per_image": s.texts_added / s.added,
            "bytes_per_image": total / s.added, "sqlite_bytes_per_image": sqlite_bytes / s.added,
            "vector_files_bytes_per_image": (total - sqlite_bytes) / s.added,
            "gib_at_100k_images": total / s.added * 100_000 / 2**30,
        }
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--max-texts", type=int, default=SIZES[-1])
    ap.add_argument("--step", type=int, default=50_000, help="texts per growth run past 100k (default 50,000)")
    ap.add_argument("--cli-repeats", type=int, default=5)
    ap.add_argument("--scene-images", type=int, default=1000, help="images per text mode for bytes per image")
    ap.add_argument("--work", type=Path, default=None, help="work directory (default: a temp dir, deleted)")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    ap.add_argument("--name", default="index_growth")
    ap.add_argument("--child-add", nargs=2, metavar=("INDEX", "CAPTIONS"), help=argparse.SUPPRESS)
    ap.add_argument("--identity", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child_add:
        return child(args)

    work = args.work or Path(tempfile.mkdtemp(prefix="index-growth-", dir=ROOT / "bench"))
    work.mkdir(parents=True, exist_ok=True)
    identity, manifest = real_identity()
    ident_file = work / "identity.json"
    ident_file.write_text(json.dumps([identity, manifest]))
    emb = ClusteredVectors(identity, manifest)
    index_dir = work / "index"
    sizes = [n for n in SIZES if n <= args.max_texts]
    # growth plan: reach each size, with equal steps past 100k so the import rates compare
    targets = sorted(set(sizes) | set(range(100_000 + args.step, args.max_texts + 1, args.step)))
    growth, at_size = [], {}
    texts = 0
    next_image = 0
    t_growth = time.perf_counter()
    try:
        for target in targets:
            n_images = (target - texts) // TEXTS_PER_IMAGE
            caps = work / "chunk.jsonl"
            write_captions(caps, next_image, n_images)
            next_image += n_images
            seconds, summary = index_run(index_dir, caps, emb)
            texts += summary["texts_added"]
            growth.append({"texts_after": texts, "texts_added": summary["texts_added"], "seconds": seconds,
                           "texts_per_s": summary["texts_added"] / seconds, "stage_seconds": summary["stage_seconds"]})
            print(f"[growth] {texts:>9,} texts  +{summary['texts_added']:,} in {seconds:6.1f} s  "
                  f"({summary['texts_added'] / seconds:,.0f} texts/s)", flush=True)
            if target not in sizes:
                continue
            row: dict = {"texts": texts}
            row["search"] = search_in_process(index_dir, emb, QUERIES)
            row["search_cli"] = search_cli(index_dir, args.cli_repeats)
            add_caps = work / "add.jsonl"
            write_captions(add_caps, next_image, ADD_TEXTS // TEXTS_PER_IMAGE)
            next_image += ADD_TEXTS // TEXTS_PER_IMAGE
            argv = [sys.executable, str(Path(__file__).resolve()), "--child-add", str(index_dir), str(add_caps),
                    "--identity", str(ident_file)]
            wall, rss, res = run_measured(argv)
            assert res.returncode == 0, res.stderr[-3000:]
            add = json.loads(res.stdout.strip().splitlines()[-1])
            texts += add["texts_added"]
            row["add_1000"] = {**add, "process_wall_s": wall, "peak_rss_mib": rss}
            row["disk_bytes"] = sum(p.stat().st_size for p in index_dir.iterdir() if p.is_file())
            row["manifest"] = json.loads((index_dir / "manifest.json").read_text())
            at_size[target] = row
            print(f"[size {target:,}] add 1000: {add['run_seconds']:.2f} s in-run, {wall:.2f} s process, "
                  f"RSS {rss:.0f} MiB; search p50 {row['search']['p50_ms']:.2f} ms "
                  f"p99 {row['search']['p99_ms']:.2f} ms; CLI {row['search_cli']['p50_s']:.2f} s", flush=True)
        growth_s = time.perf_counter() - t_growth
        bpi = bytes_per_image(work, emb, args.scene_images)
    finally:
        if not args.keep and args.work is None:
            shutil.rmtree(work, ignore_errors=True)

    first, last = sizes[0], sizes[-1]
    add_ratio = at_size[last]["add_1000"]["run_seconds"] / at_size[first]["add_1000"]["run_seconds"]
    steady = [g["texts_per_s"] for g in growth if g["texts_after"] > 100_000] or [g["texts_per_s"] for g in growth]
    med = float(np.median(steady))
    spread = (min(steady) / med - 1, max(steady) / med - 1)
    data = {
        "note": "Machine shared with other engineers' jobs while this ran: ratios within the run are the figures.",
        "vector_source": "deterministic clustered vectors (2,000 centres), not the real embedder",
        "dim": DIM, "text_mode": "joined", "texts_per_image": TEXTS_PER_IMAGE,
        "growth": growth, "growth_seconds": growth_s, "at_size": {str(k): v for k, v in at_size.items()},
        "add_1000_ratio_largest_to_1k": add_ratio,
        "import_rate_median_texts_per_s": med, "import_rate_spread": spread,
        "bytes_per_image": bpi,
    }
    lines = [
        "| texts in index | add 1,000 texts (in run) | × at 1k | add, whole process | peak RSS of add | "
        "search p50 / p99 (in-process) | `edge-t2t search` p50 | its peak RSS | disk |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for n, row in at_size.items():
        a = row["add_1000"]
        lines.append(
            f"| {n:,} | {a['run_seconds']:.2f} s | {a['run_seconds'] / at_size[first]['add_1000']['run_seconds']:.2f} "
            f"| {a['process_wall_s']:.2f} s | {a['peak_rss_mib']:.0f} MiB | {row['search']['p50_ms']:.2f} / "
            f"{row['search']['p99_ms']:.2f} ms | {row['search_cli']['p50_s']:.2f} s | "
            f"{row['search_cli']['peak_rss_mib']:.0f} MiB | {row['disk_bytes'] / 2**20:.0f} MiB |"
        )
    lines += [
        "",
        f"Growth to {texts:,} texts by `index --captions` runs: {growth_s:.0f} s; import rate past 100k texts "
        f"median {med:,.0f} texts/s, spread {spread[0] * 100:+.0f}% / {spread[1] * 100:+.0f}% "
        f"(runs of {args.step:,} texts, tail merges included where they fell).",
        "",
        "| text mode | texts/image | bytes/image | of which SQLite | GiB at 100k images |",
        "|---|---:|---:|---:|---:|",
    ]
    for mode, b in bpi.items():
        lines.append(f"| {mode} | {b['texts_per_image']:.1f} | {b['bytes_per_image'] / 1024:.1f} KiB | "
                     f"{b['sqlite_bytes_per_image'] / 1024:.1f} KiB | {b['gib_at_100k_images']:.2f} |")
    lines += ["", "Vectors: deterministic clustered stand-in for the embedder (dim 384); the real embedder's "
              "time per text comes on top. Peak RSS: of that one process (os.wait4). Machine shared with other jobs."]
    write_results(args.name, data, "\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
