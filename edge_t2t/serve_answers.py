"""What `edge-t2t serve` answers, as plain data: no Flask, no HTTP (serve.py does those).

`Answers` holds every read request of the page and the API as a method that returns a dict ready
for JSON, or bytes. It runs in the server's own threads (`serve --processes 0`), or once in each
search process (serve_pool.py), where the same methods are called by name: their arguments and
results are plain values that cross a pipe.

Each thread reads through its own Reader: its own SQLite connection (a connection belongs to the
thread that opened it) and the vectors of one whole snapshot, opened in O(1) (memory maps). Before
each request the thread compares the snapshot's manifest generation and SQLite's data_version with
what it has open and reopens when either moved, so a running `index` is seen as its commits land,
and until then the thread answers from the last whole snapshot. Describing an upload holds only
its own request's thread (and one lock, so one VLM runs at a time); thumbnails are cached by
atomic writes, safe between threads and between processes.

Pictures are found by integer id in the index, never by a path from the request.
"""

from __future__ import annotations

import csv
import io
import json
import os
import sqlite3
import sys
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path

from .errors import ImageError, InputError, StoreError

THUMB_SIDE = 256
FULL_MEGAPIXELS = 4.0  # what the VLM saw at most (images.DEFAULT_MAX_MEGAPIXELS)
THUMB_DIR = "thumbnails"  # inside the index directory: made once, reused by every later serve
CSV_COLUMNS = ("rank", "score", "image", "variant", "text", "dense", "lexical", "structure", "text_score", "scene",
               "window", "lon", "lat")


class NoSuchImage(LookupError):
    """An id that is not an image of this index: 404."""


class PictureGone(LookupError):
    """The file of an indexed image is not on this machine, or cannot be read now: 404."""


class Reader:
    """One thread's view of the index: a query.searcher.Searcher (its own SQLite connection, as a
    connection belongs to the thread that opened it, and the vectors of one whole snapshot plus the
    texts committed since) and the state of the index it was opened at."""

    def __init__(self, searcher, state: tuple):
        self.searcher, self.state = searcher, state
        self.store = searcher.store
        self.generation = state[0]

    def close(self) -> None:
        self.searcher.close()

    def hit_dicts(self, hits) -> list[dict]:
        """search --json's fields (scene_report.hit_dicts), plus the image id and a chip's outline."""
        from .scene.scene_report import hit_dicts

        paths = [h.image for h in hits]
        chips = self.searcher.chips(hits)
        rows = self.store.images_named(paths)
        out = []
        for h, d in zip(hits, hit_dicts(hits, chips), strict=True):
            d["id"] = rows[h.image].id if h.image in rows else None
            if h.image in chips and chips[h.image].outline:
                d["outline"] = chips[h.image].outline
            out.append(d)
        return out

    def image_row(self, image_id: int):
        rows = self.store.conn.execute("SELECT path, sha256, mtime_ns FROM images WHERE id = ? AND status = 'ok'",
                                       (image_id,)).fetchall()  # fmt: skip
        return rows[0] if rows else None

    def chip(self, path: str):
        from .scene.chipstore import chip_info

        return chip_info(self.store, [path]).get(path)


class Index:
    """The index directory and the embedder, shared by one process's threads. Each thread reads
    through its own Reader (`reader()`), so requests are answered side by side; an upload being
    described by the VLM holds only its own thread (and `describing`, so one VLM runs at a time).

    `searching=False` (the HTTP process of `serve --processes N`, which searches nothing itself):
    no embedder is loaded and nothing is read until a reader is asked for."""

    def __init__(self, index_dir: str | os.PathLike, embedder=None, precision: str = "int8", vlm_cfg=None,
                 warn: Callable[[str], None] | None = None, searching: bool = True):  # fmt: skip
        self.dir = Path(index_dir)
        self.vlm_cfg = vlm_cfg
        self.precision = precision
        self.warn = warn or (lambda msg: print(f"edge-t2t: {msg}", file=sys.stderr))
        self.describing = threading.Lock()
        self._local = threading.local()
        if embedder is None and searching:
            from .embed.embedder import Embedder

            # One onnxruntime thread per query: the requests are the parallelism, and a query of a
            # few words gains nothing from a second thread (ORT runs one session from many threads).
            embedder = Embedder(precision=precision, threads=1)
        self.embedder = embedder
        if not searching:
            return
        try:
            # A missing or empty index, or one of another embedder, fails here, before the server
            # starts. One search at start-up, so the first user's request does not pay the lazy
            # imports and the vectors' first read.
            self.reader().searcher.text("warm up", 1, mode="dense")
        except BaseException:
            self.close()
            raise

    def reader(self) -> Reader:
        """This thread's reader, reopened (O(1), no lock) when an `index` run saved a snapshot or
        committed since this thread last looked: the snapshot's generation and SQLite's
        data_version say so. A snapshot caught mid-save keeps the last whole one answering."""
        from .index.vindex import SNAPSHOT_READ_ERRORS
        from .query.searcher import Searcher

        old: Reader | None = getattr(self._local, "reader", None)
        if old is not None and self._state(old.store) == old.state:
            return old
        searcher = Searcher(self.dir, embedder=self.embedder, precision=self.precision, warn=self.warn)
        try:
            state = self._state(searcher.store)  # before reading: a commit landing during the open is seen next time
            searcher.open()
        except (sqlite3.Error, *SNAPSHOT_READ_ERRORS):  # a writer mid-save; a Ctrl-C is not swallowed here
            searcher.close()
            if old is not None:  # keep answering from what was open
                return old
            raise
        except BaseException:
            searcher.close()
            raise
        self._local.reader = Reader(searcher, state)
        if old is not None:
            old.close()
        return self._local.reader

    def _state(self, store) -> tuple:
        """(the snapshot's generation, SQLite's data_version on this connection): either moves when
        an `index` run saves or commits."""
        from .index import vindex

        manifest = vindex.read_manifest(self.dir)
        return (manifest or {}).get("generation"), store.conn.execute("PRAGMA data_version").fetchone()[0]

    def close(self) -> None:
        """Close this thread's reader; the server's worker threads close theirs as they end."""
        r = getattr(self._local, "reader", None)
        if r is not None:
            self._local.reader = None
            r.close()


