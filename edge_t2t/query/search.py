"""Dense ranking of images, and the hit every search returns: score each image by the maximum
cosine over its variant texts (the paper's rule) and return the top k images.

Images, not texts, are ranked, so the variant search over-fetches: it starts at
k * texts_per_image * 2 candidates and doubles until k distinct images survive or every vector
has been seen. Ties are broken by image path so results are deterministic. Queries are answered
through searcher.Searcher, which opens the index once; retrieval.py adds the other modes.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from ..errors import StoreError
from ..index.indexdir import SearchVectors
from ..index.store import Store
from ..modes import DEFAULT_VECTOR_MODE

DEFAULT_MODE = DEFAULT_VECTOR_MODE


@dataclass(frozen=True)
class Hit:
    rank: int
    score: float
    image: str
    variant: int  # ordinal of the best-matching variant of that image
    text: str  # the text of that variant (or field) that matched best
    field: str = "joined"
    parts: dict | None = None  # dense / lexical / structure parts of the score (edge_t2t.query.retrieval)
    matched: tuple = ()  # with --explain: each query constraint and its score on the best variant

    def to_dict(self) -> dict:
        """The JSON-lines contract: rank, score, image, variant, text (plus the score's parts and,
        with --explain, the constraints matched)."""
        out = {"rank": self.rank, "score": round(self.score, 6), "image": self.image, "variant": self.variant, "text": self.text}
        if self.parts is not None:
            out.update(self.parts)
        if self.matched:
            out["matched"] = list(self.matched)
        return out


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
