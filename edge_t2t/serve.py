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
  GET  /docs/, /docs/NAME              the user documentation (edge_t2t/manual/web.py)

Safety: pictures are found by integer id in the index, never by a path from the request, and
anything else is 404. Uploads are capped (MAX_UPLOAD_MB), checked by images.load_image (its
decompression-bomb guard included) and written only inside a temporary directory. Every response
carries a Content-Security-Policy that lets the page reach nothing but this server.

Requests are answered side by side (the server's threads, 4 by default). Each thread reads through
its own Reader: its own SQLite connection (a connection belongs to the thread that opened it) and
the vectors of one whole snapshot, opened in O(1) (memory maps). Before each request the thread
compares the snapshot's manifest generation and SQLite's data_version with what it has open and
reopens when either moved, so a running `index` is seen as its commits land, and until then the
thread answers from the last whole snapshot. The embedder is one onnxruntime session, run from
many threads. Describing an upload holds only its own request's thread (and one lock, so one VLM
runs at a time); thumbnails are cached by atomic writes.

Off loopback, and wherever --token-file is given, every request needs the access token; POSTs
from other sites are always refused; one audit line is written per request (serve_access.py).
HTTPS (`--cert`, `--key`) runs under cheroot, since waitress speaks plain HTTP only.
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
from importlib import resources
from pathlib import Path

from .errors import EdgeT2TError, ImageError, InputError, StoreError

MAX_UPLOAD_MB = 20
MAX_K = 500
THUMB_SIDE = 256
FULL_MEGAPIXELS = 4.0  # what the VLM saw at most (images.DEFAULT_MAX_MEGAPIXELS)
THUMB_DIR = "thumbnails"  # inside the index directory: made once, reused by every later serve
CSV_COLUMNS = ("rank", "score", "image", "variant", "text", "dense", "lexical", "structure", "text_score", "scene",
               "window", "lon", "lat")
CSP = ("default-src 'self'; img-src 'self' data: blob:; style-src 'self'; script-src 'self'; connect-src 'self'; "
       "object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'")
TLS_HANDSHAKE_S = 5.0
MAKE_CERT = ("openssl req -x509 -newkey rsa:3072 -nodes -days 365 -keyout key.pem -out cert.pem "
             "-subj /CN=HOST -addext subjectAltName=DNS:HOST,IP:ADDRESS")
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
    """The index directory and the embedder, shared by the server's threads. Each thread reads
    through its own Reader (`reader()`), so requests are answered side by side; an upload being
    described by the VLM holds only its own thread (and `describing`, so one VLM runs at a time)."""

    def __init__(self, index_dir: str | os.PathLike, embedder=None, precision: str = "int8", vlm_cfg=None,
                 warn: Callable[[str], None] | None = None):
        self.dir = Path(index_dir)
        self.vlm_cfg = vlm_cfg
        self.warn = warn or (lambda msg: print(f"edge-t2t: {msg}", file=sys.stderr))
        self.describing = threading.Lock()
        self._local = threading.local()
        if embedder is None:
            from .embed.embedder import Embedder

            # One onnxruntime thread per query: the requests are the parallelism, and a query of a
            # few words gains nothing from a second thread (ORT runs one session from many threads).
            embedder = Embedder(precision=precision, threads=1)
        self.embedder = embedder
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
        searcher = Searcher(self.dir, embedder=self.embedder, warn=self.warn)
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


def _text_hits(r: Reader, query: str, p: dict):
    if not query.strip():
        raise InputError("the query is empty: give some words to search for")
    hits = r.searcher.text(query, p["k"], mode=p["mode"], structure=p["structure"], explain=p["explain"],
                           min_score=p["min_score"])  # fmt: skip
    return hits, r.hit_dicts(hits)


def _similar_hits(r: Reader, image_id: int, k: int, min_score: float | None = None):
    if r.image_row(image_id) is None:
        raise NoSuchImage(image_id)
    hits = r.searcher.variants(r.store.variants_of(image_id), k, exclude_image_ids=[image_id], min_score=min_score)
    return hits, r.hit_dicts(hits)


