"""Describing on a Dask cluster (`--cluster` / `--workers`), with the tiny test VLM through llama.cpp.

One local cluster of 2 worker processes is shared by the module's tests (starting one costs seconds on
a busy 2-core machine). Each test leaves it with 2 live workers. The refusal test starts its own
scheduler and a worker in a private mount namespace, where another file sits at the model's path.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import helpers_media as hm
import pytest

from edge_t2t.describe.captioning import Callbacks, caption_images
from edge_t2t.describe.captions import CaptionCache
from edge_t2t.errors import ClusterError

distributed = hm.require("distributed", "the 'cluster' extra is not installed: pip install -e '.[cluster]' (make test installs it)")

from edge_t2t.describe import cluster  # noqa: E402 -- after the check that the extra is installed

# One variant and room for the schema's longest answer: the random-weight test model then writes a
# parsable answer for the RSICD samples (see test_captioning).
KW = {"n_variants": 1, "max_tokens": 1300}


@pytest.fixture(scope="module")
def vlm_cfg():
    from edge_t2t.describe.vlm import VLMConfig

    model, mmproj = hm.test_vlm_files()
    return VLMConfig(model=model, mmproj=mmproj)


@pytest.fixture(scope="module")
def session():
    with cluster.open_cluster(workers=2) as s:
        s.client.wait_for_workers(2, timeout=hm.HANG_S)
        yield s


@pytest.fixture()
def images(rsicd_samples: Path, tmp_path: Path) -> list[Path]:
    folder = tmp_path / "images"
    folder.mkdir()
    for p in sorted(rsicd_samples.glob("*.jpg")):
        shutil.copy(p, folder / p.name)
    return sorted(folder.glob("*.jpg"))


def _worker_pids(client) -> dict[str, int]:
    return client.run(os.getpid)


def _healthy(session, n: int = 2) -> None:
    session.client.wait_for_workers(n, timeout=hm.HANG_S)
    deadline = time.monotonic() + hm.HANG_S
    while len(_worker_pids(session.client)) < n and time.monotonic() < deadline:
        time.sleep(0.5)


def _transitions_when_idle(client) -> int:
    """The scheduler's task-transition count, once it holds no task (releases are asynchronous)."""
    deadline = time.monotonic() + 30
    while client.run_on_scheduler(lambda dask_scheduler: len(dask_scheduler.tasks)) and time.monotonic() < deadline:
        time.sleep(0.2)
    return client.run_on_scheduler(lambda dask_scheduler: dask_scheduler.transition_counter)


def _without_timing(record) -> str:
    data = record.to_dict()
    data.pop("seconds")
    return json.dumps(data, sort_keys=True, ensure_ascii=False)


class CountingCache(CaptionCache):
    def __init__(self, path):
        super().__init__(path)
        self.puts: Counter = Counter()

    def put(self, key, record):
        self.puts[key] += 1
        super().put(key, record)


def test_records_equal_a_local_run_and_cached_images_are_never_sent(session, vlm_cfg, images, tmp_path) -> None:
    twin = images[0].with_name("zz_same_bytes_as_" + images[0].name)  # one task, two records
    shutil.copy(images[0], twin)
    images = [*images, twin]
    local: list = []
    with CaptionCache(tmp_path / "local.sqlite") as local_cache:
        s_local = caption_images(images, vlm_cfg, on_record=local.append, cache=local_cache, **KW)
    assert (s_local.captioned, s_local.cached, s_local.failed) == (len(images) - 1, 1, 0)

    remote: list = []
    with CountingCache(tmp_path / "cache.sqlite") as cache:
        s = caption_images(images, vlm_cfg, on_record=remote.append, cache=cache, executor=session, **KW)
        assert (s.total, s.captioned, s.cached, s.failed, s.interrupted) == (len(images), len(images) - 1, 1, 0, False)
        assert s.test_model and s.model_calls == s_local.model_calls
        # Byte for byte, apart from the timing: same variants, same provenance, same image facts.
        assert sorted(map(_without_timing, remote)) == sorted(map(_without_timing, local))
        assert len(cache) == len(images) - 1 and set(cache.puts.values()) == {1}

        # Everything is cached now: the second run sends nothing to the scheduler.
        before = _transitions_when_idle(session.client)
        again: list = []
        s2 = caption_images(images, vlm_cfg, on_record=again.append, cache=cache, executor=session, **KW)
        after = _transitions_when_idle(session.client)
        assert (s2.cached, s2.captioned, s2.model_calls) == (len(images), 0, 0)
        assert after == before, "a cached image reached the scheduler"
        assert all(r.cached for r in again)
        assert {r.image: r.variants for r in again} == {r.image: r.variants for r in local}


