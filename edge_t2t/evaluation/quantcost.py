"""The quantization-cost report: one configuration matrix, run on the same data and queries.

Axes: embedder precision (fp32 / int8), index dtype (f32 / f16 / i8, as vindex stores them),
search mode (vindex's exact / hnsw / rescore) and, when a VLM is given, the VLM's GGUF precision.
Every configuration goes through the product's own code: the Embedder, a vindex directory written
by snapshot_writer.build, Snapshot.search, and evaluate's ranking for recall.

Two data paths:

* ``oracle`` (no VLM): evaluate's leave-one-out protocol over the reference captions. The
  distinct caption texts are the index; each is also a query. The search results (top ``fetch``
  texts per query, scores as the search mode gives them, everything else -inf) form the
  similarity matrix that ``evaluate.oracle_ranks`` ranks, so recall uses the same tie rule and
  LOO as ``edge-t2t eval``. fetch = 2 x 10 x (max distinct captions per image) + 1, which keeps
  R@1/5/10 exact for exact search (an image outside the fetched texts already has >= 10 images
  ahead of it).
* ``vlm``: each GGUF precision captions the images in --images; their variant texts (the default
  text mode, as `edge-t2t index` embeds them) are the index, every captioned image a candidate. The
  queries are the captions of the annotated images among them (known targets: absolute recall by
  ``evaluate.index_ranks`` over the search results, I2T read from the same T2I searches) plus a
  fixed sample of other annotation captions (agreement only). With no annotated image among
  --images, there is agreement but no absolute recall.

Agreement with the full-precision reference (fp32 embedder, f32 index, exact search, F16 VLM),
over the T2I image rankings of every query (top k = 10, or the number of images when fewer):

* ``ref_recall@k`` = mean over queries of |top-k(cfg) ∩ top-k(ref)| / |top-k(ref)|, k = 1, 5, 10;
* ``jaccard@10`` = mean |∩| / |∪| of the two top-10 sets;
* ``kendall_tau@10`` = Kendall tau-b over the UNION of the two top-10 lists, an item missing from a
  list placed at position k (tied last): order changes and set changes both lower it; identical
  lists give 1.0;
* ``delta_mR`` = mR(cfg) - mR(ref), and the same for each R@k; ``delta_mR_coarse`` the same with
  scores rounded to 1e-3 (see COARSE_DECIMALS for why both are reported).
"""

from __future__ import annotations

import resource
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

import numpy as np

from ..errors import InputError
from ..modes import DTYPES, PRECISIONS, VECTOR_MODES
from . import evaluate as ev
from .dataset import Annotations, from_lists

EMBEDDERS = PRECISIONS
MODES = ("exact", *(m for m in VECTOR_MODES if m != "exact"))  # the reference configuration first
AGREE_K = 10
SCORE_DECIMALS = 5
# The second, tie-robust reading: scores within 1e-3 tie. Why: f16/i8 exact and rescore score an
# f32 query against float16 stored vectors, so a text's match with itself comes out 0.99997 or
# 1.00003 and exact ties between verbatim-duplicate captions get broken by rounding noise, which
# the ties-against-the-query rule rewards (+1.2 mR on RSICD, all of it gone at 1e-3).
COARSE_DECIMALS = 3
ORACLE = "captions"  # the VLM label of the oracle path: reference captions stand in for a VLM
TEST_MODEL_NOTE = (
    "The VLM is the random-weight TEST model: its captions are gibberish, so the VLM rows measure "
    "the machinery (quantize -> caption -> index -> search) only, not a real model's accuracy cost."
)
B1_NOTE = (
    "b1 not measured: usearch's b1 scalar takes bit-packed input and only binary metrics (hamming, "
    "tanimoto, sorensen); with metric='cos' it rejects 384-float vectors. Sign-bit hamming is not "
    "cosine, and vindex has no b1 mode, so a b1 row would not describe anything the product can run."
)


@dataclass(frozen=True)
class Config:
    vlm: str  # ORACLE, or the GGUF precision label (F16, Q8_0, ...)
    embedder: str
    dtype: str
    mode: str

    @property
    def name(self) -> str:
        return f"{self.vlm}/{self.embedder}/{self.dtype}/{self.mode}"


