"""Search processes for `edge-t2t serve --processes N`: the answers worked out beside the server.

Why processes: Python runs one thread of a process at a time (the GIL). The embedder, the vector
graph and SQLite let go of it while they work, but the query's parsing, the ranking, the rows and
the JSON hold it, so the searches of one process's threads partly wait for each other. Each
search process has an interpreter of its own. Measured figures: docs/performance.md (Serving a team).

- Each process opens the index itself (serve_answers.Index: the embedder, one reader, the vectors
  memory-mapped, so the page cache holds them once for every process) and answers its messages
  in order: (request id, name, args), run by Answers.call, the result or the error sent back.
- A request goes to the process with the fewest requests in hand (the first in the list on a
  tie), and each may hold DEPTH at once: one in work and the next already in its pipe, so a
  process never waits for the server to hand it work while requests are waiting. A request waits
  in the server only while every process holds DEPTH.
- One reader thread per process takes its answers and wakes the request's thread.
- All N start at once, each a fresh interpreter (`python -m edge_t2t.serve_pool`, not a fork: a
  fork of a server that already runs threads could inherit a held lock; nor multiprocessing's
  spawn, which runs the caller's main script again) in a process group of its own (a terminal's
  Ctrl-C reaches only the server). Each says it is ready or sends the error that stopped it,
  which the server reports as one line before it listens (a missing index, as without processes).
- A process that dies (killed, out of memory): the requests it held answer 503 (ProcessGone), a
  new process is started in the background, and the others go on answering.
- Ctrl-C: only the server hears it, and closes them; a server that is killed leaves each process
  a closed pipe, and it ends.

The HTTP side (the token, the audit log, an upload's description by the VLM) stays in the server
process: one gate, one log, and one VLM in memory, whatever N is.
"""

from __future__ import annotations

import itertools
import os
import pickle
import select
import signal
import struct
import subprocess
import sys
import threading
import traceback

from .errors import EdgeT2TError, StoreError
from .serve_answers import Answers, Index, NoSuchImage, PictureGone

DEPTH = 2  # requests a process holds at once: the one it works on and the next
START_S = 300.0  # a process not ready by then (loading the embedder on a busy machine takes seconds) failed
STOP_S = 10.0  # a process still running this long after it was asked to stop is terminated
USER_ERRORS = (EdgeT2TError, NoSuchImage, PictureGone)
BLAS_THREADS = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")


class ProcessGone(RuntimeError):
    """A search process ended while it held a request (503: the request may be sent again)."""


def default_processes() -> int:
    """One per core, up to 4: each holds its own embedder (two took 82 MiB more than the server's
    own threads, bench/results/serve_latency.md), and beyond a few the HTTP side is the limit."""
    return max(1, min(4, os.cpu_count() or 1))


class Channel:
    """Pickled messages over a pair of pipes (this package imports no network module, so not
    multiprocessing.connection's sockets): each message is its length (8 bytes) and its pickle.
    One thread sends at a time, one receives."""

    HEADER = struct.Struct("!Q")

    def __init__(self, read_fd: int, write_fd: int):
        self.read_fd, self.write_fd = read_fd, write_fd

    def send(self, obj) -> None:
        data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
        view = memoryview(self.HEADER.pack(len(data)) + data)
        while view:
            view = view[os.write(self.write_fd, view):]

    def _exactly(self, n: int) -> bytes:
        parts = []
        while n:
            part = os.read(self.read_fd, min(n, 1 << 20))
            if not part:
                raise EOFError("the other end closed its pipe")
            parts.append(part)
            n -= len(part)
        return b"".join(parts)

    def recv(self):
        (n,) = self.HEADER.unpack(self._exactly(self.HEADER.size))
        return pickle.loads(self._exactly(n))

    def poll(self, timeout: float) -> bool:
        """Whether a message (or the end) can be read within `timeout` seconds."""
        poller = select.poll()  # not select.select: a busy server's descriptors may pass its 1024
        poller.register(self.read_fd, select.POLLIN)
        return bool(poller.poll(timeout * 1000))

    def close(self) -> None:
        for fd in (self.read_fd, self.write_fd):
            try:
                os.close(fd)
            except OSError:
                pass


