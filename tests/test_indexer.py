"""`index` orchestration: incremental runs (add, touch, rename, copy, delete, change), the VLM
path, interruption and resume, and refusals. Uses the fake embedder and a stand-in captioner."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from fake_embedder import FakeEmbedder
from PIL import Image

from edge_t2t.describe import captioning
from edge_t2t.describe.vlm import VLMConfig
from edge_t2t.errors import StoreError
from edge_t2t.hashing import sha256_bytes
from edge_t2t.images import ImageBytes
from edge_t2t.index import vindex
from edge_t2t.index.indexer import Indexer
from edge_t2t.index.lock import IndexLock
from edge_t2t.index.store import Store
from edge_t2t.modes import DEFAULT_TEXT_MODE
from edge_t2t.records import CaptionRecord, Variant

COLOURS = {"a": (200, 30, 30), "b": (30, 200, 30), "c": (30, 30, 200), "d": (200, 200, 30), "e": (90, 90, 90)}


def make_image(path, colour):
    Image.new("RGB", (16, 12), colour).save(path)


def texts_of(ix) -> dict[str, list[str]]:
    with Store(ix) as st:
        rows = st.conn.execute(
            "SELECT i.path, t.text FROM texts t JOIN variants v ON v.id = t.variant_id JOIN images i ON i.id = v.image_id ORDER BY i.path, v.ordinal, t.id"
        ).fetchall()
    out: dict[str, list[str]] = {}
    for path, text in rows:
        out.setdefault(os.path.basename(path), []).append(text)
    return out


def consistent(ix) -> bool:
    """The saved vector snapshot holds exactly SQLite's texts, keys, images and vectors."""
    from edge_t2t.index.verify import verify_index

    rep = verify_index(ix, check_models=False)
    return rep.ok and rep.checks["vectors"]["state"] == "match"


@pytest.fixture
def folder(tmp_path):
    d = tmp_path / "imgs"
    d.mkdir()
    for name in "abc":
        make_image(d / f"{name}.png", COLOURS[name])
    caps = tmp_path / "caps.jsonl"
    with open(caps, "w") as fh:
        for name in "abcd":  # d is described but not on disk: ignored
            fh.write(json.dumps({"image": f"{name}.png", "variants": [f"scene {name} one", f"scene {name} two"]}) + "\n")
    return d, caps


def test_incremental_add_touch_rename_copy_delete_change(tmp_path, folder):
    d, caps = folder
    ix, emb = tmp_path / "ix", FakeEmbedder()
    run = lambda: Indexer(ix, embedder=emb, batch_size=2).run([d], captions_file=caps)  # noqa: E731

    s = run()
    assert (s.added, s.skipped, s.failed) == (3, 0, 0) and consistent(ix)
    assert sorted(texts_of(ix)) == ["a.png", "b.png", "c.png"]
    with Store(ix) as st:
        row = st.images()[str((d / "a.png").resolve())]
        assert (row.width, row.height, row.source) == (16, 12, "captions") and len(row.sha256) == 64

    calls = emb.calls
    s = run()  # nothing changed: skipped without hashing or embedding
    assert (s.added, s.skipped) == (0, 3) and emb.calls == calls

    os.utime(d / "a.png", ns=(1_000_000_000, 1_000_000_000))  # touched, same bytes
    s = run()
    assert (s.added, s.skipped) == (0, 3) and emb.calls == calls
    with Store(ix) as st:
        assert st.images()[str((d / "a.png").resolve())].mtime_ns == 1_000_000_000

    before = texts_of(ix)["b.png"]
    os.rename(d / "b.png", d / "b_renamed.png")  # not in the captions file: the sha256 carries it
    s = run()
    assert (s.moved, s.added, s.removed, s.failed) == (1, 0, 0, 0)
    assert "b.png" not in texts_of(ix) and texts_of(ix)["b_renamed.png"] == before and consistent(ix)

    (d / "c_copy.png").write_bytes((d / "c.png").read_bytes())
    s = run()
    assert (s.reused, s.added) == (1, 0)
    assert texts_of(ix)["c_copy.png"] == texts_of(ix)["c.png"] and consistent(ix)

    (d / "a.png").unlink()
    s = run()
    assert s.removed == 1 and "a.png" not in texts_of(ix) and consistent(ix)

    make_image(d / "c.png", (1, 2, 3))  # new content under a described name: re-described
    s = run()
    assert s.added == 1 and consistent(ix)
    with Store(ix) as st:
        assert st.counts()["images_ok"] == 3

    make_image(d / "e.png", COLOURS["e"])  # not in the captions file, no VLM: a failure
    s = run()
    assert s.failed == 1 and s.failures[0][0].endswith("e.png") and "captions" in s.failures[0][1]
    with Store(ix) as st:
        assert st.counts()["images_failed"] == 1


