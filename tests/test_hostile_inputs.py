"""Hostile and broken image files, through `edge-t2t index` (test VLM) and `edge-t2t caption`.

Every bad file must get one line naming it, the run must go on, the summary must count it, and
every good file in the same folder must still be indexed. All files are generated here.

The seeded test VLM is deterministic, and with one variant and --max-tokens 1300 (above
prompts.max_output_chars(1), the longest schema-valid answer at one character a token) its
grammar-constrained answer is never cut off: every good file gets a description, so each file
here has one known outcome.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import subprocess
from pathlib import Path

import helpers_media as hm
import pytest

GOOD = ("good_a.png", "good_b.jpg", "sixteen_bit.tif", "four_band.tif", "sixteen_bit_4band.tif", "rgb.tif")
BAD = ("trunc.png", "trunc.jpg", "trunc.tif", "empty.png", "text.jpg", "bomb.png")
# Refused too, each with its own reason: the self-referencing link and the non-UTF-8 name
REFUSED = {"self_loop.png": "Too many levels of symbolic links", "\udcff\udcfe.png": "not valid UTF-8"}
COMPLETE = ("--variants", "1", "--max-tokens", "1300")  # a whole answer for every image (module docstring)


@pytest.fixture(scope="module")
def media(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("hostile")
    d = root / "images"
    d.mkdir()
    hm.make_png(d / "good_a.png", 1)
    hm.make_jpeg(d / "good_b.jpg", 2)
    hm.make_tiff16(d / "sixteen_bit.tif", seed=3)
    hm.make_tiff_4band(d / "four_band.tif", seed=4)
    hm.make_tiff16(d / "sixteen_bit_4band.tif", seed=5, bands=4)
    hm.make_tiff_rgb(d / "rgb.tif", seed=6)
    hm.truncate(hm.make_png(root / "src.png", 10, size=96), d / "trunc.png", 0.4)
    hm.truncate(hm.make_jpeg(root / "src.jpg", 11, size=96), d / "trunc.jpg", 0.4)
    hm.truncate(hm.make_tiff_rgb(root / "src.tif", seed=12, size=96), d / "trunc.tif", 0.4)
    hm.zero_byte(d / "empty.png")
    hm.text_named_image(d / "text.jpg")
    hm.png_bomb(d / "bomb.png")
    hm.symlink_loops(d / "loops")
    weird = hm.non_utf8_name(d / "odd_names")
    model, mmproj = hm.test_vlm_files()
    env = hm.child_env(root / "cache")
    return {"root": root, "dir": d, "weird": weird, "model": model, "mmproj": mmproj, "env": env}


def _failures(summary: dict) -> dict[str, str]:
    return {Path(f["image"]).name: f["error"] for f in summary["failures"]}


def _index(media: dict, index: Path, *extra: str, faults=None) -> subprocess.CompletedProcess:
    return hm.run_cli(
        "index", str(media["dir"]), "--index", str(index), "--vlm", str(media["model"]), "--mmproj", str(media["mmproj"]),
        *COMPLETE, "--batch-size", "4", *extra, env=media["env"], faults=faults,
    )  # fmt: skip


def _rows(index: Path) -> dict[str, tuple[str, str | None, str]]:
    conn = sqlite3.connect(index / "store.sqlite")
    conn.text_factory = lambda b: b.decode("utf-8", "surrogateescape")
    try:
        return {r[0]: (r[1], r[2], r[3]) for r in conn.execute("SELECT path, status, error, sha256 FROM images")}
    finally:
        conn.close()


@pytest.fixture(scope="module")
def indexed(media: dict) -> dict:
    index = media["root"] / "idx"
    res = _index(media, index, "--json", "--no-progress")
    return {"index": index, "res": res}


def test_index_survives_broken_files(media: dict, indexed: dict) -> None:
    res = indexed["res"]
    assert not hm.has_traceback(res.stderr), res.stderr[-3000:]
    assert res.returncode == 1, f"expected 1 (some images failed); stderr: {res.stderr[-2000:]}"
    summary = json.loads(res.stdout)
    failures = _failures(summary)
    assert set(failures) == {*BAD, *REFUSED}, summary["failures"]  # no good file among them
    for f in summary["failures"]:
        assert "\n" not in f["error"] and f["error"].strip()
    for name, why in REFUSED.items():
        assert why in failures[name], failures[name]
    assert summary["failed"] == len(BAD) + len(REFUSED), "the summary must count every failed image"
    assert summary["added"] == len(GOOD)


def test_good_files_in_the_same_folder_are_indexed(media: dict, indexed: dict) -> None:
    rows = _rows(indexed["index"])
    by_name = {Path(p).name: v for p, v in rows.items()}
    for name in GOOD:  # every good file is stored and described
        assert name in by_name, f"{name} missing from the store"
        assert by_name[name][:2] == ("ok", None), f"{name}: {by_name[name]}"
    for name in BAD:
        status, error, _ = by_name[name]
        assert status == "failed" and error, name
    # 16-bit and 4-band TIFFs must work: they are what remote-sensing imagery is. Their decoding
    # is checked directly too: the picture the VLM was given.
    from edge_t2t.images import load_image

    for name in ("sixteen_bit.tif", "four_band.tif", "sixteen_bit_4band.tif"):
        loaded = load_image(media["dir"] / name)
        assert loaded.image.mode == "RGB" and loaded.image.size == (40, 40)
    # The bomb was refused before decoding, for its declared size.
    assert "declared size exceeds the 16 MP safety limit (decompression-bomb guard)" in by_name["bomb.png"][1]


def test_non_utf8_file_name_is_refused_naming_the_fix(media: dict, indexed: dict) -> None:
    """b'\\xff\\xfe.png' (not UTF-8) cannot be stored, printed or searched as it is: one failure
    naming the file and the fix (the run's traceback check is in test_index_survives_broken_files)."""
    rows = _rows(indexed["index"])
    weird = str(media["weird"].resolve())
    failures = {f["image"]: f["error"] for f in json.loads(indexed["res"].stdout)["failures"]}
    assert failures[weird] == "file name is not valid UTF-8: rename the file (e.g. with convmv) and run again"
    assert weird not in rows  # refused while scanning, as the self-link is: nothing stored, looked at again next run


def test_symlink_loops_do_not_hang_or_crash(media: dict, indexed: dict) -> None:
    # Reached through loop_dir, the good files must not be indexed twice.
    rows = _rows(indexed["index"])
    assert not any("loop_dir" in p for p in rows), [p for p in rows if "loop_dir" in p]
    summary = json.loads(indexed["res"].stdout)
    reported = " ".join(f["image"] + " " + f["error"] for f in summary["failures"])
    assert "self_loop.png" in reported


def test_verify_passes_and_rerun_is_a_noop(media: dict, indexed: dict) -> None:
    res = hm.run_cli("verify", "--index", str(indexed["index"]), "--json", env=media["env"])
    assert res.returncode == 0, res.stdout
    again = _index(media, indexed["index"], "--json", "--no-progress")
    assert not hm.has_traceback(again.stderr)
    summary = json.loads(again.stdout)
    # the good files are skipped; the refused ones are looked at again and refused again
    assert (summary["added"], summary["skipped"], summary["failed"]) == (0, len(GOOD), len(BAD) + len(REFUSED))


def test_failures_are_one_line_each_in_the_human_output(media: dict, indexed: dict, tmp_path: Path) -> None:
    """Each failure is one whole line, `failed PATH: REASON`, however long (stderr is a pipe here,
    as in a log file: no wrapping at a terminal width), with the reason --json gives."""
    res = _index(media, tmp_path / "idx", "--no-progress", "--batch-size", "32")
    assert res.returncode == 1 and not hm.has_traceback(res.stderr)
    lines = res.stderr.splitlines()
    for f in json.loads(indexed["res"].stdout)["failures"]:
        if Path(f["image"]).name in BAD:
            assert f"failed {f['image']}: {f['error']}" in lines, f"{f['image']}:\n{res.stderr[-3000:]}"


def test_caption_command_survives_broken_files(media: dict) -> None:
    res = hm.run_cli("caption", str(media["dir"]), "--vlm", str(media["model"]), "--mmproj", str(media["mmproj"]),
                     *COMPLETE, "--json", env=media["env"])  # fmt: skip
    assert not hm.has_traceback(res.stderr), res.stderr[-3000:]
    assert res.returncode == 1
    try:
        res.stdout.encode("utf-8")
    except UnicodeEncodeError as exc:
        pytest.fail(f"`caption --json` wrote bytes that are not UTF-8 (a non-UTF-8 file name written raw): {exc}")
    records = [json.loads(line) for line in res.stdout.splitlines() if line.strip()]
    described = {Path(r["image"]).name for r in records}
    for name in BAD:
        lines = [ln for ln in res.stderr.splitlines() if name in ln]
        assert lines, f"{name} not named on stderr"
    assert described == set(GOOD), described
    # Each record's sha256 is of the bytes that were described.
    for r in records:
        p = Path(r["image"])
        assert p.is_file(), p
        assert r["sha256"] == hashlib.sha256(p.read_bytes()).hexdigest()


def test_file_rewritten_between_hash_and_caption(media: dict, tmp_path: Path) -> None:
    """The first file the indexer reads is rewritten right after its read and hash (fault injection in
    the child process). The indexer describes the bytes it read, not the file as it is now: the row
    keeps the hash of those bytes (and their 48 px size, where the rewrite is 40 px), never the old
    hash beside a description of the new pixels. The next run sees the changed mtime and converges."""
    d = tmp_path / "imgs"
    hm.make_png(d / "a.png", 21)
    hm.make_png(d / "b.png", 22)
    index = tmp_path / "idx"
    args = ("index", str(d), "--index", str(index), "--vlm", str(media["model"]), "--mmproj", str(media["mmproj"]),
            *COMPLETE, "--json", "--no-progress")  # fmt: skip
    before = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in (d / "a.png", d / "b.png")}
    res = hm.run_cli(*args, env=media["env"], faults=[{"stage": "hashed", "at": 1, "action": "rewrite", "seed": 555}])
    assert not hm.has_traceback(res.stderr), res.stderr[-3000:]
    # The rewrite really happened: exactly one file now holds the fault's picture.
    fault_png = hashlib.sha256(hm.make_png(tmp_path / "fault_probe.png", 555, size=40).read_bytes()).hexdigest()
    now = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in before}
    rewritten = [p for p in before if now[p] == fault_png]
    assert len(rewritten) == 1 and before[rewritten[0]] != fault_png, (before, now)
    assert [p for p in before if now[p] == before[p]] == [p for p in before if p not in rewritten]
    rows = _rows(index)
    assert set(rows) == {str(p) for p in before}, rows
    for path, (status, err, sha) in rows.items():
        # one read per file: each row is ok and carries the hash of the bytes that were read and
        # described, which for the rewritten file is its content BEFORE the rewrite
        assert status == "ok", f"{path}: {err}"
        assert sha == before[Path(path)], f"{path}: stored sha256 {sha[:12]} is not that of the bytes described"
    conn = sqlite3.connect(index / "store.sqlite")
    try:
        sizes = dict(conn.execute("SELECT path, width FROM images").fetchall())
    finally:
        conn.close()
    assert sizes == {str(p): 48 for p in before}, sizes  # the described bytes' size, not the rewrite's 40 px
    # The next run sees the rewritten file's new mtime, reads it again and converges on it as it is now.
    res2 = hm.run_cli(*args, env=media["env"])
    assert res2.returncode == 0, res2.stderr[-2000:]
    assert json.loads(res2.stdout)["added"] == 1, res2.stdout
    for path, (status, _err, sha) in _rows(index).items():
        assert status == "ok" and sha == hashlib.sha256(Path(path).read_bytes()).hexdigest()


