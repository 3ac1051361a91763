"""Index size (issue 25): bytes on disk per image for each text mode, the layout before the lean
index against the lean one (with and without the float16 exact copy), in one run; plus import
rate, add time and `search` p50 at the largest size, and how long `verify --repair` takes to
embed 100k lost texts again.

Images are the demo's generated scenes (edge_t2t.demo.scenes) with their ground-truth RSRT
descriptions, imported through the product's path (`Indexer.run` on captions files, 10,000 images
per run), each layout in its own process: the old layout by the code at the branch point (a
`git worktree` of it, --old), the new ones by this checkout. Every layout gets the same vectors:

- the real int8 embedder (all-MiniLM-L6-v2) on every distinct text of the first `--real-images`
  images (default 10,000) in sentences mode and of the first `--real-images-long` (2,000) in
  joined and fields modes (their long texts embed at a few dozen per second on the shared
  machine), embedded once and cached in the work directory;
- any other text (the 100k runs; joined and fields past 2,000 images) gets a real vector of the
  cache picked by a hash of the text, plus Gaussian noise (sigma 0.02 per component, about cosine 0.87 to it), made
  unit length. Sizes do not depend on the values; the timing parts see realistic neighbourhoods.

Queries: 200 of the scenes' template queries, embedded by the real model. Timings are wall
seconds on a shared 2-core machine; the load average is recorded beside each, and only ratios
within the run (new/old) are compared.

    git worktree add --detach /tmp/old a603b70
    .venv/bin/python bench/index_size.py --old /tmp/old --work /tmp/index-size   # 10k and 100k
    .venv/bin/python bench/index_size.py --old /tmp/old --sizes 2000 --modes sentences --name index_size_smoke
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve()
SCENE_SEED = 25
CHUNK_IMAGES = 10_000  # images per import run (one captions file each)
ADD_IMAGES = 100
IMPORT_IMAGES = 1_000  # the timed import on top of a seeded index
QUERIES = 200
NOISE = 0.02
LAYOUTS = ("old", "new", "new-no-copy")
MODES = ("sentences", "joined", "fields")


# -- the child: one layout's code, in its own process ----------------------------------------------
class CachedEmbedder:
    """The real embedder's identity and, per text, its cached real vector (or a perturbed one past
    the cache, see the module docstring)."""

    def __init__(self, work: Path):
        ident = json.loads((work / "identity.json").read_text())
        self.identity, self.manifest = ident["identity"], ident["manifest"]
        self.name, self.dim, self.precision, self.max_tokens, self.truncated = "cached", 384, "int8", 256, 0
        data = np.load(work / "vectors.npz")
        self.vectors = data["vectors"]
        self.row = {t: i for i, t in enumerate(json.loads((work / "texts.json").read_text()))}
        self.noise = np.random.default_rng(0).standard_normal((4096, self.dim)).astype(np.float32)

    def embed(self, texts, batch_size: int = 64) -> np.ndarray:
        if isinstance(texts, str):
            texts = [texts]
        out = np.empty((len(texts), self.dim), np.float32)
        for i, t in enumerate(texts):
            r = self.row.get(t)
            if r is not None:
                out[i] = self.vectors[r]
            else:
                h = zlib.crc32(t.encode())
                v = self.vectors[h % len(self.vectors)] + NOISE * self.noise[(h >> 8) % 4096]
                out[i] = v / np.linalg.norm(v)
        return out


def searcher_for(index: Path, emb):
    """search(query, vector_mode) -> hits through the layout's own entry point: the Searcher, or
    before it (the old code) open_for_search + search_open, which did the same work."""
    try:
        from edge_t2t.query.searcher import Searcher
    except ImportError:
        from edge_t2t.query.search import open_for_search, search_open

        store, vectors = open_for_search(index)
        return (lambda q, vm: search_open(store, vectors, q, emb, 10, "dense", vm)), store.close
    searcher = Searcher(index, embedder=emb).open()
    return (lambda q, vm: searcher.text(q, 10, mode="dense", vector_mode=vm)), searcher.close


def seed(index: Path, emb, mode: str, captions: list[str], extra: dict) -> dict:
    """The layout's own store code writes every image's texts (one transaction per 1,000 images),
    then its own IndexDir.rebuild writes the snapshot: what an import leaves, in a fraction of the
    time (the indexer's per-batch work is left out; the import rate is measured on top)."""
    from edge_t2t.embed.texts import plan_texts
    from edge_t2t.index.indexdir import IndexDir
    from edge_t2t.index.store import NewText, Store
    from edge_t2t.records import CaptionRecord

    prov = {"model": "ground-truth:scenes", "mmproj": "", "family": "ground-truth", "prompt_version": "scenes-1",
            "test_model": False, "constrained": False}
    t0, texts = time.perf_counter(), 0
    with Store(index, create=True) as st:
        with st.transaction():
            for key, value in (("embedder_identity", emb.identity), ("embedder_manifest", emb.manifest), ("dim", emb.dim),
                               ("dtype", "i8"), ("text_mode", mode), ("created_at", time.time()),
                               ("exact_copy", extra.get("exact_copy", True)), ("embedder_precision", "int8")):
                st.set_meta(key, value)
        for caps in captions:
            lines = Path(caps).read_text().splitlines()
            for start in range(0, len(lines), 1000):
                recs = [CaptionRecord.from_dict(json.loads(line)) for line in lines[start : start + 1000]]
                planned = [(rec, plan_texts(rec, rec.variants, mode)) for rec in recs]
                vecs = emb.embed([x.text for _, items in planned for x in items])
                at = 0
                with st.transaction():
                    for rec, items in planned:
                        image_id = st.put_image(rec.image, sha256=rec.sha256, source="captions", provenance=prov,
                                                desc_hash=rec.sha256)
                        st.add_texts(image_id, [NewText(x.ordinal, x.field, x.variant, x.text, vecs[at + i])
                                                for i, x in enumerate(items)])
                        at += len(items)
                    st.note_texts_per_image(max(len(items) for _, items in planned))
                texts += at
    rows_s = time.perf_counter() - t0
    with IndexDir.open_writer(index) as ix:
        ix.rebuild()
    return {"seed_texts": texts, "seed_rows_s": rows_s, "seed_snapshot_s": time.perf_counter() - t0 - rows_s}


def child(args) -> int:
    sys.path.insert(0, str(Path(args.code).resolve()))
    from edge_t2t.index.indexer import Indexer

    work, index = Path(args.work), Path(args.child)
    emb = CachedEmbedder(work)
    extra = {"exact_copy": False} if args.layout == "new-no-copy" else {}
    out: dict = {}
    if args.seed:
        out.update(seed(index, emb, args.mode, args.seed, extra))
    if args.captions:
        seconds, texts, c0 = 0.0, 0, time.process_time()
        for caps in args.captions:
            t0 = time.perf_counter()
            s = Indexer(index, embedder=emb, text_mode=args.mode, batch_size=256, **extra).run([], captions_file=caps)
            seconds += time.perf_counter() - t0
            texts += s.texts_added
        out.update(import_seconds=seconds, import_cpu_seconds=time.process_time() - c0, texts=texts,
                   load_after_import=os.getloadavg()[0])
    if args.add:
        t0, c0 = time.perf_counter(), time.process_time()
        s = Indexer(index, embedder=emb, text_mode=args.mode, batch_size=256).run([], captions_file=args.add)
        out.update(add_seconds=time.perf_counter() - t0, add_cpu_seconds=time.process_time() - c0, add_texts=s.texts_added,
                   load_after_add=os.getloadavg()[0])
    if args.search:
        queries = json.loads(Path(args.search).read_text())
        search, close = searcher_for(index, emb)
        try:
            for vector_mode in ("rescore", "exact"):
                search(queries[0], vector_mode)  # warm: views mapped
                seconds, cpu = [], []
                for q in queries:
                    t0, c0 = time.perf_counter(), time.process_time()
                    hits = search(q, vector_mode)
                    seconds.append(time.perf_counter() - t0)
                    cpu.append(time.process_time() - c0)
                    assert len(hits) == 10
                out[f"search_{vector_mode}_p50_ms"] = float(np.median(seconds) * 1000)
                out[f"search_{vector_mode}_cpu_p50_ms"] = float(np.median(cpu) * 1000)
            out["load_after_search"] = os.getloadavg()[0]
        finally:
            close()
    print(json.dumps(out))
    return 0


# -- the parent -------------------------------------------------------------------------------------
def write_captions(work: Path, n: int) -> list[Path]:
    """Captions files of CHUNK_IMAGES images each for the first n scenes (cached), then the
    IMPORT_IMAGES scenes after them (the timed import on top of a seeded index) and the ADD_IMAGES
    after those (the add run's file, last)."""
    files = [work / f"captions-{start:06d}.jsonl" for start in range(0, n, CHUNK_IMAGES)]
    more = [work / f"captions-import-{n:06d}.jsonl", work / f"captions-add-{n:06d}.jsonl"]
    if all(f.exists() for f in files + more):
        return files + more
    from edge_t2t.demo.scenes import describe, make_scenes

    t0 = time.perf_counter()
    scenes = make_scenes(n + IMPORT_IMAGES + ADD_IMAGES, seed=SCENE_SEED, size=32)  # scene i is the same whatever n
    spans = [(f, start, min(n, start + CHUNK_IMAGES)) for f, start in zip(files, range(0, n, CHUNK_IMAGES), strict=True)]
    spans += [(more[0], n, n + IMPORT_IMAGES), (more[1], n + IMPORT_IMAGES, n + IMPORT_IMAGES + ADD_IMAGES)]
    for path, start, end in spans:
        tmp = path.with_suffix(".tmp")
        with open(tmp, "w") as fh:
            for scene in scenes[start:end]:
                fh.write(json.dumps(describe(scene, seed=SCENE_SEED).to_dict()) + "\n")
        os.replace(tmp, path)
    print(f"[data] {len(scenes):,} scenes described in {time.perf_counter() - t0:.0f} s", flush=True)
    return files + more


def embed_cache(work: Path, captions: list[Path], queries: list[str], real: dict[str, int]) -> dict:
    """Real vectors of every distinct text of the first real[mode] images of the captions files in
    each mode, and of the queries; cached (texts.json + vectors.npz) so later runs reuse them."""
    from edge_t2t.describe.captions import load_captions
    from edge_t2t.embed.embedder import Embedder
    from edge_t2t.embed.texts import description_texts

    emb = Embedder(precision="int8")
    (work / "identity.json").write_text(json.dumps({"identity": emb.identity, "manifest": emb.manifest}))
    if (work / "vectors.npz").exists():
        return json.loads((work / "embed_facts.json").read_text())
    texts: dict[str, None] = dict.fromkeys(queries)
    records = [rec for caps in captions for rec in load_captions(caps)]
    for mode, n in real.items():
        for rec in records[:n]:
            texts.update(dict.fromkeys(description_texts(rec.variants, mode)))
    order = list(texts)
    t0, c0 = time.perf_counter(), time.process_time()
    parts = []
    for i in range(0, len(order), 4096):
        parts.append(emb.embed(order[i : i + 4096]))
        print(f"[embed] {i + len(parts[-1]):,} / {len(order):,} texts, {time.perf_counter() - t0:.0f} s", flush=True)
    vecs = np.concatenate(parts)
    facts = {"distinct_texts": len(order), "seconds": time.perf_counter() - t0, "cpu_seconds": time.process_time() - c0,
             "load": os.getloadavg()[0], "real_images": real}
    np.savez(work / "vectors.npz", vectors=vecs.astype(np.float32))
    (work / "texts.json").write_text(json.dumps(order))
    (work / "embed_facts.json").write_text(json.dumps(facts))
    print(f"[embed] {len(order):,} distinct texts in {facts['seconds']:.0f} s", flush=True)
    return facts


def run_child(args, layout: str, mode: str, index: Path, **parts) -> dict:
    code = args.old if layout == "old" else HERE.parent.parent
    argv = [sys.executable, str(HERE), "--child", str(index), "--code", str(code), "--layout", layout,
            "--mode", mode, "--work", str(args.work)]
    for key, value in parts.items():
        if value:
            argv += [f"--{key}", *(map(str, value) if isinstance(value, list) else [str(value)])]
    env = {**os.environ, "EDGE_T2T_EMBEDDER": str(HERE.parent.parent / "models" / "embedder")}
    env.pop("PYTHONPATH", None)
    res = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=args.work)
    if res.returncode != 0:
        raise RuntimeError(f"{layout} {mode}: {res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.iterdir() if p.is_file())


def measure(args, n: int, mode: str, files: list[Path], timing: bool) -> dict:
    """Each layout's index of the first n images: imported through Indexer.run up to --import-max
    images, seeded above that (seed()); then, when timing, an import of IMPORT_IMAGES more (its
    rate), an add of ADD_IMAGES in a new process, and the searches."""
    out = {}
    seeded = n > args.import_max
    for layout in LAYOUTS:
        index = args.work / f"ix-{layout}-{mode}-{n}"
        shutil.rmtree(index, ignore_errors=True)
        load = os.getloadavg()[0]
        row = run_child(args, layout, mode, index, **({"seed": files[:-2]} if seeded else {"captions": files[:-2]}))
        size = dir_bytes(index)
        row.update(load_before=load, bytes=size, bytes_per_image=size / n, seeded=seeded,
                   files={p.name: p.stat().st_size for p in index.iterdir() if p.is_file()})
        if timing:
            timed = run_child(args, layout, mode, index, add=files[-1], search=args.work / "queries.json",
                              **({"captions": [files[-2]]} if seeded else {}))
            if seeded:  # the import rate on top of the seeded index
                row.update({k: v for k, v in timed.items() if k.startswith("import") or k == "texts"})
            row.update({k: v for k, v in timed.items() if not k.startswith("import") and k != "texts"})
        out[layout] = row
        rate = f", import {row['texts'] / row['import_seconds']:,.0f} texts/s" if "import_seconds" in row else ""
        print(f"[{n:,} {mode} {layout}] {size / n / 1024:.1f} KiB/image{rate}"
              + (f", add {row['add_seconds']:.2f} s, search p50 {row['search_rescore_p50_ms']:.2f} ms" if timing else "")
              + f" (load {load:.1f})", flush=True)
        shutil.rmtree(index, ignore_errors=True)  # the old layout at 100k sentences is ~27 GiB
    return out


def repair_time(args, n_texts: int) -> dict:
    """`edge-t2t verify --repair` on a sentences index of about n_texts texts whose vector snapshot
    was deleted: every text embedded again with the real int8 embedder (through the CLI)."""
    from edge_t2t.embed.texts import description_texts
    from edge_t2t.records import CaptionRecord

    caps = args.work / "captions-000000.jsonl"
    sub = args.work / f"captions-repair-{n_texts}.jsonl"
    texts = 0
    with open(caps) as src, open(sub, "w") as dst:
        for line in src:
            texts += len(description_texts(CaptionRecord.from_dict(json.loads(line)).variants, "sentences"))
            dst.write(line)
            if texts >= n_texts:
                break
    index = args.work / "ix-repair"
    shutil.rmtree(index, ignore_errors=True)
    run_child(args, "new", "sentences", index, captions=[sub])
    (index / "manifest.json").unlink()
    env = {**os.environ}
    load = os.getloadavg()[0]
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, "-m", "edge_t2t", "verify", "--repair", "--skip-models", "--json",
                          "--index", str(index)], capture_output=True, text=True, env=env, cwd=HERE.parent.parent)
    wall = time.perf_counter() - t0
    rep = json.loads(res.stdout)
    assert res.returncode == 0 and rep["ok"], res.stdout[-3000:] + res.stderr[-2000:]
    shutil.rmtree(index, ignore_errors=True)
    return {"texts": texts, **rep["repair"], "cli_wall_s": wall, "load_before": load, "load_after": os.getloadavg()[0]}