def _search_process(conn: Channel, index_dir: str, precision: str) -> None:
    """A search process's life: open the index, say ready, answer messages until None or a closed pipe."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the server's: it closes this process
    try:
        answers = Answers(Index(index_dir, precision=precision))
    except BaseException as exc:
        conn.send(("failed", exc if isinstance(exc, EdgeT2TError) else StoreError(f"{type(exc).__name__}: {exc}")))
        return
    conn.send(("ready", os.getpid()))
    try:
        while True:
            try:
                message = conn.recv()
            except (EOFError, OSError):  # the server is gone
                return
            if message is None:
                return
            rid, name, args = message
            try:
                reply = (rid, "ok", answers.call(name, *args))
            except USER_ERRORS as exc:
                reply = (rid, "error", exc)
            except Exception:
                reply = (rid, "bug", traceback.format_exc())
            try:
                conn.send(reply)
            except OSError:  # the server is gone
                return
    finally:
        answers.close()


class _Pending:
    """One request's answer, waited for by its thread and given by the process's reader thread."""

    def __init__(self):
        self.done = threading.Event()
        self.kind, self.value = "", None

    def give(self, kind: str, value) -> None:
        self.kind, self.value = kind, value
        self.done.set()


class _Process:
    """One search process, the server's ends of its two pipes, and the requests it holds."""

    def __init__(self, index_dir: str, precision: str):
        to_child, from_server = os.pipe()  # (read end, write end) each
        from_child, to_server = os.pipe()
        theirs = (to_child, to_server)
        # One BLAS thread, unless the user says otherwise: the processes are the parallelism, and
        # numpy's OpenBLAS threads spinning after each product cost a search process 1.2 ms of CPU
        # per search (7.6 ms against 6.3, measured). The child imports edge_t2t from where this
        # process did (a clone run in place, tests).
        env = {**{v: "1" for v in BLAS_THREADS}, **os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
        try:
            self.process = subprocess.Popen([sys.executable, "-m", "edge_t2t.serve_pool", *map(str, theirs), index_dir,
                                             precision], pass_fds=theirs, stdin=subprocess.DEVNULL, env=env,
                                            process_group=0)  # fmt: skip
        except OSError as exc:
            Channel(from_child, from_server).close()
            raise StoreError(f"cannot start a search process ({exc.strerror or exc}): try 'serve --processes 0'") from None
        finally:
            for fd in theirs:  # the child holds them: when it dies, a read here sees the end
                os.close(fd)
        self.conn = Channel(from_child, from_server)
        self.pid = self.process.pid
        self.held: dict[int, _Pending] = {}
        self.reader: threading.Thread | None = None

    def wait_ready(self) -> None:
        """Returns once the process says it is ready; raises the error that stopped it."""
        try:
            if not self.conn.poll(START_S):
                raise StoreError(f"a search process was not ready after {START_S:.0f} s: the machine may be out "
                                 "of memory; try 'serve --processes 0'")  # fmt: skip
            kind, value = self.conn.recv()
        except (EOFError, OSError):
            code = self.exit_code()
            raise StoreError(f"a search process ended as it started (exit code {code}): "
                             "try 'serve --processes 0' to see why in this process") from None  # fmt: skip
        if kind != "ready":
            raise value

    def discard(self) -> None:
        """Kill a process that is not wanted (it failed to start, or the pool closed meanwhile)."""
        self.process.kill()
        self.exit_code()
        self.conn.close()

    def exit_code(self) -> int | None:
        """Wait for the process to end (asked, or dead), killing it after STOP_S; its exit code
        (negative: the signal that ended it)."""
        try:
            return self.process.wait(STOP_S)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait(STOP_S)


class SearchProcesses:
    """N search processes answering Answers' requests by name (`call`), as Answers itself does in
    the server's threads."""

    def __init__(self, index_dir, n: int, precision: str = "int8", warn=None):
        if n < 1:
            raise ValueError("SearchProcesses needs at least one process")
        self._args = (str(index_dir), precision)
        self._warn = warn or (lambda msg: print(f"edge-t2t: {msg}", file=sys.stderr))
        self._ids = itertools.count(1)
        self._cond = threading.Condition()
        self._closed = False
        self._starting = 0
        started: list[_Process] = []
        self._live: list[_Process] = []
        try:
            for _ in range(n):
                started.append(_Process(*self._args))
            for p in started:
                p.wait_ready()
        except BaseException:
            for p in started:
                p.discard()
            raise
        for p in started:
            self._add(p)

    def _add(self, p: _Process) -> None:
        p.reader = threading.Thread(target=self._read, args=(p,), name=f"edge-t2t-search-{p.pid}", daemon=True)
        with self._cond:
            self._live.append(p)
            self._cond.notify_all()
        p.reader.start()

    def pids(self) -> list[int]:
        """The processes' ids, in the order requests go to them on a tie."""
        with self._cond:
            return [p.pid for p in self._live]

    def call(self, name: str, *args):
        """Answers.call(name, *args) in a search process: its result, or the error it raised."""
        pending = _Pending()
        with self._cond:
            while True:
                if self._closed or (not self._live and not self._starting):
                    raise ProcessGone("no search process is left (serve is stopping, or each one died and could "
                                      "not be started again): restart serve, or use --processes 0")  # fmt: skip
                free = [p for p in self._live if len(p.held) < DEPTH]
                if free:
                    break
                self._cond.wait()
            p = min(free, key=lambda q: len(q.held))
            rid = next(self._ids)
            p.held[rid] = pending
            try:  # under the lock: one message at a time on a pipe
                p.conn.send((rid, name, args))
            except OSError:  # it died; its reader thread answers what it held, this request included
                pass
        pending.done.wait()
        if pending.kind == "ok":
            return pending.value
        if pending.kind == "error":
            raise pending.value
        if pending.kind == "gone":
            raise ProcessGone(f"the search process answering this request ended (exit code {pending.value}); "
                              "a new one is starting: send it again")  # fmt: skip
        raise RuntimeError(f"a search process failed on {name}:\n{pending.value}")

    def _read(self, p: _Process) -> None:
        """The reader thread of `p`: each answer to its request's thread; at the end (EOF: the
        process stopped or died) the requests it still held answer ProcessGone, and, unless the
        pool is closing, another process is started."""
        while True:
            try:
                rid, kind, value = p.conn.recv()
            except (EOFError, OSError):
                break
            except Exception as exc:  # a message that does not unpickle: the process cannot be trusted now
                self._warn(f"search process {p.pid} sent a broken answer ({type(exc).__name__}: {exc}); stopping it")
                p.process.kill()
                break
            with self._cond:
                pending = p.held.pop(rid)
                self._cond.notify()
            pending.give(kind, value)
        with self._cond:
            if p in self._live:
                self._live.remove(p)
            lost, p.held = p.held, {}
            restart = not self._closed
            if restart:
                self._starting += 1
            self._cond.notify_all()
        code = p.exit_code()
        p.conn.close()
        for pending in lost.values():
            pending.give("gone", code)
        if restart:
            self._start_one()

    def _start_one(self) -> None:
        p = None
        try:
            p = _Process(*self._args)
            p.wait_ready()
        except Exception as exc:  # a background thread: say it, and go on with the processes left
            if p is not None:
                p.discard()
            self._warn(f"a search process could not be started again ({exc})")
            with self._cond:
                self._starting -= 1
                self._cond.notify_all()
            return
        with self._cond:
            self._starting -= 1
            closed = self._closed
        if closed:
            p.discard()
            return
        self._add(p)

    def close(self) -> None:
        """Stop every process: each answers what it holds, then ends; one that has not ended after
        STOP_S (stopped, or stuck) is killed. Its reader thread sees the pipe close and reaps it."""
        with self._cond:
            self._closed = True
            live = list(self._live)
            for p in live:
                try:
                    p.conn.send(None)
                except OSError:
                    pass  # already gone
            self._cond.notify_all()
        for p in live:
            p.exit_code()
        for p in live:
            p.reader.join(STOP_S)


if __name__ == "__main__":  # a search process, started by _Process: READ_FD WRITE_FD INDEX_DIR PRECISION
    _search_process(Channel(int(sys.argv[1]), int(sys.argv[2])), sys.argv[3], sys.argv[4])
