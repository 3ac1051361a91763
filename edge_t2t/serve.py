"""`edge-t2t serve`: a local web page over one index (the `web` extra: Flask + waitress).

The page is one static HTML/JS/CSS file set (edge_t2t/web/); everything it shows comes from the
JSON API below, which calls the same functions as `edge-t2t search` and `info`:

  GET  /api/search?q=TEXT&k=N[&mode=dense|lexical|hybrid][&min_score=S][&explain=1]
  GET  /api/similar?id=ID&k=N          more like this: the image's own descriptions as the query
  POST /api/search-by-image            multipart field `image`: search by example
  GET  /api/image?id=ID                an image's description variants (and, for a chip, its scene)
  GET  /api/info                       what `edge-t2t info --json` prints
  GET  /api/export.csv|.geojson?q=..   the current results (q=... or like=ID) as a file
  GET  /thumb/ID, /image/ID, /image/ID/scene    pictures, by image id only

Safety: pictures are found by integer id in the index, never by a path from the request, and
anything else is 404. Uploads are capped (MAX_UPLOAD_MB), checked by images.load_image (its
decompression-bomb guard included) and written only inside a temporary directory. Every response
carries a Content-Security-Policy that lets the page reach nothing but this server.

One thread owns the open index and the embedder (an SQLite connection belongs to the thread that
opened it), so requests queue for it; on 2 cores that costs nothing. Before each request it checks
the snapshot's manifest generation and SQLite's data_version and reopens the reader (O(1), no
lock) when either moved, so a running `index` is seen as its commits land, and until then the
page answers from the last whole snapshot.
"""

from __future__ import annotations

import csv
import io
import ipaddress
import json
import os
import sqlite3
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from importlib import resources
from pathlib import Path

from .errors import EdgeT2TError, ImageError, InputError, StoreError

MAX_UPLOAD_MB = 20
MAX_K = 500
THUMB_SIDE = 256
FULL_MEGAPIXELS = 4.0  # what the VLM saw at most (images.DEFAULT_MAX_MEGAPIXELS)
THUMB_DIR = "thumbnails"  # inside the index directory: made once, reused by every later serve
CSV_COLUMNS = ("rank", "score", "image", "variant", "text", "dense", "lexical", "structure", "scene", "window",
               "lon", "lat")
CSP = ("default-src 'self'; img-src 'self' data: blob:; style-src 'self'; script-src 'self'; connect-src 'self'; "
       "object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'")
STATIC = {"": ("index.html", "text/html; charset=utf-8"), "app.js": ("app.js", "text/javascript; charset=utf-8"),
          "app.css": ("app.css", "text/css; charset=utf-8")}


def require_web():
    """Flask, or one line naming the extra to install."""
    try:
        import flask
        import waitress  # noqa: F401
    except ImportError as exc:
        raise InputError(f"edge-t2t serve needs the web extra ({exc.name} is missing): pip install 'edge-t2t[web]'") from None
    return flask


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class NoSuchImage(LookupError):
    """An id that is not an image of this index: 404."""