@dataclass
class VLMSpec:
    """The VLM axis: the reference GGUF (usually F16), the precisions to quantize it to, and any
    other GGUFs the user lists; all share one mmproj."""

    model: Path
    mmproj: Path
    images: Path
    quantize_to: tuple[str, ...] = ("Q8_0", "Q4_K_M")
    variants: tuple[Path, ...] = ()
    n_variants: int = 5
    max_tokens: int = 1024


@dataclass
class Options:
    embedder_dir: Path | None = None
    embedders: tuple[str, ...] = EMBEDDERS
    dtypes: tuple[str, ...] = DTYPES
    modes: tuple[str, ...] = MODES
    latency_queries: int = 200  # per configuration, single-threaded search path
    vlm_queries: int = 200  # annotation captions used as queries on the VLM path
    isolate: bool = True  # latency + RSS of each configuration in a fresh subprocess
    work_dir: Path | None = None  # index directories and quantized GGUFs (default: a temp dir)
    vlm: VLMSpec | None = None


@dataclass
class Progress:
    """Optional hooks for the CLI's progress bar."""

    on_total: Callable[[int], None] = lambda n: None
    on_step: Callable[[str], None] = lambda name: None
    on_notice: Callable[[str], None] = lambda msg: None


# ----------------------------------------------------------------------------------------------
# Agreement


def topk_images(scores: np.ndarray, k: int) -> np.ndarray:
    """(q, k) best image indices per row, ties by image index; -1 where fewer than k images scored."""
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    top = np.take_along_axis(scores, order, axis=1)
    return np.where(np.isneginf(top), -1, order)


def kendall_tau_union(a: Sequence[int], b: Sequence[int], k: int) -> float:
    """Kendall tau-b of two top-k lists over their union; a missing item sits at position k."""
    a = [x for x in a if x >= 0]
    b = [x for x in b if x >= 0]
    if a == b:
        return 1.0
    items = list(dict.fromkeys([*a, *b]))
    pa = np.asarray([a.index(x) if x in a else k for x in items], dtype=np.float64)
    pb = np.asarray([b.index(x) if x in b else k for x in items], dtype=np.float64)
    da = np.sign(pa[:, None] - pa[None, :])
    db = np.sign(pb[:, None] - pb[None, :])
    upper = np.triu(np.ones_like(da, dtype=bool), 1)
    concordance = float((da * db)[upper].sum())
    na, nb = float(np.abs(da[upper]).sum()), float(np.abs(db[upper]).sum())
    if na == 0 or nb == 0:
        return 0.0
    return concordance / float(np.sqrt(na * nb))


def agreement(top: np.ndarray, ref: np.ndarray, k: int) -> dict[str, float]:
    """Agreement of a configuration's top-k image lists with the reference's (same queries)."""
    if top.shape != ref.shape:
        raise ValueError("agreement needs the same queries in both configurations")
    out: dict[str, float] = {}
    for kk in sorted({1, 5, k} & set(range(1, k + 1))):
        hits = []
        for row, rrow in zip(top[:, :kk], ref[:, :kk], strict=True):
            r = {x for x in rrow.tolist() if x >= 0}
            if r:
                hits.append(len(r & {x for x in row.tolist() if x >= 0}) / len(r))
        out[f"ref_recall@{kk}"] = float(np.mean(hits)) if hits else float("nan")
    jac, tau = [], []
    for row, rrow in zip(top, ref, strict=True):
        a, b = {x for x in row.tolist() if x >= 0}, {x for x in rrow.tolist() if x >= 0}
        jac.append(len(a & b) / len(a | b) if a | b else 1.0)
        tau.append(kendall_tau_union(row.tolist(), rrow.tolist(), k))
    out[f"jaccard@{k}"] = float(np.mean(jac)) if jac else float("nan")
    out[f"kendall_tau@{k}"] = float(np.mean(tau)) if tau else float("nan")
    out[f"identical_top@{k}"] = float(np.mean([np.array_equal(a, b) for a, b in zip(top, ref, strict=True)]))
    return out


