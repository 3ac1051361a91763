"""`edge-t2t serve` for a team (issue 26): the access token on every endpoint, the slow-down of
wrong tokens (an injected clock), cross-site POSTs refused, the audit log (grepped for the token),
HTTPS with a self-signed pair made by openssl here, and requests answered side by side while an
upload is held mid-description (an event, not a sleep).

The demo's index and the browser come from tests/test_serve.py's fixtures.
"""

from __future__ import annotations

import http.client
import io
import json
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import quote

import pytest
from test_serve import _cards, _live, _wait, browser, demo  # noqa: F401  (fixtures used by name)

from edge_t2t import serve as web
from edge_t2t import serve_access as access
from edge_t2t.cli import main
from edge_t2t.errors import InputError

TOKEN = "team-token-" + "x7Qp2" * 6  # 41 cookie-safe characters
WRONG = "team-token-" + "x7Qp3" * 6
HTML_PAGE = "text/html"


class Clock:
    """An injected clock: the slow-down is decided by this, never by waiting."""

    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="module")
def plain(demo):  # noqa: F811
    """The ungated app: what a request with the right token must get, byte for byte."""
    app = web.create_app(demo["index"], embedder=demo["embedder"])
    yield app
    web.close_app(app)


def _gated(demo, clock=None):  # noqa: F811
    gate = access.Gate(TOKEN, clock=clock or Clock())
    return web.create_app(demo["index"], embedder=demo["embedder"], gate=gate)


@pytest.fixture(scope="module")
def gated(demo):  # noqa: F811
    app = _gated(demo)
    yield app
    web.close_app(app)


def _upload_body(demo) -> dict:  # noqa: F811
    """An indexed image as a search-by-example upload (its stored descriptions: no VLM)."""
    return {"image": (io.BytesIO((demo["images"] / demo["expected"]).read_bytes()), "q.png"), "k": "3"}


def _requests(demo) -> dict[str, tuple[str, str, dict]]:  # noqa: F811
    """One request for every route of the app: rule -> (method, url, extra keyword arguments)."""
    q = quote(demo["query"])
    return {
        "/": ("GET", "/", {}),
        "/app.js": ("GET", "/app.js", {}),
        "/app.css": ("GET", "/app.css", {}),
        "/api/search": ("GET", f"/api/search?q={q}&k=5", {}),
        "/api/similar": ("GET", "/api/similar?id=3&k=5", {}),
        "/api/search-by-image": ("POST", "/api/search-by-image", {"data": lambda: _upload_body(demo),
                                                                  "content_type": "multipart/form-data"}),
        "/api/image": ("GET", "/api/image?id=3", {}),
        "/api/info": ("GET", "/api/info", {}),
        "/api/export.csv": ("GET", f"/api/export.csv?q={q}&k=5", {}),
        "/api/export.geojson": ("GET", f"/api/export.geojson?q={q}&k=5", {}),
        "/thumb/<int:image_id>": ("GET", "/thumb/3", {}),
        "/image/<int:image_id>": ("GET", "/image/3", {}),
        "/image/<int:image_id>/scene": ("GET", "/image/3/scene", {}),
        "/docs": ("GET", "/docs", {}),
        "/docs/": ("GET", "/docs/", {}),
        "/docs/<path:name>": ("GET", "/docs/search", {}),
        "/no-such-endpoint": ("GET", "/no-such-endpoint", {}),
    }


def _send(client, method: str, url: str, extra: dict, headers: dict | None = None, addr: str = "10.0.0.7"):
    kw = {k: (v() if callable(v) else v) for k, v in extra.items()}
    return client.open(url, method=method, headers=headers or {}, environ_base={"REMOTE_ADDR": addr}, **kw)


