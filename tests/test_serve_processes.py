"""`serve --processes N` (issue 26): the searches in N processes of their own, beside the server.

What is checked: the answers are the ones the server's own threads give (which test_serve checks
against the CLI and an independent max-cosine ranking), one held search does not hold up the
next, a process that dies costs its one request (503) and is replaced, start-up errors are one
line, and no search process outlives its server, whether it is stopped with Ctrl-C or killed.

Processes are driven to known points with signals: SIGSTOP holds one in the middle of whatever it
does, SIGKILL ends it. A request goes to the process holding the fewest, the first on a tie, so
with nothing in flight it goes to the first (serve_pool.SearchProcesses).
"""

from __future__ import annotations

import io
import json
import os
import select
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path
from urllib.parse import quote

import helpers_media as hm
import pytest
from test_serve import _max_cosine_ranking, demo  # noqa: F401  (a fixture used by name)

from edge_t2t.cli import main
from edge_t2t.errors import StoreError

hm.require("flask", "the web extra is not installed: pip install -e '.[web]' (make test installs it)")

from edge_t2t import serve as web  # noqa: E402


def _pool(app):
    return app.extensions["edge_t2t_answers"]


@pytest.fixture(scope="module")
def threads_app(demo):  # noqa: F811
    """The server's threads searching, with the embedder the search processes load (int8, one
    onnxruntime thread), so both compute the same floats."""
    app = web.create_app(demo["index"])
    yield app
    web.close_app(app)


@pytest.fixture(scope="module")
def processes_app(demo):  # noqa: F811
    app = web.create_app(demo["index"], processes=2)
    yield app
    web.close_app(app)


def _paths(demo) -> list[str]:  # noqa: F811
    q = quote(demo["query"])
    return [f"/api/search?q={q}&k=7", f"/api/search?q={q}&k=5&mode=hybrid&explain=1",
            f"/api/search?q={q}&mode=lexical", "/api/search?q=a+runway&k=5&min_score=0.3",
            "/api/similar?id=3&k=4", "/api/image?id=2", f"/api/export.csv?q={q}&k=5", "/api/export.geojson?like=4&k=3",
            "/thumb/5", "/image/6", "/image/6/scene",  # the last: not a chip, so 404
            "/api/search?q=&k=3", "/api/search?q=x&k=0", "/api/similar?id=999999", "/api/image?id=0", "/thumb/424242"]  # fmt: skip


def test_processes_answer_as_the_server_threads_do(threads_app, processes_app, demo):  # noqa: F811
    ours, theirs = threads_app.test_client(), processes_app.test_client()
    statuses = []
    for path in _paths(demo):
        a, b = ours.get(path), _answered(processes_app, path)
        assert (b.status_code, b.headers["Content-Type"], b.data) == (a.status_code, a.headers["Content-Type"], a.data), path
        statuses.append(b.status_code)
    assert statuses == [200] * 10 + [404, 400, 400, 404, 400, 404]
    # and the ranking is the one worked out here from the stored texts (as test_serve checks for threads)
    want = [p for p, _ in _max_cosine_ranking(demo["index"], "a runway", demo["embedder"])[:5]]
    assert [h["image"] for h in theirs.get("/api/search?q=a+runway&k=5").get_json()["hits"]] == want


def test_search_by_an_uploaded_indexed_image_goes_through_the_processes(threads_app, processes_app, demo):  # noqa: F811
    image = (demo["images"] / demo["expected"]).read_bytes()
    answers = []
    for app in (threads_app, processes_app):
        r = app.test_client().post("/api/search-by-image", data={"k": "4", "image": (io.BytesIO(image), "q.png")},
                                   content_type="multipart/form-data")  # fmt: skip
        assert r.status_code == 200, r.get_json()
        answers.append(r.get_json())
    assert answers[1] == answers[0] and Path(answers[1]["hits"][0]["image"]).name == demo["expected"]


def test_channel_carries_large_messages_whole_and_reports_the_end():
    """A message larger than a pipe's buffer (a full picture) arrives whole, in order; a closed
    writer is EOFError, not a hang."""
    from edge_t2t.serve_pool import Channel

    a_read, b_write = os.pipe()
    b_read, a_write = os.pipe()
    a, b = Channel(a_read, a_write), Channel(b_read, b_write)
    big = os.urandom(3 * 1024 * 1024)
    sender = threading.Thread(target=lambda: [b.send(m) for m in (("picture", big), {"k": 1}, None)], daemon=True)
    sender.start()
    assert a.recv() == ("picture", big) and a.recv() == {"k": 1} and a.recv() is None
    sender.join(hm.HANG_S)
    assert not a.poll(0)  # nothing more, and the writer still open
    b.close()
    assert a.poll(hm.HANG_S)  # the end can be read
    with pytest.raises(EOFError):
        a.recv()
    a.close()


def test_a_bug_in_a_process_comes_back_with_its_traceback_and_the_process_goes_on(processes_app, demo):  # noqa: F811
    pool = _pool(processes_app)
    before = pool.pids()
    with pytest.raises(RuntimeError, match="(?s)a search process failed on nope:.*no answer named 'nope'"):
        pool.call("nope")
    assert processes_app.test_client().get("/api/image?id=2").status_code == 200
    assert pool.pids() == before


def _in_thread(fn, *args):
    box: dict = {}

    def run():
        try:
            box["value"] = fn(*args)
        except BaseException as exc:  # the test reads it
            box["error"] = exc

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, box


