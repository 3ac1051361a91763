"""Shared fixtures: the repository root, the shared real data, and built models."""

from __future__ import annotations

from pathlib import Path

import pytest

from edge_t2t import config

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def shared_data() -> Path:
    path = config.shared_data_dir()
    if not (path / "rsicd" / "captions_val.json").exists():
        pytest.fail(f"shared data not found at {path}: tests read RSICD captions from ../shared/data")
    return path


@pytest.fixture(scope="session")
def rsicd_samples(shared_data: Path) -> Path:
    return shared_data / "rsicd" / "samples"
