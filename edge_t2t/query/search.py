"""Text-to-text search: embed the query, fetch the nearest variant texts, score each image by the
maximum cosine over its variants (the paper's rule), and return the top k images.

Images, not texts, are ranked, so the variant search over-fetches: it starts at
k * texts_per_image * 2 candidates and doubles until k distinct images survive or every vector
has been seen. Ties are broken by image path so results are deterministic.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..embed.texts import description_texts
from ..errors import StoreError
from ..index.indexdir import IndexDir, SearchVectors
from ..index.store import Store
from ..modes import DEFAULT_VECTOR_MODE, RETRIEVAL_MODES, VECTOR_MODES
from ..records import Variant

DEFAULT_MODE = DEFAULT_VECTOR_MODE


@dataclass(frozen=True)
class Hit:
    rank: int
    score: float
    image: str
    variant: int  # ordinal of the best-matching variant of that image
    text: str  # the text of that variant (or field) that matched best
    field: str = "joined"
    # dense / lexical / structure parts of the score and text_score, the score without its
    # structure part (edge_t2t.query.retrieval): score = text_score + structure
    parts: dict | None = None
    matched: tuple = ()  # with --explain: each query constraint and its score on the best variant

    def to_dict(self) -> dict:
        """The JSON-lines contract: rank, score, image, variant, text (plus the score's parts,
        dense, lexical, structure and text_score, and, with --explain, the constraints matched)."""
        out = {"rank": self.rank, "score": round(self.score, 6), "image": self.image, "variant": self.variant, "text": self.text}
        if self.parts is not None:
            out.update(self.parts)
        if self.matched:
            out["matched"] = list(self.matched)
        return out


def _warn(msg: str) -> None:
    print(f"edge-t2t: {msg}", file=sys.stderr)


def open_for_search(index_dir: str | os.PathLike, warn: Callable[[str], None] = _warn) -> tuple[Store, SearchVectors]:
    """The store and the vectors to rank, opened read-only in O(1) (see indexdir.py). The caller
    closes the store."""
    ix = IndexDir.open_reader(index_dir)
    try:
        return ix.store, ix.search_vectors(warn)
    except BaseException:
        ix.close()
        raise


def _best_per_image(keys: np.ndarray, image_ids: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Index of each image's best (query, text) pair; equal scores by key, for determinism."""
    order = np.lexsort((keys, -scores))
    _, first = np.unique(image_ids[order], return_index=True)
    return order[first]


def rank_images(
    store: Store,
    vectors: SearchVectors,
    query_vecs: np.ndarray,
    k: int,
    mode: str = DEFAULT_MODE,
    exclude_image_ids: Iterable[int] = (),
    oversample: int = 4,
    pool: int = 0,
) -> list[Hit]:
    """Top k images for one or more query vectors; an image's score is the max over all
    (query, variant text) pairs. Only the rows of the winning texts are read from SQLite (O(k)).
    A text deleted since the vectors were saved has no row: its image then falls back to its next
    best text among the candidates. pool > k: up to `pool` images from the same candidates (the
    fetch is sized for k, so a pool for re-ranking costs no more vector search than k hits)."""
    if k < 1:
        raise StoreError(f"-k must be at least 1, got {k}")
    exclude = np.asarray(sorted(set(exclude_image_ids)), dtype=np.int64)
    n = len(vectors)
    per_image = max(1, store.max_texts_per_image())
    fetch = min(n, k * per_image * 2 + len(exclude) * per_image)
    rows: dict[int, object] = {}
    gone: set[int] = set()
    while True:
        cands = vectors.search(query_vecs, fetch, mode=mode, oversample=oversample)
        keys = np.concatenate([c.keys for c in cands])
        image_ids = np.concatenate([c.image_ids for c in cands])
        scores = np.concatenate([c.scores for c in cands]).astype(np.float64)
        keep = ~np.isin(image_ids, exclude)
        keys, image_ids, scores = keys[keep], image_ids[keep], scores[keep]
        while True:
            alive = ~np.isin(keys, np.fromiter(gone, np.int64, len(gone)))
            best = np.flatnonzero(alive)[_best_per_image(keys[alive], image_ids[alive], scores[alive])]
            # Rows for the k best images and any that tie with the k-th (ties are broken by path).
            by_score = best[np.argsort(-scores[best], kind="stable")]
            n_out = max(k, pool)
            top = by_score[scores[by_score] >= scores[by_score[min(n_out, len(by_score)) - 1]]] if len(by_score) else by_score
            want = [int(x) for x in keys[top] if int(x) not in rows]
            rows.update(store.variant_rows(want))
            missing = {int(x) for x in keys[top]} - rows.keys()
            if not missing:
                break
            gone |= missing  # deleted since the vectors were saved: try each image's next-best text
        if len(best) >= k or fetch >= n:
            break
        fetch = min(n, fetch * 2)
    found = [(float(scores[i]), rows[int(keys[i])]) for i in top]
    found.sort(key=lambda sr: (-sr[0], sr[1].image))
    return [
        Hit(rank=r + 1, score=s, image=row.image, variant=row.ordinal, text=row.text, field=row.field)
        for r, (s, row) in enumerate(found[: max(k, pool)])
    ]


def _load_embedder(embedder, precision: str):
    if embedder is not None:
        return embedder
    from ..embed.embedder import Embedder

    return Embedder(precision=precision)


