"""Shared by the reliability tests: generators of valid, broken and odd files (always written into
a test's tmp dir, never committed), a runner for the CLI in a subprocess, and fault injection
inside that subprocess (kill or interrupt at a named stage, rewrite a file mid-run).

Fault injection works from the outside: `cli_argv(..., faults=...)` starts
`python -c "<this module>.child_main()"`, which wraps a few library functions before calling the
real `edge_t2t.cli.main`. The modules under test stay untouched; the wrappers only count calls and
act at the chosen one.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import signal
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
TESTS = Path(__file__).resolve().parent


# -- valid images -----------------------------------------------------------------------------------
def make_png(path: Path, seed: int, size: int = 48) -> Path:
    """A distinct RGB PNG per seed (noise over a gradient, so every file has its own sha256)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    base = np.linspace(0, 255, size, dtype=np.float32)[None, :, None] * np.ones((size, 1, 3), np.float32)
    arr = np.clip(base * rng.uniform(0.3, 1.0, 3) + rng.normal(0, 40, (size, size, 3)), 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr, "RGB").save(path, format="PNG")
    return path


def make_pngs(folder: Path, n: int, start_seed: int = 0) -> list[Path]:
    return [make_png(folder / f"tile_{i:03d}.png", start_seed + i) for i in range(n)]


def make_jpeg(path: Path, seed: int, size: int = 64) -> Path:
    from PIL import Image

    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr, "RGB").save(path, format="JPEG", quality=85)
    return path


def write_tiff(path: Path, array: np.ndarray, photometric: int | None = None) -> Path:
    """An uncompressed little-endian TIFF of any band count and uint8/uint16 depth, written by hand:
    Pillow cannot write 4-band or multi-band 16-bit TIFFs, which is what RS imagery looks like.
    Bands beyond the third are ExtraSamples 'unspecified' (e.g. NIR), not alpha."""
    if array.ndim == 2:
        array = array[..., None]
    h, w, spp = array.shape
    bits = array.dtype.itemsize * 8
    assert array.dtype in (np.uint8, np.uint16)
    data = np.ascontiguousarray(array.astype(array.dtype.newbyteorder("<"))).tobytes()
    if photometric is None:
        photometric = 2 if spp >= 3 else 1  # RGB or min-is-black
    entries: list[tuple[int, int, int, bytes]] = []  # tag, type, count, value bytes
    short = lambda *v: struct.pack(f"<{len(v)}H", *v)  # noqa: E731
    long_ = lambda *v: struct.pack(f"<{len(v)}I", *v)  # noqa: E731
    entries.append((256, 4, 1, long_(w)))
    entries.append((257, 4, 1, long_(h)))
    entries.append((258, 3, spp, short(*([bits] * spp))))
    entries.append((259, 3, 1, short(1)))
    entries.append((262, 3, 1, short(photometric)))
    entries.append((273, 4, 1, long_(0)))  # strip offset, patched below
    entries.append((277, 3, 1, short(spp)))
    entries.append((278, 4, 1, long_(h)))
    entries.append((279, 4, 1, long_(len(data))))
    entries.append((284, 3, 1, short(1)))
    if spp > 3 or (spp == 2):
        extra = spp - (3 if spp >= 3 else 1)
        entries.append((338, 3, extra, short(*([0] * extra))))
    entries.append((339, 3, spp, short(*([1] * spp))))
    n = len(entries)
    ifd_size = 2 + n * 12 + 4
    extra_area = 8 + ifd_size
    blobs = b""
    offsets = {}
    for tag, _typ, _count, value in entries:
        if len(value) > 4:
            offsets[tag] = extra_area + len(blobs)
            blobs += value + (b"\x00" if len(value) % 2 else b"")
    data_offset = extra_area + len(blobs)
    out = bytearray(b"II*\x00" + long_(8))
    out += short(n)
    for tag, typ, count, value in entries:
        if tag == 273:
            value = long_(data_offset)
        out += struct.pack("<HHI", tag, typ, count)
        out += long_(offsets[tag]) if tag in offsets else value.ljust(4, b"\x00")
    out += long_(0)
    out += blobs + data
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(bytes(out))
    return path


