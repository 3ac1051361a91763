"""Crash safety of `edge-t2t index`: SIGKILL at 22 seeded moments, SIGINT, and a full disk.

Kill moments are seeded named stages, through the fault wrapper in helpers_media (the child process
wraps the store's opening, the VLM's generate, Embedder.embed, Store.transaction and the vector
snapshot's saves, which it makes happen after every batch): start-up (the store just opened),
captioning, embedding, before and after each SQLite COMMIT, after rows are appended to the vector
files, before a graph is saved, and after a manifest is replaced but before SQLite records it. The
run pauses itself at the N-th time it reaches the stage; the test reads the committed rows there
and sends SIGKILL. No timer decides where a kill lands, so the whole chain is the same on a fast
or a slow machine.

After each kill: exactly the rows committed at the pause are kept, the store opens, `verify`
passes (a snapshot that lags SQLite is allowed: a kill between a commit and the save leaves it,
searches read the newer rows by key, and the next run catches it up), and the kill-chain finally
resumes to the same images, texts and search results as an uninterrupted run with the cache off.
"""

from __future__ import annotations

import json
import random
import signal
import sqlite3
import subprocess
import time
from pathlib import Path

import helpers_media as hm
import numpy as np
import pytest

from edge_t2t.index import schema
from edge_t2t.index.store import Store
from edge_t2t.index.verify import verify_index

