"""Is the float16 copy beside an i8 graph needed (issue 25)? What `exact` scoring gives against
float32 vectors, the float16 copy (what i8 and f16 indexes score today) and the int8 codes alone
(`index --no-exact-copy`), three ways:

- RSICD val, `eval --exact` oracle (fp32 embedder): R@1/5/10 and mR, through the product's
  evaluate.oracle_eval with quantise.as_exact for each way;
- the demo's synthetic scenes, seeds 0-3 (40 scenes, `sentences` texts, int8 embedder as `index`
  uses): R@1 and MRR of the template queries that exactly one scene satisfies;
- image rankings on the demo's scene set (seed 0): for its 1,896 template queries and the
  1,887 distinct RSICD val captions as queries, how many top-1 / top-10 / full rankings of the 40
  images differ from the float16 copy's.

    .venv/bin/python bench/exact_copy.py
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import _common  # noqa: F401  (puts the repo on sys.path)
import numpy as np
from _common import write_results

from edge_t2t import config
from edge_t2t.demo import scenes as S
from edge_t2t.embed.embedder import Embedder
from edge_t2t.embed.texts import description_texts
from edge_t2t.evaluation import evaluate
from edge_t2t.evaluation.dataset import load_annotations
from edge_t2t.index.quantise import as_exact

WAYS = {"float32": ("f32", True), "float16 copy": ("i8", True), "int8 codes": ("i8", False)}


def stored(vectors: np.ndarray, way: str) -> np.ndarray:
    dtype, copy = WAYS[way]
    return as_exact(vectors, dtype, copy).astype(np.float32)


def oracle(ann_path: Path) -> dict:
    ann = load_annotations(ann_path)
    emb = Embedder(precision="fp32")
    out = {}
    for way, (dtype, copy) in WAYS.items():
        d = evaluate.oracle_eval(ann, emb.embed, dtype=dtype, exact_copy=copy).to_json()
        out[way] = {"mR": d["mR"], "mR_nodup": d["mR_nodup"],
                    **{f"{x}_{k}": d[x][k] for x in ("t2i", "i2t") for k in ("R@1", "R@5", "R@10")}}
    return out


def image_scores(query_vecs: np.ndarray, text_vecs: np.ndarray, owner: np.ndarray, n_images: int) -> np.ndarray:
    s = query_vecs @ text_vecs.T
    return np.stack([s[:, owner == j].max(axis=1) for j in range(n_images)], axis=1)


def rankings(scores: np.ndarray) -> np.ndarray:
    """Images best first; equal scores by image number (search breaks them by path, same order)."""
    return np.lexsort((np.broadcast_to(np.arange(scores.shape[1]), scores.shape), -scores), axis=1)


def scenes(emb: Embedder, captions: list[str]) -> dict:
    out: dict = {}
    for seed in (0, 1, 2, 3):
        sc = S.make_scenes(40, seed)
        texts, owner = [], []
        for i, s in enumerate(sc):
            t = description_texts(S.describe(s, 5, seed).variants, "sentences")
            texts += t
            owner += [i] * len(t)
        owner = np.array(owner)
        vecs = emb.embed(texts).astype(np.float32)
        qs = S.unique_queries(sc)
        target = np.array([[s.id for s in sc].index(sid) for _, sid in qs])
        qv = emb.embed([q.text for q, _ in qs]).astype(np.float32)
        row = {}
        for way in WAYS:
            order = rankings(image_scores(qv, stored(vecs, way), owner, len(sc)))
            rank = (order == target[:, None]).argmax(axis=1) + 1
            row[way] = {"R@1": float((rank == 1).mean()), "MRR": float((1 / rank).mean())}
        row["queries"] = len(qv)
        if seed == 0:  # the demo's own scene set: how rankings move
            many = emb.embed([q.text for q in S.all_query_specs()] + captions).astype(np.float32)
            ref = rankings(image_scores(many, stored(vecs, "float16 copy"), owner, len(sc)))
            row["rankings"] = {"queries": len(many)}
            for way in ("float32", "int8 codes"):
                got = rankings(image_scores(many, stored(vecs, way), owner, len(sc)))
                row["rankings"][way] = {f"top{k}_differ": int((got[:, :k] != ref[:, :k]).any(axis=1).sum())
                                        for k in (1, 10, len(sc))}
        out[seed] = row
    return out


def main() -> int:
    t0 = time.perf_counter()
    ann_path = config.shared_data_dir() / "rsicd" / "captions_val.json"
    coco = json.loads(ann_path.read_text())
    captions = sorted({a["caption"].strip() for a in coco["annotations"] if a["caption"].strip()})
    ora = oracle(ann_path)
    syn = scenes(Embedder(precision="int8"), captions)
    lines = ["| exact scoring against | RSICD val oracle mR / no dup | T2I R@1/5/10 | I2T R@1/5/10 | scenes R@1 (seeds 0-3) "
             "| scenes MRR (seeds 0-3) | demo rankings: top 1 / top 10 / all 40 differing from the float16 copy |",
             "|---|---|---|---|---|---|---|"]
    rk = syn[0]["rankings"]
    for way in WAYS:
        o = ora[way]
        moved = rk.get(way)
        r1 = ", ".join(f"{syn[s][way]['R@1']:.4f}" for s in syn)
        mrr = ", ".join(f"{syn[s][way]['MRR']:.4f}" for s in syn)
        lines.append(
            f"| {way} | {o['mR']:.2f} / {o['mR_nodup']:.2f} | {o['t2i_R@1']:.2f} / {o['t2i_R@5']:.2f} / {o['t2i_R@10']:.2f} | "
            f"{o['i2t_R@1']:.2f} / {o['i2t_R@5']:.2f} / {o['i2t_R@10']:.2f} | {r1} | {mrr} | "
            + (f"{moved['top1_differ']} / {moved['top10_differ']} / {moved['top40_differ']} of {rk['queries']:,}" if moved else "-")
            + " |")
    lines += ["", "Oracle: `eval --exact --precision fp32` on ../shared/data/rsicd/captions_val.json through "
              "evaluate.oracle_eval, the image side cast as each way stores it (quantise.as_exact). Scenes: "
              "edge_t2t.demo.scenes, 40 per seed, `sentences` texts, int8 embedder; queries: the template queries one "
              "scene satisfies. Rankings: seed 0 (the demo's scenes), the 1,896 template queries and the 1,887 distinct "
              "RSICD val captions as queries, 40 images ranked by max cosine, ties by image number."]
    write_results("exact_copy", {"oracle": ora, "scenes": {str(k): v for k, v in syn.items()},
                                 "seconds": time.perf_counter() - t0}, "\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