def make_tiff16(path: Path, seed: int = 0, size: int = 40, bands: int = 1) -> Path:
    """16-bit imagery with values in a narrow range, as sensors deliver (needs the stretch)."""
    rng = np.random.default_rng(seed)
    return write_tiff(path, rng.integers(300, 4000, (size, size, bands)).astype(np.uint16))


def make_tiff_4band(path: Path, seed: int = 0, size: int = 40) -> Path:
    """8-bit R, G, B, NIR."""
    rng = np.random.default_rng(seed)
    return write_tiff(path, rng.integers(0, 255, (size, size, 4)).astype(np.uint8))


def make_tiff_rgb(path: Path, seed: int = 0, size: int = 40) -> Path:
    rng = np.random.default_rng(seed)
    return write_tiff(path, rng.integers(0, 255, (size, size, 3)).astype(np.uint8))


# -- broken and hostile files -----------------------------------------------------------------------
def truncate(src: Path, dst: Path, fraction: float = 0.5) -> Path:
    data = src.read_bytes()
    dst.write_bytes(data[: max(1, int(len(data) * fraction))])
    return dst


def zero_byte(path: Path) -> Path:
    path.write_bytes(b"")
    return path


def text_named_image(path: Path) -> Path:
    path.write_text("this is a text file pretending to be an image\n" * 20)
    return path


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_bomb(path: Path, width: int = 100_000, height: int = 100_000) -> Path:
    """A valid PNG header declaring width x height 8-bit RGB pixels, with a few bytes of data: the
    decoder would need width*height*3 bytes (30 GB at the default) to decode it."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 1024)  # the first rows of zeros; the rest is 'missing'
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b""))
    return path


def symlink_loops(folder: Path) -> list[Path]:
    """A directory link back to its parent (a walk loop) and a file link to itself (ELOOP)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "loop_dir").symlink_to(folder, target_is_directory=True)
    (folder / "self_loop.png").symlink_to(folder / "self_loop.png")
    return [folder / "loop_dir", folder / "self_loop.png"]


def non_utf8_name(folder: Path, seed: int = 7) -> Path:
    """A valid PNG whose file name is not UTF-8 (bytes b'\\xff\\xfe.png'); returns the str path
    Python uses for it (surrogate-escaped)."""
    folder.mkdir(parents=True, exist_ok=True)
    raw = os.fsencode(folder) + b"/\xff\xfe.png"
    buf = io.BytesIO()
    from PIL import Image

    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(buf, "PNG")
    with open(raw, "wb") as fh:
        fh.write(buf.getvalue())
    return Path(os.fsdecode(raw))


# -- models -----------------------------------------------------------------------------------------
def test_vlm_files() -> tuple[Path, Path]:
    """The built test VLM (model, mmproj); fails with the fix when it is not built."""
    import pytest

    from edge_t2t import config

    d = config.test_vlm_dir()
    model, mmproj = d / "tiny-llava.F16.gguf", d / "tiny-llava-mmproj.F16.gguf"
    if not model.is_file() or not mmproj.is_file():
        pytest.fail(f"test VLM not built in {d}: run `make models` (or `edge-t2t models build-test-vlm`)")
    if not (config.embedder_dir() / "manifest.json").is_file():
        pytest.fail(f"embedder not built in {config.embedder_dir()}: run `make models`")
    return model, mmproj


def require(module: str, fix: str):
    """Import `module`, or fail (never skip) naming the fix. conftest's rule for shared data and
    models, applied to packages: what `make test` installs must be there, and a test that skipped
    because it was not would be a green run that checked nothing."""
    import importlib

    import pytest

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        pytest.fail(f"{module} cannot be imported ({exc}): {fix}")


# -- running the CLI --------------------------------------------------------------------------------
# How long a CLI run or a wait may take before a test calls it hung. Only a hang may reach it: the
# suite must give the same verdicts on an idle machine and on one loaded by others (2 cores at a
# load of 15-20, the e2e RSICD index and eval runs took over 300 s, the old limit).
HANG_S = 1800.0
def child_env(cache_dir: Path, **extra: str) -> dict[str, str]:
    """Environment for a CLI subprocess: its own caption cache (never the user's), fixed threads so
    runs are reproducible, and the package importable from the checkout."""
    env = dict(os.environ)
    env["EDGE_T2T_CACHE_DIR"] = str(cache_dir)
    env.setdefault("EDGE_T2T_THREADS", "2")
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.pop("EDGE_T2T_FAULTS", None)
    env.update(extra)
    return env


