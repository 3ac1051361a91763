"""Index growth: what an update and a query cost as an archive grows from 1k to 1M texts.

Everything goes through the code the CLI runs: `Indexer.run` on a captions file (lock, SQLite,
the vector snapshot's incremental save), `searcher.Searcher` + `search.rank_images` (the
in-process query: open the snapshot, rank, read the winning rows), and `edge-t2t search` as a
subprocess. Only the embedder is replaced, by a deterministic clustered vector source (each text
hashes to one of 2,000 cluster centres plus two rows of a fixed noise table), so that a million
texts take minutes, not hours. It carries the real int8 embedder's identity so that the CLI's
query, embedded by the real model, is accepted: the CLI figures time the path, the rankings
against synthetic vectors mean nothing.

Measured, at 1k, 10k, 100k and 1M texts (5 texts per image, text mode joined, i8 index). Each
size's index is seeded in bulk (SQLite rows written with executemany, then the snapshot built by
IndexDir.rebuild, the code `verify --repair` runs), because growing to 1M texts one import at a
time takes hours on 2 shared cores. Then, through the product's code:
- adding 1,000 texts (200 images) with Indexer.run in a fresh process: time inside the run, time
  of the whole process, and its peak RSS;
- the import rate of a larger `index --captions` run (10,000 texts) at that size, and the same
  with its share of the tail merge that every TAIL_MAX texts cost (the merge is timed too);
- in-process search p50 / p99 (query already embedded, k = 10, default mode) and `edge-t2t
  search` from process start to printed results, with its peak RSS;
- bytes on disk per image for each text mode, measured on synthetic scenes' structured
  descriptions and scaled linearly to 100k images.

    .venv/bin/python bench/index_growth.py                       # 1k .. 1M
    .venv/bin/python bench/index_growth.py --sizes 1000,10000 --name index_growth_smoke
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
    from edge_t2t.embed.embedder import Embedder

    emb = Embedder(precision="int8")
    return emb.identity, getattr(emb, "manifest", {})


def caption_text(i: int, j: int) -> str:
    """Variant j of image i: a short caption (RSICD-like length)."""
    return (f"scene {i} view {j}: a {('river', 'road', 'field', 'harbour', 'runway')[(i + j) % 5]} "
            f"near {('trees', 'houses', 'tanks', 'a bridge', 'a lake')[(i * 7 + j) % 5]} "
            f"in the {('north', 'south', 'east', 'west', 'centre')[(i * 3 + j) % 5]}")


def write_captions(path: Path, start: int, n_images: int) -> None:
    """Images start..start+n-1 (named as seed() names them), 5 caption variants each."""
    with open(path, "w") as fh:
        for i in range(start, start + n_images):
            variants = [caption_text(i, j) for j in range(TEXTS_PER_IMAGE)]
            fh.write(json.dumps({"image": f"img{i:07d}.jpg", "variants": variants}) + "\n")


def index_run(index_dir: Path, captions: Path, emb) -> tuple[float, dict]:
    from edge_t2t.index.indexer import Indexer

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


# Peak RSS comes from the child's own /proc/self/status VmHWM at exit: ru_maxrss of a child keeps
# the high-water mark of the address space it was forked from (the bench's, hundreds of MiB).
_WITH_PEAK = ("import atexit, sys\n"
              "def _peak():\n"
              "    hwm = [ln for ln in open('/proc/self/status') if ln.startswith('VmHWM')][0].split()[1]\n"
              "    sys.stderr.write(f'\\nVMHWM_KIB {hwm}\\n')\n"
              "atexit.register(_peak)\n")


def run_measured(argv: list[str]) -> tuple[float, float, subprocess.CompletedProcess]:
    """(wall seconds, peak RSS MiB, result) of one Python child, from fork to exit. argv is the
    Python program's own argv (after `python`); CPU seconds come from os.wait4."""
    code = _WITH_PEAK + ("import os, runpy; sys.argv = sys.argv[1:]; sys.path.insert(0, os.path.dirname(sys.argv[0])); "
                         "runpy.run_path(sys.argv[0], run_name='__main__')")
    if argv[0] == "-m":
        code = _WITH_PEAK + f"import runpy; sys.argv = ['{argv[1]}'] + sys.argv[1:]; runpy.run_module('{argv[1]}', run_name='__main__', alter_sys=True)"
        argv = argv[2:]
    full = [sys.executable, "-c", code, *argv]
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(full, stdout=out, stderr=err, text=True, cwd=ROOT)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        out.seek(0)
        err.seek(0)
        res = subprocess.CompletedProcess(full, os.waitstatus_to_exitcode(status), out.read(), err.read())
        res.cpu_s = usage.ru_utime + usage.ru_stime  # what it would take on an idle machine, roughly
        peak = [ln for ln in res.stderr.splitlines() if ln.startswith("VMHWM_KIB ")]
        return wall, (int(peak[-1].split()[1]) / 1024 if peak else float("nan")), res


