"""The index as `eval --source index` sees it: each annotated image's stored variant vectors (and,
for the lexical modes and the structure score, their texts and features), matched by file name.
evaluate.index_eval scores them; eval_report.py ties the two together.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .dataset import Annotations


@dataclass
class IndexVectors:
    """What an index holds for each annotated image (None: not in the index)."""

    vectors: list[np.ndarray | None]  # (k, dim) float32 variant vectors
    keys: list[np.ndarray | None]  # their vector keys (texts.id)
    facts: dict
    texts: list[list[str] | None] | None = None  # their texts, when asked for (lexical modes)
    features: list[list | None] | None = None  # (ordinal, features) per variant, when asked for


def load_index_vectors(index_dir, ann: Annotations, identity: dict | None = None, with_texts: bool = False,
                       with_features: bool = False) -> IndexVectors:
    """Each annotated image's stored variant vectors (as `exact` search scores them), matched by
    file name, read through the index's owner (indexdir.IndexDir)."""
    from pathlib import Path

    from ..errors import StoreError
    from ..index.indexdir import IndexDir

    with IndexDir.open_reader(index_dir) as ix:
        store = ix.store
        if identity is not None:
            store.check_identity(identity)
        keys, image_ids, vectors = ix.search_vectors().live_vectors(store.variant_keys())
        paths = store.image_paths()
        stored_dtype = store.get_meta("dtype", None)
        exact_copy = bool(store.get_meta("exact_copy", True))
        text_of = store.texts_by_key() if with_texts else {}
        if with_features:
            from ..query.retrieval import features_by_image

            features_of = features_by_image(store, list(paths))
    wanted = {Path(n).name for n in ann.images}
    by_name: dict[str, int] = {}
    for image_id, path in paths.items():
        name = Path(path).name
        if name in by_name and name in wanted:
            raise StoreError(
                f"{index_dir}: two indexed images are named {name!r} ({path} and another); "
                "evaluation matches images by file name, so index one folder per annotation file"
            )
        by_name[name] = image_id
    order = np.argsort(image_ids, kind="stable")
    ids_sorted = image_ids[order]
    out_vecs: list[np.ndarray | None] = []
    out_keys: list[np.ndarray | None] = []
    for name in ann.images:
        image_id = by_name.get(Path(name).name)
        lo, hi = np.searchsorted(ids_sorted, [image_id, image_id + 1]) if image_id is not None else (0, 0)
        out_vecs.append(vectors[order[lo:hi]] if hi > lo else None)
        out_keys.append(keys[order[lo:hi]] if hi > lo else None)
    matched = sum(1 for v in out_vecs if v is not None)
    if matched == 0:
        raise StoreError(
            f"none of the {ann.n_images} images of {ann.source} is in the index at {index_dir} "
            f"(matched by file name among {len(paths)} indexed images): index the annotated images first"
        )
    facts = {
        "index_images": len(paths),
        "index_images_not_annotated": len(set(by_name) - wanted),
        "index_vectors": len(keys),
        "index_dtype": stored_dtype,
        "index_exact_copy": exact_copy,
    }
    texts = [None if k is None else [text_of[int(x)] for x in k] for k in out_keys] if with_texts else None
    features = None
    if with_features:
        features = [features_of.get(by_name.get(Path(name).name, -1)) for name in ann.images]
    return IndexVectors(out_vecs, out_keys, facts, texts, features)