class _PoisonPlugin(distributed.WorkerPlugin):
    """Makes a worker process die when it starts describing one given image: a stand-in for an image
    that crashes llama.cpp (os._exit, every time), or with `once` a worker killed mid-image (SIGKILL,
    the first time only: the worker that gets there creates the marker file, writing its pid in it).
    Registered with the scheduler, so restarted workers get it too."""

    name = "test-poison"

    def __init__(self, sha256: str, once: Path | None = None):
        self.sha256 = sha256
        self.once = once

    def setup(self, worker) -> None:
        from edge_t2t.describe import cluster as c

        original = c._VLMHolder.describe
        poison, once = self.sha256, self.once

        def describe(holder, image, opts):
            if image.sha256 == poison and once is None:
                os._exit(17)
            if image.sha256 == poison:
                try:
                    fd = os.open(once, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
                except FileExistsError:  # the retry, on the replacement process or the other worker
                    return original(holder, image, opts)
                os.write(fd, str(os.getpid()).encode())
                os.close(fd)
                os.kill(os.getpid(), signal.SIGKILL)
            return original(holder, image, opts)

        self._original = original
        c._VLMHolder.describe = describe

    def teardown(self, worker) -> None:
        from edge_t2t.describe import cluster as c

        c._VLMHolder.describe = self._original


def test_a_worker_killed_mid_image_is_replaced_and_its_image_retried(session, vlm_cfg, images, tmp_path) -> None:
    """The worker that starts describing the second image SIGKILLs itself there, the first time
    only: a known point, mid-image. The nanny starts a new process, the scheduler retries the
    image, and every image is described and cached exactly once."""
    import cloudpickle

    from edge_t2t.hashing import sha256_file

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the workers cannot import this test module
    client = session.client
    marker = tmp_path / "killed-worker.pid"
    client.register_plugin(_PoisonPlugin(sha256_file(images[1]), once=marker), name=_PoisonPlugin.name)
    seen: list = []
    try:
        with CountingCache(tmp_path / "cache.sqlite") as cache:
            s = caption_images(images, vlm_cfg, on_record=lambda r: seen.append(r.image), cache=cache,
                               executor=session, **KW)  # fmt: skip
            # Every image described exactly once: one record each, one cache write each.
            assert (s.captioned, s.failed, s.interrupted) == (len(images), 0, False), s.failures
            assert sorted(seen) == sorted(map(str, images))
            assert len(cache) == len(images) and set(cache.puts.values()) == {1}
    finally:
        _healthy(session)  # the replacement process joined: the plugin's teardown reaches every worker
        client.unregister_worker_plugin(_PoisonPlugin.name)
    killed = int(marker.read_text())  # written by the worker just before it killed itself
    assert killed not in _worker_pids(client).values()  # the nanny started a new process


def test_an_image_that_kills_workers_repeatedly_fails_once_and_the_run_goes_on(session, vlm_cfg, images) -> None:
    import cloudpickle

    from edge_t2t.hashing import sha256_file

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the workers cannot import this test module
    client = session.client
    poison = images[1]

    def set_allowed_failures(dask_scheduler, n):
        old, dask_scheduler.allowed_failures = dask_scheduler.allowed_failures, n
        return old

    old = client.run_on_scheduler(set_allowed_failures, n=1)  # two deaths, not four: keeps the test short
    client.register_plugin(_PoisonPlugin(sha256_file(poison)), name=_PoisonPlugin.name)
    failures: list = []
    try:
        records: list = []
        s = caption_images(images, vlm_cfg, on_record=records.append, callbacks=Callbacks(on_failure=failures.append),
                           executor=session, **KW)  # fmt: skip
    finally:
        _healthy(session)  # the replacement processes joined: the plugin's teardown reaches every worker
        client.unregister_worker_plugin(_PoisonPlugin.name)
        client.run_on_scheduler(set_allowed_failures, n=old)
    assert [f.path for f in failures] == [str(poison)] and [f.path for f in s.failures] == [str(poison)]
    assert "workers died" in failures[0].reason
    assert s.captioned == len(images) - 1 and sorted(r.image for r in records) == sorted(
        str(p) for p in images if p != poison
    )


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_an_unreachable_scheduler_is_one_line_and_exit_2(vlm_cfg, images, tmp_path) -> None:
    res = hm.run_cli("caption", str(images[0]), "--vlm", str(vlm_cfg.model), "--mmproj", str(vlm_cfg.mmproj),
                     "--cluster", f"tcp://127.0.0.1:{_free_port()}", env=hm.child_env(tmp_path / "cache"),
                     timeout=120)  # fmt: skip
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert res.returncode == 2, res.stderr
    assert len(lines) == 1 and lines[0].startswith("edge-t2t: error: cannot reach the Dask scheduler"), res.stderr
    assert "dask scheduler" in lines[0]


def test_a_run_left_with_no_worker_ends_with_one_line_and_keeps_the_cache(monkeypatch, vlm_cfg, images, tmp_path) -> None:
    """Every worker gone mid-run and none restarted: the run ends after the grace period with a
    ClusterError naming the fix, instead of waiting for a worker forever. The known point: the
    session has connected (the "describing on" notice) and no image has been sent yet; there the
    only worker is retired, nanny included, so every image waits on a scheduler with no worker."""
    monkeypatch.setattr(cluster, "NO_WORKER_GRACE_S", 2.0)
    with cluster.open_cluster(workers=1) as own:  # connects (and starts its worker) on the first miss
        retired: list = []

        def on_notice(message: str) -> None:
            if message.startswith("describing on") and not retired:
                retired.extend(own.client.retire_workers(close_workers=True, remove=True))
                assert own.client.run_on_scheduler(lambda dask_scheduler: len(dask_scheduler.workers)) == 0

        records: list = []
        outcome: list = []
        cached: list = []

        def run() -> None:  # in a thread, so a run that would wait forever fails the test instead
            with CountingCache(tmp_path / "cache.sqlite") as cache:  # SQLite: opened in the thread using it
                try:
                    caption_images(images, vlm_cfg, on_record=records.append, cache=cache, executor=own,
                                   callbacks=Callbacks(on_notice=on_notice), **KW)  # fmt: skip
                except BaseException as exc:  # noqa: BLE001 -- handed to the test thread
                    outcome.append(exc)
                cached.append(len(cache))

        worker = threading.Thread(target=run, daemon=True)
        worker.start()
        worker.join(timeout=120)  # 60x the grace period
        assert not worker.is_alive(), "the run still waits for a worker"
        assert len(retired) == 1 and len(outcome) == 1 and isinstance(outcome[0], ClusterError), outcome
        message = str(outcome[0])
        assert message.startswith("no Dask worker left on ") and "run the same command again" in message
        assert "2 image(s) waiting" in message  # the in-flight window of one worker thread
        assert records == [] and cached == [0]


def test_a_missing_cluster_extra_is_one_line_naming_it(monkeypatch, vlm_cfg, images, capsys) -> None:
    from edge_t2t.cli import main

    monkeypatch.setitem(sys.modules, "distributed", None)  # `import distributed` now raises ImportError
    rc = main(["caption", str(images[0]), "--vlm", str(vlm_cfg.model), "--mmproj", str(vlm_cfg.mmproj),
               "--workers", "2"])  # fmt: skip
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert rc == 2 and len(err) == 1 and "edge-t2t[cluster]" in err[0], err


def test_the_worker_plugin_refuses_a_file_that_differs_from_the_clients(vlm_cfg, tmp_path) -> None:
    """The check itself, without a cluster: a worker whose mmproj is not the client's names itself and
    the file, and never loads the model."""
    from edge_t2t.hashing import sha256_file

    expected = {"model": (str(vlm_cfg.model), sha256_file(vlm_cfg.model)),
                "mmproj": (str(vlm_cfg.mmproj), "0" * 64)}  # fmt: skip
    holder = cluster._VLMHolder(vlm_cfg, expected)
    holder.setup(type("W", (), {"address": "tcp://10.0.0.7:4321"})())
    with pytest.raises(cluster.WorkerRefused, match=r"tcp://10\.0\.0\.7:4321.*mmproj file .*tiny-llava-mmproj"):
        holder._loaded()
    assert holder.vlm is None


def test_local_workers_spread_over_gpus(vlm_cfg, monkeypatch) -> None:
    """A local cluster's worker k loads its VLM as GPU worker k of N (gpu_offload.plan_offload then
    gives it GPU k mod n), N being the cluster's worker count; a worker with a name of its own (a
    remote `dask worker`) is no one's number and takes its machine's best GPU."""
    import dataclasses

    from edge_t2t.describe import vlm as vlm_mod
    from edge_t2t.hashing import sha256_file

    loaded = []
    monkeypatch.setattr(vlm_mod, "VLM", lambda cfg: loaded.append(cfg) or cfg)
    expected = {k: (str(p), sha256_file(p)) for k, p in (("model", vlm_cfg.model), ("mmproj", vlm_cfg.mmproj))}
    with cluster.open_cluster(workers=3) as session:  # not started: no image asked for a worker yet
        assert session.local_workers == 3
    cfg = dataclasses.replace(vlm_cfg, gpu_workers=3)
    for name in (2, "tcp://10.0.0.7:4321"):
        holder = cluster._VLMHolder(cfg, expected)
        holder.setup(type("W", (), {"address": "tcp://127.0.0.1:1", "name": name})())
        holder._loaded()
    assert [(c.gpu_worker, c.gpu_workers) for c in loaded] == [(2, 3), (None, 3)]


def _require_unshare_bind() -> None:
    """Fails (never skips) when a private mount namespace cannot be made, naming what to install."""
    if not shutil.which("unshare"):
        pytest.fail("the `unshare` command is missing: apt-get install util-linux")
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", "mount --bind /dev/null /dev/null"], capture_output=True,
                           text=True, timeout=30)  # fmt: skip
    if probe.returncode:
        pytest.fail(f"`unshare -rm` cannot bind-mount here ({probe.stderr.strip()[-200:]}): run as root or enable "
                    "user namespaces (sysctl kernel.unprivileged_userns_clone=1)")  # fmt: skip