def cli_argv(*args: str, faults: list[dict] | None = None) -> tuple[list[str], dict[str, str]]:
    """argv to run `edge-t2t ARGS` in a subprocess (through the fault wrapper when faults are given),
    and the extra environment that carries the faults."""
    if not faults:
        return [sys.executable, "-m", "edge_t2t", *args], {}
    code = f"import sys; sys.path.insert(0, {str(TESTS)!r}); import helpers_media; helpers_media.child_main()"
    return [sys.executable, "-c", code, *args], {"EDGE_T2T_FAULTS": json.dumps(faults)}


def run_cli(*args: str, env: dict[str, str], faults: list[dict] | None = None, timeout: float = HANG_S,
            cwd: Path = ROOT) -> subprocess.CompletedProcess:  # fmt: skip
    argv, extra = cli_argv(*args, faults=faults)
    # surrogateescape: a non-UTF-8 byte in the output is kept for the test to judge, not a harness crash
    return subprocess.run(argv, capture_output=True, text=True, errors="surrogateescape", env={**env, **extra},
                          cwd=cwd, timeout=timeout)  # fmt: skip


def committed_rows(index: Path, table: str, timeout: float = 1) -> int:
    """Rows of `table` that a running `index` has committed (read-only; 0 before the store exists)."""
    import sqlite3

    try:
        conn = sqlite3.connect(f"file:{index / 'store.sqlite'}?mode=ro", uri=True, timeout=timeout)
        try:
            return conn.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0]
        finally:
            conn.close()
    except sqlite3.Error:
        return 0


def wait_until_stopped(proc: subprocess.Popen, timeout: float = HANG_S, exit_ok: bool = False) -> bool:
    """Wait until `proc` has stopped itself (fault action "stop") and return True. If it exits
    instead: False when `exit_ok`, else the test fails."""
    import time

    deadline = time.monotonic() + timeout
    while proc.poll() is None:
        with open(f"/proc/{proc.pid}/stat") as fh:
            state = fh.read().rsplit(")", 1)[1].split()[0]  # the field after "(comm)"
        if state in ("T", "t"):
            return True
        assert time.monotonic() < deadline, f"process {proc.pid} never stopped (state {state})"
        time.sleep(0.05)
    assert exit_ok, f"the process exited ({proc.returncode}) before it stopped where asked"
    return False


PAUSE_AFTER_EVERY_COMMIT = [{"stage": "commit_after", "at": "*", "action": "stop"}]


def pause_once_committed(proc: subprocess.Popen, index: Path, at_least: int, table: str = "images") -> int:
    """`proc`, an `index` run that pauses itself at a stage every time (e.g. PAUSE_AFTER_EVERY_COMMIT),
    is resumed through its pauses until one finds at least `at_least` rows of `table` committed, and
    left stopped right there. Returns those rows: nothing can change them until the test resumes it."""
    while True:
        wait_until_stopped(proc)
        committed = committed_rows(index, table)
        if committed >= at_least:
            return committed
        os.kill(proc.pid, signal.SIGCONT)


def signal_and_finish(proc: subprocess.Popen, sig: int, timeout: float = HANG_S) -> tuple[str, str]:
    """Send `sig` to the stopped `proc`, resume it, resume it past any later pause, and collect its
    output (a SIGKILL needs no resuming: the kernel delivers it to a stopped process)."""
    os.kill(proc.pid, sig)
    if sig != signal.SIGKILL:
        os.kill(proc.pid, signal.SIGCONT)
        while wait_until_stopped(proc, exit_ok=True):
            os.kill(proc.pid, signal.SIGCONT)
    return proc.communicate(timeout=timeout)


def has_traceback(text: str) -> bool:
    return "Traceback (most recent call last)" in text