N_IMAGES = 24
BATCH = "2"
SEED = 20240611
# The searches and the SIGINT tests use fp32. The int8 embedder quantises activations per batch
# (DynamicQuantizeLinear over the whole padded batch), so a text's int8 vector depends on which
# texts share its batch (cosine ~0.995 between alone and batched); fp32 vectors are
# batch-independent (~1e-8). The kill chain runs both: a batch is one transaction, so a resumed run
# starts again at a batch boundary, the batches hold the same images as an uninterrupted run's, and
# the stored int8 vectors must come out the same too.
PRECISION = "fp32"
PRECISIONS = ("fp32", "int8")
QUERIES = ("a river next to a green forest", "buildings and roads", "large parking lot in the north")


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("crash")
    images = root / "images"
    hm.make_pngs(images, N_IMAGES)
    model, mmproj = hm.test_vlm_files()
    ctx = {"root": root, "images": images, "model": model, "mmproj": mmproj}
    # The uninterrupted reference: a cold cache of its own, so it shares nothing with the killed runs.
    ref = root / "ref"
    env = hm.child_env(root / "cache_ref")
    res = hm.run_cli(*_index_args(ctx, ref), env=env)
    assert res.returncode in (0, 1) and not hm.has_traceback(res.stderr), res.stderr[-3000:]
    # The random-weight test VLM writes unparsable text for some images; those would be retried
    # by every run and slow the kill chain, so they leave the set (and the reference) here.
    for f in json.loads(res.stdout)["failures"]:
        assert "no usable description" in f["error"], f
        Path(f["image"]).unlink()
    assert len(list(images.glob("*.png"))) >= 10, "the test VLM failed on too many images"
    res = hm.run_cli(*_index_args(ctx, ref), "--no-cache", env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    ctx["ref"] = ref
    ctx["ref_state"] = _state(ref)
    ctx["ref_search"] = _search(ctx, ref)
    # The int8 reference: a fresh uninterrupted run (descriptions from the reference's cache).
    ref8 = root / "ref_int8"
    res = hm.run_cli(*_index_args(ctx, ref8, "int8"), env=env)
    assert res.returncode == 0 and json.loads(res.stdout)["added"] == len(ctx["ref_state"]["images"]), res.stderr[-3000:]
    ctx["ref_vectors"] = {"fp32": _vectors(ref), "int8": _vectors(ref8)}
    return ctx


def _index_args(ctx: dict, index: Path, precision: str = PRECISION) -> tuple[str, ...]:
    return ("index", str(ctx["images"]), "--index", str(index), "--vlm", str(ctx["model"]), "--mmproj",
            str(ctx["mmproj"]), "--variants", "1", "--batch-size", BATCH, "--precision", precision, "--json",
            "--no-progress")  # fmt: skip


def _vectors(index: Path) -> dict[tuple, tuple[np.ndarray, np.ndarray]]:
    """Per stored text, keyed by (path, ordinal, field, text) since keys differ between runs: its
    vector as exact search scores it (the float16 copy) and its int8 codes in the graph. A finished
    run keeps each vector once: no pending copy is left in SQLite."""
    from edge_t2t.index.vindex import Snapshot

    conn = sqlite3.connect(index / "store.sqlite")
    try:
        rows = conn.execute("SELECT t.id, i.path, v.ordinal, t.field, t.text FROM texts t "
                            "JOIN variants v ON v.id = t.variant_id JOIN images i ON i.id = v.image_id").fetchall()
        assert conn.execute("SELECT COUNT(*) FROM pending_vectors").fetchone()[0] == 0
    finally:
        conn.close()
    snap = Snapshot.open(index)
    assert snap is not None and len(snap) == len(rows), f"{index}: snapshot and SQLite disagree"
    keys = np.array([r[0] for r in rows], dtype=np.int64)
    at, live = snap.find(keys)
    assert live.all()
    codes, found = snap.graph_values(keys)
    assert found.all()
    return {tuple(r[1:5]): (snap.vectors_at(at[i : i + 1])[0], codes[i].astype(np.float32)) for i, r in enumerate(rows)}


def _assert_same_vectors(got: dict, ref: dict, what: str) -> None:
    assert got.keys() == ref.keys(), what
    exact = max(float(np.abs(got[t][0] - ref[t][0]).max()) for t in ref)
    codes = max(float(np.abs(got[t][1] - ref[t][1]).max()) for t in ref)
    print(f"\n[crash] {what}: max |difference| per component, exact copy {exact:.3g}, graph codes {codes:.3g}")
    assert exact <= 1e-6 and codes == 0, f"{what}: stored vectors differ from the uninterrupted run's"


def _state(index: Path) -> dict:
    conn = sqlite3.connect(index / "store.sqlite")
    try:
        images = sorted(conn.execute("SELECT path, sha256, status FROM images"))
        texts = sorted(conn.execute(
            "SELECT i.path, v.ordinal, t.field, t.text FROM texts t JOIN variants v ON v.id = t.variant_id "
            "JOIN images i ON i.id = v.image_id"
        ))  # fmt: skip
    finally:
        conn.close()
    return {"images": images, "texts": texts}


def _search(ctx: dict, index: Path) -> dict:
    env = hm.child_env(ctx["root"] / "cache_search")
    out = {}
    for mode in ("exact", "rescore"):
        for q in QUERIES:
            res = hm.run_cli("search", q, "--index", str(index), "--json", "-k", "5", "--mode", mode,
                             "--precision", PRECISION, env=env)  # fmt: skip
            assert res.returncode == 0, res.stderr[-2000:]
            hits = [json.loads(line) for line in res.stdout.splitlines() if line.strip()]
            out[(mode, q)] = [(h["image"], round(h["score"], 4)) for h in hits]
    return out


def _check_after_interruption(index: Path, what: str) -> None:
    """The store opens and verify passes (same code as `edge-t2t verify`, in-process for speed)."""
    if not (index / "store.sqlite").exists():
        return  # killed before the store was created: nothing to check
    with Store(index) as store:
        store.counts()
    rep = verify_index(index, check_models=False)
    assert rep.ok, f"after {what}: {rep.problems}"


def _assert_same_as_reference(ctx: dict, index: Path) -> None:
    state = _state(index)
    assert state["images"] == ctx["ref_state"]["images"]
    assert state["texts"] == ctx["ref_state"]["texts"]
    assert _search(ctx, index) == ctx["ref_search"]


STAGE_RANGES = {"store_open": 1, "caption": 3, "embed": 3, "commit_before": 4, "commit_after": 4, "append": 6,
                "save_graph": 4, "manifest": 4}  # fmt: skip
KILLS_WANTED = 22
MAX_RUNS = 45


def _next_fault(rng: random.Random, run: int) -> dict:
    if run < 4:  # the cache is cold: die while captioning
        return {"stage": "caption", "at": rng.randint(1, STAGE_RANGES["caption"]), "action": "stop"}
    stage = rng.choice(list(STAGE_RANGES))
    return {"stage": stage, "at": rng.randint(1, STAGE_RANGES[stage]), "action": "stop"}


def _one_run(ctx: dict, index: Path, env: dict, fault: dict, precision: str) -> tuple[int, str]:
    """One run, paused at `fault` (if it gets there) and SIGKILLed there: then exactly the image rows
    committed at the pause must be kept (a kill inside a transaction, before its COMMIT, keeps none
    of it)."""
    argv, extra = hm.cli_argv(*_index_args(ctx, index, precision), faults=[fault])
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**env, **extra}, cwd=hm.ROOT)  # fmt: skip
    try:
        committed = hm.committed_rows(index, "images") if hm.wait_until_stopped(proc, exit_ok=True) else None
        if committed is not None:
            _out, err = hm.signal_and_finish(proc, signal.SIGKILL)
        else:
            _out, err = proc.communicate(timeout=hm.HANG_S)
    finally:
        if proc.poll() is None:
            proc.kill()
    if committed is not None:
        assert hm.committed_rows(index, "images") == committed, f"{fault}: the kill changed the committed rows"
    return proc.returncode, err


