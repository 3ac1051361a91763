"""`index` reads each new image file once, and describes the bytes it read and hashed.

Every `open` of a file under the image folder during `Indexer.run` is counted with a Python audit
hook (the "open" event fires for builtins.open, io.open, os.open and Pillow's opens alike). The real
caption pipeline runs (load from bytes, caption cache, describe, parse), with the scripted stand-in
VLM of test_captioning in place of llama.cpp. Before this change a new image was opened three
times: hashed while planning, read again by the caption pipeline, and its header read for the size.
"""

from __future__ import annotations

import gc
import hashlib
import os
import sys
import weakref
from collections import Counter
from pathlib import Path

import helpers_media as hm
import pytest
from fake_embedder import FakeEmbedder
from test_captioning import ScriptedVLM

from edge_t2t.describe import captioning
from edge_t2t.describe.captioning import CaptionSettings
from edge_t2t.describe.captions import CaptionCache
from edge_t2t.describe.vlm import VLMConfig
from edge_t2t.index.indexer import Indexer
from edge_t2t.index.store import Store

_WATCH: dict = {"root": None, "opens": Counter()}


def _audit(event: str, args: tuple) -> None:
    root = _WATCH["root"]
    if event != "open" or root is None or not isinstance(args[0], (str, bytes, os.PathLike)):
        return
    path = os.fsdecode(args[0])
    if path.startswith(root):
        _WATCH["opens"][os.path.basename(path)] += 1


sys.addaudithook(_audit)  # cannot be removed; it counts only while a test sets _WATCH["root"]


@pytest.fixture()
def opens():
    def run(folder: Path, fn):
        _WATCH["root"], _WATCH["opens"] = str(folder.resolve()) + os.sep, Counter()
        try:
            out = fn()
        finally:
            _WATCH["root"] = None
        return out, dict(_WATCH["opens"])

    return run


@pytest.fixture()
def vlm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    (tmp_path / "m.gguf").write_bytes(b"model bytes")
    (tmp_path / "p.gguf").write_bytes(b"mmproj bytes")
    made: list[ScriptedVLM] = []

    def factory(cfg):
        made.append(ScriptedVLM(cfg))
        return made[-1]

    monkeypatch.setattr(captioning, "_default_vlm_factory", factory)
    return VLMConfig(model=tmp_path / "m.gguf", mmproj=tmp_path / "p.gguf", seed=0), made


def _rows(ix: Path) -> dict[str, tuple[str, str, int]]:
    with Store(ix) as st:
        return {Path(r.path).name: (r.status, r.sha256, r.width) for r in st.images().values()}


def test_each_new_image_is_read_once_and_unchanged_files_never(tmp_path: Path, vlm, opens) -> None:
    cfg, made = vlm
    d = tmp_path / "imgs"
    files = [hm.make_png(d / f"img_{i}.png", seed=i) for i in range(5)]
    (d / "twin.png").write_bytes(files[0].read_bytes())  # the same bytes under a second name
    ix = tmp_path / "ix"
    with CaptionCache(tmp_path / "captions.sqlite") as cache:

        def index():
            settings = CaptionSettings(cache=cache)
            return Indexer(ix, embedder=FakeEmbedder(), vlm_cfg=cfg, n_variants=2, batch_size=2, caption=settings).run([d])

        s, counted = opens(d, index)
        assert (s.added + s.reused, s.failed) == (6, 0), s.failures
        assert counted == {f.name: 1 for f in [*files, d / "twin.png"]}, counted  # one open per new file
        rows = _rows(ix)
        for name, (status, sha, width) in rows.items():  # the hash kept is that of the bytes described
            assert status == "ok" and sha == hashlib.sha256((d / name).read_bytes()).hexdigest() and width == 48
        assert sum(v.calls for v in made) == 5  # five distinct contents described; the twin came from the cache

        # Nothing changed: no image file is opened at all.
        s, counted = opens(d, index)
        assert (s.added, s.skipped, counted) == (0, 6, {}), counted

        # One file rewritten, one added, one renamed: each of those is read once, the others never.
        hm.make_png(files[1], seed=101)
        hm.make_png(d / "new.png", seed=102)
        files[2].rename(d / "moved.png")
        s, counted = opens(d, index)
        assert (s.added, s.moved, s.skipped) == (2, 1, 4), s.to_dict()
        assert counted == {"img_1.png": 1, "new.png": 1, "moved.png": 1}, counted
        assert _rows(ix)["img_1.png"][1] == hashlib.sha256(files[1].read_bytes()).hexdigest()


def test_bytes_are_held_one_batch_at_a_time(tmp_path: Path, vlm, monkeypatch: pytest.MonkeyPatch) -> None:
    """Memory stays bounded: each call to the caption pipeline gets at most one batch of images, and
    the bytes of every earlier batch are gone (nothing keeps them alive) by the time the next starts."""
    cfg, _ = vlm
    d = tmp_path / "imgs"
    for i in range(7):
        hm.make_png(d / f"img_{i}.png", seed=i)
    real = captioning.caption_sources
    earlier: list[weakref.ref] = []
    sizes: list[int] = []

    def watching(items, *args, **kwargs):
        gc.collect()
        alive = [r for r in earlier if r() is not None]
        assert not alive, f"{len(alive)} image(s) of an earlier batch still held"
        sizes.append(len(items))
        earlier.extend(weakref.ref(image) for _, image in items)
        return real(items, *args, **kwargs)

    monkeypatch.setattr(captioning, "caption_sources", watching)
    s = Indexer(tmp_path / "ix", embedder=FakeEmbedder(), vlm_cfg=cfg, n_variants=1, batch_size=3).run([d])
    assert (s.added, s.failed) == (7, 0) and sizes == [3, 3, 1]
    gc.collect()
    assert all(r() is None for r in earlier)  # and none after the run
