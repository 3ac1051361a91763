"""Paths, environment variables and defaults. Nothing here touches the network or loads models."""

from __future__ import annotations

import os
import sys
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
# In a clone (editable install) the built models live in the repository's models/ folder.
_REPO_MODELS = PACKAGE_DIR.parent / "models"
# An install from the air-gapped bundle keeps them in its virtualenv (packaging/install.sh).
INSTALL_SHARE = Path(sys.prefix) / "share" / "edge-t2t"


def _env_path(name: str) -> Path | None:
    value = os.environ.get(name)
    return Path(value).expanduser() if value else None


def models_dir() -> Path:
    """Where built models live: $EDGE_T2T_MODELS_DIR, the clone's models/, the bundle install's
    <venv>/share/edge-t2t/models, or the user data dir."""
    explicit = _env_path("EDGE_T2T_MODELS_DIR")
    if explicit:
        return explicit
    # pyproject.toml beside it: a clone, not some package's top-level "models" in site-packages.
    if _REPO_MODELS.is_dir() and (PACKAGE_DIR.parent / "pyproject.toml").is_file():
        return _REPO_MODELS
    if (INSTALL_SHARE / "models").is_dir():
        return INSTALL_SHARE / "models"
    data_home = _env_path("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return data_home / "edge-t2t" / "models"


def docs_dir() -> Path | None:
    """The user documentation (README.md, docs/, bench/results/): $EDGE_T2T_DOCS, the clone's root,
    or the bundle install's <venv>/share/doc/edge-t2t (packaging/install.sh); None when absent."""
    explicit = _env_path("EDGE_T2T_DOCS")
    if explicit:
        return explicit
    for root in (PACKAGE_DIR.parent, Path(sys.prefix) / "share" / "doc" / "edge-t2t"):
        if (root / "README.md").is_file() and (root / "docs").is_dir():
            return root
    return None


def embedder_dir() -> Path:
    """The built ONNX embedder: $EDGE_T2T_EMBEDDER or <models>/embedder."""
    return _env_path("EDGE_T2T_EMBEDDER") or models_dir() / "embedder"


def test_vlm_dir() -> Path:
    return models_dir() / "test-vlm"


def user_vlm_dir() -> Path:
    """Where a user drops a real GGUF model + mmproj pair."""
    return models_dir() / "vlm"


def cache_dir() -> Path:
    """The caption cache: $EDGE_T2T_CACHE_DIR, else $XDG_CACHE_HOME/edge-t2t, else ~/.cache/edge-t2t."""
    explicit = _env_path("EDGE_T2T_CACHE_DIR")
    if explicit:
        return explicit
    return (_env_path("XDG_CACHE_HOME") or Path.home() / ".cache") / "edge-t2t"


def index_dir(arg: str | os.PathLike | None = None) -> Path:
    """An index directory: --index, else $EDGE_T2T_INDEX, else ./.edge-t2t."""
    if arg:
        return Path(arg).expanduser()
    return _env_path("EDGE_T2T_INDEX") or Path(".edge-t2t")


def default_threads() -> int:
    """Threads for ONNX and llama.cpp: $EDGE_T2T_THREADS, else the CPUs this process may use."""
    value = os.environ.get("EDGE_T2T_THREADS")
    if value:
        return max(1, int(value))
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def shared_data_dir() -> Path:
    """Real public data used by the demo, tests and benches (never copied into the repo)."""
    return _env_path("EDGE_T2T_SHARED") or PACKAGE_DIR.parent.parent / "shared" / "data"