@pytest.mark.slow
@pytest.mark.parametrize("precision", PRECISIONS)
def test_sigkill_at_random_moments(setup: dict, precision: str) -> None:
    """One seeded sequence of runs, each killed at a drawn stage and occurrence when it gets there
    (a resumed run has less to do). A run that is not killed completes its index, which is then
    compared with the reference and replaced by a fresh index directory, so the kills keep landing
    on real work. Every finished index must hold the same vectors as the uninterrupted run of the
    same precision."""
    rng = random.Random(SEED)
    root = setup["root"] / precision
    env = hm.child_env(root / "cache_kill")  # cold at first: the first runs die while captioning
    killed: list[dict] = []
    completed: list[Path] = []
    index = root / "killed_0"
    t0 = time.monotonic()
    for run in range(MAX_RUNS):
        if len(killed) >= KILLS_WANTED:
            break
        fault = _next_fault(rng, run)
        rc, err = _one_run(setup, index, env, fault, precision)
        what = f"run {run} {fault}"
        assert not hm.has_traceback(err), f"{what}: {err[-3000:]}"
        if rc == -signal.SIGKILL:
            killed.append(fault)
        else:
            assert rc == 0, f"{what}: rc {rc}: {err[-2000:]}"
        _check_after_interruption(index, what)
        if run % 7 == 6:  # now and then through the real CLI as well
            res = hm.run_cli("verify", "--index", str(index), "--skip-models", env=env)
            assert res.returncode == 0, f"{what}: {res.stdout}{res.stderr}"
        if rc == 0:  # this index is complete: it must equal the uninterrupted run
            assert _state(index) == setup["ref_state"], f"{index} after {what}"
            _assert_same_vectors(_vectors(index), setup["ref_vectors"][precision], f"{precision} {index.name}")
            completed.append(index)
            index = root / f"killed_{len(completed)}"
    print(f"\n[crash] {len(killed)} kills in {run + 1} runs, {len(completed)} indexes completed, "
          f"{time.monotonic() - t0:.0f} s")  # fmt: skip
    assert len(killed) == KILLS_WANTED, f"only {len(killed)} of {run + 1} runs were killed: {killed}"
    stages_hit = {k["stage"] for k in killed}
    assert set(STAGE_RANGES) <= stages_hit, f"stages never hit: {set(STAGE_RANGES) - stages_hit}"

    # The last, interrupted index resumes to the same images, texts and stored vectors.
    res = hm.run_cli(*_index_args(setup, index, precision), env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    assert verify_index(index).ok
    assert _state(index) == setup["ref_state"]
    _assert_same_vectors(_vectors(index), setup["ref_vectors"][precision], f"{precision} resumed {index.name}")


# Where a kill during the in-place upgrade to schema v7 must leave the store: (schema version,
# whether the VACUUM that gives the space back is still owed).
# The VACUUM runs once every schema step has committed (the lean layout's, v7, and the later ones).
LATEST = schema.SCHEMA_VERSION
VACUUM_STEPS = 12  # the VACUUM of the reference index's v6 copy reaches its progress handler at least this often (not 39 times)
UPGRADE_KILLS = {
    "migrate": (6, False),  # the v7 transaction never committed: the old store, untouched
    "vacuum": (LATEST, True),  # committed, VACUUM not begun
    "vacuum_step": (LATEST, True),  # inside the VACUUM: rolled back, still owed
    "commit_before": (LATEST, True),  # VACUUM done, its marker not yet cleared: done again, harmlessly
    "commit_after": (LATEST, False),  # marker cleared
}


def _schema_and_owed(index: Path) -> tuple[int, bool]:
    conn = sqlite3.connect(index / "store.sqlite")
    try:
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        owed = conn.execute("SELECT 1 FROM meta WHERE key = 'vacuum_pending'").fetchone() is not None
    finally:
        conn.close()
    return version, owed


@pytest.mark.slow
def test_sigkill_across_the_upgrade_to_the_lean_layout(setup: dict, tmp_path: Path) -> None:
    """An index written before the lean layout (schema v6: every text with its variant's fields and
    a float32 vector) is upgraded in place by the first command that opens it, here `index`. A kill
    at each stage of the upgrade, and at seeded moments, leaves a store that opens (finishing the
    upgrade), verifies clean, and holds the same texts and vectors as the reference index, with the
    space given back."""
    import shutil

    from helpers_old_store import make_v6_copy

    old = tmp_path / "v6"
    make_v6_copy(setup["ref"], old)
    assert _schema_and_owed(old) == (6, False)
    rng = random.Random(SEED + 25)
    faults = [{"stage": stage, "at": 2 if stage == "vacuum_step" else 1, "action": "kill"} for stage in UPGRADE_KILLS]
    # and at seeded moments inside the VACUUM (its progress handler is reached every 100 steps of
    # SQLite's virtual machine: more than VACUUM_STEPS times for this store): known points, not a timer
    faults += [{"stage": "vacuum_step", "at": rng.randint(3, VACUUM_STEPS), "action": "kill"} for _ in range(4)]
    env = hm.child_env(tmp_path / "cache")
    for i, fault in enumerate(faults):
        index = tmp_path / f"up{i}"
        shutil.copytree(old, index)
        rc, err = _one_run(setup, index, env, fault, PRECISION)
        what = f"upgrade run {i} {fault}"
        assert not hm.has_traceback(err), f"{what}: {err[-3000:]}"
        assert rc == -signal.SIGKILL, f"{what}: rc {rc}: {err[-2000:]}"
        assert _schema_and_owed(index) == UPGRADE_KILLS[fault["stage"]], what
        _check_after_interruption(index, what)  # opening it finishes the upgrade; verify is clean
        assert _schema_and_owed(index) == (LATEST, False), what
        with Store(index) as store:
            up = store.get_meta("upgrade")
            assert store.conn.execute("PRAGMA auto_vacuum").fetchone()[0] == 2, what  # VACUUM ran
        assert up["bytes_after"] < up["bytes_before"] and up["vectors_kept_pending"] == 0, (what, up)
        assert _state(index) == setup["ref_state"], what
        _assert_same_vectors(_vectors(index), setup["ref_vectors"][PRECISION], what)
    assert _search(setup, index) == setup["ref_search"]


@pytest.mark.parametrize(
    "fault",
    [
        {"stage": "caption", "at": 3, "action": "int"},  # mid-captioning: finish the image, then stop
        {"stage": "embed", "at": 2, "action": "int"},
        {"stage": "commit_after", "at": 3, "action": "int"},  # between a commit and its vector save
    ],
    ids=["caption", "embed", "after-commit"],
)
def test_sigint_keeps_finished_work(setup: dict, tmp_path: Path, fault: dict) -> None:
    env = hm.child_env(tmp_path / "cache")
    index = tmp_path / "idx"
    res = hm.run_cli(*_index_args(setup, index), env=env, faults=[fault])
    assert not hm.has_traceback(res.stderr), res.stderr[-3000:]
    assert res.returncode == 130, f"rc {res.returncode}; stderr: {res.stderr[-2000:]}"
    lines = [ln for ln in res.stderr.splitlines() if "interrupted" in ln]
    assert len(lines) == 1 and "kept" in lines[0], res.stderr[-2000:]
    _check_after_interruption(index, f"SIGINT {fault}")
    # An interrupt is not a failure: no image may be recorded as failed because of it.
    conn = sqlite3.connect(index / "store.sqlite")
    failed = conn.execute("SELECT path, error FROM images WHERE status = 'failed'").fetchall()
    conn.close()
    assert failed == [], f"images marked failed by the interrupt: {failed}"
    res2 = hm.run_cli(*_index_args(setup, index), env=env)
    assert res2.returncode == 0, res2.stderr[-2000:]
    _assert_same_as_reference(setup, index)


@pytest.mark.parametrize("stage", ["embed", "commit_after"])
def test_sigint_from_outside(setup: dict, tmp_path: Path, stage: str) -> None:
    """A real Ctrl-C (SIGINT from another process) once the first batch is committed: before a
    batch's embedding, or right after its COMMIT (where the summary once said "kept 0" for a batch
    the store kept: the count now happens with the commit)."""
    env = hm.child_env(tmp_path / "cache")
    index = tmp_path / "idx"
    # The run pauses itself at `stage` each time (fault action "stop"); the first pause with a batch
    # already committed gets the SIGINT, delivered when it resumes: it cannot finish before the
    # signal lands.
    argv, extra = hm.cli_argv(*_index_args(setup, index), faults=[{"stage": stage, "at": "*", "action": "stop"}])
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**env, **extra},
                            cwd=hm.ROOT)  # fmt: skip
    try:
        hm.pause_once_committed(proc, index, 1, table="variants")
        kept = hm.committed_rows(index, "images")
        out, err = hm.signal_and_finish(proc, signal.SIGINT)  # resumed through any later pause
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not hm.has_traceback(err), err[-3000:]
    assert proc.returncode == 130, err[-2000:]
    assert json.loads(out)["added"] == kept > 0
    _check_after_interruption(index, "SIGINT from outside")


