"""Describing on a Dask cluster: `caption` and `index` with `--cluster ADDRESS` or `--workers N`.

One task is one image that missed the caption cache. This process (the client) finds, loads and
hashes the images, checks the cache and sends each miss as a task: the downscaled PNG the model
will see plus the caption options (describer.ImageInput / CaptionOptions). Cached images are never
sent. Workers only return records; the client alone writes the cache, the JSON lines and the index.

- A task's key is made from the caption cache key, so a retry or a duplicate (the same bytes under
  two names, or another client describing the same archive on the same scheduler) is one task.
- Each worker holds one VLM in a worker plugin. The plugin loads it on the worker's first image,
  after checking the model files' sha256 against the client's, and refuses on a mismatch.
- A worker that dies is restarted by its nanny, and the scheduler reruns its image elsewhere. An
  image on which more than `distributed.scheduler.allowed-failures` (3) workers died comes back
  as KilledWorker: it is reported failed once, and the run goes on.
- Only a few tasks per worker thread are in flight, so the client never holds the whole archive in
  memory and Ctrl-C has little to cancel.

`distributed` is imported inside functions only: the package opens no connection and loads no
network module unless a cluster is asked for, and then it talks only to the scheduler given (or to
the loopback address with --workers).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import platform
import queue
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from .. import config
from ..errors import ClusterError, GPUError, ImageError, InputError, ModelError
from ..hashing import sha256_bytes, sha256_file
from ..records import CaptionRecord
from .captioning import CaptionRun, load_source, serve_cached, source_path, stop_after_current
from .captions import CacheKey, canonical_json
from .describer import CaptionOptions, ImageInput, UnusableAnswer, describe_image

EXTRA_HINT = "pip install 'edge-t2t[cluster]' (offline: unpack the bundle's optional archive beside it and install again)"
PLUGIN_NAME = "edge-t2t-vlm"
TASK_PREFIX = "edge-t2t-caption-"
CONNECT_TIMEOUT_S = 10.0
# Tasks in flight per worker thread: one running and one waiting, so a worker never idles while the
# client loads the next image, and Ctrl-C cancels little.
IN_FLIGHT_PER_THREAD = 2
_WINDOW_REFRESH_S = 2.0
# How long a run waits, with images in flight, while the scheduler has no worker at all, before it
# gives up with one line (every worker of a local cluster died and none was restarted, or every
# remote worker was stopped). Without it the run would wait for a worker forever. Finished images
# are in the caption cache by then, so the same command resumes where it stopped.
NO_WORKER_GRACE_S = 120.0


class WorkerRefused(ClusterError):
    """A worker cannot describe for this run (model file differs or is missing, or will not load)."""


def _distributed() -> Any:
    try:
        import distributed
    except ImportError:
        raise ClusterError(f"--cluster/--workers need the optional 'cluster' extra (Dask distributed): {EXTRA_HINT}") from None
    return distributed


# ---- the worker side ------------------------------------------------------------------------------


class _VLMHolder:
    """The worker plugin's body (plain Python, so it is testable without a cluster): one VLM per worker,
    loaded on the first image after the files' sha256 are checked against the client's."""

    name = PLUGIN_NAME
    idempotent = False

    def __init__(self, vlm_cfg: Any, expected: dict[str, tuple[str, str]]):
        self.vlm_cfg = vlm_cfg
        self.expected = expected  # kind -> (absolute path, the client's sha256)

    def __getstate__(self) -> dict[str, Any]:  # only the recipe travels; the model stays on the worker
        return {"vlm_cfg": self.vlm_cfg, "expected": self.expected}

    def setup(self, worker: Any = None) -> None:
        self.where = f"{getattr(worker, 'address', '?')} ({platform.node()})"
        # A local cluster numbers its workers 0..N-1: worker k takes GPU k mod n (gpu_offload.plan_offload).
        name = getattr(worker, "name", None)
        self.number = name if isinstance(name, int) else None
        self.lock = threading.RLock()  # a worker with several threads still has one llama.cpp context
        self.vlm: Any = None
        self.error = ""

    def teardown(self, worker: Any = None) -> None:
        with self.lock:
            vlm, self.vlm = self.vlm, None
            if vlm is not None:
                vlm.close()

    def _check_files(self) -> str:
        for kind, (path, want) in self.expected.items():
            try:
                have = sha256_file(path)
            except OSError as exc:
                return (f"worker {self.where} refused: cannot read its {kind} file {path} ({exc.strerror or exc}); "
                        "put the client's file at the same path on every worker")  # fmt: skip
            if have != want:
                return (f"worker {self.where} refused: its {kind} file {path} differs from the client's "
                        f"(sha256 {have[:12]}... there, {want[:12]}... on the client); copy the client's file "
                        "to the same path on every worker")  # fmt: skip
        return ""

    def _loaded(self) -> Any:
        if not self.error and self.vlm is None:
            self.error = self._check_files()
            if not self.error:
                from .vlm import VLM

                try:
                    self.vlm = VLM(dataclasses.replace(self.vlm_cfg, gpu_worker=self.number))
                except ModelError as exc:
                    self.error = f"worker {self.where}: {exc}"
        if self.error:
            raise WorkerRefused(self.error)
        return self.vlm

    def describe(self, image: ImageInput, opts: CaptionOptions) -> CaptionRecord:
        with self.lock:
            vlm = self._loaded()
            files = {kind: path for kind, (path, _) in self.expected.items()}
            return describe_image(vlm, image, opts, model_sha=self.expected["model"][1],
                                  mmproj_sha=self.expected["mmproj"][1],
                                  model_files=(files["model"], files["mmproj"]))  # fmt: skip


def _plugin_class() -> type:
    """The WorkerPlugin subclass, made on first use so that importing this module never imports
    distributed. It is published as `edge_t2t.describe.cluster.VLMWorkerPlugin`, so pickle finds it on a worker
    (through the module __getattr__ below) by name."""
    cls = globals().get("VLMWorkerPlugin")
    if cls is None:
        from distributed.diagnostics.plugin import WorkerPlugin

        cls = type("VLMWorkerPlugin", (_VLMHolder, WorkerPlugin), {"__module__": __name__})
        globals()["VLMWorkerPlugin"] = cls
    return cls


def __getattr__(name: str) -> Any:
    if name == "VLMWorkerPlugin":
        return _plugin_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def describe_task(image: ImageInput, opts: CaptionOptions) -> CaptionRecord:
    """One Dask task: describe one image with this worker's VLM. Pure: no file is written."""
    from distributed import get_worker

    worker = get_worker()
    holder = worker.plugins.get(PLUGIN_NAME)
    if holder is None:
        raise WorkerRefused(f"worker {worker.address} has no edge-t2t VLM plugin (was it removed by another client?)")
    return holder.describe(image, opts)


