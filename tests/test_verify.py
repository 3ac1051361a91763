"""`edge-t2t verify` against stores built directly with store.py + vindex.py (no models needed):
each test damages one thing and checks that verify names it, and that --repair fixes what it can."""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from fake_embedder import FakeEmbedder

from edge_t2t.index import vindex
from edge_t2t.index.lock import LOCK_FILE
from edge_t2t.index.schema import SCHEMA_VERSION
from edge_t2t.index.store import STORE_FILE, NewText, Store
from edge_t2t.index.verify import verify_index
from edge_t2t.records import Feature, Variant

ROOT = Path(__file__).resolve().parent.parent
DIM = 16
EMB = FakeEmbedder(DIM)  # the "recorded embedder" of these stores: a repair embeds lost vectors with it


@pytest.fixture(autouse=True)
def _no_current_embedder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """These stores carry a made-up embedder identity: point the 'current embedder' at an empty
    folder so the comparison with a built one (models/embedder) does not apply."""
    monkeypatch.setenv("EDGE_T2T_EMBEDDER", str(tmp_path / "no-embedder"))


def _unit(rng: np.random.Generator, n: int) -> np.ndarray:
    v = rng.standard_normal((n, DIM)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def _build(index_dir: Path, *, images: int = 6, texts: int = 3, dtype: str = "i8", manifest: dict | None = None,
           exact_copy: bool = True) -> Path:
    """A small sound index: `images` ok images with `texts` texts each, plus one failed image; the
    vectors are EMB's, so a repair that embeds them again gets the same ones."""
    with Store(index_dir, create=True) as store:
        with store.transaction():
            store.set_meta("dim", DIM)
            store.set_meta("dtype", dtype)
            store.set_meta("exact_copy", exact_copy)
            store.set_meta("text_mode", "joined")
            store.set_meta("embedder_identity", EMB.identity)
            if manifest is not None:
                store.set_meta("embedder_manifest", manifest)
            for i in range(images):
                image_id = store.put_image(f"/data/img{i}.png", size=10, mtime_ns=1, sha256=f"{i:064x}", source="vlm",
                                           provenance={"model": "m.gguf", "mmproj": "p.gguf", "family": "llava-1.5",
                                                       "prompt_version": "v1", "test_model": True})
                names = [f"text {i}.{j} river{i} field{j}" for j in range(texts)]
                vecs = EMB.embed(names)
                variant = Variant("a field", (Feature("river", "west", "large"),), "a caption")
                store.add_texts(image_id, [NewText(j, "joined", variant, names[j], vecs[j]) for j in range(texts)])
            store.put_image("/data/broken.png", status="failed", error="cannot decode")
    _rebuild(index_dir)
    return index_dir


def _rebuild(index_dir: Path, dtype: str | None = None) -> None:
    from edge_t2t.index.indexdir import IndexDir

    with IndexDir.open_writer(index_dir, create=False) as ix:
        ix.rebuild(DIM, dtype)


def _file(index_dir: Path, kind: str) -> Path:
    """The snapshot file of one kind (rows, exact, base, ...) that the manifest names."""
    return index_dir / vindex.read_manifest(index_dir)[kind]


def _rows(index_dir: Path) -> np.ndarray:
    return np.fromfile(_file(index_dir, "rows"), dtype=np.int64).reshape(-1, 2)


def _cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "edge_t2t", "verify", *args],
        capture_output=True, text=True, cwd=ROOT, env={**os.environ, **(env or {})}, timeout=120,
    )