def describe_upload(index: Index, path: Path) -> list:
    """The descriptions of an uploaded image: its stored ones when the index holds the same bytes,
    else the VLM's. One VLM at a time (a second upload waits for the first, as a laptop has memory
    for one model). It runs in its request's thread, on that thread's own reader: the other
    threads go on searching meanwhile."""
    with index.describing:
        variants, _ = index.reader().searcher.image_variants(path, index.vlm_cfg)
    return variants


def _example_hits(r: Reader, variants: list, k: int):
    hits = r.searcher.variants(variants, k)
    return hits, r.hit_dicts(hits)


def _image_details(r: Reader, image_id: int) -> dict:
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

        # Two threads may make the same thumbnail at once: each writes its own temp file and
        # replaces the cached one whole, so a reader sees one of two equal files, never half of one.
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
               max_upload_mb: float = MAX_UPLOAD_MB, gate=None, audit: Callable[[str], None] | None = None):
    """The Flask app over one index. The index is opened (and the embedder loaded) here, once.
    `gate` (serve_access.Gate): every request needs its token; `audit`: called with one line per
    request (serve_access.audited). Cross-site POSTs are refused either way."""
    flask = require_web()
    from werkzeug.exceptions import HTTPException

    from .serve_access import audited, protect

    ix = Index(index_dir, embedder=embedder, precision=precision, vlm_cfg=vlm_cfg)
    pictures = Pictures(ix.dir)
    app = flask.Flask(__name__, static_folder=None)
    app.config["MAX_CONTENT_LENGTH"] = int(max_upload_mb * 1024 * 1024)
    app.extensions["edge_t2t_index"] = ix
    request = flask.request
    protect(app, gate)
    if audit is not None:
        app.wsgi_app = audited(app.wsgi_app, audit)

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
    from .manual.web import add_docs_routes

    add_docs_routes(app)  # /docs: the user documentation, for a machine with no web

    def answer(r: Reader, title: str, dicts: list[dict], **extra):
        """The hits, and the generation of the snapshot they all came from."""
        return flask.jsonify({"query": title, "count": len(dicts), "generation": r.generation, "hits": dicts, **extra})

    @app.get("/api/search")
    def api_search():
        p = _search_params(request.args)
        q = request.args.get("q", "")
        t0 = time.perf_counter()
        r = ix.reader()
        _, dicts = _text_hits(r, q, p)
        resp = answer(r, q, dicts, mode=p["mode"], k=p["k"])
        # The search itself (open, embed, rank, rows), so a client can tell it from HTTP's share.
        resp.headers["Server-Timing"] = f"search;dur={(time.perf_counter() - t0) * 1000:.2f}"
        return resp

    @app.get("/api/similar")
    def api_similar():
        image_id = _int(request.args, "id", lo=1, hi=2**62)
        p = _search_params(request.args)
        r = ix.reader()
        _, dicts = _similar_hits(r, image_id, p["k"], p["min_score"])
        return answer(r, f"more like image {image_id}", dicts, like=image_id, k=p["k"])

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
            variants = describe_upload(ix, path)
        r = ix.reader()  # after the description, which may have taken minutes: the index may have moved
        _, dicts = _example_hits(r, variants, k)
        return answer(r, "search by example", dicts, k=k)

    @app.get("/api/image")
    def api_image():
        return flask.jsonify(_image_details(ix.reader(), _int(request.args, "id", lo=1, hi=2**62)))

    @app.get("/api/info")
    def api_info():
        from .cli.info import gather

        return flask.jsonify(gather(ix.dir))

    def export_dicts(r: Reader):
        p = _search_params(request.args)
        if request.args.get("like"):
            like = _int(request.args, "like", lo=1, hi=2**62)
            title = f"like-{like}"
            hits, dicts = _similar_hits(r, like, p["k"], p["min_score"])
        else:
            title = "search"
            hits, dicts = _text_hits(r, request.args.get("q", ""), p)
        return title, hits, dicts

    @app.get("/api/export.csv")
    def export_csv():
        title, _, dicts = export_dicts(ix.reader())
        return flask.Response(_csv(dicts), mimetype="text/csv",
                              headers={"Content-Disposition": f'attachment; filename="edge-t2t-{title}.csv"'})

    @app.get("/api/export.geojson")
    def export_geojson():
        from .scene.geo import feature_collection
        from .scene.scene_report import hit_features

        r = ix.reader()
        title, hits, _ = export_dicts(r)
        chips = {h.image: c for h in hits if (c := r.chip(h.image)) is not None}
        features, left_out = hit_features(hits, chips)
        body = {**feature_collection(features), "left_out": left_out}
        return flask.Response(json.dumps(body), mimetype="application/geo+json",
                              headers={"Content-Disposition": f'attachment; filename="edge-t2t-{title}.geojson"'})

    def lookup(image_id: int):
        r = ix.reader()
        row = r.image_row(image_id)
        if row is None:
            flask.abort(404)
        return row, r.chip(row[0])

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


