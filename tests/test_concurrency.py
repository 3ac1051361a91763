"""Readers during a write, and two writers on one index.

- `search` in a loop while `index` imports a few hundred RSICD captions (many batch commits):
  every search exits 0 with valid JSON lines, and what it sees only grows (it reads the last
  committed state, never a half-written one).
- A second `index` on the same store refuses at once, naming the lock file and the writer's pid;
  with --wait it waits and then finds nothing to do. verify passes after both.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import helpers_media as hm
import pytest

from edge_t2t.store import LOCK_FILE
from edge_t2t.verify import verify_index

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


def _start_index(captions: Path, index: Path, env: dict, *extra: str) -> subprocess.Popen:
    argv, _ = hm.cli_argv("index", "--captions", str(captions), "--index", str(index), "--batch-size", "15",
                          "--json", "--no-progress", *extra)  # fmt: skip
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=hm.ROOT)


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, f"index ended before {path.name} appeared: {proc.stderr.read()[-2000:]}"
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)


def _wait_for_texts(index: Path, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while True:
        assert proc.poll() is None, f"index ended before its first commit: {proc.stderr.read()[-2000:]}"
        assert time.monotonic() < deadline, "no commit within the timeout"
        if hm.committed_rows(index, "variants", timeout=5):
            return
        time.sleep(0.05)


def test_search_during_index_sees_committed_state(captions: Path, tmp_path: Path) -> None:
    env = hm.child_env(tmp_path / "cache")
    index = tmp_path / "idx"
    writer = _start_index(captions, index, env)
    _wait_for_texts(index, writer)  # the first batch is committed: from now on every search must work
    seen: list[int] = []
    runs = 0
    while writer.poll() is None or runs == 0:
        res = hm.run_cli("search", "many buildings and green trees", "--index", str(index), "--json", "-k", "1000",
                         env=env)  # fmt: skip
        runs += 1
        assert res.returncode == 0, f"search {runs} failed during indexing: {res.stderr[-2000:]}"
        assert not hm.has_traceback(res.stderr)
        hits = [json.loads(line) for line in res.stdout.splitlines() if line.strip()]
        assert hits, "a search after the first commit found nothing"
        for h in hits:
            assert {"rank", "score", "image", "variant", "text"} <= set(h) and h["text"]
        assert [h["rank"] for h in hits] == list(range(1, len(hits) + 1))
        assert len({h["image"] for h in hits}) == len(hits)
        seen.append(len(hits))
    out, err = writer.communicate(timeout=600)
    assert writer.returncode == 0, err[-2000:]
    assert json.loads(out)["added"] == N_IMAGES
    assert seen == sorted(seen), f"a later search saw fewer images than an earlier one: {seen}"
    assert runs >= 2, "the index finished before two searches ran; the test proved little"
    rep = verify_index(index, check_models=False)
    assert rep.ok and rep.checks["counts"]["images_ok"] == N_IMAGES, rep.problems
    with_verify = hm.run_cli("verify", "--index", str(index), "--skip-models", env=env)
    assert with_verify.returncode == 0, with_verify.stdout


def test_second_index_refuses_or_waits(captions: Path, tmp_path: Path) -> None:
    env = hm.child_env(tmp_path / "cache")
    index = tmp_path / "idx"
    first = _start_index(captions, index, env)
    _wait_for(index / LOCK_FILE, first)
    pid = first.pid
    second = hm.run_cli("index", "--captions", str(captions), "--index", str(index), "--json", "--no-progress", env=env)
    if first.poll() is None or second.returncode != 0:
        assert second.returncode == 2, second.stderr[-2000:]
        assert not hm.has_traceback(second.stderr)
        lines = [ln for ln in second.stderr.splitlines() if ln.strip()]
        assert len(lines) == 1, lines
        assert LOCK_FILE in lines[0] and str(pid) in lines[0], lines[0]

    # verify while the writer runs: a consistent snapshot, never a problem
    if first.poll() is None:
        rep = verify_index(index, check_models=False)
        assert rep.ok, rep.problems

    waiting = _start_index(captions, index, env, "--wait")
    out1, err1 = first.communicate(timeout=600)
    out2, err2 = waiting.communicate(timeout=600)
    assert first.returncode == 0, err1[-2000:]
    assert waiting.returncode == 0, err2[-2000:]
    s1, s2 = json.loads(out1), json.loads(out2)
    assert s1["added"] + s2["added"] == N_IMAGES
    assert s2["skipped"] + s2["added"] == N_IMAGES
    assert not (index / LOCK_FILE).exists()
    rep = verify_index(index, check_models=False)
    assert rep.ok and rep.checks["counts"]["images_ok"] == N_IMAGES, rep.problems
