"""Search by place: `search --within` / `--near` filter BEFORE ranking (searcher.Searcher.text with
a place: rank_in_place is then the dense side of query.retrieval.rank, which adds the structure
score and the parts --explain shows, as for any text query).

The R*Tree (chipstore.images_in_place) gives the chips whose WGS84 outline meets the place; only
their texts are scored, exactly, from the vectors the index keeps (SearchVectors.vectors_of: the
snapshot's exact values, and the texts committed since it). So k results come back whenever k
chips lie in the place, however far down an unfiltered ranking they would sit, and the cost grows
with the number of chips in the place, not with the archive.
"""

from __future__ import annotations

import numpy as np

from ..errors import StoreError
from ..index.indexdir import SearchVectors
from ..index.store import Store
from ..query.search import Hit


def rank_in_place(store: Store, vectors: SearchVectors, query_vecs: np.ndarray, image_ids: list[int], k: int) -> list[Hit]:
    """Top k of `image_ids` for the query vectors: max cosine over (query, text) pairs."""
    if k < 1:
        raise StoreError(f"-k must be at least 1, got {k}")
    best: dict[int, tuple[float, int]] = {}  # image id -> (score, key)
    q = np.asarray(query_vecs, np.float32)
    for i in range(0, len(image_ids), 500):
        keys, owners = store.text_keys_of(image_ids[i : i + 500])
        found, vecs = vectors.vectors_of(keys)
        if not found.any():
            continue
        scores = (vecs[found] @ q.T).max(axis=1)
        for key, image_id, s in zip(keys[found].tolist(), owners[found].tolist(), scores.tolist(), strict=True):
            old = best.get(image_id)
            if old is None or s > old[0] or (s == old[0] and key < old[1]):
                best[image_id] = (s, key)
    rows = store.variant_rows([key for _, key in best.values()])
    found = sorted(((s, rows[key]) for s, key in best.values() if key in rows), key=lambda sr: (-sr[0], sr[1].image))
    return [
        Hit(rank=r + 1, score=s, image=row.image, variant=row.ordinal, text=row.text, field=row.field)
        for r, (s, row) in enumerate(found[:k])
    ]
