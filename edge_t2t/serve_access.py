"""Who may use `edge-t2t serve`, and the record of who did (issue 26).

- **The access token.** Off loopback the server never runs open: it takes a token from
  `--token-file`, or makes one (`new_token`) and prints it once. Every request then carries it:
  scripts as `Authorization: Bearer TOKEN`, the page as a cookie (HttpOnly, SameSite=Strict, and
  Secure under HTTPS) that `POST /login` sets. Tokens are compared in constant time (of their
  sha256, so not even the length leaks). Wrong or missing: 401 with a JSON error; the page itself
  answers a browser with the sign-in page (web/login.html), still with 401.
- **Guessing is slowed down.** FREE_FAILURES distinct wrong tokens from one address cost it
  nothing; after the next one (the 6th), that address must wait 1 s, then 2, 4, ... up to
  MAX_WAIT_S before any token of it is looked at again (429 with Retry-After, no thread held).
  The same wrong token sent again (a stale cookie on a page's parallel requests) counts once.
  One right token clears the address.
- **No cross-site writes.** A POST whose Origin (or Referer) is not this server is refused (403),
  token or not; so is a POST that names no origin and signs in by cookie, since a browser always
  names one. Scripts (no Origin, a bearer header) are unaffected.
- **The audit trail.** `audited` wraps the WSGI app: one line per request, `TIME ADDRESS METHOD
  PATH STATUS MS`. The query string and the headers are never written, so neither is the token.

Nothing here knows the index; serve.py calls `protect` and `audited` on its app.
"""

from __future__ import annotations

import datetime
import hashlib
import hmac
import json
import re
import secrets
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from urllib.parse import quote, urlsplit

from .errors import InputError

COOKIE = "edge_t2t_token"
MIN_TOKEN_CHARS = 16
FREE_FAILURES = 5  # distinct wrong tokens an address may send freely; the wait starts after the next one
MAX_WAIT_S = 60.0
TRACKED_ADDRESSES = 4096  # addresses with failures remembered; the oldest is forgotten past this
SEEN_PER_ADDRESS = 64  # wrong tokens remembered per address (as truncated sha256), to count each once
# RFC 6265 cookie-octet: what a cookie value and a bearer header both carry unquoted.
TOKEN_CHARS = re.compile(r"[\x21\x23-\x2b\x2d-\x3a\x3c-\x5b\x5d-\x7e]+")
MAKE_TOKEN = "openssl rand -base64 32 > {path}"
PUBLIC = {("POST", "/login"), ("GET", "/login.js")}  # what a browser needs to sign in
SAFE_METHODS = {"GET", "HEAD", "OPTIONS"}


def new_token() -> str:
    """A fresh token: 256 random bits, URL- and cookie-safe."""
    return secrets.token_urlsafe(32)


def read_token_file(path: str | Path) -> str:
    """The token in `path`: one line of at least MIN_TOKEN_CHARS cookie-safe characters."""
    path = Path(path)
    make = MAKE_TOKEN.format(path=path)
    try:
        token = path.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise InputError(f"cannot read --token-file {path} ({exc.strerror or exc}): make one with: {make}") from None
    except UnicodeDecodeError:
        raise InputError(f"--token-file {path} is not text: make a token with: {make}") from None
    if len(token) < MIN_TOKEN_CHARS:
        raise InputError(f"--token-file {path} holds {len(token)} characters; a token needs at least "
                         f"{MIN_TOKEN_CHARS}: make one with: {make}")  # fmt: skip
    if not TOKEN_CHARS.fullmatch(token):
        raise InputError(f"--token-file {path} must hold one token on one line, of printable ASCII without "
                         f"spaces, quotes, commas, semicolons or backslashes: make one with: {make}")  # fmt: skip
    return token


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8", "surrogateescape")).digest()


@dataclass
class _Failures:
    count: int = 0
    until: float = 0.0  # the clock's time before which this address is not heard
    last: float = 0.0
    seen: list[bytes] = field(default_factory=list)