class Index:
    """The open index and embedder, owned by one thread; `call(fn)` runs fn(self) there."""

    def __init__(self, index_dir: str | os.PathLike, embedder=None, precision: str = "int8", vlm_cfg=None,
                 warn: Callable[[str], None] | None = None):
        self.dir = Path(index_dir)
        self.vlm_cfg = vlm_cfg
        self.warn = warn or (lambda msg: print(f"edge-t2t: {msg}", file=sys.stderr))
        self._owner = ThreadPoolExecutor(max_workers=1, thread_name_prefix="edge-t2t-index")
        self.searcher = None  # query.searcher.Searcher over the index as last seen (_refresh)
        self._seen = None
        self.generation = None
        self.embedder = embedder
        self._precision = precision
        try:
            self.call(Index._load)  # a missing or empty index fails here, before the server starts
        except BaseException:
            self._owner.shutdown()
            raise

    def call(self, fn, *args):
        return self._owner.submit(self._run, fn, *args).result()

    def _run(self, fn, *args):
        self._refresh()
        return fn(self, *args)

    def _load(self) -> None:
        self.embedder = self.searcher.embedder  # loaded once (unless given) and checked against the index
        # One search at start-up, so the first user's request does not pay the lazy imports and the
        # vectors' first read.
        self.searcher.text("warm up", 1, mode="dense")

    def _state(self, ix) -> tuple:
        """(the snapshot's generation, SQLite's data_version on ix's connection): either moves when
        an `index` run saves or commits."""
        from .index import vindex

        manifest = vindex.read_manifest(self.dir)
        return (manifest or {}).get("generation"), ix.store.conn.execute("PRAGMA data_version").fetchone()[0]

    def _refresh(self) -> None:
        """Reopen the reader when a commit or a new snapshot landed since the last request."""
        from .query.searcher import Searcher

        if self.searcher is not None and self._state(self.searcher) == self._seen:
            return
        from .index.vindex import SNAPSHOT_READ_ERRORS

        searcher = Searcher(self.dir, embedder=self.embedder, precision=self._precision, warn=self.warn)
        try:
            seen = self._state(searcher)  # before reading: a commit landing during the open is seen next time
            searcher.open()
        except (sqlite3.Error, *SNAPSHOT_READ_ERRORS):  # a writer mid-save; a Ctrl-C is not swallowed here
            searcher.close()
            if self.searcher is not None:  # keep answering from what was open
                return
            raise
        except BaseException:
            searcher.close()
            raise
        old, self.searcher, self._seen = self.searcher, searcher, seen
        if old is not None:
            old.close()
        self.generation = seen[0]

    @property
    def store(self):
        return self.searcher.store

    def close(self) -> None:
        def shut(_):
            if self.searcher is not None:
                self.searcher.close()
                self.searcher = None

        try:
            self._owner.submit(shut, self).result()
        finally:
            self._owner.shutdown()

    # -- work done in the owner thread --------------------------------------------------------
    def hit_dicts(self, hits) -> list[dict]:
        """search --json's fields (scene_report.hit_dicts), plus the image id and a chip's outline."""
        from .scene.chipstore import chip_info
        from .scene.scene_report import hit_dicts

        paths = [h.image for h in hits]
        chips = chip_info(self.store, paths)
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


def _int(args, name: str, default: int | None = None, lo: int = 1, hi: int = MAX_K) -> int:
    raw = args.get(name)
    if raw is None or raw == "":
        if default is None:
            raise InputError(f"give {name}=N (a whole number)")
        return default
    try:
        value = int(raw)
    except ValueError:
        raise InputError(f"{name} must be a whole number, got {raw[:40]!r}") from None
    if not lo <= value <= hi:
        raise InputError(f"{name} must be between {lo} and {hi}, got {value}")
    return value


def _search_params(args) -> dict:
    from .modes import RETRIEVAL_MODES
    from .query import retrieval

    mode = args.get("mode") or retrieval.DEFAULT_MODE
    if mode not in RETRIEVAL_MODES:
        raise InputError(f"mode must be one of {', '.join(RETRIEVAL_MODES)}, got {mode[:40]!r}")
    min_score = None
    if args.get("min_score"):
        try:
            min_score = float(args["min_score"])
        except ValueError:
            raise InputError(f"min_score must be a number, got {args['min_score'][:40]!r}") from None
    return {"k": _int(args, "k", 10), "mode": mode, "min_score": min_score,
            "explain": args.get("explain") in ("1", "true", "on"), "structure": args.get("structure") not in ("0", "false")}


def _text_hits(ix: Index, query: str, p: dict):
    if not query.strip():
        raise InputError("the query is empty: give some words to search for")
    hits = ix.searcher.text(query, p["k"], mode=p["mode"], structure=p["structure"], explain=p["explain"],
                            min_score=p["min_score"])  # fmt: skip
    return hits, ix.hit_dicts(hits)


def _similar_hits(ix: Index, image_id: int, k: int, min_score: float | None = None):
    if ix.image_row(image_id) is None:
        raise NoSuchImage(image_id)
    hits = ix.searcher.variants(ix.store.variants_of(image_id), k, exclude_image_ids=[image_id], min_score=min_score)
    return hits, ix.hit_dicts(hits)


def _example_hits(ix: Index, path: Path, k: int):
    hits = ix.searcher.image(path, k, vlm_cfg=ix.vlm_cfg)
    return hits, ix.hit_dicts(hits)