# -- the token -------------------------------------------------------------------------------------
def test_every_endpoint_needs_the_token(gated, plain, demo):  # noqa: F811
    """No token and a wrong one: 401 (JSON; the page: the sign-in page). The right one: exactly
    what the open app answers."""
    reqs = _requests(demo)
    routes = {r.rule for r in gated.url_map.iter_rules()} - {"/login", "/login.js"}  # public: signing in
    assert routes == set(reqs) - {"/no-such-endpoint"}, "a route without a case here"
    c, open_c = gated.test_client(), plain.test_client()
    for rule, (method, url, extra) in reqs.items():
        for headers, message in (({}, "needs an access token"), ({"Authorization": f"Bearer {WRONG}"},
                                                                 "wrong access token")):
            r = _send(c, method, url, extra, headers)
            assert r.status_code == 401 and r.headers["WWW-Authenticate"].startswith("Bearer"), (rule, r.status_code)
            if rule == "/":  # a browser opening the page gets the sign-in page, and nothing of the app
                assert r.mimetype == HTML_PAGE and b'id="login-form"' in r.data and b"/app.js" not in r.data
            else:
                assert r.mimetype == "application/json" and message in r.get_json()["error"], rule
        r = _send(c, method, url, extra, {"Authorization": f"Bearer {TOKEN}"})
        want = _send(open_c, method, url, extra)
        assert (r.status_code, r.data) == (want.status_code, want.data), rule
        expected = {"/image/<int:image_id>/scene": 404, "/no-such-endpoint": 404, "/docs": 302}.get(rule, 200)
        assert r.status_code == expected, rule


def test_sign_in_sets_a_strict_httponly_cookie(gated, demo):  # noqa: F811
    c = gated.test_client()
    same = {"Origin": "http://localhost"}
    r = c.post("/login", data={"token": WRONG}, headers=same)
    assert r.status_code == 401 and r.get_json()["error"] == "wrong access token" and not r.headers.get("Set-Cookie")
    r = c.post("/login", data={"token": TOKEN}, headers=same)
    assert r.status_code == 200 and r.get_json() == {"ok": True}
    cookie = r.headers["Set-Cookie"]
    attrs = {a.strip().split("=")[0].lower() for a in cookie.split(";")[1:]}
    assert cookie.startswith(f"{access.COOKIE}={TOKEN};") and {"httponly", "samesite", "path"} <= attrs
    assert "SameSite=Strict" in cookie and "secure" not in attrs  # Secure only under HTTPS (tested below)
    page = c.get("/")
    assert page.status_code == 200 and b'<script src="/app.js"' in page.data
    assert c.get(f"/api/search?q={quote(demo['query'])}&k=1").status_code == 200
    # A stale cookie (a restart with a new token): the sign-in page again, and the cookie dropped.
    c.set_cookie(access.COOKIE, WRONG)
    r = c.get("/")
    assert r.status_code == 401 and b'id="login-form"' in r.data
    assert r.headers["Set-Cookie"].startswith(f"{access.COOKIE}=;") and "Max-Age=0" in r.headers["Set-Cookie"]
    assert c.get_cookie(access.COOKIE) is None
    assert c.get("/login.js").status_code == 200  # what the sign-in page needs, without a token


def test_repeated_wrong_tokens_from_one_address_are_slowed_down(demo):  # noqa: F811
    clock = Clock()
    app = _gated(demo, clock)
    c = app.test_client()
    try:
        def get(token, addr="10.9.9.9"):
            return c.get("/api/info", headers={"Authorization": f"Bearer {token}"}, environ_base={"REMOTE_ADDR": addr})

        for i in range(access.FREE_FAILURES):
            assert get(f"wrong-{i:020d}").status_code == 401
            assert get(f"wrong-{i:020d}").status_code == 401  # the same wrong token again counts once
        assert get(TOKEN).status_code == 200  # five distinct misses: not slowed yet; the right one clears them
        waits = []
        for i in range(access.FREE_FAILURES + 9):
            r = get(f"again-{i:020d}")
            if r.status_code == 429:  # slowed: nothing is looked at, the right token neither
                waits.append(int(r.headers["Retry-After"]))
                assert get(TOKEN).status_code == 429 and "too many wrong tokens" in r.get_json()["error"]
                assert get(TOKEN, addr="10.9.9.10").status_code == 200  # another address is not slowed
                clock.now += waits[-1]
                r = get(f"again-{i:020d}")
            assert r.status_code == 401
        # the 6th distinct miss makes the address wait 1 s, each further one twice as long, up to 60 s
        assert waits == [1, 2, 4, 8, 16, 32, 60, 60]
        clock.now += 60
        assert get(TOKEN).status_code == 200
        assert get("after-clear-0000000000").status_code == 401  # cleared: free misses again
    finally:
        web.close_app(app)