@pytest.mark.linux_only
def test_a_worker_with_a_different_model_file_is_refused(vlm_cfg, images, tmp_path) -> None:
    """A real scheduler and worker started by hand, as on a site's network. The worker runs in its own
    mount namespace where another file is bind-mounted at the model's path: the same path, different
    bytes, as on a machine that got a different copy."""
    _require_unshare_bind()
    model = tmp_path / "vlm" / "model.gguf"
    model.parent.mkdir()
    shutil.copy(vlm_cfg.model, model)
    other = tmp_path / "other.gguf"
    data = bytearray(vlm_cfg.model.read_bytes())
    data[-1] ^= 0xFF  # one byte of the last tensor: still a valid GGUF header
    other.write_bytes(bytes(data))
    port = _free_port()
    address = f"tcp://127.0.0.1:{port}"
    dask = str(Path(sys.executable).with_name("dask"))
    env = hm.child_env(tmp_path / "cache")
    procs = [subprocess.Popen([dask, "scheduler", "--host", "127.0.0.1", "--port", str(port), "--no-dashboard"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)]  # fmt: skip
    try:
        worker = f"mount --bind {other} {model} && exec {dask} worker {address} --nthreads 1 --no-dashboard"
        procs.append(subprocess.Popen(["unshare", "-rm", "sh", "-c", worker], stdout=subprocess.DEVNULL,
                                      stderr=subprocess.DEVNULL, env=env))  # fmt: skip
        res = hm.run_cli("caption", str(images[0]), "--vlm", str(model), "--mmproj", str(vlm_cfg.mmproj),
                         "--variants", "1", "--max-tokens", "1300", "--cluster", address, env=env,
                         timeout=hm.HANG_S)  # fmt: skip
    finally:
        for p in reversed(procs):
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
    assert res.returncode == 2, res.stdout + res.stderr
    assert not hm.has_traceback(res.stderr), res.stderr[-3000:]
    error = [ln for ln in res.stderr.splitlines() if ln.startswith("edge-t2t: error:")]
    assert len(error) == 1, res.stderr
    assert "refused" in error[0] and f"model file {model}" in error[0] and "tcp://127.0.0.1:" in error[0], error[0]
    cache = tmp_path / "cache" / "captions.sqlite"  # opened at the start; nothing was written to it
    assert sqlite3.connect(cache).execute("SELECT COUNT(*) FROM captions").fetchone()[0] == 0


def test_index_describes_on_local_workers(vlm_cfg, images, tmp_path) -> None:
    """`index --workers 2` end to end through the CLI: the images are described on the cluster and indexed."""
    env = hm.child_env(tmp_path / "cache")
    res = hm.run_cli("index", str(images[0].parent), "--index", str(tmp_path / "idx"), "--vlm", str(vlm_cfg.model),
                     "--mmproj", str(vlm_cfg.mmproj), "--variants", "1", "--max-tokens", "1300", "--workers", "2",
                     "--json", "--no-progress", env=env, timeout=hm.HANG_S)  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads(res.stdout)
    assert summary["added"] == len(images) and summary["failed"] == 0
    assert "local Dask worker" in res.stderr
    rows = sqlite3.connect(tmp_path / "cache" / "captions.sqlite").execute("SELECT COUNT(*) FROM captions").fetchone()
    assert rows[0] == len(images)


def test_ctrl_c_cancels_the_rest_and_keeps_finished_records(vlm_cfg, images, tmp_path) -> None:
    """Ctrl-C as a terminal sends it: SIGINT to the whole process group (the CLI and its local workers).
    Known point: the workers hold every image but the first (a worker preload: the fault hook,
    helpers_media), so exactly one can finish; the CLI pauses itself right after writing that record,
    and the SIGINT lands there. The held images are cancelled, the finished one kept."""
    out = tmp_path / "captions.jsonl"
    held = [p.name for p in images[1:]]
    argv, faults = hm.cli_argv("caption", str(images[0].parent), "--vlm", str(vlm_cfg.model), "--mmproj",
                               str(vlm_cfg.mmproj), "--variants", "1", "--max-tokens", "1300", "--workers", "2",
                               "--out", str(out),
                               faults=[{"stage": "record", "at": 1, "action": "stop"},
                                       {"stage": "worker_describe", "images": held, "action": "hold"}])  # fmt: skip
    env = {**hm.child_env(tmp_path / "cache"), **faults, **hm.DASK_PRELOAD_FAULTS}
    proc = subprocess.Popen(argv, env=env, cwd=hm.ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # fmt: skip
    try:
        hm.wait_until_stopped(proc)
        os.killpg(proc.pid, signal.SIGINT)  # the local workers ignore it; the CLI takes it when resumed
        stdout, stderr = hm.signal_and_finish(proc, signal.SIGCONT)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # any worker left holding an image
    assert proc.returncode == 130, stderr[-3000:]
    assert not hm.has_traceback(stderr), stderr[-3000:]
    lines = [json.loads(ln) for ln in out.read_text().splitlines()]
    assert [r["image"] for r in lines] == [str(images[0])] and lines[0]["variants"]
    assert "kept 1 finished caption(s)" in stderr
    rows = sqlite3.connect(tmp_path / "cache" / "captions.sqlite").execute("SELECT COUNT(*) FROM captions").fetchone()
    assert rows[0] == 1  # the finished record is in the cache too, and nothing else