def recall_deltas(rec: dict, ref: dict) -> dict[str, float | None]:
    out: dict[str, float | None] = {}
    for direction in ("t2i", "i2t"):
        for key, value in (rec.get(direction) or {}).items():
            base = (ref.get(direction) or {}).get(key)
            out[f"delta_{direction}_{key}"] = None if value is None or base is None else value - base
    for key, a, b in (("delta_mR", rec.get("mR"), ref.get("mR")),
                      ("delta_mR_coarse", (rec.get("coarse") or {}).get("mR"), (ref.get("coarse") or {}).get("mR"))):
        out[key] = None if a is None or b is None else a - b
    return out


# ----------------------------------------------------------------------------------------------
# Scores from search results


def sparse_scores(cands, n_cols: int) -> np.ndarray:
    """(q, n_cols) matrix: each query's search scores at its candidates' keys, -inf elsewhere.

    Scores are rounded to SCORE_DECIMALS. Why: a text's cosine with itself comes out as 1.0 from
    usearch, 0.9999996 from a float32 matmul and 1 +- 1e-16 in float64, and the oracle's I2T
    turns those into wins or ties (RSICD repeats captions across images): on 100 RSICD images
    the same f32 vectors gave I2T R@1 63.4 / 65.8 / 67.4. Rounding makes exact matches tie
    everywhere (63.4 in all three), and 1e-5 is far below the f16 / i8 quantization steps.
    """
    out = np.full((len(cands), n_cols), -np.inf)
    for row, c in enumerate(cands):
        out[row, c.keys] = np.round(np.asarray(c.scores, dtype=np.float64), SCORE_DECIMALS)
    return out


def oracle_t2i_topk(ann: Annotations, sim: np.ndarray, text_ids: np.ndarray, k: int) -> np.ndarray:
    """Top-k images of every T2I query under evaluate's leave-one-out protocol (same queries, same
    order as ``evaluate.oracle_ranks``: caption entries of images with >= 2 captions)."""
    n_img, n_text = ann.n_images, sim.shape[0]
    img = np.asarray(ann.caption_image, dtype=np.int64)
    pairs, mult = np.unique(img * n_text + text_ids, return_counts=True)
    pair_img, pair_text = pairs // n_text, pairs % n_text
    mult_of = dict(zip(pairs.tolist(), mult.tolist(), strict=True))
    texts_of: list[list[int]] = [[] for _ in range(n_img)]
    for i, t in zip(pair_img.tolist(), pair_text.tolist(), strict=True):
        texts_of[i].append(t)
    queries, own = [], []
    for c in range(len(img)):
        i, u = int(img[c]), int(text_ids[c])
        keep = texts_of[i] if mult_of[i * n_text + u] >= 2 else [t for t in texts_of[i] if t != u]
        if not keep:
            continue  # single-caption image: evaluate skips this query too
        queries.append(c)
        own.append(sim[u, keep].max())
    q = np.asarray(queries, dtype=np.int64)
    own_a = np.asarray(own, dtype=np.float64)
    out = np.empty((len(q), min(k, n_img)), dtype=np.int64)
    for start in range(0, len(q), 1024):
        block = q[start : start + 1024]
        best = ev.group_max(sim[text_ids[block]][:, pair_text], pair_img, n_img)
        best[np.arange(len(block)), img[block]] = own_a[start : start + len(block)]  # LOO own image
        out[start : start + len(block)] = topk_images(best, k)
    return out


# ----------------------------------------------------------------------------------------------
# Index directories, sizes and the search-path probe


def build_index(index_dir: Path, vectors: np.ndarray, owners: np.ndarray, dtype: str) -> dict:
    """Write a vindex directory (keys = row numbers) and return its build time and file sizes."""
    from ..index import snapshot_writer, vindex

    if index_dir.exists():
        shutil.rmtree(index_dir)
    t0 = time.perf_counter()
    snapshot_writer.build(index_dir, np.arange(len(vectors), dtype=np.int64), owners, vectors, vectors.shape[1], dtype)
    seconds = time.perf_counter() - t0
    return {"build_seconds": seconds, **vindex.file_sizes(index_dir)}


def needed_bytes(sizes: dict, mode: str) -> int:
    """Bytes a search in ``mode`` reads: the graph (hnsw), the exact vectors (exact), or both. An
    index without an exact copy (f16, f32 graphs) scores its graph's own vectors in every mode."""
    if not sizes["rescore_bytes"]:
        return sizes["graph_bytes"] + sizes["keys_bytes"]
    graph = sizes["graph_bytes"] if mode in ("hnsw", "rescore") else 0
    exact = sizes["rescore_bytes"] if mode in ("exact", "rescore") else 0
    return graph + exact + sizes["keys_bytes"]


