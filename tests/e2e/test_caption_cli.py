"""`edge-t2t caption` as a user runs it: a subprocess over the real RSICD samples with the tiny test VLM."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import helpers_media as hm
import numpy as np
import pytest
from PIL import Image

from edge_t2t import config
from edge_t2t.describe import prompts

ROOT = Path(__file__).resolve().parents[2]
# Enough for the schema's longest one-variant answer even at one character per token.
# No --threads: the tiny test model runs fastest on one thread (vlm.py picks 1 for small models);
# two threads on a busy 2-core machine were 30x slower.
FAST = ["--variants", "1", "--max-tokens", "1300"]


@pytest.fixture(scope="module")
def vlm_args() -> list[str]:
    hm.require("llama_cpp", "llama-cpp-python is a core dependency: run `make setup`")
    from edge_t2t.describe.testvlm import MMPROJ_FILE, MODEL_FILE, build_test_vlm

    out = config.test_vlm_dir()
    build_test_vlm(out)
    return ["--vlm", str(out / MODEL_FILE), "--mmproj", str(out / MMPROJ_FILE)]


def _env(tmp: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGE_T2T_")}
    env.update({"EDGE_T2T_CACHE_DIR": str(tmp / "cache"), "PYTHONPATH": str(ROOT), **extra})
    return env


def _caption(args: list[str], env: dict[str, str], timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edge_t2t", "caption", *args], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)  # fmt: skip


def _check_record(rec: dict) -> None:
    keys = {"image", "sha256", "model", "mmproj", "family", "prompt_version", "variants", "seconds",
            "test_model", "cached", "constrained"}  # fmt: skip
    assert keys <= set(rec)
    assert rec["sha256"] == hashlib.sha256(Path(rec["image"]).read_bytes()).hexdigest()
    assert rec["test_model"] is True and rec["prompt_version"] == prompts.PROMPT_VERSION
    assert 1 <= len(rec["variants"]) and set(rec["variants"][0]) == {"one_sentence", "features", "caption"}
    for v in rec["variants"]:
        assert len(v["one_sentence"]) <= prompts.ONE_SENTENCE_MAX and len(v["caption"]) <= prompts.CAPTION_MAX
        for f in v["features"]:
            assert set(f) == {"name", "position", "size"}
            assert f["position"] in prompts.POSITIONS and f["size"] in prompts.SIZES


@pytest.mark.slow
def test_caption_samples_then_all_cached(vlm_args: list[str], rsicd_samples: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "zero.jpg").write_bytes(b"")
    (bad / "notes.jpg").write_text("not an image")
    (bad / "cut.png").write_bytes((rsicd_samples / "square_146.jpg").read_bytes()[:500])
    out = tmp_path / "caps.jsonl"
    env = _env(tmp_path)
    proc = _caption([str(rsicd_samples), str(bad), "--out", str(out), "--json", *vlm_args, *FAST], env)
    assert proc.returncode == 1, proc.stderr  # some images failed -> 1, the rest written
    lines = [json.loads(x) for x in proc.stdout.splitlines()]
    assert lines == [json.loads(x) for x in out.read_text().splitlines()]
    samples = sorted(p.name for p in rsicd_samples.glob("*.jpg"))
    assert sorted(Path(r["image"]).name for r in lines) == samples
    for rec in lines:
        _check_record(rec)
        assert rec["cached"] is False
    assert "TEST model" in proc.stderr and "placeholder" in proc.stderr
    for name in ("zero.jpg", "notes.jpg", "cut.png"):
        assert proc.stderr.count(name) >= 2  # once as it happens, once in the summary
    assert "3 failed" in proc.stderr

    # Second run, human output: a table on stdout, records only in --out, all from the cache.
    out2 = tmp_path / "again.jsonl"
    again = _caption([str(rsicd_samples), "--out", str(out2), *vlm_args, *FAST], env)
    assert again.returncode == 0, again.stderr
    cached = [json.loads(x) for x in out2.read_text().splitlines()]
    assert [r["cached"] for r in cached] == [True] * len(samples)
    assert [r["variants"] for r in cached] == [r["variants"] for r in lines]
    assert "0 captioned, 5 from cache" in again.stderr
    assert all(name in again.stdout for name in samples) and not again.stdout.lstrip().startswith("{")


@pytest.mark.slow
def test_ctrl_c_keeps_finished_captions(vlm_args: list[str], tmp_path: Path) -> None:
    """Ctrl-C while the second of three images is being described (the run pauses itself as it
    hands that image to the VLM: the fault hook, helpers_media): the current image is finished,
    the third is never started, so exactly two records are kept."""
    folder = tmp_path / "imgs"
    folder.mkdir()
    rng = np.random.default_rng(7)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(folder / f"t{i}.png")
    out = tmp_path / "caps.jsonl"
    argv, faults = hm.cli_argv("caption", str(folder), "--out", str(out), "--json", "--no-cache", *vlm_args, *FAST,
                               faults=[{"stage": "caption", "at": 2, "action": "stop"}])  # fmt: skip
    proc = subprocess.Popen(argv, env={**_env(tmp_path), **faults}, cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        hm.wait_until_stopped(proc)
        partial = out.with_name(out.name + ".partial")
        assert len(partial.read_text().splitlines()) == 1  # the first image is done and written
        stdout, err = hm.signal_and_finish(proc, signal.SIGINT)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    kept = [json.loads(x) for x in out.read_text().splitlines()]
    assert [Path(r["image"]).name for r in kept] == ["t0.png", "t1.png"]
    assert [json.loads(x) for x in stdout.splitlines()] == kept  # --json printed what --out kept
    for rec in kept:  # whole records, each of the bytes it names
        _check_record(rec)
    assert "kept 2 finished caption(s)" in err


def test_no_vlm_explains_how_to_get_one(tmp_path: Path, rsicd_samples: Path) -> None:
    env = _env(tmp_path, EDGE_T2T_MODELS_DIR=str(tmp_path / "nomodels"))
    proc = _caption([str(rsicd_samples)], env, timeout=120)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr and "--vlm" in proc.stderr


def test_help_lists_contract_options() -> None:
    proc = subprocess.run([sys.executable, "-m", "edge_t2t", "caption", "--help"], cwd=ROOT,
                          capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})  # fmt: skip
    assert proc.returncode == 0
    for opt in ("--vlm", "--mmproj", "--family", "--out", "--json", "--variants", "--prompt-file",
                "--max-megapixels", "--threads", "--gpu-layers", "--max-tokens", "--cache-dir", "--no-cache"):  # fmt: skip
        assert opt in proc.stdout, opt