def test_cross_site_posts_are_refused(gated, plain, demo):  # noqa: F811
    evil, same = "http://evil.example", "http://localhost"
    for app, auth in ((gated, {"Authorization": f"Bearer {TOKEN}"}), (plain, {})):
        c = app.test_client()
        for headers in ({"Origin": evil}, {"Origin": "null"}, {"Referer": f"{evil}/page"},
                        {"Origin": "http://localhost:9999"}, {"Origin": "https://localhost"}):
            r = c.post("/api/search-by-image", data=_upload_body(demo), headers={**auth, **headers})
            assert r.status_code == 403 and "cross-site" in r.get_json()["error"], headers
        for headers in ({"Origin": same}, {"Referer": f"{same}/?q=x"}, {}):  # no origin: a script
            r = c.post("/api/search-by-image", data=_upload_body(demo), headers={**auth, **headers})
            assert r.status_code == 200 and Path(r.get_json()["hits"][0]["image"]).name == demo["expected"], headers
    c = gated.test_client()
    assert c.post("/login", data={"token": TOKEN}, headers={"Origin": evil}).status_code == 403  # no forced sign-in
    assert c.post("/login", data={"token": TOKEN}, headers={"Origin": same}).status_code == 200
    # signed in by cookie: a POST that names no origin is not a browser's own page
    assert c.post("/api/search-by-image", data=_upload_body(demo)).status_code == 403
    assert c.post("/api/search-by-image", data=_upload_body(demo), headers={"Origin": same}).status_code == 200


def test_token_compare_and_token_files(tmp_path):
    gate = access.Gate(TOKEN)
    assert gate.matches(TOKEN) and not gate.matches(WRONG) and not gate.matches(TOKEN[:-1]) and not gate.matches("")
    f = tmp_path / "token"
    f.write_text(f"  {TOKEN}\n")
    assert access.read_token_file(f) == TOKEN
    for content, why in (("", "holds 0 characters"), ("short", "holds 5 characters"),
                         (f"{TOKEN} {TOKEN}", "one token on one line"), (f"{TOKEN}\n{TOKEN}", "one token on one line"),
                         (f'{TOKEN}"', "one token on one line")):
        f.write_text(content)
        with pytest.raises(InputError, match=why):
            access.read_token_file(f)
    with pytest.raises(InputError, match="openssl rand"):
        access.read_token_file(tmp_path / "missing")
    made = {access.new_token() for _ in range(3)}
    assert len(made) == 3 and all(access.TOKEN_CHARS.fullmatch(t) and len(t) >= 43 for t in made)


# -- the command line --------------------------------------------------------------------------------
def _served(monkeypatch):
    """Replace web.serve: keep the app and the options, call `ready` as a listening server does."""
    seen = []

    def fake(app, host, port, threads=4, tls=None, ready=None):
        seen.append({"app": app, "host": host, "port": port, "threads": threads, "tls": tls})
        if ready is not None:
            ready()

    monkeypatch.setattr(web, "serve", fake)
    return seen


def test_off_loopback_a_token_is_made_and_printed_once(demo, monkeypatch, capsys):  # noqa: F811
    seen = _served(monkeypatch)
    capsys.readouterr()
    assert main(["serve", "--index", str(demo["index"]), "--host", "0.0.0.0", "--port", "9998", "--threads", "2"]) == 0
    out, err = capsys.readouterr()
    urls = re.findall(r"http://0\.0\.0\.0:9998/#token=(\S+)", out)
    assert len(urls) == 1 and out.count(urls[0]) == 1 and urls[0] not in err
    app = seen[-1]["app"]
    assert seen[-1]["threads"] == 2 and seen[-1]["tls"] is None
    try:
        c = app.test_client()
        assert c.get("/api/info").status_code == 401
        assert c.get("/api/info", headers={"Authorization": f"Bearer {urls[0]}"}).status_code == 200
    finally:
        web.close_app(app)
    assert "WARNING: plain HTTP" in err  # the token would cross the network in clear