def _image_details(ix: Index, image_id: int) -> dict:
    row = ix.image_row(image_id)
    if row is None:
        raise NoSuchImage(image_id)
    path = row[0]
    chip = ix.chip(path)
    out = {"id": image_id, "image": path, "variants": [v.to_dict() for v in ix.store.variants_of(image_id)],
           "chip": None}
    if chip is not None:
        out["chip"] = {**chip.to_dict(), "outline": chip.outline}
    return out


def _csv(dicts: list[dict]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(CSV_COLUMNS)
    for d in dicts:
        w.writerow([json.dumps(d[c]) if isinstance(d.get(c), list) else d.get(c, "") for c in CSV_COLUMNS])
    return buf.getvalue()


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
        self._lock = threading.Lock()

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
        data = _jpeg(self.picture(path, chip, THUMB_SIDE))
        from .fileio import atomic_write_bytes

        with self._lock:
            try:
                atomic_write_bytes(cached, data)
            except OSError:
                pass  # no room or no permission: serve it uncached
        return data


def _jpeg(img, quality: int = 85) -> bytes:
    buf = io.BytesIO()
    img.convert("RGB").save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def create_app(index_dir: str | os.PathLike, *, embedder=None, precision: str = "int8", vlm_cfg=None,
               max_upload_mb: float = MAX_UPLOAD_MB):
    """The Flask app over one index. The index is opened (and the embedder loaded) here, once."""
    flask = require_web()
    from werkzeug.exceptions import HTTPException

    ix = Index(index_dir, embedder=embedder, precision=precision, vlm_cfg=vlm_cfg)
    pictures = Pictures(ix.dir)
    app = flask.Flask(__name__, static_folder=None)
    app.config["MAX_CONTENT_LENGTH"] = int(max_upload_mb * 1024 * 1024)
    app.extensions["edge_t2t_index"] = ix
    request = flask.request

    def error(status: int, message: str):
        return flask.jsonify({"error": message}), status

    @app.after_request
    def headers(resp):
        resp.headers["Content-Security-Policy"] = CSP
        resp.headers["X-Content-Type-Options"] = "nosniff"
        resp.headers["Referrer-Policy"] = "no-referrer"
        return resp

    @app.errorhandler(EdgeT2TError)
    def user_error(exc):
        return error(400, str(exc))

    @app.errorhandler(NoSuchImage)
    def not_found(exc):
        return error(404, "no such image in this index")

    @app.errorhandler(HTTPException)
    def http_error(exc):
        if exc.code == 413:
            return error(413, f"the upload is larger than {max_upload_mb:g} MB: send a smaller image")
        return error(exc.code or 500, exc.description or exc.name)

    def static_file(name: str):
        if name not in STATIC:
            flask.abort(404)
        filename, mime = STATIC[name]
        body = resources.files("edge_t2t.web").joinpath(filename).read_bytes()
        return flask.Response(body, mimetype=mime.split(";")[0], headers={"Cache-Control": "no-cache"})

    app.add_url_rule("/", "page", lambda: static_file(""))
    app.add_url_rule("/app.js", "js", lambda: static_file("app.js"))
    app.add_url_rule("/app.css", "css", lambda: static_file("app.css"))

    def answer(title: str, dicts: list[dict], **extra):
        return flask.jsonify({"query": title, "count": len(dicts), "generation": ix.generation, "hits": dicts, **extra})

    @app.get("/api/search")
    def api_search():
        p = _search_params(request.args)
        q = request.args.get("q", "")
        t0 = time.perf_counter()
        _, dicts = ix.call(_text_hits, q, p)
        resp = answer(q, dicts, mode=p["mode"], k=p["k"])
        # The search itself (queue, embed, rank, rows), so a client can tell it from HTTP's share.
        resp.headers["Server-Timing"] = f"search;dur={(time.perf_counter() - t0) * 1000:.2f}"
        return resp

    @app.get("/api/similar")
    def api_similar():
        image_id = _int(request.args, "id", lo=1, hi=2**62)
        p = _search_params(request.args)
        _, dicts = ix.call(_similar_hits, image_id, p["k"], p["min_score"])
        return answer(f"more like image {image_id}", dicts, like=image_id, k=p["k"])

    @app.post("/api/search-by-image")
    def api_by_image():
        k = _int(request.form, "k", 10)
        upload = request.files.get("image")
        if upload is None:
            raise InputError("send the image as the multipart form field 'image'")
        # The client's file name is never used for the path: a fixed name inside a fresh temp dir.
        with tempfile.TemporaryDirectory(prefix="edge-t2t-upload-") as tmp:
            path = Path(tmp) / "query-image"
            upload.save(path)
            _, dicts = ix.call(_example_hits, path, k)
        return answer("search by example", dicts, k=k)

    @app.get("/api/image")
    def api_image():
        return flask.jsonify(ix.call(_image_details, _int(request.args, "id", lo=1, hi=2**62)))

    @app.get("/api/info")
    def api_info():
        from .cli.info import gather

        return flask.jsonify(gather(ix.dir))

    def export_dicts():
        p = _search_params(request.args)
        if request.args.get("like"):
            like = _int(request.args, "like", lo=1, hi=2**62)
            title = f"like-{like}"
            hits, dicts = ix.call(_similar_hits, like, p["k"], p["min_score"])
        else:
            title = "search"
            hits, dicts = ix.call(_text_hits, request.args.get("q", ""), p)
        return title, hits, dicts

    @app.get("/api/export.csv")
    def export_csv():
        title, _, dicts = export_dicts()
        return flask.Response(_csv(dicts), mimetype="text/csv",
                              headers={"Content-Disposition": f'attachment; filename="edge-t2t-{title}.csv"'})

    @app.get("/api/export.geojson")
    def export_geojson():
        from .scene.geo import feature_collection
        from .scene.scene_report import hit_features

        title, hits, _ = export_dicts()
        chips = ix.call(lambda i: {h.image: c for h in hits if (c := i.chip(h.image)) is not None})
        features, left_out = hit_features(hits, chips)
        body = {**feature_collection(features), "left_out": left_out}
        return flask.Response(json.dumps(body), mimetype="application/geo+json",
                              headers={"Content-Disposition": f'attachment; filename="edge-t2t-{title}.geojson"'})

    def lookup(image_id: int):
        row, chip = ix.call(lambda i: (r := i.image_row(image_id), i.chip(r[0]) if r else None))
        if row is None:
            flask.abort(404)
        return row, chip

    def picture_response(data: bytes):
        return flask.Response(data, mimetype="image/jpeg", headers={"Cache-Control": "private, max-age=3600"})

    @app.get("/thumb/<int:image_id>")
    def thumb(image_id: int):
        (path, sha, mtime), chip = lookup(image_id)
        return picture_response(_guard(lambda: pictures.thumbnail(image_id, path, f"{sha}:{mtime}", chip)))

    @app.get("/image/<int:image_id>")
    def full(image_id: int):
        (path, _, _), chip = lookup(image_id)
        return picture_response(_guard(lambda: _jpeg(pictures.picture(path, chip, None))))

    @app.get("/image/<int:image_id>/scene")
    def scene(image_id: int):
        (path, _, _), chip = lookup(image_id)
        if chip is None:
            flask.abort(404)
        return picture_response(_guard(lambda: _jpeg(pictures.picture(path, chip, 512, scene=True))))

    def _guard(make: Callable[[], bytes]) -> bytes:
        """The file of an indexed image may be gone from this machine, or unreadable now: 404."""
        try:
            return make()
        except (ImageError, StoreError, OSError):  # a scene reader's rasterio errors arrive as ImageError (tiling.py)
            flask.abort(404, "the image file is not available on this machine")

    return app


def serve(app, host: str, port: int, threads: int = 4) -> None:
    """Run the app under waitress until Ctrl-C."""
    from waitress import create_server

    try:
        server = create_server(app, host=host, port=port, threads=threads, clear_untrusted_proxy_headers=True)
    except OSError as exc:
        raise InputError(f"cannot listen on {host}:{port} ({exc.strerror or exc}): pass another --port") from None
    try:
        server.run()
        # waitress catches Ctrl-C itself and returns from run(); nothing else makes it return here.
        raise KeyboardInterrupt
    finally:
        server.close()
        app.extensions["edge_t2t_index"].close()
