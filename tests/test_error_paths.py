"""Bad inputs that reach the narrowed `except` clauses (issue 10): each still ends as one line that
names the file and the fix, and whatever was opened is closed. If a clause were narrowed past what
the library really raises, the library's own exception would escape here and the test would fail."""

from __future__ import annotations

import os
import shutil
import sqlite3
from pathlib import Path

import helpers_media as hm
import pytest

from edge_t2t import config
from edge_t2t.errors import ModelError, StoreError


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _embedder_with(tmp_path: Path, damaged: str, content: bytes) -> Path:
    """A copy of the built embedder (the ONNX files linked, not copied) with one file replaced."""
    src = config.embedder_dir()
    dst = tmp_path / "embedder"
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).symlink_to(f) if f.suffix == ".onnx" else shutil.copy(f, dst / f.name)
    target = dst / (damaged if damaged == "tokenizer.json" else next(f.name for f in src.glob("*.int8.onnx")))
    target.unlink()
    target.write_bytes(content)
    return target


@pytest.mark.parametrize("content", [b"{not json", b"", b'{"a": 1}'])
def test_damaged_tokenizer_is_one_line_model_error(tmp_path: Path, content: bytes) -> None:
    """tokenizers raises a bare Exception here (the one broad except left in embedder.py)."""
    from edge_t2t.embed.embedder import Embedder

    hm.test_vlm_files()
    bad = _embedder_with(tmp_path, "tokenizer.json", content)
    with pytest.raises(ModelError) as err:
        Embedder(bad.parent, precision="int8")
    msg = str(err.value)
    assert str(bad) in msg and "not a valid tokenizer file" in msg and "--force" in msg and "\n" not in msg


@pytest.mark.parametrize(("content", "error"), [(b"", "InvalidArgument"), (b"garbage" * 300, "InvalidProtobuf")])
def test_damaged_onnx_is_one_line_model_error(tmp_path: Path, content: bytes, error: str) -> None:
    """onnxruntime's InvalidArgument / InvalidProtobuf derive from Exception, not RuntimeError: the
    narrowed clause must still catch them."""
    from edge_t2t.embed.embedder import Embedder

    hm.test_vlm_files()
    bad = _embedder_with(tmp_path, "int8", content)
    with pytest.raises(ModelError) as err:
        Embedder(bad.parent, precision="int8")
    msg = str(err.value)
    assert str(bad) in msg and "could not be loaded by onnxruntime" in msg and "--force" in msg
    assert error in msg  # onnxruntime's exception class is named


def test_store_on_a_file_that_is_not_sqlite_names_it_and_closes(tmp_path: Path) -> None:
    from edge_t2t.index.store import STORE_FILE, Store

    (tmp_path / STORE_FILE).write_bytes(b"this is not a database" * 100)
    before = _open_fds()
    for _ in range(3):
        with pytest.raises(StoreError) as err:
            Store(tmp_path)
        assert str(tmp_path / STORE_FILE) in str(err.value) and "re-index" in str(err.value)
    assert _open_fds() == before  # the connection that opened the file was closed each time


def test_caption_cache_on_a_file_that_is_not_sqlite_names_it_and_closes(tmp_path: Path) -> None:
    from edge_t2t.describe.captions import CaptionCache

    path = tmp_path / "captions.sqlite"
    path.write_bytes(b"this is not a database" * 100)
    before = _open_fds()
    for _ in range(3):
        with pytest.raises(StoreError) as err:
            CaptionCache(path)
        assert str(path) in str(err.value) and "--cache-dir" in str(err.value)
    assert _open_fds() == before
    with sqlite3.connect(tmp_path / "other.sqlite") as conn:  # a sound path still opens
        conn.execute("SELECT 1")
    CaptionCache(tmp_path / "good.sqlite").close()


def test_unreadable_image_gets_a_placeholder_thumbnail(tmp_path: Path) -> None:
    from edge_t2t.query.report import _thumbnail

    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    assert _thumbnail(str(bad)) == ""
    good = hm.make_png(tmp_path / "good.png", 1)
    assert _thumbnail(str(good)).startswith("data:image/jpeg;base64,")


def test_scene_size_from_bytes_or_path(tmp_path: Path) -> None:
    from edge_t2t.scene.tiling import scene_size

    good = hm.make_png(tmp_path / "good.png", 1)
    assert scene_size(good) == scene_size(good, good.read_bytes()) == (48, 48)
    for data in (b"not an image", b"", b"II*\x00" + b"\x00" * 20):  # Pillow's and rasterio's errors, narrowed
        assert scene_size(tmp_path / "x.tif", data) is None


def test_half_built_vlm_destructor_is_quiet_and_a_built_one_closes() -> None:
    from edge_t2t.describe.vlm import VLM

    vlm = VLM.__new__(VLM)  # as after an __init__ that failed before loading anything
    with pytest.raises(AttributeError):  # the narrowed clause's case: close() on a half-built VLM
        vlm.close()
    assert vlm.__del__() is None  # ...which the destructor swallows

    closed: list[str] = []
    built = VLM.__new__(VLM)  # as after a full __init__: the destructor must really close it
    built._pool, built._parallel = None, None
    built._llama = type("Llama", (), {"close": lambda self: closed.append("llama")})()
    built.__del__()
    assert closed == ["llama"] and built._llama is None