def test_on_loopback_nothing_changes_unless_a_token_file_is_given(demo, monkeypatch, capsys, tmp_path):  # noqa: F811
    seen = _served(monkeypatch)
    assert main(["serve", "--index", str(demo["index"])]) == 0
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    assert main(["serve", "--index", str(demo["index"]), "--token-file", str(token_file)]) == 0
    out, err = capsys.readouterr()
    assert TOKEN not in out + err and "#token=" not in out and "WARNING" not in err
    open_app, gated_app = seen[0]["app"], seen[1]["app"]
    try:
        assert open_app.test_client().get("/api/info").status_code == 200
        assert gated_app.test_client().get("/api/info").status_code == 401
        assert gated_app.test_client().get("/api/info", headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200
    finally:
        web.close_app(open_app)
        web.close_app(gated_app)


@pytest.mark.parametrize("argv,why", [
    (["--token-file", "{empty}"], "holds 0 characters"),
    (["--token-file", "{missing}"], "cannot read --token-file"),
    (["--cert", "{empty}"], "--cert and --key go together"),
    (["--cert", "{missing}", "--key", "{empty}"], "does not exist"),
    (["--cert", "{empty}", "--key", "{empty}"], "cannot use --cert"),
    (["--audit-log", "{dir}"], "cannot write --audit-log"),
    (["--threads", "0"], "--threads must be at least 1"),
])
def test_refuses_to_start_with_one_line(demo, monkeypatch, capsys, tmp_path, argv, why):  # noqa: F811
    monkeypatch.setattr(web, "serve", lambda *a, **k: pytest.fail("must not serve"))
    (tmp_path / "empty").write_text("")
    paths = {"empty": tmp_path / "empty", "missing": tmp_path / "missing", "dir": tmp_path}
    args = [a.format(**paths) for a in argv]
    assert main(["serve", "--index", str(demo["index"]), "--host", "0.0.0.0", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and why in err, err


# -- the audit log, from a real server process ------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _request(port: int, method: str, path: str, headers: dict | None = None, body: bytes | None = None,
             tls: ssl.SSLContext | None = None, timeout: float = 120):  # fmt: skip
    conn = (http.client.HTTPSConnection("127.0.0.1", port, context=tls, timeout=timeout) if tls
            else http.client.HTTPConnection("127.0.0.1", port, timeout=timeout))  # fmt: skip
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, dict(resp.getheaders()), resp.read()
    finally:
        conn.close()


def test_audit_log_has_one_line_per_request_and_never_the_token(demo, tmp_path):  # noqa: F811
    token_file, log = tmp_path / "token", tmp_path / "audit.log"
    token_file.write_text(TOKEN + "\n")
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "edge_t2t", "serve", "--index", str(demo["index"]), "--port",
                             str(port), "--token-file", str(token_file), "--audit-log", str(log)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})  # fmt: skip
    try:
        for line in proc.stderr:  # printed once the server listens
            if "serving" in line:
                break
        assert proc.poll() is None, proc.stderr.read()
        q = quote(demo["query"])
        bearer = {"Authorization": f"Bearer {TOKEN}"}
        form = f"token={quote(TOKEN)}".encode()
        sent = [  # (method, path, headers, body, expected status)
            ("GET", f"/api/search?q={q}&k=3", bearer, None, 200),
            ("GET", f"/api/search?q={q}&token={TOKEN}", {}, None, 401),  # a token in a query is not read, nor logged
            ("GET", "/api/info", {"Authorization": f"Bearer {WRONG}"}, None, 401),
            ("POST", "/login", {"Origin": f"http://127.0.0.1:{port}",
                                "Content-Type": "application/x-www-form-urlencoded"}, form, 200),
            ("GET", "/api/info", {"Cookie": f"{access.COOKIE}={TOKEN}"}, None, 200),
            ("GET", "/thumb/3", bearer, None, 200),
            ("GET", "/api/search%0A2099-01-01T00:00:00%2010.0.0.1%20GET%20/forged%20200%201.0ms", bearer, None, 404),
            ("GET", "/", {}, None, 401),
        ]
        for method, path, headers, body, status in sent:
            got = _request(port, method, path, headers, body)
            assert got[0] == status, (path, got[0], got[2][:200])
        proc.send_signal(signal.SIGINT)
        assert proc.wait(60) == 130
        stdout, stderr = proc.stdout.read(), proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
    text = log.read_text()
    lines = text.splitlines()
    pattern = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}[+-]\d\d:\d\d 127\.0\.0\.1 (GET|POST) (/\S*) (\d{3}) "
                         r"\d+\.\dms")  # fmt: skip
    parsed = [pattern.fullmatch(line) for line in lines]
    assert all(parsed), lines
    assert [(m[1], m[3]) for m in parsed] == [(m, str(s)) for m, _, _, _, s in sent]
    assert [m[2] for m in parsed][:3] == ["/api/search", "/api/search", "/api/info"]  # never the query
    assert "%0A" in parsed[6][2] and "/forged" in parsed[6][2]  # one line: the newline stays encoded
    for secret in (TOKEN, quote(TOKEN), WRONG):
        assert secret not in text and secret not in stdout + stderr