def tls_adapter(cert: str | os.PathLike, key: str | os.PathLike):
    """HTTPS for `serve --cert --key`: cheroot's adapter over Python's ssl module, with the pair
    loaded now, so a wrong file is one line before anything starts. (waitress is plain HTTP only:
    its authors leave TLS to a proxy in front; cheroot is the WSGI server of CherryPy.)"""
    try:
        from cheroot.ssl.builtin import BuiltinSSLAdapter
    except ImportError as exc:
        raise InputError(f"--cert needs the web extra ({exc.name} is missing): pip install 'edge-t2t[web]'") from None
    for flag, path in (("--cert", cert), ("--key", key)):
        if not Path(path).is_file():
            raise InputError(f"{flag} {path} does not exist: make a pair with {MAKE_CERT} (docs/web.md: Serving a team)")

    class Adapter(BuiltinSSLAdapter):
        # cheroot shakes hands on its accepting thread: bound it, so a client that connects and
        # says nothing holds new connections up for TLS_HANDSHAKE_S, not for the whole socket timeout.
        def wrap(self, sock):
            sock.settimeout(TLS_HANDSHAKE_S)
            return super().wrap(sock)

    try:
        # a key with a passphrase: ask for none (the server may have no terminal), fail instead
        return Adapter(str(cert), str(key), private_key_password=lambda: "")
    except (ValueError, OSError) as exc:  # ssl.SSLError is an OSError (this package imports no network module)
        raise InputError(f"cannot use --cert {cert} with --key {key} ({exc}): give a PEM certificate and its "
                         f"unencrypted PEM key, e.g. made with {MAKE_CERT}") from None


class HTTPServer:
    """The app listening on host:port: waitress for HTTP, cheroot (with `tls`, a tls_adapter) for
    HTTPS; `threads` requests are answered at once. Bound on creation; run() serves until Ctrl-C
    or close()."""

    def __init__(self, app, host: str, port: int, threads: int = 4, tls=None):
        self.tls = tls is not None
        try:
            if tls is None:
                from waitress import create_server

                self._server = create_server(app, host=host, port=port, threads=threads,
                                             clear_untrusted_proxy_headers=True)  # fmt: skip
                self.port = self._server.effective_port
            else:
                from cheroot import wsgi

                self._server = wsgi.Server((host, port), app, numthreads=threads, server_name=host)
                self._server.ssl_adapter = tls
                self._server.prepare()
                self.port = self._server.bind_addr[1]
        except OSError as exc:
            raise InputError(f"cannot listen on {host}:{port} ({exc.strerror or exc}): pass another --port") from None

    def run(self) -> None:
        if self.tls:
            self._server.serve()
        else:
            self._server.run()  # waitress catches Ctrl-C itself and returns

    def close(self) -> None:
        if self.tls:
            self._server.stop()
        else:
            self._server.close()


def serve(app, host: str, port: int, threads: int = 4, tls=None, ready: Callable[[], None] | None = None) -> None:
    """Run the app until Ctrl-C; `ready` is called once it listens."""
    server = HTTPServer(app, host, port, threads, tls)
    try:
        if ready is not None:
            ready()
        server.run()
        # run() returns (or raises KeyboardInterrupt) only on Ctrl-C: nothing else closes it here.
        raise KeyboardInterrupt
    finally:
        server.close()
        app.extensions["edge_t2t_index"].close()