def probe_search(
    index_dir: str, embedder_dir: str | None, precision: str, mode: str, queries: list[str], fetch: int
) -> dict:
    """The single-threaded search path per query: embed (1 onnxruntime thread), vector search,
    best score per image. Excludes the SQLite row fetch of search.rank_images. Run in a fresh
    process (see ``isolate``) its peak RSS is this configuration's own."""
    from ..embed.embedder import Embedder
    from ..index.vindex import Snapshot

    emb = Embedder(Path(embedder_dir) if embedder_dir else None, precision=precision, threads=1)
    index = Snapshot.open(index_dir)
    emb.embed(queries[:1])
    index.search(emb.embed(queries[:1]), fetch, mode=mode)  # warm: graph view, page cache
    seconds = []
    for text in queries:
        t0 = time.perf_counter()
        c = index.search(emb.embed([text]), fetch, mode=mode)[0]
        order = np.lexsort((c.keys, -c.scores))
        np.unique(c.image_ids[order], return_index=True)
        seconds.append(time.perf_counter() - t0)
    ms = np.asarray(seconds) * 1000.0
    return {
        "query_ms_p50": float(np.percentile(ms, 50)),
        "query_ms_p95": float(np.percentile(ms, 95)),
        "latency_queries": len(queries),
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def _run_probe(isolate: bool, *args) -> dict:
    if not isolate:
        out = probe_search(*args)
        out["rss_scope"] = "process peak so far (not isolated)"
        return out
    import multiprocessing

    # spawn, not fork: a forked child inherits the parent's pages and its RSS would mean nothing
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        out = pool.apply(probe_search, args)
    out["rss_scope"] = "fresh subprocess: embedder + index + queries"
    return out


def embedder_bytes(embedder) -> int:
    return (embedder.model_dir / embedder.manifest["onnx"][embedder.precision]).stat().st_size


def _sample(texts: Sequence[str], n: int, seed: int = 0) -> list[str]:
    if n >= len(texts):
        return list(texts)
    rng = np.random.default_rng(seed)
    return [texts[i] for i in sorted(rng.choice(len(texts), size=n, replace=False))]


# ----------------------------------------------------------------------------------------------
# The matrix


@dataclass
class _Row:
    config: Config
    recall: dict | None
    top: np.ndarray
    size: dict
    time: dict
    search: dict
    extra: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return {
            "name": self.config.name,
            "config": asdict(self.config),
            "recall": self.recall,
            "size": self.size,
            "time": self.time,
            "search": self.search,
            **self.extra,
        }


def _load_embedders(opts: Options, progress: Progress) -> dict:
    from ..embed.embedder import Embedder

    out = {}
    for p in opts.embedders:
        progress.on_notice(f"loading the {p} embedder")
        out[p] = Embedder(opts.embedder_dir, precision=p)
    return out


def _dir(opts: Options) -> str | None:
    return str(opts.embedder_dir) if opts.embedder_dir else None


def _recall(rank: Callable[[np.ndarray], ev.EvalResult], scores: np.ndarray) -> dict:
    """evaluate's metrics at SCORE_DECIMALS, plus the tie-robust reading at COARSE_DECIMALS."""
    out = rank(scores).to_json()
    coarse = rank(np.round(scores, COARSE_DECIMALS)).to_json()
    out["coarse"] = {k: coarse[k] for k in ("t2i", "i2t", "mR")} | {"decimals": COARSE_DECIMALS}
    return out


def _facts(built: dict, mode: str, emb, embed_seconds: float, **extra) -> tuple[dict, dict]:
    size = {k: built[k] for k in ("graph_bytes", "rescore_bytes", "keys_bytes")}
    size |= {"index_bytes_for_mode": needed_bytes(built, mode), "embedder_onnx_bytes": embedder_bytes(emb)}
    times = {"embed_seconds": embed_seconds, "build_seconds": built["build_seconds"],
             "index_seconds": embed_seconds + built["build_seconds"]}  # fmt: skip
    for key, value in extra.items():
        (times if key.endswith("seconds") else size)[key] = value
    return size, times


def _oracle_rows(ann: Annotations, opts: Options, work: Path, embedders: dict, progress: Progress, rows: list[_Row]) -> None:
    """Append one row per finished configuration to ``rows`` (so Ctrl-C keeps them)."""
    from ..index.vindex import Snapshot

    texts, ids = ev.distinct_texts(ann.captions)
    n_text = len(texts)
    per_image = max(len(set(ids[ann.caption_image == i].tolist())) for i in range(ann.n_images))
    fetch = min(n_text, 2 * AGREE_K * per_image + 1)
    owners = np.zeros(n_text, dtype=np.int64)
    owners[ids[::-1]] = ann.caption_image[::-1]  # first image carrying each text (latency grouping)
    latency_texts = _sample(texts, opts.latency_queries)

    def rank(sim: np.ndarray) -> ev.EvalResult:
        t2i, i2t, counts = ev.oracle_ranks(ann, sim, ids)
        return ev.EvalResult(t2i, i2t, counts, {"source": "oracle"})

    for precision, emb in embedders.items():
        progress.on_step(f"{ORACLE}/{precision}: embedding {n_text} distinct captions")
        t0 = time.perf_counter()
        vectors = emb.embed(texts)
        embed_seconds = time.perf_counter() - t0
        for dtype in opts.dtypes:
            index_dir = work / f"{ORACLE}-{precision}-{dtype}"
            built = build_index(index_dir, vectors, owners, dtype)
            vi = Snapshot.open(index_dir)
            for mode in opts.modes:
                cfg = Config(ORACLE, precision, dtype, mode)
                progress.on_step(cfg.name)
                sim = sparse_scores(vi.search(vectors, fetch, mode=mode), n_text)
                recall = _recall(rank, sim)
                top = oracle_t2i_topk(ann, sim, ids, AGREE_K)
                del sim
                search = _run_probe(opts.isolate, str(index_dir), _dir(opts), precision, mode, latency_texts, 2 * AGREE_K * per_image)
                size, times = _facts(built, mode, emb, embed_seconds)
                rows.append(_Row(cfg, recall, top, size, times, search, {"fetch": fetch, "vectors": n_text}))


def _vlm_models(spec: VLMSpec, work: Path, progress: Progress) -> list[tuple[str, Path, float]]:
    """(label, GGUF, quantize seconds) for the reference model, its quantizations and the user's list."""
    from ..describe.gguf_check import inspect_gguf
    from ..describe.vlm import quantize_gguf

    inspect_gguf(spec.model)  # a bad --vlm fails here, with the file named, before any work
    models = [("F16" if "f16" in spec.model.name.lower() else spec.model.stem, spec.model, 0.0)]
    for ftype in spec.quantize_to:
        dst = work / "gguf" / f"{spec.model.stem}.{ftype}.gguf"
        progress.on_step(f"quantizing {spec.model.name} to {ftype}")
        t0 = time.perf_counter()
        quantize_gguf(spec.model, dst, ftype)
        models.append((ftype, dst, time.perf_counter() - t0))
    for path in spec.variants:
        inspect_gguf(path)
        models.append((path.stem, path, 0.0))
    labels = [m[0] for m in models]
    if len(set(labels)) != len(labels):
        models = [(f"{lab}#{n}", p, s) for n, (lab, p, s) in enumerate(models)]
    return models


def _vlm_rows(ann: Annotations, opts: Options, work: Path, embedders: dict, progress: Progress,
              rows: list[_Row], info: dict) -> None:  # fmt: skip
    """Caption with every VLM precision, then append rows as _oracle_rows does; facts go to ``info``."""
    from ..describe.captioning import caption_images
    from ..describe.vlm import VLMConfig
    from ..embed.texts import description_texts
    from ..index.vindex import Snapshot
    from ..modes import DEFAULT_TEXT_MODE

    spec = opts.vlm
    assert spec is not None
    info.update({"models": {}, "test_model": False})
    captions: dict[str, dict[str, list[str]]] = {}  # label -> image name -> variant texts
    for label, path, qseconds in _vlm_models(spec, work, progress):
        progress.on_step(f"captioning {spec.images} with {label}")
        records = []
        summary = caption_images(
            [spec.images], VLMConfig(model=path, mmproj=spec.mmproj), n_variants=spec.n_variants,
            max_tokens=spec.max_tokens, cache=None, on_record=records.append,
        )  # fmt: skip
        if summary.interrupted:
            raise KeyboardInterrupt
        captions[label] = {
            Path(r.image).name: description_texts(r.variants, DEFAULT_TEXT_MODE) for r in records
        }
        info["test_model"] = info["test_model"] or summary.test_model
        if info["test_model"]:
            info["note"] = TEST_MODEL_NOTE
        info["models"][label] = {
            "gguf": str(path), "gguf_bytes": path.stat().st_size, "mmproj_bytes": spec.mmproj.stat().st_size,
            "quantize_seconds": qseconds, "caption_seconds": summary.seconds,
            "images": summary.total, "captioned": summary.captioned, "failed": summary.failed,
            "failures": [f"{f.path}: {f.reason}" for f in summary.failures],
            "test_model": summary.test_model,
        }  # fmt: skip
    images = sorted({name for per in captions.values() for name in per})
    if not images:
        raise InputError(f"{spec.images}: no image could be captioned by any VLM; check the folder and the model")
    # Every captioned image is a candidate; annotated ones also bring their captions as queries
    # with a known target (absolute recall). Unannotated images are distractors with no captions.
    index_of = {name: n for n, name in enumerate(ann.images)}
    matched = [name for name in images if name in index_of]
    pos = {name: n for n, name in enumerate(images)}
    pairs = [(pos[ann.images[i]], c) for c, i in zip(ann.captions, ann.caption_image.tolist(), strict=True)
             if ann.images[i] in pos]  # fmt: skip
    sub = from_lists(images, pairs, source=ann.source)
    own, own_ids = ev.distinct_texts(sub.captions)
    own_set = set(own)
    others = [t for t in dict.fromkeys(ann.captions) if t not in own_set]
    queries = own + _sample(others, max(0, opts.vlm_queries - len(own)))
    info.update({"images": images, "annotated_images": matched, "queries": len(queries),
                 "queries_with_target": len(own)})  # fmt: skip
    if not matched:
        info["recall_note"] = "no annotated image among --images: absolute recall not available, agreement only"
    k = min(AGREE_K, len(images))

    def rank(scores: np.ndarray, owners: np.ndarray) -> ev.EvalResult:
        # I2T from the same T2I searches: the product only ever searches texts against the image
        # index, so a (caption, image) pair the search did not return is -inf in both directions
        t2i, i2t, i2t_nd, counts = ev.index_ranks(sub, owners, scores, scores, own_ids)
        return ev.EvalResult(t2i, i2t, counts, {"source": "index"}, i2t_nodup=i2t_nd)

    qvecs: dict[str, np.ndarray] = {}
    for label, per_image in captions.items():
        texts = [t for name in images for t in per_image.get(name, [])]
        owners = np.asarray([n for n, name in enumerate(images) for _ in per_image.get(name, [])], dtype=np.int64)
        if not texts:
            continue
        for precision, emb in embedders.items():
            t0 = time.perf_counter()
            vectors = emb.embed(texts)
            embed_seconds = time.perf_counter() - t0
            if precision not in qvecs:  # the same queries for every VLM
                qvecs[precision] = emb.embed(queries)
            qvec = qvecs[precision]
            # as evaluate's T2I: enough vectors that 11 distinct images come back (pigeonhole)
            fetch = min(len(texts), 2 * AGREE_K * int(np.bincount(owners).max()))
            for dtype in opts.dtypes:
                index_dir = work / f"{label}-{precision}-{dtype}"
                built = build_index(index_dir, vectors, owners, dtype)
                vi = Snapshot.open(index_dir)
                for mode in opts.modes:
                    cfg = Config(label, precision, dtype, mode)
                    progress.on_step(cfg.name)
                    dense = sparse_scores(vi.search(qvec, fetch, mode=mode), len(texts))
                    recall = _recall(partial(rank, owners=owners), dense[: len(own)]) if own else None
                    top = topk_images(ev.group_max(dense, owners, len(images)), k)
                    search = _run_probe(opts.isolate, str(index_dir), _dir(opts), precision, mode, queries[: opts.latency_queries], fetch)
                    size, times = _facts(built, mode, emb, embed_seconds, vlm_gguf_bytes=info["models"][label]["gguf_bytes"],
                                         caption_seconds=info["models"][label]["caption_seconds"])  # fmt: skip
                    rows.append(_Row(cfg, recall, top, size, times, search, {"fetch": fetch, "vectors": len(texts)}))


def _finish(rows: list[_Row], reference: Config) -> list[dict]:
    """Agreement and deltas against the reference row of the same data path."""
    ref = next((r for r in rows if r.config == reference), None)
    out = []
    for r in rows:
        j = r.to_json()
        j["reference"] = reference.name
        if ref is None:
            j["agreement"] = None
        else:
            k = r.top.shape[1]
            j["agreement"] = agreement(r.top, ref.top, k) | {"k": k, "queries": int(len(r.top))}
            if r.recall is not None and ref.recall is not None:
                j["agreement"] |= recall_deltas(r.recall, ref.recall)
        out.append(j)
    return out


def run(ann: Annotations, opts: Options, progress: Progress | None = None) -> dict:
    """Run the matrix and return the report (JSON-ready). Ctrl-C keeps the finished rows."""
    progress = progress or Progress()
    for axis, given, allowed in (("embedder", opts.embedders, EMBEDDERS), ("dtype", opts.dtypes, DTYPES), ("mode", opts.modes, MODES)):
        bad = [x for x in given if x not in allowed]
        if bad or not given:
            raise InputError(f"{axis} {', '.join(bad) or '(none)'} is not one of {', '.join(allowed)}")
    # The reference configuration is always part of the matrix: agreement is measured against it.
    opts.embedders = tuple(dict.fromkeys(("fp32", *opts.embedders)))
    opts.dtypes = tuple(dict.fromkeys(("f32", *opts.dtypes)))
    opts.modes = tuple(dict.fromkeys(("exact", *opts.modes)))
    n_cfg = len(opts.embedders) * len(opts.dtypes) * len(opts.modes)
    n_vlm = (1 + len(opts.vlm.quantize_to) + len(opts.vlm.variants)) if opts.vlm else 0
    n_quant = len(opts.vlm.quantize_to) if opts.vlm else 0
    progress.on_total(n_cfg * (1 + n_vlm) + len(opts.embedders) + n_vlm + n_quant)
    t_start = time.perf_counter()
    own_tmp = opts.work_dir is None
    work = Path(tempfile.mkdtemp(prefix="edge-t2t-quantcost-")) if own_tmp else Path(opts.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    report: dict = {
        "definitions": "Agreement with" + __doc__.split("Agreement with", 1)[1].rstrip() if __doc__ else "",
        "annotations": {"source": ann.source, "format": ann.format, "split": ann.split, "images": ann.n_images,
                        "captions": ann.n_captions, "notes": ann.notes},  # fmt: skip
        "axes": {"embedders": opts.embedders, "dtypes": opts.dtypes, "modes": opts.modes},
        "b1": B1_NOTE,
        "interrupted": False,
        "configs": [],
    }
    rows: list[_Row] = []
    vlm_rows: list[_Row] = []
    try:
        embedders = _load_embedders(opts, progress)
        report["embedder"] = {p: {"name": e.name, "onnx_bytes": embedder_bytes(e)} for p, e in embedders.items()}
        _oracle_rows(ann, opts, work, embedders, progress, rows)
        if opts.vlm is not None:
            report["vlm"] = {}
            _vlm_rows(ann, opts, work, embedders, progress, vlm_rows, report["vlm"])
    except KeyboardInterrupt:
        report["interrupted"] = True
        progress.on_notice("interrupted: reporting the configurations finished so far")
    finally:
        if own_tmp:
            shutil.rmtree(work, ignore_errors=True)
    report["configs"] = _finish(rows, Config(ORACLE, "fp32", "f32", "exact"))
    if vlm_rows:
        first = vlm_rows[0].config.vlm
        report["configs"] += _finish(vlm_rows, Config(first, "fp32", "f32", "exact"))
    report["wall_seconds"] = time.perf_counter() - t_start
    report["process_peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return report
