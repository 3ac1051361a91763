"""Retrieval modes beyond the paper's max-cosine: lexical (FTS5 BM25), hybrid (dense + lexical
fused), and spatial/size constraints read from the query (query_parse) scored against the
stored features. bench/retrieval_modes.py measures each; its figures chose the defaults here.

Work per query stays O(candidates): the dense side is search.rank_images with the fetch it makes
for k hits, from which it keeps up to `pool` images (no second vector search); the lexical side is
FTS5's top texts over the query's rarer words only (lexical.select_terms); structure reads the
features of those candidate images only.

Scores (what `--min-score` compares against):
  dense    the best cosine over an image's texts (the paper's rule);
  lexical  the image's best BM25, divided by the query's best BM25 among the candidates (0..1),
           over the query's rarer words only (lexical.select_terms);
  hybrid   linear: (dense + LEXICAL_WEIGHT * lexical) / (1 + LEXICAL_WEIGHT), 0..1 like the
           other modes' text scores, the lexical part taken as min(1, lexical / LEXICAL_CAP) when
           a cap is set (the chosen rule has none); or reciprocal-rank fusion of the two image
           rankings (fusion="rrf", bench and eval only: it lost on the held-in data). A cap makes
           every text within LEXICAL_CAP of the query's best BM25 score the same lexical 1, so the
           dense score orders them: BM25 is not greatest at a text's own words (it rewards a
           repeated word and a shorter text), so at weight 0.3 without a cap a near-copy beat a
           query's own text (bench/results/retrieval_modes_notes.md);
  plus STRUCTURE_WEIGHT * (mean constraint score of the image's best variant) when the query
  states places, relations or sizes. A query with none ranks as without structure. Because
  every linear text score spans 0..1, the structure weighs the same against it whatever the
  lexical weight (it used to be added to a 0..1+w score, so a larger w silently weakened it).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import lru_cache

import numpy as np

from ..index.store import Store
from ..records import Feature
from . import lexical, query_parse
from .search import Hit, rank_images

# dense stays the default. Held out (bench/results/retrieval_modes.md, docs/performance.md),
# hybrid (w 0.05, no cap) is below dense on no figure, ties it with structure on the synthetic
# seeds (MRR 1.000, 18/18 directional) and gains +0.012 synthetic MRR without it, but gains only
# +0.72 mR without duplicates on the RSICD oracle (+0.76 on the report half; goal +2).
# Structure is on in every mode.
DEFAULT_MODE = "dense"
FUSIONS = ("linear", "rrf")
# Chosen on held-in data only (bench/retrieval_modes.py --calibrate: synthetic seeds 4-5 and the
# RSICD validation "tune" half, oracle and index source), by a criterion fixed beforehand: no held-in
# figure below dense's by more than 0.5 point (0.005 MRR), then the best mean normalised gain. Of 33
# rules (weights 0.05-1.0 x caps none/1.0-0.5, RRF k 10/30/60), w 0.05 uncapped won (0.0246; next
# w 1.0 cap 0.9, 0.0240), re-run once the text score was divided by its range (issue 14): the
# structure no longer weakens as w grows, so capped rules up to w 1.0 became eligible. The same
# run before that change, on the same indexes, also chose w 0.05 uncapped: the first calibration's
# w 0.3 cap 0.8 came from another machine, whose figures this one does not reproduce
# (bench/results/retrieval_modes_notes.md).
# RRF lost 2.2 index mR on the tune half.
# Each image's parts are mixed (its best cosine + weight x its best normalised BM25, capped when
# LEXICAL_CAP is set), in search and in eval alike. At w 0.05 a near-copy's higher BM25 (the reason
# for a cap) moves the score by at most 0.05 / 1.05.
LEXICAL_WEIGHT = 0.05
LEXICAL_CAP = None
STRUCTURE_WEIGHT = 1.0
RRF_K = 60
MIN_POOL = 50  # images fused/re-scored per query: the right one must be among them to be lifted


@dataclass
class Candidate:
    image: str
    image_id: int
    dense: float | None = None
    lexical: float = 0.0
    structure: float = 0.0
    score: float = 0.0
    text_score: float = 0.0  # the score without the structure part: score = text_score + weight x structure
    key: int = -1  # the text shown: the dense best, else the lexical best
    matched: list = field(default_factory=list)  # query_parse.ConstraintResult of the best variant
    structure_variant: int = -1
    text_hit: object = None  # the dense side's search.Hit (its best text), when it found the image


def _dense_candidates(store, vectors, query_vec, k, pool, vector_mode, exclude):
    return rank_images(store, vectors, query_vec, k, vector_mode, exclude_image_ids=exclude, pool=pool)


def _image_ids(store: Store, paths: list[str]) -> dict[str, int]:
    out: dict[str, int] = {}
    for i in range(0, len(paths), 500):
        chunk = paths[i : i + 500]
        q = ",".join("?" * len(chunk))
        out.update(dict(store.conn.execute(f"SELECT path, id FROM images WHERE path IN ({q})", chunk)))
    return out


def features_by_image(store: Store, image_ids: list[int]) -> dict[int, list[tuple[int, tuple[Feature, ...]]]]:
    """(ordinal, features) of each variant of the given images (one stored row per variant)."""
    out: dict[int, list] = {}
    for image_id, ordinal, feats in store.features_of(image_ids):
        out.setdefault(image_id, []).append((ordinal, _parse_features(feats)))
    return out


@lru_cache(maxsize=16384)  # the same features JSON comes back for every query that reaches the image
def _parse_features(feats: str) -> tuple[Feature, ...]:
    return tuple(Feature.from_any(f) for f in json.loads(feats))


def best_variant_structure(parsed: query_parse.ParsedQuery, variants) -> tuple[float, list, int]:
    """(score, constraint results, ordinal) of an image's best variant for the query's
    constraints; `variants` is (ordinal, features) per variant. Search and eval both score so."""
    best, best_res, best_ord = 0.0, [], -1
    for ordinal, features in variants:
        s, res = query_parse.score_features(parsed, features)
        if s > best or best_ord < 0:
            best, best_res, best_ord = s, res, ordinal
    return best, best_res, best_ord


def score_structure(store: Store, parsed: query_parse.ParsedQuery, cands: list[Candidate]) -> None:
    """Set each candidate's structure score: its best variant's mean constraint score."""
    feats = features_by_image(store, [c.image_id for c in cands])
    for c in cands:
        c.structure, c.matched, c.structure_variant = best_variant_structure(parsed, feats.get(c.image_id, []))


@dataclass
class Pool:
    """Every candidate image of one query with each part of its score, before they are combined."""

    cands: list[Candidate]
    dense_order: list[str]  # images by dense score, best first
    lex_order: list[str]  # images by lexical score, best first
    parsed: query_parse.ParsedQuery


def gather(
    store: Store,
    vectors,
    query: str,
    query_vec: np.ndarray | None,
    pool: int,
    sides: tuple[str, ...] = ("dense", "lexical"),
    vector_mode: str = "rescore",
    parsed: query_parse.ParsedQuery | None = None,
    exclude_image_ids=(),
    k: int | None = None,
    dense_side: Callable[[int], list[Hit]] | None = None,
) -> Pool:
    """Up to `pool` best images of each side (dense, lexical) for a query, with their parts, and
    their structure scores when `parsed` states constraints. The dense side's vector search is
    sized for `k` hits (default: pool) and the pool taken from what it fetched; `dense_side(n)`,
    when given, is the dense side instead: the best n images, best first (a place filter's exact
    ranking of the chips in the place, scene.geosearch.rank_in_place)."""
    parsed = parsed or query_parse.ParsedQuery(query)
    exclude = set(exclude_image_ids)
    by_image: dict[str, Candidate] = {}
    dense_order: list[str] = []
    if "dense" in sides:
        dense_hits = (dense_side(max(k or pool, pool)) if dense_side is not None
                      else _dense_candidates(store, vectors, query_vec, k or pool, pool, vector_mode, exclude))  # fmt: skip
        for h in dense_hits:
            by_image[h.image] = Candidate(h.image, -1, dense=h.score, key=-1, text_hit=h)
            dense_order.append(h.image)
    lex_order: list[str] = []
    if "lexical" in sides:
        per_image = max(1, store.max_texts_per_image())
        # lexical mode keeps a query's rarest word even when every word is common; hybrid then
        # adds nothing lexical (lexical.select_terms)
        keys, scores = lexical.search_texts(store.conn, query, pool * min(per_image, 8),
                                            keep_one="dense" not in sides)
        rows = store.variant_rows(keys)
        top = float(scores[0]) if len(scores) else 1.0
        lex_keys: dict[str, list[int]] = {}
        for key, s in zip(keys.tolist(), scores.tolist(), strict=True):
            row = rows.get(key)
            if row is None or row.image_id in exclude:
                continue
            lex_keys.setdefault(row.image, []).append(key)
            c = by_image.get(row.image)
            if c is None:
                c = by_image[row.image] = Candidate(row.image, row.image_id, key=key)
            if len(lex_keys[row.image]) == 1:  # the image's best text: rows come best first
                lex_order.append(row.image)
                c.lexical = s / top if top > 0 else 0.0
        if "dense" in sides and query_vec is not None:
            # An image the lexical side found but the dense pool missed: its dense score is the best
            # cosine over its lexically matched texts (a lower bound of its true max).
            missing = [img for img in lex_order if by_image[img].dense is None]
            want = np.asarray([k_ for img in missing for k_ in lex_keys[img]], np.int64)
            found, vecs = vectors.vectors_of(want)
            q = np.asarray(query_vec, dtype=np.float32).reshape(-1)
            score_of = dict(zip(want[found].tolist(), (vecs[found] @ q).tolist(), strict=True))
            for img in missing:
                by_image[img].dense = max((score_of[k_] for k_ in lex_keys[img] if k_ in score_of), default=None)
    cands = list(by_image.values())
    if any(c.image_id < 0 for c in cands):
        ids = _image_ids(store, [c.image for c in cands if c.image_id < 0])
        for c in cands:
            if c.image_id < 0:
                c.image_id = ids.get(c.image, -1)
    if parsed and cands:
        score_structure(store, parsed, cands)
    return Pool(cands, dense_order, lex_order, parsed)


def combine(
    pool: Pool,
    k: int,
    mode: str = "hybrid",
    structure: bool = True,
    fusion: str = "linear",
    lexical_weight: float = LEXICAL_WEIGHT,
    structure_weight: float = STRUCTURE_WEIGHT,
    lexical_cap: float | None = LEXICAL_CAP,
    rrf_k: int = RRF_K,
) -> list[Candidate]:
    """The top k of a pool under one mode's scoring (see the module's docstring), best first,
    ties by image path. The pool is left as it was, so one pool can be combined many ways."""
    if mode == "dense":
        members = set(pool.dense_order)
    elif mode == "lexical":
        members = set(pool.lex_order)
    else:
        members = set(pool.dense_order) | set(pool.lex_order)
    cands = [c for c in pool.cands if c.image in members]
    ranks = {}
    if fusion == "rrf" and mode == "hybrid":  # the linear mix needs no ranks
        by_image = {c.image: c for c in pool.cands}
        for side, order, part in (("dense_rank", pool.dense_order, "dense"), ("lexical_rank", pool.lex_order, "lexical")):
            r = side_ranks({img: getattr(by_image[img], part) for img in order})
            ranks[side] = np.array([r.get(c.image, np.inf) for c in cands], dtype=np.float64)
    dense = np.array([c.dense if c.dense is not None else 0.0 for c in cands], dtype=np.float64)
    lex = np.array([c.lexical for c in cands], dtype=np.float64)
    structs = np.array([c.structure for c in cands], dtype=np.float64) if structure and pool.parsed else None
    weights = (fusion, lexical_weight, structure_weight, lexical_cap, rrf_k)
    scores = fused(dense, lex, structs, mode, *weights, **ranks)
    # the same rule without the structure: what a score above 1 is made of (report.score_terms)
    texts = scores if structs is None else fused(dense, lex, None, mode, *weights, **ranks)
    out = [replace(c, score=float(score), text_score=float(text), lexical=c.lexical if mode != "dense" else 0.0,
                   matched=c.matched if structure else [], structure=c.structure if structure else 0.0)
           for c, score, text in zip(cands, scores, texts, strict=True)]
    out.sort(key=lambda c: (-c.score, c.image))
    return out[:k]


def side_ranks(scores: dict[str, float]) -> dict[str, int]:
    """Each image's competition rank on one side: how many of that side's images score strictly
    higher (0 = best; equal scores share a rank, so a tie is never broken by fetch order). eval
    ranks whole rows the same way (evaluate.competition_ranks)."""
    ordered = sorted(scores.values(), reverse=True)
    first = {}
    for r, s in enumerate(ordered):
        first.setdefault(s, r)
    return {img: first[s] for img, s in scores.items()}


def fused(
    dense: np.ndarray,
    lexical: np.ndarray,
    structure: np.ndarray | None,
    mode: str,
    fusion: str = "linear",
    lexical_weight: float = LEXICAL_WEIGHT,
    structure_weight: float = STRUCTURE_WEIGHT,
    lexical_cap: float | None = LEXICAL_CAP,
    rrf_k: int = RRF_K,
    dense_rank: np.ndarray | None = None,
    lexical_rank: np.ndarray | None = None,
) -> np.ndarray:
    """Each candidate image's score under one mode, from its parts (arrays of one shape: the
    candidates of a search, or a queries x images matrix in `eval`, which calls this too, so the
    two cannot drift apart). dense: best cosine; lexical: normalised best BM25; structure: best
    variant's constraint score (None: the query states none, or structure is off); ranks are
    0-based competition ranks on each side (side_ranks), inf where a side did not find the
    image (rrf only). lexical_cap: see the module's docstring (None: no cap; eval's oracle
    can give a query's own text a lexical part above 1, which any cap clips to 1).
    RRF scores keep their own scale (at most 2 / (rrf_k + 1)): their range does not grow with
    a weight, so a structure weight keeps one meaning there; the bench gives RRF its own."""
    if mode == "dense":
        score = np.asarray(dense, dtype=np.float64)
    elif mode == "lexical":
        score = np.asarray(lexical, dtype=np.float64)
    elif fusion == "rrf":
        score = sum(1.0 / (rrf_k + 1 + np.asarray(r, dtype=np.float64)) for r in (dense_rank, lexical_rank))
    else:
        lex = np.asarray(lexical, dtype=np.float64)
        if lexical_cap is not None:
            lex = np.minimum(1.0, lex / lexical_cap)
        # divided by the mix's range (1 + w) so the text score spans 0..1 as dense and lexical
        # do, and the structure below counts the same whatever the weight; the order without
        # structure is unchanged. Uncapped, search's lexical part is also at most 1 (the query's
        # best); only eval's oracle can exceed it (its own text), where no structure is scored.
        score = (np.asarray(dense, dtype=np.float64) + lexical_weight * lex) / (1.0 + lexical_weight)
    if structure is not None:
        score = score + structure_weight * np.asarray(structure, dtype=np.float64)
    return score


def rank(
    store: Store,
    vectors,
    query: str,
    query_vec: np.ndarray | None,
    k: int,
    mode: str = "hybrid",
    vector_mode: str = "rescore",
    structure: bool = True,
    fusion: str = "linear",
    lexical_weight: float = LEXICAL_WEIGHT,
    structure_weight: float = STRUCTURE_WEIGHT,
    pool: int | None = None,
    exclude_image_ids=(),
    lexical_cap: float | None = LEXICAL_CAP,
    rrf_k: int = RRF_K,
    dense_side: Callable[[int], list[Hit]] | None = None,
) -> list[Candidate]:
    """The top k candidates for one text query, best first (ties by image path). Without
    constraints in the query, dense mode fetches exactly k images: the paper's ranking.
    `dense_side`: the dense side's best n images instead of the vector index's (see gather)."""
    parsed = query_parse.parse(query) if structure else query_parse.ParsedQuery(query)
    fused = mode != "dense" or bool(parsed)
    size = max(k, pool or MIN_POOL) if fused else k
    sides = {"dense": ("dense",), "lexical": ("lexical",), "hybrid": ("dense", "lexical")}[mode]
    p = gather(store, vectors, query, query_vec, size, sides, vector_mode, parsed, exclude_image_ids, k=k,
               dense_side=dense_side)
    return combine(p, k, mode, structure, fusion, lexical_weight, structure_weight, lexical_cap, rrf_k)


def to_hits(store: Store, cands: list[Candidate], explain: bool = False):
    """search.Hit rows for the chosen candidates, with the text that matched best."""
    keys = [c.key for c in cands if c.key >= 0]
    rows = store.variant_rows(keys) if keys else {}
    out = []
    for r, c in enumerate(cands):
        dense_hit = c.text_hit
        if dense_hit is not None:
            variant, text, fld = dense_hit.variant, dense_hit.text, dense_hit.field
        else:
            row = rows.get(c.key)
            variant, text, fld = (row.ordinal, row.text, row.field) if row else (-1, "", "")
        parts = {"dense": None if c.dense is None else round(float(c.dense), 6), "lexical": round(c.lexical, 6),
                 "structure": round(c.structure, 6), "text_score": round(c.text_score, 6)}
        matched = tuple(m.to_dict() for m in c.matched) if explain else ()
        out.append(Hit(rank=r + 1, score=c.score, image=c.image, variant=variant, text=text, field=fld,
                       parts=parts, matched=matched))
    return out