def search(
    index_dir: str | os.PathLike,
    query: str,
    k: int = 10,
    embedder=None,
    mode: str | None = None,
    precision: str = "int8",
    warn: Callable[[str], None] = _warn,
    vector_mode: str = DEFAULT_MODE,
    structure: bool = True,
    explain: bool = False,
    min_score: float | None = None,
) -> list[Hit]:
    """The top k images for a text query. `mode` is the retrieval mode (modes.RETRIEVAL_MODES; default
    retrieval.DEFAULT_MODE); an old vector mode (hnsw/rescore/exact) passed as `mode` still means
    dense search with that vector mode. Hits scoring under `min_score` are left out."""
    from . import retrieval

    if not query or not query.strip():
        raise StoreError("the query is empty: give some words to search for")
    if mode in VECTOR_MODES:
        mode, vector_mode = "dense", mode
    mode = mode or retrieval.DEFAULT_MODE
    if mode not in RETRIEVAL_MODES:
        raise StoreError(f"unknown search mode {mode!r}: use one of {', '.join(RETRIEVAL_MODES)}")
    if vector_mode not in VECTOR_MODES:
        raise StoreError(f"unknown vector mode {vector_mode!r}: use one of {', '.join(VECTOR_MODES)}")
    store, vectors = open_for_search(index_dir, warn)
    try:
        emb = _load_embedder(embedder, precision) if mode != "lexical" else None
        return search_open(store, vectors, query, emb, k, mode, vector_mode, structure, explain, min_score, warn)
    finally:
        store.close()


def search_open(store: Store, vectors: SearchVectors, query: str, embedder, k: int = 10, mode: str = "dense",
                vector_mode: str = DEFAULT_MODE, structure: bool = True, explain: bool = False,
                min_score: float | None = None, warn: Callable[[str], None] = _warn) -> list[Hit]:
    """search() on an index already open (edge-t2t serve keeps one open); `mode` already checked."""
    from . import retrieval

    qv = None
    if mode != "lexical":
        store.check_identity(embedder.identity)
        before = embedder.truncated
        qv = embedder.embed([query])
        if embedder.truncated > before:
            warn(f"the query is longer than the embedder's {embedder.max_tokens} tokens; only its start was used")
    cands = retrieval.rank(store, vectors, query, qv, k, mode, vector_mode, structure=structure)
    hits = retrieval.to_hits(store, cands, explain=explain)
    return [h for h in hits if min_score is None or h.score >= min_score]


def search_by_variants(
    index_dir: str | os.PathLike,
    variants: list[Variant],
    k: int = 10,
    embedder=None,
    mode: str = DEFAULT_MODE,
    precision: str = "int8",
    exclude_sha256: str = "",
    exclude_path: str = "",
) -> list[Hit]:
    """Image-to-image by text: each variant of the query image is a query; an image scores the max
    over (query variant, image variant) pairs. Optionally drop the query image itself."""
    if not variants:
        raise StoreError("the query image has no descriptions to search with")
    store, vectors = open_for_search(index_dir)
    try:
        emb = _load_embedder(embedder, precision)
        exclude: list[int] = []
        if exclude_sha256 or exclude_path:
            exclude = [
                int(r[0])
                for r in store.conn.execute(
                    "SELECT id FROM images WHERE (sha256 != '' AND sha256 = ?) OR path = ?",
                    (exclude_sha256, exclude_path),
                )
            ]
        return search_by_variants_open(store, vectors, variants, emb, k, mode, exclude)
    finally:
        store.close()


def search_by_variants_open(store: Store, vectors: SearchVectors, variants: list[Variant], embedder, k: int = 10,
                            mode: str = DEFAULT_MODE, exclude_image_ids: Iterable[int] = ()) -> list[Hit]:
    """search_by_variants() on an index already open (edge-t2t serve's "more like this")."""
    if not variants:
        raise StoreError("the query image has no descriptions to search with")
    store.check_identity(embedder.identity)
    text_mode = store.get_meta("text_mode", "joined")
    qv = embedder.embed(description_texts(variants, text_mode))
    return rank_images(store, vectors, qv, k, mode, exclude_image_ids=exclude_image_ids)


def query_image_variants(index_dir, image_path: str | os.PathLike, vlm_cfg=None, n_variants: int = 5) -> tuple[list[Variant], str]:
    """Descriptions of a query image and its sha256: reused from the index when the same file
    content is already there, else written by the configured VLM (through the caption cache)."""
    from ..images import ImageBytes, load_image

    path = Path(image_path)
    image = ImageBytes.read(path)  # one read: the hash, the check that it is an image, the description
    loaded = load_image(image)
    with Store(index_dir) as store:
        row = store.ok_image_with_sha(loaded.sha256)
        if row is not None:
            stored = store.variants_of(row.id)
            if stored:
                return stored, loaded.sha256
    if vlm_cfg is None:
        raise StoreError(
            f"{path} is not in the index, so it must be described first: pass --vlm MODEL.gguf --mmproj MMPROJ.gguf"
        )
    from ..describe.captioning import CaptionSettings, Failure, caption_sources
    from ..describe.captions import CaptionCache

    outcomes = []
    with CaptionCache() as cache:  # a query image described once is not described again
        caption_sources([(path, image)], vlm_cfg, n_variants, CaptionSettings(cache=cache),
                        lambda _path, outcome: outcomes.append(outcome))  # fmt: skip
    if not outcomes or isinstance(outcomes[0], Failure):
        reason = outcomes[0].reason if outcomes else "no description"
        raise StoreError(f"{path} could not be described by the VLM ({reason}); try another --vlm model")
    return outcomes[0].variants, loaded.sha256