def search_in_process(index_dir: Path, emb, n_queries: int) -> dict:
    from edge_t2t.query import search as S
    from edge_t2t.query.searcher import Searcher

    q = emb.embed([f"query {i}: a runway near a lake in the east" for i in range(n_queries)])
    t_open = time.perf_counter()
    searcher = Searcher(index_dir).open()
    store, vectors = searcher.store, searcher.vectors
    open_s = time.perf_counter() - t_open
    try:
        S.rank_images(store, vectors, q[:1], 10)  # warm: views mapped, page cache
        seconds, cpu = [], []
        for row in q:
            t0, c0 = time.perf_counter(), time.process_time()
            hits = S.rank_images(store, vectors, row[None, :], 10)
            seconds.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
            assert len(hits) == 10
    finally:
        searcher.close()
    # CPU time as well: on a machine shared by many jobs a query mostly waits for a core.
    return {"open_ms": open_s * 1000, "p50_ms": percentile_ms(seconds, 50), "p99_ms": percentile_ms(seconds, 99),
            "cpu_p50_ms": percentile_ms(cpu, 50), "cpu_p99_ms": percentile_ms(cpu, 99)}


def search_cli(index_dir: Path, repeats: int) -> dict:
    walls, cpus, rss = [], [], 0.0
    for i in range(repeats):
        argv = ["-m", "edge_t2t", "search", f"a runway near a lake {i}", "--index", str(index_dir), "-k", "10", "--json"]
        wall, peak, res = run_measured(argv)
        assert res.returncode == 0 and len(res.stdout.splitlines()) == 10, res.stderr[-2000:]
        walls.append(wall)
        cpus.append(res.cpu_s)
        rss = max(rss, peak)
    return {"p50_s": float(np.median(walls)), "max_s": float(max(walls)), "cpu_p50_s": float(np.median(cpus)),
            "peak_rss_mib": rss}


def bytes_per_image(work: Path, emb, n_images: int) -> dict:
    """Bytes on disk per image for each text mode, on the synthetic scenes' structured descriptions."""
    from edge_t2t.demo.scenes import describe, make_scenes
    from edge_t2t.index.indexer import Indexer

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