def test_unreadable_file(media: dict, tmp_path: Path) -> None:
    """A chmod-000 file next to a good one. Root ignores permission bits through the
    CAP_DAC_OVERRIDE / CAP_DAC_READ_SEARCH capabilities, so as root the child runs under
    `setpriv --bounding-set -dac_override,-dac_read_search`: still uid 0, but the kernel now
    enforces the bits, and the read really fails with EACCES (nothing is simulated). As a normal
    user the bits bite anyway. As root without setpriv it fails, naming the package."""
    import shutil

    d = tmp_path / "imgs"
    hm.make_png(d / "ok.png", 31)
    locked = hm.make_png(d / "locked.png", 32)
    locked.chmod(0o000)
    argv, _ = hm.cli_argv("index", str(d), "--index", str(tmp_path / "idx"), "--vlm", str(media["model"]),
                          "--mmproj", str(media["mmproj"]), *COMPLETE, "--json", "--no-progress")  # fmt: skip
    if os.geteuid() == 0:
        if not shutil.which("setpriv"):
            pytest.fail("running as root without setpriv (to make permission bits apply): apt-get install util-linux")
        argv = ["setpriv", "--bounding-set", "-dac_override,-dac_read_search", *argv]
    try:
        res = subprocess.run(argv, capture_output=True, text=True, env=hm.child_env(tmp_path / "cache"),
                             cwd=hm.ROOT, timeout=hm.HANG_S)  # fmt: skip
    finally:
        locked.chmod(0o644)
    assert not hm.has_traceback(res.stderr), res.stderr[-3000:]
    summary = json.loads(res.stdout)
    failed = _failures(summary)
    assert list(failed) == ["locked.png"] and "ermission" in failed["locked.png"], summary["failures"]
    assert (summary["failed"], summary["added"]) == (1, 1), "the unreadable file counted, the readable one indexed"