# -- HTTPS ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cert_pair(tmp_path_factory):
    """A self-signed certificate for 127.0.0.1, made offline by openssl, as the README says."""
    if shutil.which("openssl") is None:
        pytest.fail("openssl is needed to make the test certificate (apt-get install openssl)")
    d = tmp_path_factory.mktemp("tls")
    cert, key = d / "cert.pem", d / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-keyout", str(key),
                    "-out", str(cert), "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True)  # fmt: skip
    return cert, key


def test_https_with_a_self_signed_pair(gated, plain, demo, cert_pair, tmp_path):  # noqa: F811
    cert, key = cert_pair
    server = web.HTTPServer(gated, "127.0.0.1", 0, threads=2, tls=web.tls_adapter(cert, key))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    trust = ssl.create_default_context(cafile=str(cert))  # verifies the chain and the address
    try:
        path = f"/api/search?q={quote(demo['query'])}&k=5"
        status, _, body = _request(server.port, "GET", path, {"Authorization": f"Bearer {TOKEN}"}, tls=trust)
        assert status == 200 and body == plain.test_client().get(path).data
        assert _request(server.port, "GET", path, tls=trust)[0] == 401
        origin = f"https://127.0.0.1:{server.port}"
        status, headers, _ = _request(server.port, "POST", "/login", {"Origin": origin, "Content-Type":
                                      "application/x-www-form-urlencoded"}, f"token={quote(TOKEN)}".encode(), tls=trust)
        assert status == 200 and "Secure" in headers["Set-Cookie"] and "HttpOnly" in headers["Set-Cookie"]
        with pytest.raises(ssl.SSLCertVerificationError):  # another certificate is not this server
            _request(server.port, "GET", path, tls=ssl.create_default_context())
    finally:
        server.close()
        thread.join(30)
    assert not thread.is_alive()
    other = tmp_path / "other.pem"
    other.write_text(key.read_text())
    with pytest.raises(InputError, match="cannot use --cert"):
        web.tls_adapter(other, key)  # a key where the certificate should be


# -- side by side -----------------------------------------------------------------------------------------
def test_searches_are_answered_while_an_upload_is_being_described(plain, demo, monkeypatch):  # noqa: F811
    """The upload is held inside describe_upload (an event) while searches go through the same
    server; each search answers as it does alone. Before issue 26 one thread served every request,
    so these searches waited for the upload."""
    entered, release = threading.Event(), threading.Event()
    real = web.describe_upload

    def held(index, path):
        entered.set()
        assert release.wait(120), "never released"
        return real(index, path)

    monkeypatch.setattr(web, "describe_upload", held)
    url, server = _live(plain)
    port = int(url.rsplit(":", 1)[1])
    q = quote(demo["query"])
    want = plain.test_client().get(f"/api/search?q={q}&k=5").get_json()
    boundary = "edge-t2t-test-boundary"
    image = (demo["images"] / demo["expected"]).read_bytes()
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"k\"\r\n\r\n3\r\n--{boundary}\r\n"
            f"Content-Disposition: form-data; name=\"image\"; filename=\"q.png\"\r\nContent-Type: image/png\r\n\r\n"
            ).encode() + image + f"\r\n--{boundary}--\r\n".encode()  # fmt: skip
    pool = ThreadPoolExecutor(max_workers=4)
    try:
        upload = pool.submit(_request, port, "POST", "/api/search-by-image",
                             {"Content-Type": f"multipart/form-data; boundary={boundary}"}, body)  # fmt: skip
        assert entered.wait(60), "the upload never reached its description"
        searches = [pool.submit(_request, port, "GET", f"/api/search?q={q}&k=5", timeout=60) for _ in range(6)]
        for f in searches:
            status, _, data = f.result(timeout=90)
            assert status == 200 and json.loads(data) == want
        assert not upload.done()  # every search answered while the upload was still held
        release.set()
        status, _, data = upload.result(timeout=120)
        assert status == 200 and Path(json.loads(data)["hits"][0]["image"]).name == demo["expected"]
    finally:
        release.set()
        pool.shutdown(wait=True)
        server.close()