def seed(index_dir: Path, emb, n_texts: int) -> float:
    """An index of n_texts texts as `index --captions` would leave it, written in bulk (SQLite rows
    with executemany, then the snapshot by IndexDir.rebuild, the code `verify --repair` runs), so
    that 1M texts take minutes. Returns the seconds of the snapshot build."""
    from edge_t2t.index.indexdir import IndexDir
    from edge_t2t.index.store import Store

    n_images = n_texts // TEXTS_PER_IMAGE
    with Store(index_dir, create=True) as st, st.transaction():
        st.set_meta("embedder_identity", emb.identity)
        st.set_meta("embedder_manifest", emb.manifest)
        st.set_meta("dim", DIM)
        st.set_meta("dtype", "i8")
        st.set_meta("text_mode", "joined")
        st.set_meta("created_at", time.time())
        st.set_meta("max_texts_per_image", TEXTS_PER_IMAGE)
        desc = st._description_id({"model": "imported:bench", "mmproj": "", "family": "", "prompt_version": "",
                                   "test_model": False, "constrained": False})
        step = 20_000
        for start in range(0, n_images, step):
            ids = range(start, min(n_images, start + step))
            st.conn.executemany(
                "INSERT INTO images(id, path, sha256, status, source, desc_hash, description_id, indexed_at) "
                "VALUES (?, ?, '', 'ok', 'captions', 'bench', ?, 0)",
                ((i + 1, f"img{i:07d}.jpg", desc) for i in ids),
            )
            texts = [(i, j, caption_text(i, j)) for i in ids for j in range(TEXTS_PER_IMAGE)]
            vecs = emb.embed([t for _, _, t in texts])
            # schema v7: one variant row and one text row per caption (ids in step), its vector
            # pending until the snapshot below holds it
            first = st.conn.execute("SELECT IFNULL(MAX(id), 0) FROM variants").fetchone()[0] + 1
            st.conn.executemany(
                "INSERT INTO variants(id, image_id, ordinal, one_sentence, features, caption) VALUES (?, ?, ?, ?, '[]', '')",
                ((first + n, i + 1, j, t) for n, (i, j, t) in enumerate(texts)),
            )
            st.conn.executemany("INSERT INTO texts(id, variant_id, field, text) VALUES (?, ?, 'joined', ?)",
                                ((first + n, first + n, t) for n, (_, _, t) in enumerate(texts)))
            st.conn.executemany("INSERT INTO pending_vectors(key, vector) VALUES (?, ?)",
                                ((first + n, v.tobytes()) for n, v in enumerate(vecs)))
    t0 = time.perf_counter()
    with IndexDir.open_writer(index_dir) as ix:
        ix.rebuild()
    return time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=lambda s: [int(x) for x in s.split(",") if x], default=list(SIZES),
                    help="index sizes in texts, comma-separated (default 1k,10k,100k,1M; empty: bytes per image only)")
    ap.add_argument("--import-texts", type=int, default=10_000, help="texts of the import-rate run at each size")
    ap.add_argument("--cli-repeats", type=int, default=5)
    ap.add_argument("--scene-images", type=int, default=500, help="images per text mode for bytes per image")
    ap.add_argument("--work", type=Path, default=None, help="work directory (default: a temp dir, deleted)")
    ap.add_argument("--name", default="index_growth")
    ap.add_argument("--child-add", nargs=2, metavar=("INDEX", "CAPTIONS"), help=argparse.SUPPRESS)
    ap.add_argument("--identity", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child_add:
        return child(args)

    work = args.work or Path(tempfile.mkdtemp(prefix="index-growth-"))
    work.mkdir(parents=True, exist_ok=True)
    identity, manifest = real_identity()
    ident_file = work / "identity.json"
    ident_file.write_text(json.dumps([identity, manifest]))
    emb = ClusteredVectors(identity, manifest)
    at_size: dict = {}
    t_all = time.perf_counter()
    bpi: dict = {}
    try:
        for n in args.sizes:
            index_dir = work / f"index-{n}"
            row: dict = {"texts": n, "seed_snapshot_build_s": seed(index_dir, emb, n)}
            next_image = n // TEXTS_PER_IMAGE
            row["search"] = search_in_process(index_dir, emb, QUERIES)
            row["search_cli"] = search_cli(index_dir, args.cli_repeats)
            # add 1,000 texts (200 images) in a process of its own: time and peak RSS
            add_caps = work / "add.jsonl"
            write_captions(add_caps, next_image, ADD_TEXTS // TEXTS_PER_IMAGE)
            next_image += ADD_TEXTS // TEXTS_PER_IMAGE
            argv = [str(Path(__file__).resolve()), "--child-add", str(index_dir), str(add_caps),
                    "--identity", str(ident_file)]
            wall, rss, res = run_measured(argv)
            assert res.returncode == 0, res.stderr[-3000:]
            add = json.loads(res.stdout.strip().splitlines()[-1])
            row["add_1000"] = {**add, "process_wall_s": wall, "process_cpu_s": res.cpu_s, "peak_rss_mib": rss}
            # import rate at this size: one larger run, plus what merging its texts into the base costs
            caps = work / "import.jsonl"
            write_captions(caps, next_image, args.import_texts // TEXTS_PER_IMAGE)
            seconds, summary = index_run(index_dir, caps, emb)
            merge_s = force_merge(index_dir)
            texts = summary["texts_added"]
            # every text is inserted twice: into the tail, then into the base when the tail is merged
            # (conservative: the load/save part of a merge is shared by TAIL_MAX texts, not by these)
            amortised = seconds + merge_s * texts / (texts + ADD_TEXTS)
            row["import"] = {"texts": texts, "seconds": seconds, "texts_per_s": texts / seconds,
                             "stage_seconds": summary["stage_seconds"], "merge_seconds": merge_s,
                             "texts_per_s_with_merge_share": texts / amortised}
            row["disk_bytes"] = sum(p.stat().st_size for p in index_dir.iterdir() if p.is_file())
            at_size[n] = row
            print(f"[{n:,} texts] seed build {row['seed_snapshot_build_s']:.0f} s; add 1000: {add['run_seconds']:.2f} s "
                  f"in run, {wall:.2f} s process, RSS {rss:.0f} MiB; import {texts / seconds:,.0f} texts/s "
                  f"(merge {merge_s:.1f} s); search p50 {row['search']['p50_ms']:.2f} ms p99 "
                  f"{row['search']['p99_ms']:.2f} ms; CLI {row['search_cli']['p50_s']:.2f} s", flush=True)
            report(args, at_size, bpi, time.perf_counter() - t_all)  # after each size: a timeout keeps the rest
            shutil.rmtree(index_dir, ignore_errors=True)
        bpi = bytes_per_image(work, emb, args.scene_images)
        report(args, at_size, bpi, time.perf_counter() - t_all)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    return 0


def force_merge(index_dir: Path) -> float:
    """Seconds to merge the tail into the base, as a checkpoint does once the tail passes TAIL_MAX."""
    from edge_t2t.index.indexdir import IndexDir

    t0 = time.perf_counter()
    with IndexDir.open_writer(index_dir) as ix:
        w = ix.open_vectors(DIM, "i8")
        w.merge_tail()
        w.save()
        ix._record_generation()
    return time.perf_counter() - t0


def report(args, at_size: dict, bpi: dict, seconds: float) -> None:
    sizes = list(at_size)
    first = at_size[sizes[0]] if sizes else None
    rates = [r["import"]["texts_per_s_with_merge_share"] for r in at_size.values()] or [float("nan")]
    med = float(np.median(rates))
    data = {
        "note": "Machine shared with other engineers' jobs while this ran: ratios within the run are the figures.",
        "vector_source": "deterministic clustered vectors (2,000 centres), not the real embedder",
        "dim": DIM, "dtype": "i8", "text_mode": "joined", "texts_per_image": TEXTS_PER_IMAGE,
        "seconds": seconds, "at_size": {str(k): v for k, v in at_size.items()},
        "add_1000_ratio_to_first": {str(k): v["add_1000"]["run_seconds"] / first["add_1000"]["run_seconds"]
                                    for k, v in at_size.items()},
        "import_rate_spread_vs_median": [min(rates) / med - 1, max(rates) / med - 1],
        "bytes_per_image": bpi,
    }
    lines = [
        "| texts in index | add 1,000 texts (in run) | × first | add, whole process (CPU s) | peak RSS of add | "
        f"import {args.import_texts:,} texts (+ merge share) | search p50 / p99 in-process | "
        "`edge-t2t search` p50 (CPU s) | its peak RSS | disk |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for n, row in at_size.items():
        a, imp = row["add_1000"], row["import"]
        lines.append(
            f"| {n:,} | {a['run_seconds']:.2f} s | {a['run_seconds'] / first['add_1000']['run_seconds']:.2f} "
            f"| {a['process_wall_s']:.2f} s ({a['process_cpu_s']:.2f}) | {a['peak_rss_mib']:.0f} MiB | {imp['texts_per_s']:,.0f} "
            f"({imp['texts_per_s_with_merge_share']:,.0f}) texts/s | {row['search']['p50_ms']:.2f} / "
            f"{row['search']['p99_ms']:.2f} ms (CPU {row['search']['cpu_p50_ms']:.2f} / {row['search']['cpu_p99_ms']:.2f}) | {row['search_cli']['p50_s']:.2f} s ({row['search_cli']['cpu_p50_s']:.2f}) | "
            f"{row['search_cli']['peak_rss_mib']:.0f} MiB | {row['disk_bytes'] / 2**20:.0f} MiB |"
        )
    lines += [
        "",
        f"Import rate with the merge share, across sizes: median {med:,.0f} texts/s, spread "
        f"{(min(rates) / med - 1) * 100:+.0f}% / {(max(rates) / med - 1) * 100:+.0f}%. Each size's index was "
        "seeded in bulk (SQLite rows, then the snapshot by IndexDir.rebuild); the adds, imports and searches "
        "then ran through Indexer.run, search.rank_images and the CLI.",
        "",
        "| text mode | texts/image | bytes/image | of which SQLite | GiB at 100k images |",
        "|---|---:|---:|---:|---:|",
    ]
    for mode, b in bpi.items():
        lines.append(f"| {mode} | {b['texts_per_image']:.1f} | {b['bytes_per_image'] / 1024:.1f} KiB | "
                     f"{b['sqlite_bytes_per_image'] / 1024:.1f} KiB | {b['gib_at_100k_images']:.2f} |")
    lines += ["", f"Bytes per image: {args.scene_images:,} synthetic scenes' structured descriptions per text mode, "
              "scaled linearly to 100k images. Vectors: deterministic clustered stand-in for the embedder (dim 384); "
              "the real embedder's time per text comes on top. Peak RSS and CPU seconds: of that one process "
              "(os.wait4); on a loaded machine a process waits for a CPU, so its wall time exceeds its CPU time. "
              "Machine shared with other jobs (load average above 10 on 2 cores at times)."]
    write_results(args.name, data, "\n".join(lines))
    print("\n".join(lines), flush=True)


if __name__ == "__main__":
    sys.exit(main())
