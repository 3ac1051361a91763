"""Readers during a write, and two writers on one index.

- `search` while `index` imports a few hundred RSICD captions (several batch commits): the writer
  pauses itself after every COMMIT (fault injection, helpers_media), so each search runs at a known
  committed state and must see exactly it; one more search overlaps each stretch of writing.
- A second `index` on the same store, while the first is paused holding the lock, refuses at once,
  naming the lock file and the writer's pid; with --wait it waits and then finds nothing to do.
  verify passes after both.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import helpers_media as hm
import pytest

from edge_t2t.index.lock import LOCK_FILE, IndexLock
from edge_t2t.index.verify import verify_index

N_IMAGES = 300


@pytest.fixture(scope="module")
def captions(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    hm.test_vlm_files()  # models must be built
    coco = json.loads((shared_data / "rsicd" / "captions_val.json").read_text())
    names = {img["id"]: img["file_name"] for img in coco["images"]}
    caps: dict[str, list[str]] = {}
    for ann in coco["annotations"]:
        caps.setdefault(names[ann["image_id"]], []).append(ann["caption"])
    path = tmp_path_factory.mktemp("conc") / "caps.jsonl"
    with open(path, "w") as fh:
        for name in sorted(caps)[:N_IMAGES]:
            fh.write(json.dumps({"image": name, "variants": caps[name]}) + "\n")
    return path


def _start_index(captions: Path, index: Path, env: dict, *extra: str, faults: list[dict] | None = None,
                 batch: int = 15) -> subprocess.Popen:  # fmt: skip
    argv, fault_env = hm.cli_argv("index", "--captions", str(captions), "--index", str(index), "--batch-size",
                                  str(batch), "--json", "--no-progress", *extra, faults=faults)  # fmt: skip
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**env, **fault_env}, cwd=hm.ROOT)  # fmt: skip


def _images_with_texts(index: Path) -> int:
    import sqlite3

    conn = sqlite3.connect(f"file:{index / 'store.sqlite'}?mode=ro", uri=True, timeout=30)
    try:
        return conn.execute("SELECT COUNT(DISTINCT image_id) FROM variants").fetchone()[0]
    finally:
        conn.close()


def _search_all(index: Path, env: dict, *mode: str) -> subprocess.CompletedProcess:
    return hm.run_cli("search", "many buildings and green trees", "--index", str(index), "--json", "-k", "1000",
                      *mode, env=env)  # fmt: skip


def _check_hits(res: subprocess.CompletedProcess, what: str) -> list[dict]:
    assert res.returncode == 0, f"search {what} failed: {res.stderr[-2000:]}"
    assert not hm.has_traceback(res.stderr)
    hits = [json.loads(line) for line in res.stdout.splitlines() if line.strip()]
    for h in hits:
        assert {"rank", "score", "image", "variant", "text"} <= set(h) and h["text"]
    assert [h["rank"] for h in hits] == list(range(1, len(hits) + 1))
    assert len({h["image"] for h in hits}) == len(hits)
    return hits


SEARCH_BATCH = 50


def test_search_during_index_sees_committed_state(captions: Path, tmp_path: Path) -> None:
    """The writer pauses itself right after every COMMIT (before the vector snapshot is saved), so
    each search runs at a known committed state. An exact search must return exactly the committed
    images (the newest batch read from SQLite by key); the default HNSW search, approximate, a
    subset of them (it can miss an image even with k above the image count). After each pause one
    more search runs while the writer is busy again and must succeed with valid results."""
    env = hm.child_env(tmp_path / "cache")
    index = tmp_path / "idx"
    writer = _start_index(captions, index, env, faults=[{"stage": "commit_after", "at": "*", "action": "stop"}],
                          batch=SEARCH_BATCH)  # fmt: skip
    paused: list[int] = []  # images with texts at each pause
    try:
        while hm.wait_until_stopped(writer, exit_ok=True):
            committed = _images_with_texts(index)
            res = _search_all(index, env, "--vector-mode", "exact")
            if committed == 0:  # the bookkeeping transaction before the first batch: nothing to find yet
                assert res.returncode == 2 and "empty" in res.stderr and not hm.has_traceback(res.stderr), res.stderr
            else:
                exact = {h["image"] for h in _check_hits(res, f"exact, at pause {len(paused)}")}
                assert len(exact) == committed, f"paused after a commit of {committed} images, search saw {len(exact)}"
                # the default (HNSW) path over the same state: approximate, so a subset of the exact set
                hnsw = {h["image"] for h in _check_hits(_search_all(index, env), f"at pause {len(paused)}")}
                assert hnsw <= exact and hnsw
            paused.append(committed)
            os.kill(writer.pid, signal.SIGCONT)
            if committed:
                hits = _check_hits(_search_all(index, env), "while the writer runs")
                assert 0 < len(hits) <= N_IMAGES
    finally:
        if writer.poll() is None:
            writer.kill()
    out, err = writer.communicate(timeout=600)
    assert writer.returncode == 0, err[-2000:]
    assert json.loads(out)["added"] == N_IMAGES
    batches = list(range(SEARCH_BATCH, N_IMAGES + 1, SEARCH_BATCH))
    assert [n for n in dict.fromkeys(paused) if n] == batches, f"pauses saw {paused}"
    assert paused == sorted(paused), paused
    rep = verify_index(index, check_models=False)
    assert rep.ok and rep.checks["counts"]["images_ok"] == N_IMAGES, rep.problems
    with_verify = hm.run_cli("verify", "--index", str(index), "--skip-models", env=env)
    assert with_verify.returncode == 0, with_verify.stdout


def test_second_index_refuses_or_waits(captions: Path, tmp_path: Path) -> None:
    """The first writer pauses itself after its first batch COMMIT, holding the lock: a second
    `index` must refuse at once (exit 2, one line naming the lock file and the writer's pid);
    `--wait` must find the lock held, wait, and then find nothing left to do."""
    env = hm.child_env(tmp_path / "cache")
    index = tmp_path / "idx"
    first = _start_index(captions, index, env, faults=[{"stage": "commit_after", "at": "*", "action": "stop"}])
    waiting = None
    try:
        while True:  # resume it through the bookkeeping commits, up to its first batch of images
            assert hm.wait_until_stopped(first, exit_ok=True), "the first writer finished instead of pausing after its first batch"
            if _images_with_texts(index):
                break
            os.kill(first.pid, signal.SIGCONT)
        assert IndexLock(index).is_locked() and IndexLock(index).holder() == first.pid
        assert _images_with_texts(index) == 15

        second = hm.run_cli("index", "--captions", str(captions), "--index", str(index), "--json", "--no-progress",
                            env=env)  # fmt: skip
        assert second.returncode == 2, second.stderr[-2000:]
        assert not hm.has_traceback(second.stderr) and second.stdout == ""
        lines = [ln for ln in second.stderr.splitlines() if ln.strip()]
        assert len(lines) == 1, lines
        assert str(index / LOCK_FILE) in lines[0] and f"process {first.pid} " in lines[0], lines[0]

        # verify while the writer is paused mid-run: a consistent snapshot, never a problem
        rep = verify_index(index, check_models=False)
        assert rep.ok, rep.problems

        # --wait: it pauses itself the first time it finds the lock held, which proves it waited
        waiting = _start_index(captions, index, env, "--wait", faults=[{"stage": "lock_busy", "at": 1, "action": "stop"}])
        assert hm.wait_until_stopped(waiting, exit_ok=True), "index --wait never found the lock held"
        os.kill(waiting.pid, signal.SIGCONT)  # it keeps polling while the first writer is paused
        os.kill(first.pid, signal.SIGCONT)
        while hm.wait_until_stopped(first, exit_ok=True):  # through its remaining commits
            os.kill(first.pid, signal.SIGCONT)
        out1, err1 = first.communicate(timeout=600)
        out2, err2 = waiting.communicate(timeout=600)
    finally:
        for proc in (first, waiting):
            if proc is not None and proc.poll() is None:
                proc.kill()
    assert first.returncode == 0, err1[-2000:]
    assert waiting.returncode == 0, err2[-2000:]
    s1, s2 = json.loads(out1), json.loads(out2)
    assert s1["added"] == N_IMAGES and (s2["added"], s2["skipped"]) == (0, N_IMAGES)
    assert not (index / LOCK_FILE).exists()
    rep = verify_index(index, check_models=False)
    assert rep.ok and rep.checks["counts"]["images_ok"] == N_IMAGES, rep.problems