def report(args, results: dict, embed_facts: dict, repair: dict | None, seconds: float) -> None:
    real = embed_facts["real_images"]
    from _common import write_results

    lines = ["| images | text mode | texts/image | old layout | new | new, no exact copy | new / old | no copy / old |",
             "|---:|---|---:|---:|---:|---:|---:|---:|"]
    for key, row in results.items():
        n, mode = key.split("/")
        o, a, b = (row[x]["bytes_per_image"] for x in LAYOUTS)
        texts = row["new"].get("seed_texts") or row["new"]["texts"]
        lines.append(f"| {int(n):,} | {mode} | {texts / int(n):.1f} | {o / 1024:.1f} KiB | {a / 1024:.1f} KiB "
                     f"| {b / 1024:.1f} KiB | {a / o:.3f} | {b / o:.3f} |")
    timed = [(k, r) for k, r in results.items() if "search_rescore_p50_ms" in r["old"]]
    if timed:
        lines += ["", "| images | text mode | layout | import, texts/s | add 100 images | search p50 rescore | search p50 exact "
                  "| import / old, wall (CPU) | add / old, wall (CPU) | search p50 / old, rescore (CPU) | exact (CPU) |",
                  "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for key, row in timed:
            n, mode = key.split("/")
            o = row["old"]
            for layout in LAYOUTS:
                r = row[layout]
                rate, orate = r["texts"] / r["import_seconds"], o["texts"] / o["import_seconds"]
                ratio = {k: r[k] / o[k] for k in ("import_cpu_seconds", "add_seconds", "add_cpu_seconds", "search_rescore_p50_ms",
                                                    "search_rescore_cpu_p50_ms", "search_exact_p50_ms", "search_exact_cpu_p50_ms")}
                lines.append(
                    f"| {int(n):,} | {mode} | {layout} | {rate:,.0f} | {r['add_seconds']:.2f} s | "
                    f"{r['search_rescore_p50_ms']:.2f} ms | {r['search_exact_p50_ms']:.1f} ms | "
                    f"{rate / orate:.3f} ({1 / ratio['import_cpu_seconds']:.3f}) | "
                    f"{ratio['add_seconds']:.3f} ({ratio['add_cpu_seconds']:.3f}) | "
                    f"{ratio['search_rescore_p50_ms']:.3f} ({ratio['search_rescore_cpu_p50_ms']:.3f}) | "
                    f"{ratio['search_exact_p50_ms']:.3f} ({ratio['search_exact_cpu_p50_ms']:.3f}) |")
    if repair:
        lines += ["", f"`verify --repair` after deleting the vector snapshot of a sentences index of {repair['texts']:,} texts: "
                  f"{repair['embedded_again']:,} texts embedded again ({repair['precision']} embedder) and the snapshot "
                  f"rebuilt in {repair['seconds']:.0f} s ({repair['embedded_again'] / repair['seconds']:,.0f} texts/s; the CLI "
                  f"call {repair['cli_wall_s']:.0f} s wall), load average {repair['load_before']:.1f} before, "
                  f"{repair['load_after']:.1f} after."]
    lines += ["", f"Scenes: `edge_t2t.demo.scenes` seed {SCENE_SEED}, ground-truth descriptions (5 variants each). Up to "
              f"{args.import_max:,} images an index is imported with `Indexer.run` in runs of {CHUNK_IMAGES:,} images; "
              "larger ones are seeded by the layout's own code (Store.add_texts, one transaction per 1,000 images, then "
              f"IndexDir.rebuild), and their import rate is an `Indexer.run` of {IMPORT_IMAGES:,} more images on top. "
              f"Each layout runs in its own process (old: the code at the branch point, `{args.old}`). Vectors: the real int8 embedder on the {embed_facts['distinct_texts']:,} "
              f"distinct texts of the first {real['sentences']:,} images in sentences mode and the first {real['joined']:,} "
              f"in joined and fields modes (embedded once, {embed_facts['seconds']:.0f} s); other texts reuse a real "
              f"vector picked by a hash of the text plus noise (sigma {NOISE} per component). "
              "Add: 100 more images in a new process. Search: 200 template queries, k 10, dense, in-process "
              "(the Searcher; the old code's open_for_search + search_open, the same work; the query's vector from the "
              "same cache). Import rates are texts per wall second; CPU ratios are of the process's CPU seconds (import, "
              "add) and per-query CPU time (search), which a loaded machine disturbs less. Wall times on a shared 2-core "
              "machine: the load averages are in the JSON; compare the ratios, taken in one run."]
    write_results(args.name, {"results": results, "embed": embed_facts, "repair": repair, "seconds": seconds,
                              "real_images": args.real_images, "noise_sigma": NOISE}, "\n".join(lines))
    print("\n".join(lines), flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="10000,100000", help="image counts, comma-separated (default 10000,100000)")
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--timing-size", type=int, default=None, help="size whose add/search are timed (default: the largest)")
    ap.add_argument("--real-images", type=int, default=10_000, help="images whose sentences-mode texts get real vectors")
    ap.add_argument("--real-images-long", type=int, default=2_000,
                    help="images whose joined- and fields-mode texts (long ones) get real vectors")
    ap.add_argument("--repair-texts", type=int, default=100_000, help="texts of the repair timing (0: skip)")
    ap.add_argument("--import-max", type=int, default=10_000,
                    help="largest size imported through Indexer.run; larger ones are seeded (default 10,000)")
    ap.add_argument("--old", type=Path, required=False, help="a checkout of the code before the lean layout")
    ap.add_argument("--work", type=Path, default=Path("/tmp/index-size"))
    ap.add_argument("--name", default="index_size")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--code", help=argparse.SUPPRESS)
    ap.add_argument("--layout", help=argparse.SUPPRESS)
    ap.add_argument("--mode", help=argparse.SUPPRESS)
    ap.add_argument("--captions", nargs="*", help=argparse.SUPPRESS)
    ap.add_argument("--add", help=argparse.SUPPRESS)
    ap.add_argument("--seed", nargs="*", help=argparse.SUPPRESS)
    ap.add_argument("--search", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args)
    sys.path.insert(0, str(HERE.parent))
    import _common  # noqa: F401  (puts the repo on sys.path)

    if args.old is None or not (args.old / "edge_t2t" / "index" / "store.py").is_file():
        ap.error("--old DIR: a checkout of the code before the lean layout (git worktree add --detach DIR a603b70)")
    args.work.mkdir(parents=True, exist_ok=True)
    sizes = [int(x) for x in args.sizes.split(",") if x]
    modes = [m for m in args.modes.split(",") if m]
    timing_size = args.timing_size or max(sizes)
    t_all = time.perf_counter()
    from edge_t2t.demo.scenes import all_query_specs

    specs = all_query_specs()
    queries = [specs[i].text for i in np.random.default_rng(0).choice(len(specs), QUERIES, replace=False)]
    (args.work / "queries.json").write_text(json.dumps(queries))
    real_files = write_captions(args.work, args.real_images)
    real = {mode: args.real_images if mode == "sentences" else min(args.real_images, args.real_images_long)
            for mode in MODES}
    embed_facts = embed_cache(args.work, real_files[:-2], queries, real)
    results: dict = {}
    repair = None
    if args.repair_texts:
        repair = repair_time(args, args.repair_texts)
        print(f"[repair] {repair}", flush=True)
    for n in sizes:
        files = write_captions(args.work, n)
        for mode in modes:
            results[f"{n}/{mode}"] = measure(args, n, mode, files, timing=n == timing_size)
            report(args, results, embed_facts, repair, time.perf_counter() - t_all)
    return 0


if __name__ == "__main__":
    sys.exit(main())