# ---- the client side ------------------------------------------------------------------------------


class ClusterSession:
    """A connection to a Dask scheduler (or a local cluster, started on first use) for one command:
    a captioning.Executor (caption() describes a run's cache misses on the workers)."""

    def __init__(self, connect: Callable[[], tuple[Any, Any]], description: str, local_workers: int = 1):
        self._connect = connect
        self.description = description
        self.local_workers = local_workers  # worker processes of a local cluster (they share its GPUs)
        self._client: Any = None
        self._local: Any = None
        self._plugin: tuple | None = None
        self._threads = (0, 0.0)  # (worker threads, when asked)

    @property
    def client(self) -> Any:
        if self._client is None:
            self._client, self._local = self._connect()
        return self._client

    @property
    def connected(self) -> bool:
        return self._client is not None

    def ensure_plugin(self, vlm_cfg: Any, expected: dict[str, tuple[str, str]]) -> None:
        """Register the VLM plugin for these files and settings, once per session: registering it
        again would make every worker tear down and reload its model."""
        wanted = (canonical_json(_cfg_dict(vlm_cfg)), canonical_json(expected))
        if self._plugin != wanted:
            self.client.register_plugin(_plugin_class()(vlm_cfg, expected), name=PLUGIN_NAME)
            self._plugin = wanted

    def caption(self, run: CaptionRun) -> None:
        caption_on_cluster(self, run)

    def workers_present(self) -> int:
        """Workers the scheduler knows now (the client's view, refreshed every few seconds)."""
        return len(self.client.scheduler_info().get("workers", {}))

    def worker_threads(self) -> int:
        count, when = self._threads
        if time.monotonic() - when > _WINDOW_REFRESH_S:
            count = sum(self.client.nthreads().values())
            self._threads = (count, time.monotonic())
        return count

    def close(self) -> None:
        client, local, self._client, self._local = self._client, self._local, None, None
        if client is not None:
            if self._plugin is not None:  # free the workers' models on a long-lived cluster
                # distributed 2026.8 (tried): ValueError when the plugin is gone already (another
                # client), RuntimeError on a closed client, OSError (CommClosedError, TimeoutError)
                # when the scheduler went away; it re-raises a worker's teardown error, and ours
                # (_VLMHolder.teardown) only closes the VLM.
                with contextlib.suppress(ValueError, RuntimeError, OSError):
                    client.unregister_worker_plugin(PLUGIN_NAME)
            client.close()
        if local is not None:
            local.close()