@pytest.mark.parametrize("dtype", ["i8", "f16", "f32"])
def test_sound_index_passes(tmp_path: Path, dtype: str) -> None:
    index = _build(tmp_path / "idx", dtype=dtype)
    rep = verify_index(index)
    assert rep.ok, rep.problems
    assert rep.checks["vectors"]["state"] == "match"
    assert rep.checks["texts"]["texts"] == 18 and rep.checks["texts"]["pending_vectors"] == 0
    assert rep.checks["counts"] == {"images_ok": 6, "images_failed": 1}
    assert rep.checks["schema"]["version"] == SCHEMA_VERSION
    # These descriptions name no VLM files (as imported captions), so verify says it checked none.
    vlm = rep.checks["models"]["vlm"]
    assert vlm["status"] == "not_recorded" and vlm["files"] == {}
    assert vlm["descriptions"] == 1 and vlm["without_files"] == 1
    assert {"model_path", "model_sha256", "mmproj_path", "mmproj_sha256"} <= set(vlm["columns"])


def test_stale_vectors_are_a_warning_and_repair_fixes_them(tmp_path: Path) -> None:
    index = _build(tmp_path / "idx")
    # A commit whose save never happened (what a SIGKILL between the two leaves).
    with Store(index) as store, store.transaction():
        image_id = store.put_image("/data/new.png", sha256="f" * 64)
        store.add_texts(image_id, [NewText(0, "joined", Variant("x"), "new", _unit(np.random.default_rng(5), 1)[0])])
    rep = verify_index(index)
    assert rep.ok, rep.problems
    assert rep.checks["vectors"]["state"] == "stale"
    assert rep.checks["vectors"]["newer_than_snapshot"] == 1
    assert any("lags" in w for w in rep.warnings)
    fixed = verify_index(index, repair=True)
    assert fixed.ok and fixed.repaired
    assert fixed.checks["vectors"]["state"] == "match"
    assert verify_index(index).checks["vectors"]["state"] == "match"


def _exact_vectors(index: Path) -> np.ndarray:
    """Every stored vector as exact search scores it, in key order."""
    snap = vindex.Snapshot.open(index)
    return snap.vectors_at(np.arange(len(snap.rows)))


@pytest.mark.parametrize("exact_copy", [True, False])
def test_lost_vector_files_are_a_problem_and_repair_embeds_the_texts_again(tmp_path: Path, exact_copy: bool) -> None:
    """The snapshot holds each vector once: without it only the texts are left. --repair embeds them
    again with the recorded embedder, giving the vectors the index had."""
    index = _build(tmp_path / "idx", exact_copy=exact_copy)
    before = _exact_vectors(index)
    (index / vindex.MANIFEST_FILE).unlink()
    rep = verify_index(index)
    assert not rep.ok and rep.checks["vectors"]["state"] == "corrupt"
    assert any("no vector anywhere" in p and "18 texts" in p for p in rep.problems), rep.problems
    fixed = verify_index(index, repair=True, embedder=EMB)
    assert fixed.ok and fixed.checks["vectors"]["state"] == "match", fixed.problems
    assert fixed.repair["embedded_again"] == 18 and fixed.repair["vectors"] == 18
    assert np.array_equal(_exact_vectors(index), before)
    assert all((index / name).exists() for name in vindex.manifest_files(vindex.read_manifest(index)))


def test_a_snapshot_not_saved_yet_is_a_warning(tmp_path: Path) -> None:
    """Texts committed before the first save keep their pending vectors: nothing is lost."""
    index = tmp_path / "idx"
    with Store(index, create=True) as store, store.transaction():
        store.set_meta("dim", DIM)
        store.set_meta("dtype", "i8")
        store.set_meta("embedder_identity", EMB.identity)
        image = store.put_image("/data/a.png")
        store.add_texts(image, [NewText(0, "joined", Variant("x"), "x", EMB.embed(["x"])[0])])
    rep = verify_index(index)
    assert rep.ok and rep.checks["vectors"]["state"] == "missing"
    fixed = verify_index(index, repair=True)  # no embedder needed: the vector is on disk
    assert fixed.ok and fixed.checks["vectors"]["state"] == "match" and fixed.repair["embedded_again"] == 0