def _bomb(d: Path, root: Path) -> Path:
    return hm.png_bomb(d / "bomb.png")


SINGLE_BAD = {
    "truncated-png": lambda d, root: hm.truncate(hm.make_png(root / "s.png", 10, size=96), d / "trunc.png", 0.4),
    "truncated-jpeg": lambda d, root: hm.truncate(hm.make_jpeg(root / "s.jpg", 11, size=96), d / "trunc.jpg", 0.4),
    "truncated-tiff": lambda d, root: hm.truncate(hm.make_tiff_rgb(root / "s.tif", 12, size=96), d / "trunc.tif", 0.4),
    "zero-bytes": lambda d, root: hm.zero_byte(d / "empty.png"),
    "text-as-jpeg": lambda d, root: hm.text_named_image(d / "text.jpg"),
    "decompression-bomb": _bomb,
    "symlink-self-loop": lambda d, root: hm.symlink_loops(d / "loops")[1],
}
SINGLE_GOOD = {
    "tiff-16bit": lambda d, root: hm.make_tiff16(d / "sixteen.tif", seed=3),
    "tiff-4band": lambda d, root: hm.make_tiff_4band(d / "four.tif", seed=4),
    "tiff-16bit-4band": lambda d, root: hm.make_tiff16(d / "sixteen4.tif", seed=5, bands=4),
}
SINGLE_BAD["non-utf8-name"] = lambda d, root: hm.non_utf8_name(d / "odd")