class Gate:
    """The one token, and the wrong ones each address has sent. `clock` is injectable (tests)."""

    def __init__(self, token: str, clock: Callable[[], float] = time.monotonic):
        self._digest = _digest(token)
        self._clock = clock
        self._failures: dict[str, _Failures] = {}
        self._lock = threading.Lock()

    def matches(self, presented: str) -> bool:
        return hmac.compare_digest(_digest(presented), self._digest)

    def wait_s(self, address: str) -> float:
        """Seconds `address` must still wait before a token of it is looked at (0: none)."""
        with self._lock:
            f = self._failures.get(address)
            return max(0.0, f.until - self._clock()) if f is not None else 0.0

    def failed(self, address: str, presented: str) -> None:
        key = _digest(presented)[:16]
        now = self._clock()
        with self._lock:
            f = self._failures.get(address)
            if f is None:
                if len(self._failures) >= TRACKED_ADDRESSES:
                    del self._failures[min(self._failures, key=lambda a: self._failures[a].last)]
                f = self._failures[address] = _Failures()
            f.last = now
            if key in f.seen:
                return
            f.seen = [*f.seen[-(SEEN_PER_ADDRESS - 1):], key]
            f.count += 1
            if f.count > FREE_FAILURES:
                f.until = now + min(MAX_WAIT_S, 2.0 ** (f.count - FREE_FAILURES - 1))

    def passed(self, address: str) -> None:
        with self._lock:
            self._failures.pop(address, None)


def request_origin(headers) -> str | None:
    """The origin a request says it comes from (Origin, else Referer's), lower-cased; "null" for an
    opaque origin; None when it names none."""
    origin = headers.get("Origin")
    if origin:
        return origin.strip().lower()
    referer = headers.get("Referer")
    if referer:
        parts = urlsplit(referer)
        return f"{parts.scheme}://{parts.netloc}".lower() if parts.scheme and parts.netloc else "null"
    return None


def same_origin(origin: str | None, scheme: str, host: str) -> bool | None:
    """Whether `origin` is this server as the request reached it (scheme and Host); None: unknown."""
    if origin is None:
        return None
    return origin == f"{scheme}://{host}".lower()


def protect(app, gate: Gate | None) -> None:
    """Refuse cross-site POSTs, and, with a gate, every request without the token (see the module
    docstring). Registers a before_request hook and the sign-in routes on the Flask `app`."""
    import flask

    request = flask.request

    def refuse(status: int, message: str, headers: dict | None = None):
        return flask.Response(json.dumps({"error": message}), status=status, mimetype="application/json",
                              headers=headers or {})  # fmt: skip

    challenge = {"WWW-Authenticate": 'Bearer realm="edge-t2t"'}  # RFC 6750; browsers show no dialog for it

    def bearer() -> str | None:
        kind, _, value = request.headers.get("Authorization", "").partition(" ")
        return value.strip() if kind.lower() == "bearer" and value.strip() else None

    def too_many(address: str):
        wait = gate.wait_s(address)
        if wait <= 0:
            return None
        return refuse(429, f"too many wrong tokens from {address}: wait {wait:.0f} s",
                      {"Retry-After": str(max(1, round(wait)))})  # fmt: skip

    def unauthorized(message: str):
        """401: JSON, except that a browser opening the page gets the sign-in page."""
        if request.path == "/" and request.method in ("GET", "HEAD"):
            page = resources.files("edge_t2t.web").joinpath("login.html").read_bytes()
            return flask.Response(page, status=401, mimetype="text/html", headers={"Cache-Control": "no-store", **challenge})
        return refuse(401, message, challenge)

    def wrong(address: str, presented: str, by_cookie: bool):
        gate.failed(address, presented)
        resp = unauthorized("wrong access token")
        if by_cookie:  # a stale cookie (the server restarted with a new token): drop it
            resp.delete_cookie(COOKIE, path="/", httponly=True, samesite="Strict", secure=request.is_secure)
        return resp

    @app.before_request
    def check():
        token, cookie = bearer(), request.cookies.get(COOKIE)
        if request.method not in SAFE_METHODS:
            verdict = same_origin(request_origin(request.headers), request.scheme, request.host)
            # A browser names the origin of every POST; one that names none and signs in by cookie is not a browser's.
            if verdict is False or (verdict is None and token is None and cookie and gate is not None):
                return refuse(403, "cross-site request refused: POST only from this server's own page, "
                                   "or from a script with an Authorization: Bearer header")  # fmt: skip
        if gate is None or (request.method, request.path) in PUBLIC:
            return None
        presented = token if token is not None else cookie
        if not presented:
            return unauthorized("this server needs an access token: send 'Authorization: Bearer TOKEN', "
                                "or sign in on its page")  # fmt: skip
        address = request.remote_addr or "-"
        if (resp := too_many(address)) is not None:
            return resp
        if not gate.matches(presented):
            return wrong(address, presented, by_cookie=token is None)
        gate.passed(address)
        return None

    if gate is None:
        return

    @app.post("/login")
    def login():
        address = request.remote_addr or "-"
        if (resp := too_many(address)) is not None:
            return resp
        presented = request.form.get("token", "").strip()
        if not presented:
            return refuse(401, "give the access token")
        if not gate.matches(presented):
            return wrong(address, presented, False)
        gate.passed(address)
        resp = flask.jsonify({"ok": True})
        # A session cookie: the page is signed in until the browser closes, or the token changes.
        resp.set_cookie(COOKIE, presented, path="/", httponly=True, samesite="Strict", secure=request.is_secure)
        return resp

    @app.get("/login.js")
    def login_js():
        body = resources.files("edge_t2t.web").joinpath("login.js").read_bytes()
        return flask.Response(body, mimetype="text/javascript", headers={"Cache-Control": "no-cache"})