def test_swapped_files_swap_their_descriptions_without_describing_again(tmp_path, folder):
    d, caps = folder
    ix, emb = tmp_path / "ix", FakeEmbedder()
    Indexer(ix, embedder=emb).run([d], captions_file=caps)
    before = texts_of(ix)
    a, b = (d / "a.png").read_bytes(), (d / "b.png").read_bytes()
    (d / "a.png").write_bytes(b)
    (d / "b.png").write_bytes(a)
    calls = emb.calls
    s = Indexer(ix, embedder=emb).run([d], captions_file=caps)
    assert (s.reused, s.added, s.failed) == (2, 0, 0) and emb.calls == calls
    after = texts_of(ix)
    assert after["a.png"] == before["b.png"] and after["b.png"] == before["a.png"] and consistent(ix)
    with Store(ix) as st:
        assert st.provenance()[0]["images"] == 3  # provenance follows the copied descriptions


@dataclass
class FakeSummary:
    failures: list = field(default_factory=list)
    interrupted: bool = False


# captioning is replaced by FakeCaptioner below, so these files are never opened; a VLMConfig, as
# the indexer's vlm_cfg is typed
FAKE_VLM = VLMConfig(model=Path("no-such-model.gguf"), mmproj=Path("no-such-mmproj.gguf"))

class FakeCaptioner:
    """Stands in for captioning.caption_sources: records from the file name; can stop early. It gets
    the bytes the indexer read and hashed, and hands each outcome back with the item's tag."""

    def __init__(self, stop_after: int | None = None, fail: str = ""):
        self.stop_after = stop_after
        self.fail = fail
        self.done = 0

    def __call__(self, items, vlm_cfg, n_variants, settings, on_result, vlm_factory=None):
        out = FakeSummary()
        for tag, image in items:
            assert isinstance(image, ImageBytes) and sha256_bytes(image.data) == image.sha256
            if self.stop_after is not None and self.done >= self.stop_after:
                out.interrupted = True
                break
            if self.fail and image.path.name == self.fail:
                failure = captioning.Failure(str(image.path), "model produced nothing")
                out.failures.append(failure)
                on_result(tag, failure)
                continue
            self.done += 1
            on_result(tag, CaptionRecord(
                image=str(image.path), sha256=image.sha256, model="test.gguf", mmproj="mm.gguf", family="test",
                prompt_version="p1", variants=[Variant(f"{image.path.stem} variant {i}") for i in range(n_variants)],
                test_model=True,
            ))  # fmt: skip
        return out


def five_images(tmp_path):
    d = tmp_path / "imgs"
    d.mkdir()
    for name, colour in COLOURS.items():
        make_image(d / f"{name}.png", colour)
    return d


def test_records_from_the_caption_stage_keep_provenance_and_failures(tmp_path, monkeypatch):
    """The indexer's side of the VLM path with a stand-in caption stage (FakeCaptioner): what it
    stores of each record and failure. The VLM itself runs in e2e/test_index_search_cli.py."""
    d = five_images(tmp_path)
    monkeypatch.setattr(captioning, "caption_sources", FakeCaptioner(fail="c.png"))
    s = Indexer(tmp_path / "ix", embedder=FakeEmbedder(), vlm_cfg=FAKE_VLM, n_variants=3).run([d])
    assert (s.added, s.failed) == (4, 1) and "model produced nothing" in s.failures[0][1]
    with Store(tmp_path / "ix") as st:
        assert st.counts()["texts"] == 12
        prov = st.provenance()
        assert prov[0]["model"] == "test.gguf" and prov[0]["test_model"] == 1 and prov[0]["images"] == 4
        assert {r.source for r in st.images().values() if r.status == "ok"} == {"vlm"}