def _cfg_dict(vlm_cfg: Any) -> dict[str, Any]:
    data = dataclasses.asdict(vlm_cfg) if dataclasses.is_dataclass(vlm_cfg) else dict(vars(vlm_cfg))
    return {k: str(v) if isinstance(v, Path) else v for k, v in data.items()}


def _quiet_dask_logs() -> None:
    # Dask's own warnings (worker restarts, slow event loop) would tear the progress bar; what
    # matters reaches the user through our failures and notices.
    logging.getLogger("distributed").setLevel(logging.ERROR)


def _connect_remote(address: str, timeout: float) -> tuple[Any, Any]:
    distributed = _distributed()
    _quiet_dask_logs()
    try:
        client = distributed.Client(address, timeout=timeout, set_as_default=False)
    except (OSError, TimeoutError, ValueError) as exc:
        reason = " ".join(str(exc).split())[:200] or type(exc).__name__
        raise ClusterError(
            f"cannot reach the Dask scheduler at {address} ({reason}); start it with `dask scheduler` on that "
            "machine, or check the address, the port (default 8786) and the firewall"
        ) from None
    try:
        client.wait_for_workers(1, timeout=timeout)
    except (TimeoutError, OSError):
        client.close()
        raise ClusterError(
            f"no Dask worker joined the scheduler at {address} within {timeout:g} s; start one on each machine "
            f"with `dask worker {address} --nthreads 1`"
        ) from None
    return client, None


def _start_local(workers: int, threads: int) -> tuple[Any, Any]:
    distributed = _distributed()
    _quiet_dask_logs()
    # The workers must not take the terminal's Ctrl-C (it goes to the whole process group): the client
    # cancels their work and closes them. A signal ignored when a process is spawned stays ignored in
    # it, and asyncio then leaves it alone. (A worker restarted later by its nanny is not covered.)
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        cluster = _new_local_cluster(distributed, workers, threads)
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
    return distributed.Client(cluster, set_as_default=False), cluster


def _new_local_cluster(distributed: Any, workers: int, threads: int) -> Any:
    return distributed.LocalCluster(
        # Only CRITICAL from distributed's own loggers: a worker's failure reaches the client through
        # its future (one line per image), while a worker whose scheduler went away first (Ctrl-C)
        # logs its heartbeat's traceback at ERROR, which would be noise under the interrupt message.
        n_workers=workers, threads_per_worker=1, processes=True, host="127.0.0.1", silence_logs=logging.CRITICAL,
        # No dashboard; the scheduler's small HTTP server (health checks) listens on loopback only.
        dashboard_address=None, scheduler_kwargs={"dashboard_address": "127.0.0.1:0"},
        # No memory limit: a worker holds a whole VLM by design, and the nanny must not kill it for that.
        memory_limit=0,
        # Each worker's llama.cpp gets its share of the CPUs (config.default_threads reads this).
        env={"EDGE_T2T_THREADS": str(threads)},
    )  # fmt: skip


