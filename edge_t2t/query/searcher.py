"""The searcher: one index opened once, and every kind of query answered from it.

`Searcher(index_dir)` opens the index's store, its vectors and the embedder each at most once, on
first use (a lexical query loads no embedder), and keeps them until
close(). Every query returns search.Hit rows, best first:

- text(query, ...): a text query in any retrieval mode (retrieval.rank: dense, lexical, hybrid,
  with the places, relations and sizes the query states); with `place`, the dense side is only the
  chips whose scene outline meets the place, scored exactly (scene.geosearch.rank_in_place);
- image(path, ...): search by example: the query image's descriptions (image_variants: the
  index's own when it holds the same bytes, else the VLM's), each a query (variants);
- variants(variants, ...): each description variant is a query, and an image scores its best
  (query variant, text) pair (search.rank_images): "more like this" of an indexed image;
- chips(hits): where each hit that is a chip of a scene lies (for --json, --html, --geojson).

`edge-t2t search`, `serve`, `eval --source index`, the demo and the benches all search through it.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from functools import partial
from pathlib import Path

from ..embed.texts import description_texts
from ..errors import StoreError
from ..errors import warn as print_warning
from ..index.indexdir import IndexDir, SearchVectors
from ..index.store import Store
from ..modes import DEFAULT_VECTOR_MODE, RETRIEVAL_MODES, VECTOR_MODES
from ..records import Variant
from ..scene import chipstore
from ..scene.geo import PlaceFilter
from ..scene.geosearch import rank_in_place
from . import retrieval
from .search import Hit, rank_images


class Searcher:
    """An index opened for searching. Use as a context manager, or call close().

    `embedder`: an embed.embedder.Embedder (or a stand-in with identity, embed, truncated and
    max_tokens); None loads the ONNX embedder of `precision` on first use. It is checked once
    against the index's embedder identity. `warn` gets the warnings a user should see (an index
    without a vector snapshot, a query longer than the embedder reads)."""

    def __init__(self, index_dir: str | os.PathLike, *, embedder=None, precision: str = "int8",
                 warn: Callable[[str], None] = print_warning):  # fmt: skip
        self.index_dir = Path(index_dir)
        self.precision = precision
        self.warn = warn
        self._embedder = embedder
        self._embedder_checked = False
        self._ix: IndexDir | None = None
        self._vectors: SearchVectors | None = None

    # -- what is opened, once each ----------------------------------------------------------------
    def _index(self) -> IndexDir:
        if self._ix is None:
            self._ix = IndexDir.open_reader(self.index_dir)
        return self._ix

    @property
    def store(self) -> Store:
        return self._index().store

    @property
    def vectors(self) -> SearchVectors:
        """The vectors a search ranks (indexdir.SearchVectors): the snapshot plus the texts
        committed after it. An index without any described image is an error here."""
        if self._vectors is None:
            self._vectors = self._index().search_vectors(self.warn)
        return self._vectors

    def open(self) -> Searcher:
        """Open the store and the vectors now rather than on the first query (a server reopens
        between requests and keeps the last ones answering if this fails)."""
        self._vectors = self.vectors
        return self

    @property
    def embedder(self):
        if not self._embedder_checked:
            store = self.store  # opened first: a missing index is reported before a missing model
            if self._embedder is None:
                from ..embed.embedder import Embedder

                self._embedder = Embedder(precision=self.precision)
            store.check_identity(self._embedder.identity)
            self._embedder_checked = True
        return self._embedder

    def close(self) -> None:
        ix, self._ix, self._vectors = self._ix, None, None
        if ix is not None:
            ix.close()

    def __enter__(self) -> Searcher:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- queries --------------------------------------------------------------------------------
    def text(self, query: str, k: int = 10, *, mode: str | None = None, vector_mode: str = DEFAULT_VECTOR_MODE,
             structure: bool = True, explain: bool = False, min_score: float | None = None,
             place: PlaceFilter | None = None) -> list[Hit]:  # fmt: skip
        """The top k images for a text query. `mode` is the retrieval mode (modes.RETRIEVAL_MODES;
        default retrieval.DEFAULT_MODE); an old vector mode (hnsw/rescore/exact) passed as `mode`
        still means dense search with that vector mode. With `place`, the dense side ranks only the
        chips in the place, by exact max cosine (dense mode only); the structure and `explain` work
        as without it. Hits scoring under `min_score` are left out."""
        if not query or not query.strip():
            raise StoreError("the query is empty: give some words to search for")
        if mode in VECTOR_MODES:
            mode, vector_mode = "dense", mode
        mode = mode or retrieval.DEFAULT_MODE
        if mode not in RETRIEVAL_MODES:
            raise StoreError(f"unknown search mode {mode!r}: use one of {', '.join(RETRIEVAL_MODES)}")
        if vector_mode not in VECTOR_MODES:
            raise StoreError(f"unknown vector mode {vector_mode!r}: use one of {', '.join(VECTOR_MODES)}")
        if place is not None and mode != "dense":
            raise StoreError(f"a place filter ranks by dense vectors only, not {mode}")
        vectors = self.vectors
        qv = self._query_vector(query, self.embedder) if mode != "lexical" else None
        in_place = None
        if place is not None:  # filtered before ranking: only the chips whose outline meets the place
            in_place = partial(rank_in_place, self.store, vectors, qv, chipstore.images_in_place(self.store, place))
        cands = retrieval.rank(self.store, vectors, query, qv, k, mode, vector_mode, structure=structure,
                               dense_side=in_place)  # fmt: skip
        hits = retrieval.to_hits(self.store, cands, explain=explain)
        return _at_least(hits, min_score)

    def _query_vector(self, query: str, emb):
        before = emb.truncated
        qv = emb.embed([query])
        if emb.truncated > before:
            self.warn(f"the query is longer than the embedder's {emb.max_tokens} tokens; only its start was used")
        return qv

    def variants(self, variants: list[Variant], k: int = 10, *, vector_mode: str = DEFAULT_VECTOR_MODE,
                 exclude_image_ids: Iterable[int] = (), min_score: float | None = None) -> list[Hit]:  # fmt: skip
        """Search by example: each variant of a query image is a query; an image scores the max over
        (query variant, image variant) pairs. Images in `exclude_image_ids` are left out."""
        if not variants:
            raise StoreError("the query image has no descriptions to search with")
        vectors = self.vectors
        qv = self.embedder.embed(description_texts(variants, self.store.get_meta("text_mode", "joined")))
        return _at_least(rank_images(self.store, vectors, qv, k, vector_mode, exclude_image_ids=exclude_image_ids),
                         min_score)  # fmt: skip

    def image(self, image_path: str | os.PathLike, k: int = 10, *, vlm_cfg=None, exclude_self: bool = False,
              vector_mode: str = DEFAULT_VECTOR_MODE, min_score: float | None = None) -> list[Hit]:  # fmt: skip
        """Search by example: the top k images for a query image's descriptions (image_variants).
        exclude_self leaves out the indexed images with the same content or at the same path."""
        variants, sha = self.image_variants(image_path, vlm_cfg)
        exclude: list[int] = []
        if exclude_self:
            rows = self.store.conn.execute("SELECT id FROM images WHERE (sha256 != '' AND sha256 = ?) OR path = ?",
                                           (sha, str(Path(image_path).resolve())))  # fmt: skip
            exclude = [int(r[0]) for r in rows]
        return self.variants(variants, k, vector_mode=vector_mode, exclude_image_ids=exclude, min_score=min_score)

    def image_variants(self, image_path: str | os.PathLike, vlm_cfg=None, n_variants: int = 5) -> tuple[list[Variant], str]:
        """Descriptions of a query image and its sha256: reused from the index when the same file
        content is already there, else written by the configured VLM (through the caption cache)."""
        from ..images import ImageBytes, load_image

        path = Path(image_path)
        image = ImageBytes.read(path)  # one read: the hash, the check that it is an image, the description
        loaded = load_image(image)
        row = self.store.ok_image_with_sha(loaded.sha256)
        if row is not None:
            stored = self.store.variants_of(row.id)
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

    def chips(self, hits: list[Hit]) -> dict[str, chipstore.ChipInfo]:
        """Where each hit that is a chip of a scene lies (scene, window, footprint), by image path."""
        if not hits:
            return {}
        return chipstore.chip_info(self.store, [h.image for h in hits])


def _at_least(hits: list[Hit], min_score: float | None) -> list[Hit]:
    return [h for h in hits if min_score is None or h.score >= min_score]