def test_interrupted_run_keeps_finished_batches_and_resumes_to_the_same_state(tmp_path, monkeypatch):
    d = five_images(tmp_path)
    emb = FakeEmbedder()
    monkeypatch.setattr(captioning, "caption_sources", FakeCaptioner())
    Indexer(tmp_path / "clean", embedder=emb, vlm_cfg=FAKE_VLM, batch_size=2).run([d])

    monkeypatch.setattr(captioning, "caption_sources", FakeCaptioner(stop_after=3))  # Ctrl-C in batch 2
    s = Indexer(tmp_path / "ix", embedder=emb, vlm_cfg=FAKE_VLM, batch_size=2).run([d])
    assert s.interrupted and s.added == 3 and consistent(tmp_path / "ix")
    with Store(tmp_path / "ix") as st:
        assert st.last_run()["status"] == "interrupted"

    monkeypatch.setattr(captioning, "caption_sources", FakeCaptioner())
    s = Indexer(tmp_path / "ix", embedder=emb, vlm_cfg=FAKE_VLM, batch_size=2).run([d])
    assert (s.added, s.skipped, s.interrupted) == (2, 3, False)
    assert texts_of(tmp_path / "ix") == texts_of(tmp_path / "clean") and consistent(tmp_path / "ix")


def test_ctrl_c_mid_batch_rolls_that_batch_back(tmp_path, monkeypatch):
    d = five_images(tmp_path)
    emb = FakeEmbedder()
    real_embed = emb.embed
    calls = {"n": 0}

    def embed_then_interrupt(texts, batch_size=32):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real_embed(texts)

    emb.embed = embed_then_interrupt
    monkeypatch.setattr(captioning, "caption_sources", FakeCaptioner())
    s = Indexer(tmp_path / "ix", embedder=emb, vlm_cfg=FAKE_VLM, batch_size=2).run([d])
    assert s.interrupted and s.added == 2
    assert len(texts_of(tmp_path / "ix")) == 2 and consistent(tmp_path / "ix")


def test_refuses_changing_dtype_or_text_mode_and_other_embedders(tmp_path, folder):
    d, caps = folder
    ix = tmp_path / "ix"
    Indexer(ix, embedder=FakeEmbedder(), dtype="f16").run([d], captions_file=caps)
    with pytest.raises(StoreError, match="--dtype f16"):
        Indexer(ix, embedder=FakeEmbedder(), dtype="i8").run([d], captions_file=caps)
    with pytest.raises(StoreError, match=f"--text-mode {DEFAULT_TEXT_MODE}"):  # the mode it was created with
        Indexer(ix, embedder=FakeEmbedder(), text_mode="fields").run([d], captions_file=caps)
    with pytest.raises(StoreError, match="other-model"):
        Indexer(ix, embedder=FakeEmbedder(name="other-model")).run([d], captions_file=caps)


def test_second_writer_is_refused_while_the_lock_is_held(tmp_path, folder):
    d, caps = folder
    with IndexLock(tmp_path / "ix"), pytest.raises(StoreError, match=f"process {os.getpid()}"):
        Indexer(tmp_path / "ix", embedder=FakeEmbedder()).run([d], captions_file=caps)


def test_no_describer_for_new_images_is_a_clear_error_and_leaves_no_index(tmp_path):
    d = five_images(tmp_path)
    first = sorted(d.iterdir())[0].resolve()
    with pytest.raises(StoreError, match=f"^{len(COLOURS)} image\\(s\\) need descriptions .*--vlm.*e.g. {first}$"):
        Indexer(tmp_path / "ix", embedder=FakeEmbedder()).run([d])
    assert not (tmp_path / "ix").exists()  # not an empty index that doctor would call sound


def test_no_describer_for_new_images_leaves_an_index_that_was_there_as_it_was(tmp_path, folder):
    d, caps = folder
    ix = tmp_path / "ix"
    Indexer(ix, embedder=FakeEmbedder()).run([d], captions_file=caps)
    before = texts_of(ix)
    make_image(d / "e.png", COLOURS["e"])
    with pytest.raises(StoreError, match=f"^1 image\\(s\\) need descriptions .*e.g. {d.resolve() / 'e.png'}$"):
        Indexer(ix, embedder=FakeEmbedder()).run([d])
    assert texts_of(ix) == before and consistent(ix)


def test_progress_shows_a_bar_only_for_a_stage_with_work(tmp_path, folder, capsys):
    """One bar per stage that has work; none where a stage has nothing to do (a re-run of a captions
    file with nothing new printed "embed 0/0", as did files touched but not changed)."""
    d, caps = folder
    for ix, paths, n in ((tmp_path / "records", [], 4), (tmp_path / "files", [d], 3)):  # 4 records, 3 files
        Indexer(ix, embedder=FakeEmbedder(), progress=True).run(paths, captions_file=caps)
        shown = capsys.readouterr().err.split()
        assert shown[0] == "embed" and f"{n}/{n}" in shown and "caption" not in shown  # no VLM: no caption stage
    Indexer(tmp_path / "records", embedder=FakeEmbedder(), progress=True).run(captions_file=caps)
    assert capsys.readouterr().err == ""
    for f in d.iterdir():  # a new mtime, the same bytes: each file is read, found unchanged and shrunk off
        os.utime(f, ns=(f.stat().st_atime_ns, f.stat().st_mtime_ns + 10**9))
    s = Indexer(tmp_path / "files", embedder=FakeEmbedder(), progress=True).run([d], captions_file=caps)
    assert s.skipped == 3 and s.added == 0
    assert capsys.readouterr().err.strip() == ""