def test_concurrent_readers_answer_as_one(plain, demo, monkeypatch):  # noqa: F811
    """Four clients at once on a four-thread server: every answer equals the sequential one, and
    each thread reads through a reader of its own. The first two requests meet at a barrier inside
    reader(), which only two requests in flight at once can pass."""
    url, server = _live(plain)
    port = int(url.rsplit(":", 1)[1])
    paths = [f"/api/search?q={quote(w)}&k=7" for w in ("a lake", "a runway", "a river", "farmland", demo["query"])]
    paths += [f"/api/similar?id={i}&k=4" for i in (1, 5, 9)] + ["/api/image?id=2"]
    c = plain.test_client()
    want = {p: c.get(p).data for p in paths}
    readers, calls, lock = set(), [], threading.Lock()
    meet = threading.Barrier(2)
    real = web.Index.reader

    def spy(self):
        r = real(self)
        with lock:
            readers.add((threading.get_ident(), id(r)))
            calls.append(1)
            first_two = len(calls) <= 2
        if first_two:
            meet.wait(60)  # BrokenBarrierError if the second request cannot run beside the first
        return r

    monkeypatch.setattr(web.Index, "reader", spy)
    try:
        with ThreadPoolExecutor(max_workers=4) as pool:
            got = list(pool.map(lambda p: (p, _request(port, "GET", p)), paths * 6))
    finally:
        server.close()
    assert all(status == 200 and data == want[p] for p, (status, _, data) in got)
    threads = {t for t, _ in readers}
    assert len(threads) >= 2 and len(readers) == len(threads) == len({r for _, r in readers})  # one reader each


def test_thumbnail_writes_from_two_threads_never_mix(tmp_path, monkeypatch):
    """Thread A is held between writing its temp file and replacing the target while thread B
    writes the same path whole; both writes land and the file is A's, whole. (With one temp name
    per process, B wrote into A's temp file and A's replace then failed.)"""
    from edge_t2t import fileio

    target = tmp_path / "thumb.jpg"
    a_written, b_done = threading.Event(), threading.Event()
    real_fsync = os.fsync

    def fsync(fd):
        real_fsync(fd)
        if threading.current_thread().name == "writer-a":
            a_written.set()
            assert b_done.wait(60)

    monkeypatch.setattr(fileio.os, "fsync", fsync)
    errors = []

    def write(data, done=None):
        try:
            fileio.atomic_write_bytes(target, data)
        except Exception as exc:  # the test's verdict: no write may fail
            errors.append(exc)
        if done is not None:
            done.set()

    a = threading.Thread(target=write, args=(b"A" * 50_000,), name="writer-a")
    a.start()
    assert a_written.wait(60)
    b = threading.Thread(target=write, args=(b"B" * 70_000, b_done), name="writer-b")
    b.start()
    b.join(60)
    a.join(60)
    assert not errors and target.read_bytes() == b"A" * 50_000
    assert sorted(p.name for p in tmp_path.iterdir()) == ["thumb.jpg"]


# -- the page ------------------------------------------------------------------------------------------
def test_page_signs_in_with_the_token(browser, gated, demo):  # noqa: F811
    from selenium.webdriver.common.by import By

    url, server = _live(gated)
    d = browser
    try:
        d.delete_all_cookies()
        d.get(url + "/")
        _wait(d, lambda d: d.find_element(By.ID, "login-form"), what="the sign-in page")
        d.find_element(By.ID, "token").send_keys(WRONG)
        d.find_element(By.ID, "sign-in").click()
        _wait(d, lambda d: "wrong access token" in d.find_element(By.ID, "login-message").text, what="the refusal")
        d.find_element(By.ID, "token").clear()
        d.find_element(By.ID, "token").send_keys(TOKEN)
        d.find_element(By.ID, "sign-in").click()
        _wait(d, lambda d: d.find_element(By.ID, "search-form"), what="the search page")
        assert d.execute_script("return document.cookie") == ""  # HttpOnly: the page's script cannot read it
        d.find_element(By.ID, "q").send_keys(demo["query"])
        d.find_element(By.ID, "go").click()
        _wait(d, lambda d: _cards(d), what="results")
        assert Path(_cards(d)[0].get_attribute("data-image")).name == demo["expected"]
        _wait(d, lambda d: d.execute_script(
            "return [...document.querySelectorAll('#results img')].every(i => i.complete && i.naturalWidth > 0)"),
            what="thumbnails, with the cookie")  # fmt: skip
        # the URL serve prints for a made token signs a fresh browser in by itself, and leaves no token behind
        d.delete_all_cookies()
        d.get(f"{url}/?q={quote(demo['query'])}&k=3#token={quote(TOKEN, safe='')}")
        _wait(d, lambda d: len(_cards(d)) == 3, what="bookmarked results after signing in")
        assert "token" not in d.current_url and d.current_url.endswith("k=3")
    finally:
        d.delete_all_cookies()
        server.close()
