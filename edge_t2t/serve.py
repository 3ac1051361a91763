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

What each request answers is worked out by serve_answers.Answers, as plain data. With
`--processes N` (the command's default: one per core, up to 4) it runs in N search processes
(serve_pool.py), each with its own interpreter, so N searches run on N cores; with 0 it runs in
the server's own threads (4 by default), one index reader per thread. Either way each answer comes
from one whole vector snapshot, reopened in O(1) when an `index` run saves or commits. Describing
an upload by the VLM stays in the server process, in its request's thread (one VLM at a time),
and never holds up the searches.

Off loopback, and wherever --token-file is given, every request needs the access token; POSTs
from other sites are always refused; one audit line is written per request (serve_access.py).
HTTPS (`--cert`, `--key`) runs under cheroot, since waitress speaks plain HTTP only.
"""

from __future__ import annotations

import ipaddress
import os
import tempfile
import time
from collections.abc import Callable
from importlib import resources
from pathlib import Path

from .errors import EdgeT2TError, InputError
from .serve_answers import Answers, Index, NoSuchImage, PictureGone, describe_upload

MAX_UPLOAD_MB = 20
MAX_K = 500
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


def search_params(args) -> dict:
    """The search parameters of a request's query string (or form), checked: InputError says what is wrong."""
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


def create_app(index_dir: str | os.PathLike, *, embedder=None, precision: str = "int8", vlm_cfg=None,
               max_upload_mb: float = MAX_UPLOAD_MB, gate=None, audit: Callable[[str], None] | None = None,
               processes: int = 0):  # fmt: skip
    """The Flask app over one index. The index is opened (and the embedder loaded) here, once:
    in this process (`processes` 0), or in that many search processes (serve_pool), each its own.
    `embedder` (a stand-in, for tests) needs processes 0. `gate` (serve_access.Gate): every request
    needs its token; `audit`: called with one line per request (serve_access.audited). Cross-site
    POSTs are refused either way. Close with close_app(app)."""
    flask = require_web()
    from werkzeug.exceptions import HTTPException

    from .serve_access import audited, protect

    if processes and embedder is not None:
        raise ValueError("a given embedder lives in this process: use processes=0 with it")
    if processes:
        from .serve_pool import SearchProcesses

        answers = SearchProcesses(index_dir, processes, precision=precision)
        try:
            # This process only describes uploads (and finds their stored descriptions): no embedder here.
            ix = Index(index_dir, precision=precision, vlm_cfg=vlm_cfg, searching=False)
        except BaseException:
            answers.close()
            raise
    else:
        ix = Index(index_dir, embedder=embedder, precision=precision, vlm_cfg=vlm_cfg)
        answers = Answers(ix)
    call = answers.call
    app = flask.Flask(__name__, static_folder=None)
    app.config["MAX_CONTENT_LENGTH"] = int(max_upload_mb * 1024 * 1024)
    app.extensions["edge_t2t_index"] = ix
    app.extensions["edge_t2t_answers"] = answers
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

    @app.errorhandler(PictureGone)
    def picture_gone(exc):
        return error(404, str(exc))

    if processes:
        from .serve_pool import ProcessGone

        @app.errorhandler(ProcessGone)
        def process_gone(exc):
            resp, status = error(503, str(exc))
            resp.headers["Retry-After"] = "1"
            return resp, status

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

    def id_arg(name: str = "id") -> int:
        return _int(request.args, name, lo=1, hi=2**62)

    @app.get("/api/search")
    def api_search():
        p = search_params(request.args)
        t0 = time.perf_counter()
        resp = flask.jsonify(call("search", request.args.get("q", ""), p))
        # The search itself (open, embed, rank, rows), so a client can tell it from HTTP's share.
        resp.headers["Server-Timing"] = f"search;dur={(time.perf_counter() - t0) * 1000:.2f}"
        return resp

    @app.get("/api/similar")
    def api_similar():
        like = id_arg()
        return flask.jsonify(call("similar", like, search_params(request.args)))

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
        return flask.jsonify(call("example", variants, k))

    @app.get("/api/image")
    def api_image():
        return flask.jsonify(call("image", id_arg()))

    @app.get("/api/info")
    def api_info():
        from .cli.info import gather

        return flask.jsonify(gather(ix.dir))

    def export(kind: str, mimetype: str):
        p = search_params(request.args)
        like = id_arg("like") if request.args.get("like") else None
        title, body = call("export", kind, p, request.args.get("q", ""), like)
        return flask.Response(body, mimetype=mimetype,
                              headers={"Content-Disposition": f'attachment; filename="edge-t2t-{title}.{kind}"'})

    app.add_url_rule("/api/export.csv", "export_csv", lambda: export("csv", "text/csv"))
    app.add_url_rule("/api/export.geojson", "export_geojson", lambda: export("geojson", "application/geo+json"))

    def picture_response(data: bytes):
        return flask.Response(data, mimetype="image/jpeg", headers={"Cache-Control": "private, max-age=3600"})

    @app.get("/thumb/<int:image_id>")
    def thumb(image_id: int):
        return picture_response(call("thumbnail", image_id))

    @app.get("/image/<int:image_id>")
    def full(image_id: int):
        return picture_response(call("picture", image_id))

    @app.get("/image/<int:image_id>/scene")
    def scene(image_id: int):
        return picture_response(call("picture", image_id, True))

    return app


def close_app(app) -> None:
    """Close what create_app opened: the search processes, or this process's readers."""
    app.extensions["edge_t2t_answers"].close()
    app.extensions["edge_t2t_index"].close()


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
        close_app(app)