def test_an_update_appends_to_the_snapshot_instead_of_rebuilding_it(tmp_path, folder):
    """A second run loads the saved snapshot and adds only the change: the base graph is the
    same file, byte for byte, the row file is appended to, and one new generation is saved."""
    d, caps = folder
    ix = tmp_path / "ix"
    Indexer(ix, embedder=FakeEmbedder()).run([d], captions_file=caps)
    m1 = vindex.read_manifest(ix)
    base = (ix / m1["base"]).read_bytes()
    rows_inode = (ix / m1["rows"]).stat().st_ino
    make_image(d / "e.png", COLOURS["e"])
    with open(caps, "a") as fh:
        fh.write(json.dumps({"image": "e.png", "variants": ["scene e one"]}) + "\n")
    s = Indexer(ix, embedder=FakeEmbedder()).run([d], captions_file=caps)
    m2 = vindex.read_manifest(ix)
    assert s.added == 1 and not s.rebuilt_vectors
    assert m2["generation"] == m1["generation"] + 1 and m2["base"] == m1["base"]
    assert (ix / m2["base"]).read_bytes() == base and (ix / m2["rows"]).stat().st_ino == rows_inode
    assert m2["tail_count"] == m1["tail_count"] + s.texts_added and m2["n_rows"] == m1["n_rows"] + s.texts_added
    with Store(ix) as st:
        assert st.get_meta("vector_generation") == m2["generation"]
    assert consistent(ix)


def test_a_file_gone_between_the_walk_and_its_stat_is_one_failure(tmp_path, folder, monkeypatch):
    from edge_t2t import images

    d, caps = folder
    real = images.find_images

    def walk_then_vanish(roots, on_error):
        found = list(real(roots, on_error=on_error))
        (d / "b.png").unlink()  # deleted after the walk saw it
        yield from found

    monkeypatch.setattr(images, "find_images", walk_then_vanish)
    s = Indexer(tmp_path / "ix", embedder=FakeEmbedder()).run([d], captions_file=caps)
    assert s.added == 2 and s.failures == [(str((d / "b.png").resolve()), "no such file (it disappeared during the scan)")]


def test_a_fifo_is_not_a_regular_file(tmp_path, folder):
    d, caps = folder
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    s = Indexer(tmp_path / "ix", embedder=FakeEmbedder()).run([d, fifo], captions_file=caps)
    assert (str(fifo), "not a regular file") in s.failures and s.added == 3


def test_index_help_names_sentences_as_the_default_text_mode():
    import argparse

    from edge_t2t.cli import index as cli_index

    parser = argparse.ArgumentParser()
    cli_index.register(parser.add_subparsers())
    help_text = " ".join(parser._subparsers._group_actions[0].choices["index"].format_help().split())
    assert "sentences (the default" in help_text and "the paper's form; default" not in help_text
    assert DEFAULT_TEXT_MODE == "sentences"


def test_a_run_saves_at_its_end_and_at_most_every_checkpoint_interval(tmp_path, monkeypatch):
    from edge_t2t.index import indexdir

    d = five_images(tmp_path)
    monkeypatch.setattr(captioning, "caption_sources", FakeCaptioner())
    # An interval no run reaches, however slow the machine (the default 60 s is a matter of the clock)
    monkeypatch.setattr(indexdir, "CHECKPOINT_EVERY_S", float("inf"))
    Indexer(tmp_path / "once", embedder=FakeEmbedder(), vlm_cfg=FAKE_VLM, batch_size=1).run([d])
    # one save when the (empty) snapshot is created, one at the end: not one per batch
    assert vindex.read_manifest(tmp_path / "once")["generation"] == 2
    monkeypatch.setattr(indexdir, "CHECKPOINT_EVERY_S", 0.0)
    Indexer(tmp_path / "often", embedder=FakeEmbedder(), vlm_cfg=FAKE_VLM, batch_size=1).run([d])
    assert vindex.read_manifest(tmp_path / "often")["generation"] == 1 + 5  # creation + one per batch
    assert consistent(tmp_path / "once") and consistent(tmp_path / "often")