@pytest.mark.parametrize("case", list(SINGLE_BAD) + list(SINGLE_GOOD))
def test_each_case_alone_next_to_a_good_image(media: dict, tmp_path: Path, case: str) -> None:
    """One hostile (or odd but valid) file beside one good PNG, so each failure is attributed."""
    d = tmp_path / "imgs"
    hm.make_png(d / "companion.png", 0)  # seed 0: a file the test VLM describes
    made = (SINGLE_BAD.get(case) or SINGLE_GOOD[case])(d, tmp_path)
    res = hm.run_cli("index", str(d), "--index", str(tmp_path / "idx"), "--vlm", str(media["model"]), "--mmproj",
                     str(media["mmproj"]), *COMPLETE, "--json", "--no-progress", env=media["env"])  # fmt: skip
    assert not hm.has_traceback(res.stderr), res.stderr[-2500:]
    summary = json.loads(res.stdout)
    failures = _failures(summary)
    rows = _rows(tmp_path / "idx")
    assert rows[str((d / "companion.png").resolve())][0] == "ok"
    if case in SINGLE_BAD:
        assert res.returncode == 1, res.stderr[-2000:]
        assert list(failures) == [made.name] and failures[made.name].strip(), summary["failures"]
        assert "\n" not in failures[made.name]
        assert (summary["failed"], summary["added"]) == (1, 1), summary
    else:
        assert res.returncode == 0 and failures == {}, summary["failures"]
        assert rows[str(made.resolve())][0] == "ok" and summary["added"] == 2
    rep = hm.run_cli("verify", "--index", str(tmp_path / "idx"), "--skip-models", env=media["env"])
    assert rep.returncode == 0, rep.stdout + rep.stderr
