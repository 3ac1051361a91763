"""Retrieval evaluation: text-to-image (T2I) and image-to-text (I2T) Recall@1/5/10 and mR.

Ranking rule, used for every configuration: TIES COUNT AGAINST THE QUERY. A target's rank is the
number of other (non-target) candidates whose score is >= the target's score, so rank 0 means
strictly best. RSICD repeats captions verbatim across images, so exact ties are common; breaking
them in the query's favour (or by argsort order, which is arbitrary) would inflate R@1.

Every distinct text is embedded once. Verbatim-equal texts then share one vector and one row of
the similarity matrix, so their scores are bit-identical whatever batch they fell in, and the tie
rule above sees them as the exact ties they are. Scores are computed in float64 from the (possibly
quantised) vectors so that an independent loop-based computation agrees to rounding.

Two sources of image-side text:

* ``oracle``: reference captions stand in for a VLM's descriptions, leave-one-out (LOO).
  T2I: caption j of image i is the query; image i is represented by its OTHER captions, every
  other image by all of its captions; image score = max cosine over representing captions.
  I2T: for caption j of image i the query set is image i's other captions; the database is all
  captions minus image i's captions other than j, so j is the only target; a database caption's
  score is the max cosine over the query set.
  A query is a *dup* when caption j's text is also among image i's other captions (the hit is
  then trivial on the text side). Images with one caption have no "other captions": their
  queries are skipped and counted (``skipped_single_caption``). Images with no caption are not
  candidates in T2I (nothing represents them) and counted (``images_without_captions``).
* ``index``: the image side is the variant vectors an index holds for the annotated images
  (matched by file name); image score = max cosine over its vectors. T2I hit: the caption's own
  image; I2T hit: any of the image's reference captions (ties only count against when the
  competing caption is not itself a target). Here *dup* means a caption repeated verbatim within
  its own image: ``*_nodup`` counts each distinct (image, caption text) once, on both sides.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from ..index.quantise import as_exact, graph_codes
from .dataset import Annotations

KS = (1, 5, 10)


# ----------------------------------------------------------------------------------------------
# Rank and recall primitives


def pessimistic_rank(target_score: float, other_scores: np.ndarray) -> int:
    """Number of OTHER candidates scoring >= the target: ties count against the query."""
    return int(np.count_nonzero(np.asarray(other_scores) >= target_score))


def recall_at(ranks: np.ndarray, ks: Sequence[int] = KS) -> dict[str, float | None]:
    """Percent of queries whose target rank is < k, for each k; None when there are no queries."""
    ranks = np.asarray(ranks)
    if ranks.size == 0:
        return {f"R@{k}": None for k in ks}
    return {f"R@{k}": float(np.count_nonzero(ranks < k) * 100.0 / ranks.size) for k in ks}


def mean_or_none(values: Sequence[float | None]) -> float | None:
    if not values or any(v is None for v in values):
        return None
    return float(sum(values) / len(values))  # type: ignore[arg-type]


# ----------------------------------------------------------------------------------------------
# Texts and vectors


def distinct_texts(texts: Sequence[str]) -> tuple[list[str], np.ndarray]:
    """(distinct texts in first-seen order, id of each input text into that list)."""
    index: dict[str, int] = {}
    ids = np.empty(len(texts), dtype=np.int64)
    for n, t in enumerate(texts):
        ids[n] = index.setdefault(t, len(index))
    return list(index), ids


def unit(vectors: np.ndarray) -> np.ndarray:
    """Rows scaled to length 1 (zero rows stay zero), in float32 as the embedder returns them."""
    v = np.asarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(v, axis=1, keepdims=True)
    return v / np.where(norms > 0, norms, 1.0)


def stored_scores(queries: np.ndarray, database: np.ndarray, dtype: str, exact_copy: bool = True) -> np.ndarray:
    """(queries, database) scores exactly as `exact` search of an index of ``dtype`` gives them:
    the float32 query against the index's exact values of each vector (quantise.as_exact: float16
    for f16 graphs and beside i8 ones; an i8 index without that copy: its codes as unit vectors),
    not re-normalised after the float16 cast. In float64."""
    return unit(queries).astype(np.float64) @ as_exact(unit(database), dtype, exact_copy).T


def cosine_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine similarity of every row of ``a`` with every row of ``b``, in float64."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    na = np.linalg.norm(a, axis=1, keepdims=True)
    nb = np.linalg.norm(b, axis=1, keepdims=True)
    return (a / np.where(na > 0, na, 1.0)) @ (b / np.where(nb > 0, nb, 1.0)).T


def text_similarity(vectors: np.ndarray) -> np.ndarray:
    """Cosine of every distinct text with every other, made exactly symmetric with a diagonal of 1.

    Why: a text's cosine with itself is 1 by definition, but float rounding makes sim[a, a] and
    sim[b, b] differ in the last bit, and a matrix product need not give sim[a, b] == sim[b, a].
    Under the ties-count-against rule such noise would decide genuine ties (two verbatim-duplicate
    targets both scoring 1) at random.
    """
    sim = cosine_matrix(vectors, vectors)
    sim = (sim + sim.T) / 2.0
    nonzero = np.linalg.norm(np.asarray(vectors, dtype=np.float64), axis=1) > 0
    sim[np.flatnonzero(nonzero), np.flatnonzero(nonzero)] = 1.0
    return np.clip(sim, -1.0, 1.0, out=sim)


def group_max(scores: np.ndarray, groups: np.ndarray, n_groups: int) -> np.ndarray:
    """Column-wise max within groups: out[:, g] = max of scores[:, groups == g]; -inf if empty."""
    order = np.argsort(groups, kind="stable")
    sorted_groups = groups[order]
    present, starts = np.unique(sorted_groups, return_index=True)
    out = np.full((scores.shape[0], n_groups), -np.inf)
    if len(order):
        out[:, present] = np.maximum.reduceat(scores[:, order], starts, axis=1)
    return out


# ----------------------------------------------------------------------------------------------
# Results


@dataclass
class Ranks:
    """Per-query ranks of one direction, with the dup flag of each query."""

    ranks: np.ndarray  # (q,) int64
    dup: np.ndarray  # (q,) bool

    def metrics(self, nodup: bool = False) -> dict[str, float | None]:
        return recall_at(self.ranks[~self.dup] if nodup else self.ranks)


@dataclass
class EvalResult:
    t2i: Ranks
    i2t: Ranks
    counts: dict[str, int]
    config: dict[str, object] = field(default_factory=dict)
    # when set, I2T nodup figures come from these ranks instead of filtering i2t by its dup flags
    i2t_nodup: Ranks | None = None

    def to_json(self) -> dict[str, object]:
        out: dict[str, object] = {}
        for suffix, nodup in (("", False), ("_nodup", True)):
            t2i = self.t2i.metrics(nodup)
            i2t = self.i2t_nodup.metrics() if nodup and self.i2t_nodup else self.i2t.metrics(nodup)
            out["t2i" + suffix] = t2i
            out["i2t" + suffix] = i2t
            out["t2i_mean" + suffix] = mean_or_none(list(t2i.values()))
            out["i2t_mean" + suffix] = mean_or_none(list(i2t.values()))
            out["mR" + suffix] = mean_or_none([*t2i.values(), *i2t.values()])
        out["counts"] = dict(self.counts)
        out["counts"]["queries"] = self.counts.get("t2i_queries", 0) + self.counts.get("i2t_queries", 0)
        out["config"] = dict(self.config)
        return out


def _base_counts(ann: Annotations) -> dict[str, int]:
    per_image = ann.captions_per_image()
    distinct_per_image = [len(set(c)) for c in _captions_by_image(ann)]
    return {
        "images": ann.n_images,
        "captions": ann.n_captions,
        "distinct_captions": len(set(ann.captions)),
        "images_without_captions": int(np.count_nonzero(per_image == 0)),
        "images_with_one_caption": int(np.count_nonzero(per_image == 1)),
        "images_with_one_distinct_caption": int(sum(1 for d in distinct_per_image if d == 1)),
        # captions whose text appears earlier in the same image (verbatim repeats)
        "duplicate_captions": int(sum(len(c) - len(set(c)) for c in _captions_by_image(ann))),
    }


def _captions_by_image(ann: Annotations) -> list[list[str]]:
    out: list[list[str]] = [[] for _ in range(ann.n_images)]
    for c, i in zip(ann.captions, ann.caption_image, strict=True):
        out[int(i)].append(c)
    return out


# ----------------------------------------------------------------------------------------------
# Oracle (leave-one-out over reference captions)


def _max_then_fuse(parts: Sequence[np.ndarray], combine: Callable | None, reduce: Callable) -> np.ndarray:
    """`reduce` (a max over an image's texts) applied to each score part, then the parts combined
    into one score: the image-level fusion search does (max per part, then mix), not a max of mixed
    text scores."""
    values = [reduce(p) for p in parts]
    return values[0] if combine is None else combine(*values)


def oracle_ranks(
    ann: Annotations, sim: np.ndarray | Sequence[np.ndarray], text_ids: np.ndarray, combine: Callable | None = None
) -> tuple[Ranks, Ranks, dict]:
    """T2I and I2T ranks from ``sim`` (distinct text x distinct text cosine) under the oracle protocol.
    ``sim`` may be several such matrices (the parts of a retrieval mode) with ``combine`` mixing
    their per-image maxima (retrieval.fused).

    Returns (t2i, i2t, counts). Both directions are indexed per caption entry (caption j of
    image i); queries that cannot be asked (single-caption images) are left out and counted.
    """
    parts = [sim] if isinstance(sim, np.ndarray) else list(sim)
    combine = combine if len(parts) > 1 else None

    n_img = ann.n_images
    img = np.asarray(ann.caption_image, dtype=np.int64)
    n_text = parts[0].shape[0]
    # Distinct (image, text) pairs and each text's multiplicity within its image.
    pair_key = img * n_text + text_ids
    pairs, pair_mult = np.unique(pair_key, return_counts=True)
    pair_img, pair_text = pairs // n_text, pairs % n_text
    mult = dict(zip(pairs.tolist(), pair_mult.tolist(), strict=True))
    texts_of: list[list[int]] = [[] for _ in range(n_img)]
    for i, t in zip(pair_img.tolist(), pair_text.tolist(), strict=True):
        texts_of[i].append(t)
    has_caption = np.bincount(img, minlength=n_img) > 0

    # T2I. best[u, a] = max cosine (each part's max) of text u against all of image a's captions;
    # the query's own image is represented by its OTHER captions (own_parts), put in its column
    # before the parts are mixed, so a rank-based mix (rrf) ranks whole rows too.
    valid, own_parts, dup = [], [], []
    for c in range(len(img)):
        i, u = int(img[c]), int(text_ids[c])
        if mult[i * n_text + u] >= 2:  # the same text stays among the other captions
            own_parts.append([p[u, texts_of[i]].max() for p in parts])
            dup.append(True)
        else:
            others = [t for t in texts_of[i] if t != u]
            if not others:  # a single-caption image: nothing represents it under LOO
                continue
            own_parts.append([p[u, others].max() for p in parts])
            dup.append(False)
        valid.append(c)
    valid_a = np.asarray(valid, dtype=np.int64)
    own_a = np.asarray(own_parts, dtype=np.float64).reshape(len(valid_a), len(parts))
    t2i_rank = np.zeros(len(valid_a), dtype=np.int64)
    candidates = np.flatnonzero(has_caption)
    for start in range(0, len(valid_a), 1024):  # bounded memory on large caption sets
        block = valid_a[start : start + 1024]
        u_rows = np.unique(text_ids[block], return_inverse=True)
        own_col = np.searchsorted(candidates, img[block])
        at = (np.arange(len(block)), own_col)
        part_rows = []
        for n, p in enumerate(parts):
            r = group_max(p[u_rows[0]][:, pair_text], pair_img, n_img)[u_rows[1]][:, candidates]
            r[at] = own_a[start : start + 1024, n]
            part_rows.append(r)
        rows = part_rows[0] if combine is None else combine(*part_rows)
        ge = rows >= rows[at][:, None]
        # the query's own image is the target, not a competitor
        ge[at] = False
        t2i_rank[start : start + len(block)] = ge.sum(axis=1)
    t2i = Ranks(t2i_rank, np.asarray(dup, dtype=bool))

    # I2T. Candidates are caption entries; group them by text so a score per distinct text
    # is enough: a text competes once per caption of another image carrying it.
    global_count = np.bincount(text_ids, minlength=n_text)
    i2t_rank, i2t_dup = [], []
    for i in range(n_img):
        ts = texts_of[i]
        if not ts:
            continue
        rows = [p[ts] for p in parts]  # (k, n_text) each
        not_i = global_count.copy()
        for t in ts:
            not_i[t] -= mult[i * n_text + t]
        for n, t in enumerate(ts):
            m = mult[i * n_text + t]
            if m < 2 and len(ts) == 1:
                continue  # single caption: empty query set
            query_rows = rows if m >= 2 else [np.delete(r, n, axis=0) for r in rows]
            # texts that are no candidate (only image i's other captions) are left out of the
            # parts, so a rank-based mix ranks the candidates alone
            out = (not_i == 0) & (np.arange(n_text) != t)
            score = _max_then_fuse(query_rows, combine, lambda r, out=out: np.where(out, -np.inf, r.max(axis=0)))
            rank = int(not_i[score >= score[t]].sum())
            i2t_rank.extend([rank] * m)  # every copy of caption j gives the same query
            i2t_dup.extend([m >= 2] * m)
    i2t = Ranks(np.asarray(i2t_rank, dtype=np.int64), np.asarray(i2t_dup, dtype=bool))

    single = int(np.count_nonzero(np.bincount(img, minlength=n_img) == 1))
    counts = {
        "t2i_queries": len(t2i.ranks),
        "t2i_queries_dup": int(t2i.dup.sum()),
        "i2t_queries": len(i2t.ranks),
        "i2t_queries_dup": int(i2t.dup.sum()),
        "t2i_candidates": len(candidates),
        "skipped_single_caption": single,  # per direction: one query each, skipped in both
    }
    return t2i, i2t, counts


def lexical_similarity(
    queries: Sequence[str], texts: Sequence[str], exclude_self: bool = False, keep_one: bool = True
) -> np.ndarray:
    """BM25 of each query against each text (FTS5, as `search --mode lexical` scores), each row
    divided by its best score as the search does; exclude_self: the query's own text (the
    diagonal, when queries are the texts) is left out of that best, as a search would not see it.
    keep_one: as lexical.select_terms (True for lexical mode, False for hybrid's lexical side)."""
    from ..query.lexical import bm25_matrix, normalise_rows

    raw = bm25_matrix(queries, texts, keep_one=keep_one)
    mask = np.eye(len(queries), len(texts), dtype=bool) if exclude_self else None
    return normalise_rows(raw, mask)


def competition_ranks(scores: np.ndarray, found: np.ndarray | None = None) -> np.ndarray:
    """Each column's rank within its row: how many columns score strictly higher (0 = best, equal
    scores share a rank), as retrieval.side_ranks ranks one side of a search; inf where `found`
    is False (the side did not find that image)."""
    s = np.asarray(scores, dtype=np.float64)
    srt = np.sort(s, axis=1)
    out = np.empty(s.shape, dtype=np.float64)
    for r in range(len(s)):
        out[r] = s.shape[1] - np.searchsorted(srt[r], s[r], side="right")
    return out if found is None else np.where(found, out, np.inf)


def mode_parts(mode: str, **weights) -> tuple[tuple[str, ...], Callable]:
    """The score parts a retrieval mode needs and the function that mixes their per-image values:
    retrieval.fused, the search's own rule. With fusion="rrf" (reciprocal-rank fusion, measured
    beside the linear mix) the parts are whole rows (a query's score for every candidate): each
    side's ranks are competition ranks over every candidate (the search ranks only its candidate
    pools, which hold the top ranks), one without a shared word being absent from the lexical side."""
    from ..query.retrieval import fused

    names = {"dense": ("dense",), "lexical": ("lexical",), "hybrid": ("dense", "lexical")}[mode]
    rrf = weights.get("fusion") == "rrf" and mode == "hybrid"

    def combine(*values, structure=None):
        parts = dict(zip(names, values, strict=True))
        ranks = {}
        if rrf:
            d, lx = np.atleast_2d(parts["dense"]), np.atleast_2d(parts["lexical"])
            shape = np.shape(parts["dense"])
            ranks = {"dense_rank": competition_ranks(d).reshape(shape),
                     "lexical_rank": competition_ranks(lx, lx > 0).reshape(shape)}
        return fused(parts.get("dense", 0.0), parts.get("lexical", 0.0), structure, mode, **weights, **ranks)

    return names, combine


def oracle_eval(
    ann: Annotations, embed: Callable[[list[str]], np.ndarray], dtype: str = "f32", mode: str = "dense",
    exact_copy: bool = True, **weights,
) -> EvalResult:
    """Embed each distinct caption once, store it as an index of ``dtype`` keeps it for exact
    search (quantise.as_exact; ``exact_copy=False``: an i8 index without its float16 copy), and
    score exactly; both sides are stored texts, so both are cast.
    mode lexical/hybrid scores with BM25 over the distinct captions: each image's best BM25 and
    best cosine, mixed as the search mixes them (retrieval.fused). Reference captions have no
    features, so there is no structure part."""
    texts, ids = distinct_texts(ann.captions)
    names, combine = mode_parts(mode, **weights)
    parts = []
    for name in names:
        if name == "dense":
            parts.append(text_similarity(as_exact(unit(embed(texts)), dtype, exact_copy)))
        else:
            parts.append(lexical_similarity(texts, texts, exclude_self=True, keep_one=mode == "lexical"))
    t2i, i2t, counts = oracle_ranks(ann, parts, ids, combine)
    return EvalResult(t2i, i2t, {**_base_counts(ann), **counts}, {"source": "oracle", "dtype": dtype, "mode": mode})


# ----------------------------------------------------------------------------------------------
# Index (VLM descriptions of the annotated images)


def index_ranks(
    ann: Annotations,
    owner: np.ndarray,
    t2i_scores: np.ndarray,
    i2t_scores: np.ndarray,
    text_ids: np.ndarray,
) -> tuple[Ranks, Ranks, Ranks, dict]:
    """T2I and I2T ranks with the image side given as vectors owned by annotated images.

    ``owner[p]`` is the annotated image of image-side vector p. ``t2i_scores[u, p]`` and
    ``i2t_scores[u, p]`` are the cosine of distinct caption text u with vector p as seen by each
    direction's search (the same matrix when exact; -inf where an approximate search did not
    return the pair). Images owning no vector are not in the index: their captions are not asked
    and they are no candidates. Returns (t2i, i2t, i2t_nodup, counts). T2I's dup flag marks
    verbatim repeats of a caption within its image (the first copy stays in nodup); i2t_nodup
    counts each distinct (image, caption text) once among the candidates.
    """
    n_img = ann.n_images
    img = np.asarray(ann.caption_image, dtype=np.int64)
    present = np.zeros(n_img, dtype=bool)
    present[owner] = True
    in_index = np.flatnonzero(present)
    if len(in_index) == 0:
        raise ValueError("no annotated image has vectors")
    n_text = t2i_scores.shape[0]

    # T2I over the caption entries of images in the index; best[u, a] = image a's score for text u
    best = group_max(t2i_scores, owner, n_img)
    asked = present[img]
    q_img, q_text = img[asked], text_ids[asked]
    own = best[q_text, q_img]
    ge = best[q_text][:, in_index] >= own[:, None]
    ge[np.arange(len(q_img)), np.searchsorted(in_index, q_img)] = False  # the target itself
    key = q_img * n_text + q_text
    _, first = np.unique(key, return_index=True)
    repeat = np.ones(len(key), dtype=bool)
    repeat[first] = False
    t2i = Ranks(ge.sum(axis=1).astype(np.int64), repeat)

    # I2T: the candidates are the captions of images in the index.
    best = best if i2t_scores is t2i_scores else group_max(i2t_scores, owner, n_img)
    count_all = np.bincount(q_text, minlength=n_text)
    count_distinct = np.bincount(np.unique(key) % n_text, minlength=n_text)
    ranks, ranks_nd = [], []
    for i in in_index:
        own_count = np.bincount(text_ids[img == i], minlength=n_text)
        targets = np.flatnonzero(own_count)
        if len(targets) == 0:
            continue  # no reference caption: nothing to hit, not asked
        score = best[:, i]
        beats = score >= score[targets].max()
        # competitors are the captions of OTHER images: a target's text carried by another image
        # still competes (the ground truth cannot tell the two apart), other targets do not
        ranks.append(int((count_all - own_count)[beats].sum()))
        ranks_nd.append(int((count_distinct - (own_count > 0))[beats].sum()))
    no_dup = np.zeros(len(ranks), dtype=bool)
    i2t = Ranks(np.asarray(ranks, dtype=np.int64), no_dup)
    i2t_nodup = Ranks(np.asarray(ranks_nd, dtype=np.int64), no_dup)
    counts = {
        "t2i_queries": len(q_img),
        "t2i_queries_dup": int(repeat.sum()),
        "i2t_queries": len(ranks),
        "i2t_queries_dup": 0,
        "t2i_candidates": len(in_index),
        "images_not_in_index": int(n_img - len(in_index)),
    }
    return t2i, i2t, i2t_nodup, counts


def usearch_scores(
    database: np.ndarray, queries: np.ndarray, dtype: str, fetch: int, threads: int = 0
) -> np.ndarray:
    """(n_queries, n_database) cosine as an HNSW graph of ``dtype`` built the product's way
    (vindex.new_graph, vectors and queries encoded by quantise.graph_codes) returns it for each
    query's top ``fetch``; pairs the search did not return are -inf (they rank last)."""
    from ..index.vindex import new_graph

    database = np.ascontiguousarray(database, dtype=np.float32)
    index = new_graph(database.shape[1], dtype)
    index.add(np.arange(len(database), dtype=np.uint64), graph_codes(database, dtype), threads=threads)
    fetch = max(1, min(fetch, len(database)))
    matches = index.search(graph_codes(queries, dtype), fetch, threads=threads)
    keys = np.atleast_2d(np.asarray(matches.keys)).astype(np.int64)
    dists = np.atleast_2d(np.asarray(matches.distances)).astype(np.float64)
    counts = np.atleast_1d(np.asarray(matches.counts))
    out = np.full((len(queries), len(database)), -np.inf)
    for q in range(len(queries)):
        n = int(counts[q])
        out[q, keys[q, :n]] = 1.0 - dists[q, :n]
    return out


def index_eval(
    ann: Annotations,
    image_vectors: Sequence[np.ndarray | None],
    embed: Callable[[list[str]], np.ndarray],
    dtype: str = "f32",
    exact: bool = True,
    exact_copy: bool = True,
    threads: int = 0,
    t2i_search: tuple[Callable, Sequence[np.ndarray | None], int] | None = None,
    mode: str = "dense",
    image_texts: Sequence[Sequence[str] | None] | None = None,
    image_features: Sequence[list | None] | None = None,
    **weights,
) -> EvalResult:
    """Captions against per-image vectors (``image_vectors[i]``: image i's variant vectors, None
    when not indexed). exact: numpy over vectors quantised as a usearch index of dtype stores
    them. Otherwise both directions go through HNSW usearch indexes of dtype built here, except
    T2I when ``t2i_search`` = (search function, per-image usearch keys, vectors of images not
    annotated) gives the index's own search (vindex.VectorIndex.search). exact: the scores an
    index of dtype gives in `exact` search mode (stored_scores).

    lexical/hybrid (``image_texts``), and any mode whose queries state places or sizes when
    ``image_features`` (each image's (ordinal, features) per variant) are given, are scored exactly
    the way search scores a candidate: each part's best over the image's texts, mixed by
    retrieval.fused, plus the structure score of its best variant."""
    texts, ids = distinct_texts(ann.captions)
    raw = np.asarray(embed(texts), dtype=np.float32)
    have = [i for i, v in enumerate(image_vectors) if v is not None and len(v) > 0]
    if not have:
        raise ValueError("no annotated image has vectors")
    stacked = np.concatenate([np.asarray(image_vectors[i], dtype=np.float32) for i in have])
    owner = np.concatenate([np.full(len(image_vectors[i]), i, dtype=np.int64) for i in have])
    structure = structure_matrix(texts, image_features) if image_features is not None else None
    if mode != "dense" or structure is not None:
        # image-level parts, mixed as retrieval.combine mixes a search's candidates
        names, combine = mode_parts(mode, **weights)
        parts = []
        for name in names:
            if name == "dense":
                part = stored_scores(raw, stacked, dtype, exact_copy)
            else:
                if image_texts is None:
                    raise ValueError(f"mode {mode!r} needs the images' texts")
                part = lexical_similarity(texts, [t for i in have for t in image_texts[i]], keep_one=mode == "lexical")
            parts.append(group_max(part, owner, ann.n_images)[:, have])
        scores = combine(*parts, structure=None if structure is None else structure[:, have])
        scoring = "exact: " + " + ".join({"dense": "cosine", "lexical": "FTS5 BM25"}[n] for n in names) + (
            " + structure" if structure is not None else "") + ", each an image's best, mixed as search mixes them"
        t2i, i2t, i2t_nd, counts = index_ranks(ann, np.asarray(have, dtype=np.int64), scores, scores, ids)
        config = {"source": "index", "dtype": dtype, "exact": True, "scoring": scoring, "mode": mode,
                  "structure": structure is not None}
        return EvalResult(t2i, i2t, {**_base_counts(ann), **counts}, config, i2t_nodup=i2t_nd)
    if exact:
        t2i_scores = i2t_scores = stored_scores(raw, stacked, dtype, exact_copy)
        scoring = "exact numpy" + ("" if dtype == "f32" else f", as exact search of a {dtype} index scores "
                                   f"({'its float16 values' if exact_copy or dtype != 'i8' else 'its int8 codes'})")
    else:
        per_image = int(np.bincount(owner).max())
        # T2I: enough variant vectors that at least 11 distinct images come back (pigeonhole)
        if t2i_search is None:
            t2i_scores = usearch_scores(stacked, raw, dtype, per_image * 11, threads)
        else:
            search, image_keys, foreign = t2i_search
            column_keys = np.concatenate([np.asarray(image_keys[i], dtype=np.int64) for i in have])
            # vectors of images outside the annotations may take slots: fetch that many more
            t2i_scores = searched_scores(search, raw, column_keys, per_image * 11 + foreign)
        # I2T: each image vector fetches caption texts; 10 ranks plus its own captions and slack
        per_caption = int(ann.captions_per_image().max())
        i2t_scores = usearch_scores(raw, stacked, dtype, 4 * (10 + per_caption), threads).T
        scoring = f"usearch HNSW, dtype {dtype}"
        if t2i_search is not None:
            scoring = f"T2I: the index's own search; I2T: usearch HNSW over the captions, dtype {dtype}"
    t2i, i2t, i2t_nd, counts = index_ranks(ann, owner, t2i_scores, i2t_scores, ids)
    config = {"source": "index", "dtype": dtype, "exact": exact, "scoring": scoring, "mode": mode}
    return EvalResult(t2i, i2t, {**_base_counts(ann), **counts}, config, i2t_nodup=i2t_nd)


def structure_matrix(queries: Sequence[str], image_features: Sequence[list | None]) -> np.ndarray | None:
    """(queries, images) structure scores: the best variant's constraint score, as search scores a
    candidate (retrieval.best_variant_structure); None when no query states places or sizes or no
    image has features (the part would be 0 everywhere)."""
    from ..query import query_parse
    from ..query.retrieval import best_variant_structure

    if not any(v and any(f for _, f in v) for v in image_features):
        return None
    parsed = [query_parse.parse(q) for q in queries]
    if not any(parsed):
        return None
    out = np.zeros((len(queries), len(image_features)), dtype=np.float64)
    for q, p in enumerate(parsed):
        if p:
            for i, variants in enumerate(image_features):
                if variants:
                    out[q, i] = best_variant_structure(p, variants)[0]
    return out


def searched_scores(search: Callable, queries: np.ndarray, column_keys: np.ndarray, fetch: int) -> np.ndarray:
    """(n_queries, n_columns) scores from an index search returning, per query, candidates with
    ``keys`` and ``scores`` (vindex.VectorIndex.search); keys outside ``column_keys`` (images not
    annotated) are dropped, pairs not returned are -inf."""
    sorter = np.argsort(column_keys)
    sorted_keys = column_keys[sorter]
    out = np.full((len(queries), len(column_keys)), -np.inf)
    for q, cand in enumerate(search(queries, fetch)):
        keys = np.asarray(cand.keys, dtype=np.int64)
        pos = np.minimum(np.searchsorted(sorted_keys, keys), len(sorted_keys) - 1)
        known = sorted_keys[pos] == keys
        out[q, sorter[pos[known]]] = np.asarray(cand.scores, dtype=np.float64)[known]
    return out
