"""Shared fixtures: the repository root, the shared real data, and built models."""

from __future__ import annotations

import hashlib
import json
import os
import signal
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