def test_garbage_usearch_file_is_a_problem(tmp_path: Path) -> None:
    index = _build(tmp_path / "idx")
    before = _exact_vectors(index)
    _file(index, "base").write_bytes(b"\x00garbage" * 100)
    rep = verify_index(index)
    assert not rep.ok
    assert rep.checks["vectors"]["state"] == "corrupt"
    assert any("unreadable" in p for p in rep.problems)
    fixed = verify_index(index, repair=True, embedder=EMB)
    assert fixed.ok, fixed.problems
    assert fixed.checks["vectors"]["state"] == "match" and fixed.repair["embedded_again"] == 18
    assert np.array_equal(_exact_vectors(index), before)


def test_wrong_dtype_and_wrong_vectors_are_problems(tmp_path: Path) -> None:
    index = _build(tmp_path / "idx", dtype="i8")
    with Store(index) as store:  # files of another dtype than meta says
        store.set_meta("dtype", "f16")
    rep = verify_index(index)
    assert not rep.ok and any("dtype i8" in p for p in rep.problems)

    index2 = _build(tmp_path / "idx2", dtype="i8")
    exact = np.memmap(_file(index2, "exact"), dtype=np.float16, mode="r+").reshape(-1, DIM)
    exact[2] = -exact[2]  # same key, another vector in the copy than in the graph: no crash can do that
    exact.flush()
    rep2 = verify_index(index2)
    assert not rep2.ok
    keys = _rows(index2)
    assert any(_file(index2, "exact").name in p and str(int(keys[2, 0])) in p for p in rep2.problems), rep2.problems
    # the repair trusts neither of the two: that text is embedded again, the others are kept
    fixed = verify_index(index2, repair=True, embedder=EMB)
    assert fixed.ok and fixed.repair["embedded_again"] == 1


def test_bad_vector_blobs_are_problems(tmp_path: Path) -> None:
    index = _build(tmp_path / "idx")
    with Store(index) as store, store.transaction():  # two texts committed after the last save: pending
        image = store.put_image("/data/late.png")
        ids = store.add_texts(image, [NewText(j, "joined", Variant("late"), f"late {j}", EMB.embed(["late"])[0])
                                      for j in range(2)])
    conn = sqlite3.connect(index / STORE_FILE)
    conn.execute("UPDATE pending_vectors SET vector = ? WHERE key = ?", (b"\x00" * 10, ids[0]))  # torn blob
    conn.execute("UPDATE pending_vectors SET vector = ? WHERE key = ?", (np.full(DIM, 3.0, np.float32).tobytes(), ids[1]))
    conn.commit()
    conn.close()
    rep = verify_index(index)
    assert not rep.ok
    assert any(f"text keys {ids[0]}" in p and f"not {DIM}-dim float32" in p for p in rep.problems)
    assert any("not finite unit vectors" in p and str(ids[1]) in p for p in rep.problems)
    # SQLite is the source the repair would copy from: verify must refuse to repair from it.
    assert not verify_index(index, repair=True).repaired


def test_ok_image_without_texts_is_a_problem(tmp_path: Path) -> None:
    index = _build(tmp_path / "idx")
    conn = sqlite3.connect(index / STORE_FILE)
    conn.execute("PRAGMA foreign_keys=ON")
    conn.execute("DELETE FROM variants WHERE image_id = (SELECT id FROM images WHERE path = '/data/img3.png')")
    conn.commit()
    conn.close()
    rep = verify_index(index)
    assert any("/data/img3.png" in p and "no texts" in p for p in rep.problems)


def test_schema_version_mismatch(tmp_path: Path) -> None:
    index = _build(tmp_path / "idx")
    conn = sqlite3.connect(index / STORE_FILE)
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.commit()
    conn.close()
    rep = verify_index(index)
    assert not rep.ok
    assert any(f"schema version {SCHEMA_VERSION + 1}" in p for p in rep.problems)