# -- disk full ----------------------------------------------------------------------------------
def _captions_jsonl(shared_data: Path, path: Path, n_images: int) -> Path:
    coco = json.loads((shared_data / "rsicd" / "captions_val.json").read_text())
    names = {img["id"]: img["file_name"] for img in coco["images"]}
    caps: dict[str, list[str]] = {}
    for ann in coco["annotations"]:
        caps.setdefault(names[ann["image_id"]], []).append(ann["caption"])
    with open(path, "w") as fh:
        for name in sorted(caps)[:n_images]:
            fh.write(json.dumps({"image": name, "variants": caps[name]}) + "\n")
    return path


def _disk_full_run(argv: list[str], env: dict, preexec=None) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, env=env, cwd=hm.ROOT, timeout=hm.HANG_S, preexec_fn=preexec)


def _assert_clean_failure(res: subprocess.CompletedProcess) -> None:
    assert res.returncode not in (0, 130) and res.returncode > 0, f"rc {res.returncode}: {res.stderr[-2000:]}"
    assert not hm.has_traceback(res.stderr), res.stderr[-3000:]
    msg = [ln for ln in res.stderr.splitlines() if ln.startswith("edge-t2t:")]
    assert msg, res.stderr[-2000:]


def test_disk_full_on_tmpfs(shared_data: Path, tmp_path: Path) -> None:
    """The index lives on a 1 MiB tmpfs: a clear error, then (space freed) verify passes and the
    same command completes."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.fail("cannot mount a tmpfs: run the tests as root (CAP_SYS_ADMIN), as `make test` in CI does")
    try:
        captions = _captions_jsonl(shared_data, tmp_path / "caps.jsonl", 150)
        env = hm.child_env(tmp_path / "cache")
        argv, _ = hm.cli_argv("index", "--captions", str(captions), "--index", str(mnt / "idx"), "--batch-size", "10",
                              "--json", "--no-progress")  # fmt: skip
        res = _disk_full_run(argv, env)
        assert res.returncode > 0, f"rc {res.returncode}: {res.stderr[-2000:]}"
        subprocess.run(["mount", "-o", "remount,size=64m", str(mnt)], check=True)
        _check_after_interruption(mnt / "idx", "disk full")  # consistency first, then the message
        res2 = _disk_full_run(argv, env)
        assert res2.returncode == 0, res2.stderr[-2000:]
        assert json.loads(res2.stdout)["failed"] == 0
        rep = verify_index(mnt / "idx", check_models=False)
        assert rep.ok and rep.checks["counts"]["images_ok"] == 150
        _assert_clean_failure(res)
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_disk_full_by_file_size_limit(shared_data: Path, tmp_path: Path) -> None:
    """RLIMIT_FSIZE in the child: a write past 1 MiB fails with EFBIG (SIGXFSZ ignored), as on a
    full disk. Needs no root."""
    import resource

    captions = _captions_jsonl(shared_data, tmp_path / "caps.jsonl", 150)
    env = hm.child_env(tmp_path / "cache")
    index = tmp_path / "idx"
    argv, _ = hm.cli_argv("index", "--captions", str(captions), "--index", str(index), "--batch-size", "10",
                          "--json", "--no-progress")  # fmt: skip

    def limit() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))

    res = _disk_full_run(argv, env, limit)
    assert res.returncode > 0, f"rc {res.returncode}: {res.stderr[-2000:]}"
    _check_after_interruption(index, "file size limit")  # consistency first, then the message
    res2 = _disk_full_run(argv, env)
    assert res2.returncode == 0, res2.stderr[-2000:]
    assert verify_index(index, check_models=False).ok
    _assert_clean_failure(res)