def describe_upload(index: Index, path: Path) -> list:
    """The descriptions of an uploaded image: its stored ones when the index holds the same bytes,
    else the VLM's. One VLM at a time (a second upload waits for the first, as a laptop has memory
    for one model). It runs in its request's thread, on that thread's own reader: the other
    threads go on searching meanwhile."""
    with index.describing:
        variants, _ = index.reader().searcher.image_variants(path, index.vlm_cfg)
    return variants


class Pictures:
    """Thumbnails (cached on disk in the index directory) and full pictures of indexed images."""

    def __init__(self, index_dir: Path):
        self.cache = index_dir / THUMB_DIR
        try:
            self.cache.mkdir(exist_ok=True)
            probe = tempfile.NamedTemporaryFile(dir=self.cache, delete=True)
            probe.close()
        except OSError:  # a read-only index (e.g. on a DVD): cache in a temp dir for this run
            self._tmp = tempfile.TemporaryDirectory(prefix="edge-t2t-thumbs-")
            self.cache = Path(self._tmp.name)

    def picture(self, path: str, chip, side: int | None, scene: bool = False):
        """A Pillow image: the image (or chip) itself, or for scene=True the chip's scene overview."""
        if chip is not None:
            from .scene.scene_report import ChipPictures

            pics = ChipPictures({path: chip})
            try:
                chip_img, overview = pics.chip_and_overview(chip)
            finally:
                pics.close()
            img = overview if scene else chip_img
        else:
            from .images import load_image

            mp = FULL_MEGAPIXELS if side is None else max(0.01, side * side * 4 / 1e6)
            img = load_image(path, max_megapixels=mp, hard_limit_megapixels=FULL_MEGAPIXELS * 4).image
        if side is not None:
            from PIL import Image

            img = img.copy()
            img.thumbnail((side, side), Image.Resampling.LANCZOS)
        return img

    def thumbnail(self, image_id: int, path: str, key: str, chip) -> bytes:
        import hashlib

        tag = hashlib.sha256(f"{path}\0{key}".encode()).hexdigest()[:16]
        cached = self.cache / f"{image_id}-{tag}.jpg"
        if cached.is_file():
            return cached.read_bytes()
        data = jpeg(self.picture(path, chip, THUMB_SIDE))
        from .fileio import atomic_write_bytes

        # Two threads (or processes) may make the same thumbnail at once: each writes its own temp
        # file and replaces the cached one whole, so a reader sees one of two equal files, never half of one.
        try:
            atomic_write_bytes(cached, data)
        except OSError:
            pass  # no room or no permission: serve it uncached
        return data