def test_a_held_search_does_not_hold_up_the_next(demo):  # noqa: F811
    """Process A is stopped (SIGSTOP) before a request, which it takes (with nothing in flight A is
    first): that request waits inside A, while the next goes to B (A holds one, B none) and is
    answered."""
    app = web.create_app(demo["index"], processes=2)
    pool = _pool(app)
    try:
        a, b = pool.pids()
        q = quote(demo["query"])
        want = app.test_client().get(f"/api/search?q={q}&k=3").get_json()
        os.kill(a, signal.SIGSTOP)
        try:
            held, box = _in_thread(app.test_client().get, f"/api/search?q={q}&k=3")
            got = _answered(app, f"/api/search?q={q}&k=3")  # B's, while A is held
            assert got.status_code == 200 and got.get_json() == want
            assert held.is_alive() and not box  # still inside A
        finally:
            os.kill(a, signal.SIGCONT)
        held.join(hm.HANG_S)
        assert box["value"].get_json() == want
        assert sorted(pool.pids()) == sorted([a, b])
    finally:
        web.close_app(app)


def _answered(app, path: str):
    """The response to GET `path`, which must come within hm.HANG_S (a request left waiting fails
    the test instead of hanging it)."""
    t, box = _in_thread(app.test_client().get, path)
    t.join(hm.HANG_S)
    assert not t.is_alive(), f"{path} got no answer in {hm.HANG_S} s"
    if "error" in box:
        raise box["error"]
    return box["value"]


def _kill_and_ask(app, pid: int, path: str):
    os.kill(pid, signal.SIGKILL)
    lost = _answered(app, path)
    assert lost.status_code == 503 and lost.headers["Retry-After"] == "1"
    assert lost.get_json()["error"] == ("the search process answering this request ended (exit code -9); "
                                        "a new one is starting: send it again")  # fmt: skip


def test_a_process_that_dies_costs_its_request_and_is_replaced(demo):  # noqa: F811
    """Two processes: A is killed, the request it takes answers 503, and B answers the next one at
    once. One process: killed, its request 503, and the next request waits for its successor."""
    q = quote(demo["query"])
    path = f"/api/search?q={q}&k=3"
    app = web.create_app(demo["index"], processes=2)
    c = app.test_client()
    try:
        a, b = _pool(app).pids()
        want = c.get(path).get_json()
        _kill_and_ask(app, a, path)  # nothing in flight: A takes it
        assert _answered(app, path).get_json() == want  # B, while A's successor starts
        assert b in _pool(app).pids() and a not in _pool(app).pids()
    finally:
        web.close_app(app)
    assert c.get(path).status_code == 503  # closed: no process is left

    app = web.create_app(demo["index"], processes=1)
    try:
        (only,) = _pool(app).pids()
        _kill_and_ask(app, only, path)
        assert _answered(app, path).get_json() == want  # waited for the successor
        (successor,) = _pool(app).pids()
        assert successor != only
    finally:
        web.close_app(app)


def test_start_up_errors_are_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("EDGE_T2T_INDEX", str(tmp_path / "nowhere"))
    for processes in ("0", "2"):
        assert main(["serve", "--port", "1", "--processes", processes]) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and "nowhere" in err and "Traceback" not in err, err
    with pytest.raises(StoreError, match="nowhere"):
        web.create_app(tmp_path / "nowhere", processes=1)
    assert main(["serve", "--processes", "-1"]) == 2
    assert "--processes must be 0 or more, got -1" in capsys.readouterr().err


def _children(pid: int) -> list[int]:
    text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    return [int(p) for p in text.split()]


def _wait_exit(pids: list[int]) -> list[int]:
    """Waits (on pidfds: no polling) until each process in `pids` has ended; returns those still
    running after hm.HANG_S."""
    fds = {}
    for pid in pids:
        try:
            fds[os.pidfd_open(pid)] = pid
        except ProcessLookupError:
            pass  # already gone
    try:
        poller = select.poll()
        for fd in fds:
            poller.register(fd, select.POLLIN)
        left = dict(fds)
        while left:
            ready = poller.poll(hm.HANG_S * 1000)
            if not ready:
                break
            for fd, _ in ready:
                poller.unregister(fd)
                left.pop(fd)
        return sorted(left.values())
    finally:
        for fd in fds:
            os.close(fd)


def _start_serving(demo, *extra: str) -> tuple[subprocess.Popen, int]:  # noqa: F811
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "edge_t2t", "serve", "--index", str(demo["index"]), "--port",
                             str(port), *extra], stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})  # fmt: skip
    for line in proc.stderr:  # serve prints this line once it listens, after its processes are ready
        if "serving" in line:
            assert "(2 search processes;" in line, line
            return proc, port
    raise AssertionError(f"serve exited {proc.wait()} before listening")


@pytest.mark.parametrize("how", [signal.SIGINT, signal.SIGKILL], ids=["ctrl-c", "killed"])
def test_no_search_process_outlives_its_server(demo, how):  # noqa: F811
    proc, port = _start_serving(demo, "--processes", "2")
    try:
        children = _children(proc.pid)
        commands = [Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[1:3] for pid in children]
        assert commands == [[b"-m", b"edge_t2t.serve_pool"]] * 2
        with socket.create_connection(("127.0.0.1", port)) as s:
            s.sendall(f"GET /api/search?q={quote(demo['query'])}&k=1 HTTP/1.0\r\n\r\n".encode())
            reply = b"".join(iter(lambda: s.recv(65536), b""))
        head, body = reply.split(b"\r\n\r\n", 1)
        assert head.startswith(b"HTTP/1.0 200") and Path(json.loads(body)["hits"][0]["image"]).name == demo["expected"]
        proc.send_signal(how)
        assert proc.wait(hm.HANG_S) == (130 if how == signal.SIGINT else -signal.SIGKILL)
        assert _wait_exit(children) == []
        if how == signal.SIGINT:
            assert "stopped" in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stderr.close()