def test_corrupt_sqlite_is_a_problem(tmp_path: Path) -> None:
    index = _build(tmp_path / "idx", images=40)
    path = index / STORE_FILE
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # all pages into the main file
    conn.close()
    data = bytearray(path.read_bytes())
    page = 4096
    assert len(data) > 4 * page
    # Scribble over interior pages (not page 1, so the header still says SQLite).
    for start in range(2 * page, len(data) - page, 3 * page):
        data[start + 100 : start + 400] = os.urandom(300)
    path.write_bytes(bytes(data))
    rep = verify_index(index)
    assert not rep.ok
    assert any(STORE_FILE in p for p in rep.problems)


def test_not_a_database(tmp_path: Path) -> None:
    index = tmp_path / "idx"
    index.mkdir()
    (index / STORE_FILE).write_bytes(b"this is not sqlite at all" * 200)
    rep = verify_index(index)
    assert not rep.ok
    assert rep.problems == [f"{index / STORE_FILE}: not a readable SQLite database (file is not a database); "
                            "delete the index directory and re-index"]  # fmt: skip


def test_embedder_files_changed_or_missing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    emb = tmp_path / "embedder"
    emb.mkdir()
    files = {"model.int8.onnx": b"int8 weights", "tokenizer.json": b"{}"}
    for name, data in files.items():
        (emb / name).write_bytes(data)
    manifest = {"files": {n: hashlib.sha256(d).hexdigest() for n, d in files.items()}}
    monkeypatch.setenv("EDGE_T2T_EMBEDDER", str(emb))
    index = _build(tmp_path / "idx", manifest=manifest)
    rep = verify_index(index)
    assert rep.ok, rep.problems
    assert rep.checks["models"]["embedder"]["files"] == {"model.int8.onnx": "ok", "tokenizer.json": "ok"}

    (emb / "model.int8.onnx").write_bytes(b"int8 weights, edited")
    (emb / "tokenizer.json").unlink()
    rep = verify_index(index)
    assert not rep.ok
    assert any("model.int8.onnx" in p and "sha256" in p for p in rep.problems)
    assert any("tokenizer.json" in w and "missing" in w for w in rep.warnings)
    assert not any("tokenizer.json" in p for p in rep.problems)


def test_stale_lock_and_unfinished_run_are_warnings(tmp_path: Path) -> None:
    index = _build(tmp_path / "idx")
    with Store(index) as store, store.transaction():
        store.start_run({"paths": []})
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (index / LOCK_FILE).write_text(str(dead.pid))
    rep = verify_index(index)
    assert rep.ok
    assert rep.checks["lock"]["present"] and not rep.checks["lock"]["alive"]
    assert any(LOCK_FILE in w for w in rep.warnings)
    assert any("never finished" in w for w in rep.warnings)


def test_cli_exit_codes_and_json(tmp_path: Path) -> None:
    index = _build(tmp_path / "idx")
    good = _cli("--index", str(index), "--json")
    assert good.returncode == 0, good.stderr
    out = json.loads(good.stdout)
    assert out["ok"] is True and out["problems"] == [] and {"sqlite", "schema", "texts", "vectors"} <= set(out["checks"])

    text = _cli("--index", str(index))
    assert text.returncode == 0 and text.stdout.startswith("ok: ")

    rows = _file(index, "rows")
    rows.write_bytes(b"junk")
    bad = _cli("--index", str(index))
    assert bad.returncode == 1
    problem_lines = [ln for ln in bad.stdout.splitlines() if ln.startswith("problem: ")]
    assert problem_lines and all(rows.name in ln for ln in problem_lines)

    # (repairing these rows needs the texts embedded again: test_repair_cli_embeds_lost_vectors_again)
    missing = _cli("--index", str(tmp_path / "nowhere"))
    assert missing.returncode == 2
    assert "Traceback" not in missing.stderr
    assert len(missing.stderr.strip().splitlines()) == 1 and "nowhere" in missing.stderr