# -- the audit trail -------------------------------------------------------------------------------
class AuditLog:
    """Lines appended to a file (or written to standard error), whole, one request at a time."""

    def __init__(self, path: str | Path | None = None):
        self.path = Path(path) if path else None
        try:
            self._fh = open(self.path, "a", encoding="utf-8") if self.path else sys.stderr  # noqa: SIM115
        except OSError as exc:
            raise InputError(f"cannot write --audit-log {path} ({exc.strerror or exc}): give a writable file") from None
        self._lock = threading.Lock()

    def __call__(self, line: str) -> None:
        with self._lock:
            self._fh.write(line + "\n")
            self._fh.flush()

    def close(self) -> None:
        if self.path is not None:
            self._fh.close()


def audit_line(when: float, address: str, method: str, path: str, status: str, ms: float) -> str:
    """`TIME ADDRESS METHOD PATH STATUS MS`: local time with its offset, the path without its query
    (a search's words stay out of the log, and a token never reaches it), percent-encoded so a
    request cannot write a line of its own."""
    stamp = datetime.datetime.fromtimestamp(when).astimezone().isoformat(timespec="milliseconds")
    shown = quote(path.encode("latin-1", "replace"), safe="/-._~!$&'()*+,=:@")[:200]
    return f"{stamp} {address} {quote(method, safe='')[:16]} {shown} {status} {ms:.1f}ms"


def audited(wsgi_app, write: Callable[[str], None]):
    """`wsgi_app` writing one audit line per request when its response starts (the app has built
    the body by then: the milliseconds are the app's, not the network's)."""

    def app(environ, start_response):
        t0 = time.perf_counter()
        wall = time.time()
        written = False

        def log(status: str) -> None:
            nonlocal written
            if not written:
                written = True
                write(audit_line(wall, environ.get("REMOTE_ADDR") or "-", environ.get("REQUEST_METHOD", "-"),
                                 environ.get("PATH_INFO", ""), status, (time.perf_counter() - t0) * 1000))  # fmt: skip

        def start(status, headers, exc_info=None):
            log(status.split(" ", 1)[0])
            return start_response(status, headers, exc_info)

        try:
            return wsgi_app(environ, start)
        except BaseException:
            log("500")
            raise

    return app