# -- fault injection (runs inside the child process) ------------------------------------------------
# A fault is {"stage": NAME, "at": N, "action": "kill" | "int" | "rewrite", ...}: at the N-th time
# (1-based) this process reaches NAME, do the action. Stages:
#   caption        before the VLM's generate() or describe_parallel() call for one image
#   embed          before Embedder.embed() (each indexer batch)
#   commit_before  inside a store transaction, all rows written, before COMMIT
#   commit_after   right after COMMIT, before the vector files are saved
#   save_npy       after an .npy temp file is written, before it replaces the old one
#   save_usearch   before the usearch graph is written (the two .npy files are already new)
#   hashed         after a file was read and hashed (ImageBytes.read; action 'rewrite' replaces
#                  that file's content)
#   lock_busy      a try to take a lock found it held by another process (before --wait's sleep)
#   record         after `caption --out` wrote (and fsynced) a record
#   store_open     the store is open (created or migrated), before the run's first transaction
#   migrate        the schema v7 upgrade has written everything, before its COMMIT
#   vacuum         the upgrade is committed, before the VACUUM that gives the space back
#   vacuum_step    inside that VACUUM (SQLite's progress handler, every 100 virtual-machine steps)
#   gpu_devices    the VLM lists llama.cpp's GPU devices; action "report" overrides what each reports:
#                  "free_bytes" (its free memory) and "software" (a CPU-type device, never auto's)
# "at" may be "*": every time. With "after": [OTHER, M], "at" counts only the times NAME is reached
# once OTHER has been reached M times (e.g. the first COMMIT after the 2nd batch's embedding: inside
# that batch's transaction). Action "stop" pauses the process right there (SIGSTOP to itself) with
# everything it holds (the index lock, an open transaction) until the test sends SIGCONT; see
# wait_until_stopped().
def child_main() -> None:
    faults = json.loads(os.environ.get("EDGE_T2T_FAULTS") or "[]")
    counts: dict[str, int] = {}

    def reach(stage: str, path: str | None = None) -> None:
        counts[stage] = counts.get(stage, 0) + 1
        for f in faults:
            if f["stage"] != stage:
                continue
            n = counts[stage]
            if "after" in f:
                other, m = f["after"]
                if counts.get(other, 0) < m:
                    continue
                n -= f.setdefault("_reached_before", n - 1)  # counted from the time `other` got to m
            if f["at"] in (n, "*"):
                act = f.get("action", "kill")
                if act == "kill":
                    os.kill(os.getpid(), signal.SIGKILL)
                elif act == "stop":
                    os.kill(os.getpid(), signal.SIGSTOP)
                elif act == "int":
                    os.kill(os.getpid(), signal.SIGINT)
                elif act == "rewrite" and path:
                    make_png(Path(path), seed=int(f.get("seed", 999)), size=int(f.get("size", 40)))

    from contextlib import contextmanager

    from edge_t2t.describe import vlm
    from edge_t2t.embed import embedder
    from edge_t2t.index import indexdir, schema, snapshot_writer, store

    # Both caption paths: generate() (sequential) and describe_parallel() (the default).
    def reaching_caption(orig):
        def wrapped(self, *a, **k):
            reach("caption")
            return orig(self, *a, **k)

        return wrapped

    for name in ("generate", "describe_parallel"):
        setattr(vlm.VLM, name, reaching_caption(getattr(vlm.VLM, name)))

    orig_embed = embedder.Embedder.embed

    def embed(self, *a, **k):
        reach("embed")
        return orig_embed(self, *a, **k)

    embedder.Embedder.embed = embed

    orig_tx = store.Store.transaction

    @contextmanager
    def transaction(self):
        with orig_tx(self) as conn:
            yield conn
            reach("commit_before")
        reach("commit_after")

    store.Store.transaction = transaction

    # Save every batch (not every 60 s), so the kills land on many snapshot saves.
    indexdir.CHECKPOINT_EVERY_S = 0.0

    orig_append = snapshot_writer.VectorWriter._append

    def append(self, *a, **k):
        out = orig_append(self, *a, **k)
        reach("append")  # rows appended past the manifest's count: cut off by the next writer
        return out

    snapshot_writer.VectorWriter._append = append

    orig_save_graph = snapshot_writer._save_graph

    def save_graph(path, graph):
        reach("save_graph")
        return orig_save_graph(path, graph)

    snapshot_writer._save_graph = save_graph

    orig_manifest = snapshot_writer._write_manifest

    def write_manifest(index_dir, manifest):
        orig_manifest(index_dir, manifest)
        reach("manifest")  # the new generation is out, SQLite's meta and deletion log not yet updated

    snapshot_writer._write_manifest = write_manifest

    # The schema v7 upgrade (issue 25): MIGRATIONS holds the step itself, so it is wrapped there.
    at = schema.MIGRATIONS.index(schema.lean_layout)
    orig_lean = schema.MIGRATIONS[at]

    def lean_layout(conn):
        orig_lean(conn)
        reach("migrate")

    schema.MIGRATIONS[at] = lean_layout
    orig_give_back = store.Store._give_space_back

    def give_space_back(self):
        reach("vacuum")
        self.conn.set_progress_handler(lambda: reach("vacuum_step"), 100)
        try:
            return orig_give_back(self)
        finally:
            self.conn.set_progress_handler(None, 0)

    store.Store._give_space_back = give_space_back

    from edge_t2t.images import ImageBytes

    orig_read = ImageBytes.read.__func__

    def read(cls, path):
        image = orig_read(cls, path)  # read and hashed: the bytes the indexer will describe
        reach("hashed", str(path))
        return image

    ImageBytes.read = classmethod(read)

    from edge_t2t.describe import vlm_devices

    orig_devices = vlm_devices.gpu_devices

    def gpu_devices(lc):
        devices, why = orig_devices(lc)
        for f in faults:
            if f["stage"] == "gpu_devices" and f.get("action") == "report":
                devices = [dataclasses.replace(d, free_bytes=int(f.get("free_bytes", d.free_bytes)),
                                               software=bool(f.get("software", d.software))) for d in devices]  # fmt: skip
        return devices, why

    vlm_devices.gpu_devices = gpu_devices

    import fcntl

    orig_flock = fcntl.flock

    def flock(fd, operation):
        try:
            return orig_flock(fd, operation)
        except BlockingIOError:
            reach("lock_busy")
            raise

    fcntl.flock = flock

    from edge_t2t.describe import captions

    orig_write = captions.JsonlWriter.write

    def write(self, record):
        orig_write(self, record)
        reach("record")

    captions.JsonlWriter.write = write

    orig_store_init = store.Store.__init__

    def store_init(self, *a, **k):
        orig_store_init(self, *a, **k)
        reach("store_open")

    store.Store.__init__ = store_init

    from edge_t2t.cli import main

    sys.exit(main(sys.argv[1:]))