def jpeg(img, quality: int = 85) -> bytes:
    buf = io.BytesIO()
    img.convert("RGB").save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def csv_text(dicts: list[dict]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(CSV_COLUMNS)
    for d in dicts:
        w.writerow([json.dumps(d[c]) if isinstance(d.get(c), list) else d.get(c, "") for c in CSV_COLUMNS])
    return buf.getvalue()


class Answers:
    """Every read request, answered from one process's Index. `call(name, *args)` runs the method
    `name` (one of NAMES): the server's threads call it directly, a search process calls it for
    each message (serve_pool.py). Parameters arrive checked (serve.py's search_params); errors a
    user caused are EdgeT2TError (400), NoSuchImage and PictureGone (404)."""

    NAMES = ("search", "similar", "example", "image", "export", "thumbnail", "picture")

    def __init__(self, index: Index):
        self.index = index
        self.pictures = Pictures(index.dir)

    def call(self, name: str, *args):
        if name not in self.NAMES:
            raise ValueError(f"no answer named {name!r}")
        return getattr(self, name)(*args)

    def close(self) -> None:
        self.index.close()

    @staticmethod
    def _answer(r: Reader, title: str, dicts: list[dict], **extra) -> dict:
        """The hits, and the generation of the snapshot they all came from."""
        return {"query": title, "count": len(dicts), "generation": r.generation, "hits": dicts, **extra}

    @staticmethod
    def _text_hits(r: Reader, query: str, p: dict):
        if not query.strip():
            raise InputError("the query is empty: give some words to search for")
        hits = r.searcher.text(query, p["k"], mode=p["mode"], structure=p["structure"], explain=p["explain"],
                               min_score=p["min_score"])  # fmt: skip
        return hits, r.hit_dicts(hits)

    @staticmethod
    def _similar_hits(r: Reader, image_id: int, k: int, min_score: float | None = None):
        if r.image_row(image_id) is None:
            raise NoSuchImage(image_id)
        hits = r.searcher.variants(r.store.variants_of(image_id), k, exclude_image_ids=[image_id], min_score=min_score)
        return hits, r.hit_dicts(hits)

    def search(self, query: str, p: dict) -> dict:
        r = self.index.reader()
        _, dicts = self._text_hits(r, query, p)
        return self._answer(r, query, dicts, mode=p["mode"], k=p["k"])

    def similar(self, image_id: int, p: dict) -> dict:
        r = self.index.reader()
        _, dicts = self._similar_hits(r, image_id, p["k"], p["min_score"])
        return self._answer(r, f"more like image {image_id}", dicts, like=image_id, k=p["k"])

    def example(self, variants: list, k: int) -> dict:
        """Search by example with the descriptions of an upload (describe_upload)."""
        r = self.index.reader()  # after the description, which may have taken minutes: the index may have moved
        hits = r.searcher.variants(variants, k)
        return self._answer(r, "search by example", r.hit_dicts(hits), k=k)

    def image(self, image_id: int) -> dict:
        r = self.index.reader()
        row = r.image_row(image_id)
        if row is None:
            raise NoSuchImage(image_id)
        path = row[0]
        chip = r.chip(path)
        out = {"id": image_id, "image": path, "variants": [v.to_dict() for v in r.store.variants_of(image_id)],
               "chip": None}
        if chip is not None:
            out["chip"] = {**chip.to_dict(), "outline": chip.outline}
        return out

    def export(self, kind: str, p: dict, query: str, like: int | None) -> tuple[str, str]:
        """(title, body) of the current results as "csv" or "geojson": a text query, or like=ID."""
        r = self.index.reader()
        if like is not None:
            title = f"like-{like}"
            hits, dicts = self._similar_hits(r, like, p["k"], p["min_score"])
        else:
            title = "search"
            hits, dicts = self._text_hits(r, query, p)
        if kind == "csv":
            return title, csv_text(dicts)
        from .scene.geo import feature_collection
        from .scene.scene_report import hit_features

        chips = {h.image: c for h in hits if (c := r.chip(h.image)) is not None}
        features, left_out = hit_features(hits, chips)
        return title, json.dumps({**feature_collection(features), "left_out": left_out})

    def _lookup(self, image_id: int):
        r = self.index.reader()
        row = r.image_row(image_id)
        if row is None:
            raise NoSuchImage(image_id)
        return row, r.chip(row[0])

    def thumbnail(self, image_id: int) -> bytes:
        (path, sha, mtime), chip = self._lookup(image_id)
        return _readable(lambda: self.pictures.thumbnail(image_id, path, f"{sha}:{mtime}", chip))

    def picture(self, image_id: int, scene: bool = False) -> bytes:
        """The image (or chip) as a JPEG, or for scene=True its scene's overview (chips only)."""
        (path, _, _), chip = self._lookup(image_id)
        if scene and chip is None:
            raise NoSuchImage(image_id)
        side = 512 if scene else None
        return _readable(lambda: jpeg(self.pictures.picture(path, chip, side, scene=scene)))


def _readable(make: Callable[[], bytes]) -> bytes:
    """The file of an indexed image may be gone from this machine, or unreadable now: PictureGone."""
    try:
        return make()
    except (ImageError, StoreError, OSError):  # a scene reader's rasterio errors arrive as ImageError (tiling.py)
        raise PictureGone("the image file is not available on this machine") from None
