"""Search modes and index dtypes through the product's own search path, on the RSICD captions.

Builds one index from ../shared/data/rsicd/captions_val.json (COCO, 1,092 images) with the int8
embedder, then the same index in each other dtype (f32 / f16 / i8): the same texts embedded in the same
batches, so the same vectors.
For every (dtype, mode) it runs the same queries through search.rank_images (query vectors
embedded once, so only the vector search + per-image max + SQLite row fetch are timed) and
compares the top-10 *images* with the peer: exact brute force over the same vectors.
Also times a whole search (Searcher opened on the index, consistency check, embed, rank) per mode.

Queries: a seeded sample of the captions with every third word dropped (so they are not verbatim
index texts), plus a few hand-written ones.

    .venv/bin/python bench/search_modes.py [--queries 200]
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import tempfile
import time
from pathlib import Path

from _common import percentile_ms, write_results

HAND = ["a stadium with a green field", "many white storage tanks", "a viaduct crossing a river",
        "a square with a fountain in the middle", "cars parked near a viaduct"]  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--queries", type=int, default=200)
    args = ap.parse_args()

    import numpy as np

    from edge_t2t import config
    from edge_t2t.embed.embedder import Embedder
    from edge_t2t.index import vindex
    from edge_t2t.index.indexer import Indexer
    from edge_t2t.index.store import Store
    from edge_t2t.query import search
    from edge_t2t.query.searcher import Searcher

    caps = config.shared_data_dir() / "rsicd" / "captions_val.json"
    coco = json.loads(caps.read_text())
    rng = random.Random(0)
    sample = rng.sample([a["caption"] for a in coco["annotations"]], args.queries - len(HAND))
    queries = HAND + [" ".join(w for i, w in enumerate(c.split()) if i % 3 != 2) for c in sample]

    emb = Embedder(precision="int8")
    work = Path(tempfile.mkdtemp(prefix="edge-t2t-bench-"))
    try:
        base = work / "i8"
        t = time.perf_counter()
        Indexer(base, embedder=emb, dtype="i8").run([], captions_file=caps)
        build_s = time.perf_counter() - t
        for dtype in ("f32", "f16"):  # the same texts in the same batches: the same vectors
            Indexer(work / dtype, embedder=emb, dtype=dtype).run([], captions_file=caps)
        qv = emb.embed(queries)
        with Store(base) as st:
            n_texts = st.counts()["texts"]

        rows, results = [], []
        reference = None
        for dtype in ("f32", "f16", "i8"):
            d = work / dtype
            searcher = Searcher(d).open()
            store, vectors = searcher.store, searcher.vectors
            graph_bytes = vindex.file_sizes(d)["graph_bytes"]
            for mode in ("exact", "hnsw", "rescore"):
                tops, secs = [], []
                for q in qv:
                    t = time.perf_counter()
                    hits = search.rank_images(store, vectors, q[None, :], 10, mode)
                    secs.append(time.perf_counter() - t)
                    tops.append([h.image for h in hits])
                if reference is None:  # f32 exact is the peer everything is compared with
                    reference = tops
                agree = float(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(tops, reference, strict=True)]))
                top1 = float(np.mean([a[0] == b[0] for a, b in zip(tops, reference, strict=True)]))
                results.append({"dtype": dtype, "mode": mode, "p50_ms": percentile_ms(secs, 50),
                                "p99_ms": percentile_ms(secs, 99), "agree_at_10": agree, "top1_same": top1,
                                "graph_bytes": graph_bytes})  # fmt: skip
            searcher.close()
        peer = next(r for r in results if r["dtype"] == "f32" and r["mode"] == "exact")
        for r in results:
            r["p50_vs_exact_f32"] = r["p50_ms"] / peer["p50_ms"]
            rows.append(f"| {r['dtype']} | {r['mode']} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | "
                        f"{r['p50_vs_exact_f32']:.2f}x | {r['agree_at_10']:.4f} | {r['top1_same']:.3f} | "
                        f"{r['graph_bytes'] / 1024:.0f} |")  # fmt: skip

        whole = {}
        for mode in ("exact", "hnsw", "rescore"):
            secs = []
            for q in queries[:50]:
                t = time.perf_counter()
                with Searcher(base, embedder=emb) as whole_search:
                    whole_search.text(q, 10, mode=mode)
                secs.append(time.perf_counter() - t)
            whole[mode] = {"p50_ms": percentile_ms(secs, 50), "p99_ms": percentile_ms(secs, 99)}

        table = (
            "| dtype | mode | p50 ms | p99 ms | p50 vs f32 exact | top-10 images vs f32 exact | top-1 same | graph KiB |\n"
            "|---|---|---|---|---|---|---|---|\n" + "\n".join(rows) + "\n\n"
            "Whole search (a Searcher per query, as the CLI opens one) on the i8 index (open store + consistency check + embed query + rank), "
            "50 queries:\n\n| mode | p50 ms | p99 ms |\n|---|---|---|\n"
            + "\n".join(f"| {m} | {v['p50_ms']:.1f} | {v['p99_ms']:.1f} |" for m, v in whole.items())
            + f"\n\n{len(queries)} queries, k=10 images, {n_texts} texts from 1,092 images (RSICD val captions, "
            f"duplicates dropped); int8 embedder; index built in {build_s:.1f} s. rank_images timings exclude "
            "embedding. i8 graphs hold per-vector max-abs int8 codes; rescore over-fetches 4x and re-scores "
            "with the f16 exact vectors."
        )
        write_results("search_modes", {"queries": len(queries), "texts": n_texts, "index_build_s": build_s,
                                       "rank_images": results, "whole_search": whole}, table)  # fmt: skip
        print(table)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