# Dask workers are processes of their own: the CLI's local cluster spawns them, so child_main's
# wrappers are not in them. Dask runs this module in each as a preload (DASK_PRELOAD_FAULTS in the
# CLI's environment), and its faults {"stage": "worker_describe", "images": [NAME, ...],
# "action": "hold"} make a worker that starts describing one of those images wait there for good:
# the image is never finished, whatever the timing, until the process is closed.
DASK_PRELOAD_FAULTS = {"DASK_DISTRIBUTED__WORKER__PRELOAD": json.dumps([str(Path(__file__).resolve())])}


def dask_setup(worker) -> None:
    import threading

    held = {name for f in json.loads(os.environ.get("EDGE_T2T_FAULTS") or "[]")
            if f["stage"] == "worker_describe" and f["action"] == "hold" for name in f["images"]}  # fmt: skip
    if not held:
        return
    from edge_t2t.describe import cluster

    original = cluster._VLMHolder.describe

    def describe(holder, image, opts):
        if Path(image.path).name in held:
            threading.Event().wait()
        return original(holder, image, opts)

    cluster._VLMHolder.describe = describe


# A variant schema with bounded fields: an unbounded string lets a random model write until its token cap.
BOUNDED_SCHEMA = {
    "type": "object",
    "properties": {
        "one_sentence": {"type": "string", "maxLength": 40},
        "size": {"type": "string", "enum": ["small", "medium", "large"]},
        "caption": {"type": "string", "maxLength": 60},
    },
    "required": ["one_sentence", "size", "caption"],
}


def sample_png(path: Path) -> bytes:
    """The PNG the caption pipeline hands the VLM (images.to_png_bytes), of an RGB sample."""
    from PIL import Image

    from edge_t2t.images import to_png_bytes

    with Image.open(path) as im:
        return to_png_bytes(im.convert("RGB"))
