"""Shared fixtures: the repository root, the shared real data, and built models."""

from __future__ import annotations

import hashlib
import json
import os
import platform
import signal
import sys
from pathlib import Path

import numpy as np
import pytest

from edge_t2t import config

ROOT = Path(__file__).resolve().parent.parent

# A shell without job control starts a background command (`make test &`, nohup) with SIGINT
# ignored, and Python keeps an ignored SIGINT, as do the CLI processes the tests start. The Ctrl-C
# tests then deliver nothing. Catching it here gives this process Python's KeyboardInterrupt and
# the children the default disposition (a caught signal resets on exec, an ignored one does not).
signal.signal(signal.SIGINT, signal.default_int_handler)

# The suite describes on the CPU whatever GPU the machine has (the default --gpu-layers auto would
# take one), so its outputs are the same everywhere; tests/test_gpu.py asks for the device itself.
os.environ["EDGE_T2T_GPU_LAYERS"] = "0"


# -- no skips -----------------------------------------------------------------------------------
# A missing component fails a test; it never skips it (a skipped test is a green run that checked
# nothing). The only skips allowed are these platform limits, each a marker a test opts into; any
# other skip (pytest.skip, importorskip, skipif, an empty parametrization) is turned into a failure.
# Add a platform here, with why, rather than a skip in a test file.
PLATFORM_ONLY = {
    # /proc, mount and network namespaces, the bundle's manylinux wheels
    "linux_only": (sys.platform == "linux", "Linux only"),
    # qemu-user emulates an x86-64 CPU without AVX for the bundle's compat llama.cpp build
    "x86_64_only": (platform.machine() in ("x86_64", "AMD64"), "x86-64 only"),
}
_ALLOWED_SKIP = "platform limit (tests/conftest.py PLATFORM_ONLY): "


def pytest_configure(config: pytest.Config) -> None:
    for name, (_ok, what) in PLATFORM_ONLY.items():
        config.addinivalue_line("markers", f"{name}: runs on {what}; skipped elsewhere (the only allowed skip)")


def pytest_runtest_setup(item: pytest.Item) -> None:
    for name, (ok, what) in PLATFORM_ONLY.items():
        if not ok and item.get_closest_marker(name):
            pytest.skip(f"{_ALLOWED_SKIP}{what}")


def _fail_a_skip(report):
    if report.skipped and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        if _ALLOWED_SKIP not in reason:
            report.outcome = "failed"
            report.longrepr = f"a skip is a failure (tests/conftest.py PLATFORM_ONLY lists the allowed ones): {reason}"
    return report


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    return _fail_a_skip((yield))


@pytest.hookimpl(wrapper=True)
def pytest_make_collect_report(collector: pytest.Collector):  # a skip at import (importorskip)
    return _fail_a_skip((yield))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    path = config.shared_data_dir()
    if not (path / "rsicd" / "captions_val.json").exists():
        pytest.fail(f"shared data not found at {path}: tests read RSICD captions from ../shared/data")
    return path


@pytest.fixture(scope="session")
def rsicd_samples(shared_data: Path) -> Path:
    return shared_data / "rsicd" / "samples"


@pytest.fixture(scope="session")
def reference(shared_data: Path) -> tuple[list[str], np.ndarray, dict]:
    """sentence-transformers reference texts and vectors (made by bench/make_reference.py).

    RSICD captions are not copied into the repo: the fixture keeps their positions in the sorted
    distinct caption list of ../shared and a sha256 proving they are the same texts."""
    data = np.load(ROOT / "tests" / "fixtures" / "embedder_reference.npz")
    annotations = json.loads((shared_data / "rsicd" / "captions_val.json").read_text(encoding="utf-8"))
    distinct = sorted({a["caption"].strip() for a in annotations["annotations"] if a["caption"].strip()})
    captions = [distinct[int(i)] for i in data["rsicd_positions"]]
    digest = hashlib.sha256("\n".join(captions).encode("utf-8")).hexdigest()
    assert digest == str(data["rsicd_sha256"]), "../shared RSICD captions differ from those the fixture was made on"
    texts = captions + [str(t) for t in data["own_texts"]]
    return texts, data["vectors"], json.loads(str(data["meta"]))


@pytest.fixture(scope="session")
def vlm_dir(tmp_path_factory) -> Path:
    """The seeded tiny LLaVA pair, built once per test session (the tests that run llama.cpp)."""
    import helpers_media as hm

    hm.require("llama_cpp", "llama-cpp-python is a core dependency: run `make setup`")
    from edge_t2t.describe import testvlm

    out = tmp_path_factory.mktemp("test-vlm")
    testvlm.build_test_vlm(out, seed=0)
    return out
