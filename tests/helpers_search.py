"""One query through a Searcher opened for it and closed after, as `edge-t2t search` does per
command: the tests' short form of query.searcher.Searcher."""

from __future__ import annotations

from edge_t2t.errors import warn as print_warning
from edge_t2t.modes import DEFAULT_VECTOR_MODE
from edge_t2t.query.searcher import Searcher


def text_search(index, query: str, k: int = 10, *, embedder=None, warn=print_warning, **options):
    """Searcher.text: `options` are its keyword arguments (mode, vector_mode, structure, explain, ...)."""
    with Searcher(index, embedder=embedder, warn=warn) as searcher:
        return searcher.text(query, k, **options)


def variant_search(index, variants, k: int = 10, *, embedder=None, mode: str = DEFAULT_VECTOR_MODE,
                   exclude_path: str = ""):  # fmt: skip
    """Searcher.variants, leaving out the image indexed at `exclude_path`."""
    with Searcher(index, embedder=embedder) as searcher:
        exclude = [row.id for row in searcher.store.images_named([exclude_path]).values()]
        return searcher.variants(variants, k, vector_mode=mode, exclude_image_ids=exclude)