@contextlib.contextmanager
def open_cluster(address: str | None = None, workers: int | None = None, *,
                 timeout: float = CONNECT_TIMEOUT_S) -> Iterator[ClusterSession]:  # fmt: skip
    """A session on the scheduler at `address` (connected now, so a wrong address fails at once), or on
    a local cluster of `workers` processes (started on the first image that needs the model)."""
    if (address is None) == (workers is None):
        raise InputError("give either a scheduler address (--cluster) or a number of local workers (--workers)")
    _distributed()  # a missing extra is reported before anything starts
    if workers is not None:
        if workers < 1:
            raise InputError(f"--workers {workers}: give 1 or more local worker processes")
        threads = max(1, config.default_threads() // workers)
        session = ClusterSession(lambda: _start_local(workers, threads),
                                 f"{workers} local Dask worker(s), {threads} CPU thread(s) each", workers)  # fmt: skip
    else:
        session = ClusterSession(lambda: _connect_remote(address, timeout), f"the Dask scheduler at {address}")
        session.client  # noqa: B018 -- connect now: fail fast on a wrong address
    try:
        yield session
    finally:
        session.close()


def add_arguments(parser: Any) -> None:
    """--cluster / --workers for `caption` and `index`."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--cluster", metavar="ADDRESS",
                       help="describe on a running Dask cluster: its scheduler, e.g. tcp://10.0.0.5:8786 "
                            "(needs the 'cluster' extra; see docs/cluster.md)")  # fmt: skip
    group.add_argument("--workers", type=int, metavar="N",
                       help="describe on a local Dask cluster of N worker processes, CPU threads split "
                            "between them (needs the 'cluster' extra)")  # fmt: skip


def session_from_args(args: Any) -> contextlib.AbstractContextManager[ClusterSession | None]:
    if getattr(args, "cluster", None):
        return open_cluster(address=args.cluster)
    if getattr(args, "workers", None) is not None:
        return open_cluster(workers=args.workers)
    return contextlib.nullcontext(None)


def task_key(key: CacheKey) -> str:
    return TASK_PREFIX + sha256_bytes(canonical_json(key.as_tuple()).encode())[:40]


def _failure_reason(exc: BaseException | None) -> str:
    name = type(exc).__name__
    if name == "KilledWorker":
        return ("Dask workers died while describing it, again and again (a llama.cpp crash on this image, "
                "or too little memory); skipped")  # fmt: skip
    if isinstance(exc, ImageError | UnusableAnswer):
        return str(exc)
    return f"{name} on the worker: {' '.join(str(exc).split())[:200]}"


def caption_on_cluster(session: ClusterSession, run: CaptionRun) -> None:
    """A run on the cluster (the Executor's caption): the same (tag, source) items as in-process, the
    same records handed to `run.done(tag, record)` (which counts them), failures to
    `run.fail(tag, path, reason)`. Each source is loaded once, here; a task's members are the
    (tag, path) pairs that share its bytes."""
    from .gguf_check import check_pair

    items, vlm_cfg, opts, cache, summary = run.items, run.vlm_cfg, run.opts, run.cache, run.summary
    done, fail, notice, shas = run.done, run.fail, run.notice, run.shas

    model = Path(vlm_cfg.model).expanduser().absolute()
    mmproj = Path(vlm_cfg.mmproj).expanduser().absolute()
    model_files = (vlm_cfg.model, vlm_cfg.mmproj)
    model_sha, mmproj_sha = shas
    state: dict[str, Any] = {"plugin": False, "next": iter(items), "done": not items}
    # task key -> (future, cache key, the image sent, its members: (tag, path) of each image with these bytes)
    inflight: dict[str, tuple[Any, CacheKey, ImageInput, list[tuple[Any, Path]]]] = {}
    # Images whose workers died under them. A dying worker takes every task queued on it along, so
    # an innocent image can share a crash image's deaths: each is retried alone at the end, where a
    # death has one cause, and only then reported failed. The image sent is kept, so nothing is read again.
    suspects: list[tuple[CacheKey, ImageInput, list[tuple[Any, Path]]]] = []
    finished: queue.Queue = queue.Queue()

    def submit(member: tuple[Any, Path], image: ImageInput, key: CacheKey, suffix: str = "") -> None:
        if not state["plugin"]:  # first miss: check the files here, then connect and ship the recipe
            nonlocal model_sha, mmproj_sha
            check_pair(model, mmproj)
            model_sha, mmproj_sha = model_sha or sha256_file(model), mmproj_sha or sha256_file(mmproj)
            key = CacheKey.make(image.sha256, model_sha, mmproj_sha, opts.prompt.version, opts.params)
            was_connected = session.connected
            session.ensure_plugin(dataclasses.replace(vlm_cfg, model=model, mmproj=mmproj, gpu_workers=session.local_workers),
                                  {"model": (str(model), model_sha), "mmproj": (str(mmproj), mmproj_sha)})  # fmt: skip
            if not was_connected:
                notice(f"describing on {session.description}")
            state["plugin"] = True
        tkey = task_key(key) + suffix
        if tkey in inflight:  # the same bytes twice: one task, both paths get its record
            inflight[tkey][3].append(member)
            return
        future = session.client.submit(describe_task, image, opts, key=tkey)
        inflight[tkey] = (future, key, image, [member])
        future.add_done_callback(finished.put)

    def fill(stop: dict[str, bool]) -> None:
        window = None
        while not state["done"] and not stop["stop"]:
            if inflight:
                window = window or max(IN_FLIGHT_PER_THREAD, IN_FLIGHT_PER_THREAD * session.worker_threads())
                if len(inflight) >= window:
                    return
            item = next(state["next"], None)
            if item is None:
                state["done"] = True
                return
            tag, source = item
            path = source_path(source)
            try:
                loaded = load_source(source, opts)
            except ImageError as exc:
                fail(tag, path, str(exc).removeprefix(f"{path}: "))
                continue
            key = CacheKey.make(loaded.sha256, model_sha, mmproj_sha, opts.prompt.version, opts.params)
            hit = cache.get(key) if cache is not None and model_sha else None
            if hit is not None:  # never sent
                done(tag, serve_cached(hit, path, model_files, model_sha, mmproj_sha))
            else:
                submit((tag, path), ImageInput.from_loaded(loaded), key)

    def collect(future: Any) -> None:
        entry = inflight.pop(future.key, None)
        if entry is None:
            return
        _, key, image, members = entry
        if future.status == "finished":
            record = future.result()
            summary.model_loaded = True
            summary.model_calls += 1 + bool(record.extra.get("retried"))
            summary.retries += bool(record.extra.get("retried"))
            record.image = str(members[0][1])
            if cache is not None:
                cache.put(key, record)
            done(members[0][0], record)
            for tag, other in members[1:]:  # as the local path gives them: a cache hit, or (no cache) a fresh copy
                twin = serve_cached(CaptionRecord.from_dict(record.to_dict()), other, model_files, model_sha, mmproj_sha)
                twin.cached = cache is not None
                done(tag, twin)
        elif future.status == "error":
            exc = future.exception()
            if isinstance(exc, WorkerRefused | GPUError):  # every further image there would fail the same way
                raise ClusterError(str(exc))
            if type(exc).__name__ == "KilledWorker" and not state.get("alone"):
                suspects.append((key, image, members))
                future.release()
                return
            summary.retries += bool(getattr(exc, "retried", False))
            for tag, p in members:
                fail(tag, p, _failure_reason(exc))
        else:  # cancelled by someone else, or lost with the scheduler
            for tag, p in members:
                fail(tag, p, f"the Dask scheduler dropped this image ({future.status}); run the same command again")
        future.release()

    watch = _WorkerWatch(session)

    def wait_one() -> None:
        try:
            collect(finished.get(timeout=0.5))
        except queue.Empty:
            watch.check(len(inflight))

    stop_message = "interrupt: cancelling the images not described yet, keeping the finished ones (Ctrl-C again to stop now)"
    with stop_after_current(notice, stop_message) as stop:
        try:
            while True:
                fill(stop)
                if stop["stop"] or not inflight:
                    break
                wait_one()
            state["alone"] = True
            for key, image, members in suspects:
                if stop["stop"]:
                    break
                submit(members[0], image, key, suffix="-alone")
                inflight[task_key(key) + "-alone"][3].extend(members[1:])
                while inflight and not stop["stop"]:
                    wait_one()
        except KeyboardInterrupt:
            stop["stop"] = True
        finally:
            if inflight:
                _wind_down(session, inflight, collect)
    summary.interrupted = stop["stop"]


class _WorkerWatch:
    """Ends a run that waits on a scheduler with no worker left (see NO_WORKER_GRACE_S)."""

    def __init__(self, session: ClusterSession):
        self.session = session
        self.last_seen = self.last_asked = time.monotonic()

    def check(self, waiting: int) -> None:
        now = time.monotonic()
        if now - self.last_asked < 1.0:  # the client's view changes every few seconds only
            return
        self.last_asked = now
        if self.session.workers_present():
            self.last_seen = now
        elif now - self.last_seen > NO_WORKER_GRACE_S:
            raise ClusterError(
                f"no Dask worker left on {self.session.description} for {NO_WORKER_GRACE_S:.0f} s, with {waiting} "
                "image(s) waiting: start workers (dask worker ADDRESS) or use --workers N, then run the same "
                "command again (finished images are kept in the caption cache)"
            )


def _wind_down(session: ClusterSession, inflight: dict, collect: Callable[[Any], None]) -> None:
    """Keep what already finished, cancel the rest (Ctrl-C, or a refusal that ends the run)."""
    for future, *_ in list(inflight.values()):
        if future.status == "finished":
            with contextlib.suppress(ClusterError):
                collect(future)
    left = [future for future, *_ in inflight.values()]
    inflight.clear()
    if left:
        with contextlib.suppress(RuntimeError, OSError):  # a closed client; a lost scheduler (CommClosedError)
            session.client.cancel(left)