def test_repair_refuses_while_an_index_run_holds_the_lock(tmp_path: Path) -> None:
    index = _build(tmp_path / "idx")
    from edge_t2t.index.lock import IndexLock

    (index / vindex.MANIFEST_FILE).unlink()
    with IndexLock(index):  # a live writer (this process)
        res = _cli("--index", str(index), "--repair")
    assert res.returncode == 2
    assert LOCK_FILE in res.stderr and str(os.getpid()) in res.stderr and "Traceback" not in res.stderr
    assert not (index / vindex.MANIFEST_FILE).exists()


def test_leftover_temp_files_are_a_warning_and_repair_removes_them(tmp_path: Path) -> None:
    index = _build(tmp_path / "idx")
    tmp = "base.9.usearch.tmp"
    (index / tmp).write_bytes(b"half a save")
    rep = verify_index(index)
    assert rep.ok and rep.checks["temp_files"] == [tmp]
    assert any(".tmp" in w for w in rep.warnings)
    fixed = verify_index(index, repair=True)
    assert fixed.ok and fixed.repaired and fixed.checks["temp_files"] == []
    assert not (index / tmp).exists()


def test_embedder_built_from_other_weights_is_a_problem(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    emb = tmp_path / "other-embedder"
    emb.mkdir()
    (emb / "manifest.json").write_text(json.dumps({"source_weights_sha256": "y" * 64, "files": {}}))
    monkeypatch.setenv("EDGE_T2T_EMBEDDER", str(emb))
    rep = verify_index(_build(tmp_path / "idx"))
    assert not rep.ok and rep.checks["models"]["embedder"]["current_weights_match"] is False
    assert any("manifest.json" in p and "weights" in p for p in rep.problems)


def test_key_pointing_at_another_image_is_a_problem(tmp_path: Path) -> None:
    index = _build(tmp_path / "idx", dtype="f32")
    rows = np.memmap(_file(index, "rows"), dtype=np.int64, mode="r+").reshape(-1, 2)
    rows[0, 1] = rows[-1, 1]  # key of image 1 now claims the last image: results would name the wrong file
    rows.flush()
    rep = verify_index(index)
    assert not rep.ok and rep.checks["vectors"]["state"] == "corrupt"
    name = _file(index, "rows").name
    assert any(name in p and "another image" in p and str(int(rows[0, 0])) in p for p in rep.problems)
    fixed = verify_index(index, repair=True, embedder=EMB)
    assert fixed.ok and fixed.repair["embedded_again"] == 1


def test_vlm_files_recorded_by_index_changed_or_missing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                       rsicd_samples: Path) -> None:  # fmt: skip
    """Index with the tiny test VLM (copied, so the copy can be damaged), then change and delete
    its mmproj: a changed file is a problem naming it, a missing one a warning."""
    import shutil

    from edge_t2t import config

    monkeypatch.delenv("EDGE_T2T_EMBEDDER")  # the real embedder: index needs it
    src = config.test_vlm_dir()
    manifest = json.loads((src / "manifest.json").read_text()) if (src / "manifest.json").is_file() else {}
    if not manifest or not (config.embedder_dir() / "manifest.json").is_file():
        pytest.fail(f"test VLM or embedder not built ({src}, {config.embedder_dir()}): run `make models`")
    vlm_dir = tmp_path / "vlm"
    vlm_dir.mkdir()
    model = Path(shutil.copy(src / manifest["model"], vlm_dir / "model.gguf"))
    mmproj = Path(shutil.copy(src / manifest["mmproj"], vlm_dir / "mmproj.gguf"))
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    # The 5 real RSICD samples, one variant each with room for the longest schema-valid answer: the
    # seeded test VLM describes every one.
    for p in sorted(rsicd_samples.glob("*.jpg")):
        shutil.copy(p, imgs / p.name)
    index = tmp_path / "idx"
    env = {"EDGE_T2T_CACHE_DIR": str(tmp_path / "cache"), "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-m", "edge_t2t", "index", str(imgs), "--index", str(index), "--vlm", str(model),
         "--mmproj", str(mmproj), "--variants", "1", "--max-tokens", "1300", "--threads", "1", "--json",
         "--no-progress"],
        capture_output=True, text=True, cwd=tmp_path, env={**os.environ, **env}, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["added"] == 5, proc.stdout

    with Store(index) as store:
        (prov,) = store.provenance()
    assert prov["model_path"] == str(model.resolve()) and prov["mmproj_path"] == str(mmproj.resolve())
    assert prov["model_sha256"] == hashlib.sha256(model.read_bytes()).hexdigest()
    assert prov["mmproj_sha256"] == hashlib.sha256(mmproj.read_bytes()).hexdigest()
    rep = verify_index(index)
    assert rep.ok, rep.problems
    vlm = rep.checks["models"]["vlm"]
    assert vlm["status"] == "checked" and vlm["files"] == {str(model.resolve()): "ok", str(mmproj.resolve()): "ok"}

    data = bytearray(mmproj.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, one byte changed
    mmproj.write_bytes(bytes(data))
    rep = verify_index(index)
    assert not rep.ok and rep.checks["models"]["vlm"]["files"][str(mmproj.resolve())] == "changed"
    assert rep.checks["models"]["vlm"]["files"][str(model.resolve())] == "ok"
    assert [p for p in rep.problems if str(mmproj.resolve()) in p and "sha256" in p and "restore" in p]
    assert not [p for p in rep.problems if str(model.resolve()) in p]
    bad = _cli("--index", str(index), env={"EDGE_T2T_EMBEDDER": str(config.embedder_dir())})
    assert bad.returncode == 1
    assert any(ln.startswith("problem: ") and str(mmproj.resolve()) in ln for ln in bad.stdout.splitlines())

    mmproj.unlink()
    rep = verify_index(index)
    assert rep.ok, rep.problems
    assert rep.checks["models"]["vlm"]["files"][str(mmproj.resolve())] == "missing"
    assert [w for w in rep.warnings if str(mmproj.resolve()) in w and "missing" in w]


def test_texts_deleted_since_the_snapshot_are_stale_not_a_problem(tmp_path: Path) -> None:
    index = _build(tmp_path / "idx")
    with Store(index) as store, store.transaction():
        store.remove_images([store.images()["/data/img0.png"].id])  # committed; the snapshot still holds its keys
    rep = verify_index(index)
    assert rep.ok, rep.problems
    assert rep.checks["vectors"]["state"] == "stale" and rep.checks["vectors"]["deleted_since_snapshot"] == 3
    fixed = verify_index(index, repair=True)
    assert fixed.ok and fixed.checks["vectors"]["state"] == "match"


def test_a_snapshot_of_another_index_or_missing_keys_is_a_problem(tmp_path: Path) -> None:
    import shutil

    a, b = _build(tmp_path / "a"), _build(tmp_path / "b")
    for name in vindex.manifest_files(vindex.read_manifest(a)) + [vindex.MANIFEST_FILE]:
        shutil.copy(a / name, b / name)  # same vectors, but another index's snapshot
    rep = verify_index(b)
    assert not rep.ok and any("another index" in p for p in rep.problems)
    assert verify_index(b, repair=True, embedder=EMB).ok

    # a key at or below the snapshot's last key that the snapshot lacks: no crash leaves that
    with Store(a) as store:
        first = int(store.variant_keys()[0])
    rows = np.memmap(_file(a, "rows"), dtype=np.int64, mode="r+").reshape(-1, 2)
    rows[0, 0] = 0  # the file no longer holds key `first`
    rows.flush()
    rep = verify_index(a)
    assert not rep.ok and any(f"keys {first}" in p for p in rep.problems), rep.problems
