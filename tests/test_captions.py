"""The caption cache, the JSONL writer and the caption-file importers."""

from __future__ import annotations

import json
import sqlite3
from collections import defaultdict
from pathlib import Path

import pytest

from edge_t2t.describe.captions import (
    CacheKey,
    CaptionCache,
    JsonlWriter,
    canonical_json,
    detect_format,
    load_captions,
)
from edge_t2t.errors import InputError, StoreError
from edge_t2t.hashing import file_sha256
from edge_t2t.records import CaptionRecord, Feature, Variant


def _record(image: str = "a.jpg", text: str = "A harbour with boats.") -> CaptionRecord:
    return CaptionRecord(
        image=image, sha256="ab" * 32, model="m.gguf", mmproj="p.gguf", family="llava-1.5",
        prompt_version="rsrt-1", variants=[Variant(text, (Feature("boat", "south", "small"),), "Boats moor.")],
        seconds=1.5, test_model=True,
    )  # fmt: skip


def _key(**changes: object) -> CacheKey:
    base = {"image_sha256": "i" * 64, "model_sha256": "m" * 64, "mmproj_sha256": "p" * 64,
            "prompt_version": "rsrt-1", "params": {"max_tokens": 100, "temperature": 0.0, "seed": 0}}  # fmt: skip
    base.update(changes)
    return CacheKey.make(**base)  # type: ignore[arg-type]


# ---------------------------------------------------------------- cache


def test_canonical_json_ignores_key_order() -> None:
    assert canonical_json({"b": 1, "a": [1, 2]}) == canonical_json({"a": [1, 2], "b": 1}) == '{"a":[1,2],"b":1}'


def test_cache_round_trip_and_key_parts(tmp_path: Path) -> None:
    path = tmp_path / "c" / "captions.sqlite"
    with CaptionCache(path) as cache:
        assert cache.get(_key()) is None
        cache.put(_key(), _record())
        got = cache.get(_key())
        assert got is not None and got.to_dict() == _record().to_dict()
        # Every part of the key matters.
        for change in [
            {"image_sha256": "x" * 64}, {"model_sha256": "x" * 64}, {"mmproj_sha256": "x" * 64},
            {"prompt_version": "custom-12345678"}, {"params": {"max_tokens": 101, "temperature": 0.0, "seed": 0}},
        ]:  # fmt: skip
            assert cache.get(_key(**change)) is None, change
        # The same params spelled in another order hit.
        assert cache.get(_key(params={"seed": 0, "temperature": 0.0, "max_tokens": 100})) is not None
        assert len(cache) == 1
    # Persisted across connections, in WAL mode.
    with CaptionCache(path) as cache:
        assert cache.get(_key()) is not None
    mode = sqlite3.connect(path).execute("PRAGMA journal_mode").fetchone()[0]
    assert mode.lower() == "wal"


def test_cache_put_replaces(tmp_path: Path) -> None:
    with CaptionCache(tmp_path / "c.sqlite") as cache:
        cache.put(_key(), _record(text="first"))
        cache.put(_key(), _record(text="second"))
        assert len(cache) == 1
        assert cache.get(_key()).variants[0].one_sentence == "second"


def test_cache_default_location_follows_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGE_T2T_CACHE_DIR", str(tmp_path / "envcache"))
    with CaptionCache() as cache:
        assert cache.path == tmp_path / "envcache" / "captions.sqlite"
        assert cache.path.exists()


def test_file_sha256_memo(tmp_path: Path) -> None:
    import hashlib

    f = tmp_path / "model.gguf"
    f.write_bytes(b"one")
    with CaptionCache(tmp_path / "c.sqlite") as cache:
        assert file_sha256(f, cache) == hashlib.sha256(b"one").hexdigest()
        f.write_bytes(b"two!")  # size and mtime change -> hashed again
        assert file_sha256(f, cache) == hashlib.sha256(b"two!").hexdigest()
        st = f.stat()  # remembered in the cache, for the next process
        assert cache.lookup(str(f.resolve()), st.st_size, st.st_mtime_ns) == hashlib.sha256(b"two!").hexdigest()


# ---------------------------------------------------------------- JSONL writer


def test_jsonl_writer_lines_visible_before_close_and_moved_on_close(tmp_path: Path) -> None:
    out = tmp_path / "sub" / "caps.jsonl"
    out.parent.mkdir()
    out.write_text("old content\n")
    writer = JsonlWriter(out)
    writer.write(_record("a.jpg"))
    writer.write(_record("b.jpg"))
    # Finished lines are on disk already (a hard kill keeps them), the old file is untouched.
    partial = [json.loads(line) for line in writer.partial.read_text().splitlines()]
    assert [r["image"] for r in partial] == ["a.jpg", "b.jpg"]
    assert out.read_text() == "old content\n"
    writer.close()
    assert not writer.partial.exists()
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["image"] for r in lines] == ["a.jpg", "b.jpg"] and writer.count == 2
    assert load_captions(out)[1].image == "b.jpg"


# ---------------------------------------------------------------- importers


def test_import_real_rsicd_coco(shared_data: Path) -> None:
    path = shared_data / "rsicd" / "captions_val.json"
    raw = json.loads(path.read_text())
    distinct: dict[int, set[str]] = defaultdict(set)
    for ann in raw["annotations"]:
        distinct[ann["image_id"]].add(" ".join(ann["caption"].split()))
    records = load_captions(path)
    assert detect_format(path) == "coco"
    assert len(records) == len(raw["images"]) == 1092
    assert sum(len(r.variants) for r in records) == sum(len(v) for v in distinct.values())
    assert sum(len(r.variants) for r in records) < len(raw["annotations"])  # duplicates dropped
    names = {img["id"]: img["file_name"] for img in raw["images"]}
    for r in records:
        assert r.image == names[r.extra["coco_id"]]
        assert {v.one_sentence for v in r.variants} == distinct[r.extra["coco_id"]]
        assert len({v.one_sentence for v in r.variants}) == len(r.variants)
        assert r.model == "imported:coco" and r.prompt_version == "imported" and r.test_model is False
        assert all(v.features == () and v.caption == "" for v in r.variants)


def test_import_coco_rejects_dangling_annotation(tmp_path: Path) -> None:
    f = tmp_path / "coco.json"
    f.write_text(json.dumps({"images": [{"id": 1, "file_name": "a.jpg"}],
                             "annotations": [{"image_id": 2, "caption": "x"}]}))  # fmt: skip
    with pytest.raises(InputError, match=r"coco\.json.*image_id 2"):
        load_captions(f)


def test_import_karpathy_with_split_filter(tmp_path: Path) -> None:
    data = {"images": [
        {"filename": "a.jpg", "split": "train", "sentences": [{"raw": "a farm ."}, {"raw": "a farm ."}]},
        {"filename": "b.jpg", "split": "test", "sentences": [{"raw": "a port ."}, {"tokens": ["many", "ships"]}]},
    ], "dataset": "rsicd"}  # fmt: skip
    f = tmp_path / "dataset_rsicd.json"
    f.write_text(json.dumps(data))
    everything = load_captions(f)
    assert detect_format(f) == "karpathy"
    assert [(r.image, len(r.variants)) for r in everything] == [("a.jpg", 1), ("b.jpg", 2)]
    test_only = load_captions(f, split="test")
    assert [r.image for r in test_only] == ["b.jpg"]
    assert [v.one_sentence for v in test_only[0].variants] == ["a port .", "many ships"]
    assert test_only[0].model == "imported:karpathy" and test_only[0].extra["split"] == "test"


def test_import_rsrt_jsonl(tmp_path: Path) -> None:
    lines = [
        {"image": "x.png", "variants": [
            {"one_sentence": "A lake.", "feature": ["lake", "trees"], "caption": "A lake in a forest."},
            {"one_sentence": "Water.", "features": [{"name": "lake", "position": "centre", "size": "large"}]},
        ]},
        {"image": "y.png", "variants": ["Just a sentence."], "class": "forest"},
    ]  # fmt: skip
    f = tmp_path / "rsrt.jsonl"
    f.write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
    records = load_captions(f)
    assert detect_format(f) == "rsrt"
    assert [r.image for r in records] == ["x.png", "y.png"]
    assert [ft.name for ft in records[0].variants[0].features] == ["lake", "trees"]
    assert records[0].variants[1].features == (Feature("lake", "centre", "large"),)
    assert records[1].variants[0].one_sentence == "Just a sentence."
    assert records[1].extra == {"class": "forest"}
    assert all(r.model == "imported:rsrt" and r.prompt_version == "imported" for r in records)


def test_import_our_own_jsonl_keeps_model_fields(tmp_path: Path) -> None:
    f = tmp_path / "ours.jsonl"
    rec = _record()
    rec.cached = True
    f.write_text(json.dumps(rec.to_dict()) + "\n")
    (got,) = load_captions(f)
    assert detect_format(f) == "edge-t2t"
    assert got.model == "m.gguf" and got.test_model is True and got.prompt_version == "rsrt-1"
    assert got.variants == rec.variants and got.cached is False


@pytest.mark.parametrize(
    "content, match",
    [
        ('{"image": "a.jpg", "variants": []}\n{"image": "b.jpg", "variants": [\n', r"bad\.jsonl: line 2"),
        ('{"image": "a.jpg", "variants": []}\n[1, 2]\n', r"line 2: expected a JSON object"),
        ('{"image": "a.jpg"}\n', r"line 1: a record needs 'image' and a 'variants' list"),
        ('{"image": "a.jpg", "variants": [42]}\n', r"line 1: a variant must be"),
        ("", r"empty"),
        # the dataset reader's rules (eval's): an image may have no sentences, but a file with none is refused
        ('{"images": [{"filename": "a.jpg"}]}', r"bad\.jsonl: no captions found"),
        ('{"images": [{"sentences": ["x"]}]}', r"images\[0\]: missing or empty image file name"),
    ],
)
def test_import_malformed_names_file_and_line(tmp_path: Path, content: str, match: str) -> None:
    f = tmp_path / "bad.jsonl"
    f.write_text(content)
    with pytest.raises(InputError, match=match):
        load_captions(f)


def test_import_missing_file(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="nope.json"):
        load_captions(tmp_path / "nope.json")


def test_cache_refuses_a_newer_schema(tmp_path: Path) -> None:
    path = tmp_path / "c.sqlite"
    CaptionCache(path).close()
    db = sqlite3.connect(path)
    db.execute("UPDATE meta SET value = '99' WHERE key = 'schema_version'")
    db.commit()
    db.close()
    with pytest.raises(StoreError, match="schema version 99"):
        CaptionCache(path)


def test_index_and_eval_read_one_dataset_under_one_set_of_rules(tmp_path: Path) -> None:
    """`index --captions` and `eval` share dataset.py: the file_name fallback and plain-string
    sentences work for both; only the default split differs (index: all, eval: test)."""
    from edge_t2t.evaluation.dataset import load_annotations

    data = {"images": [
        {"file_name": "a.jpg", "split": "train", "sentences": ["a farm .", {"raw": "fields"}]},
        {"file_name": "b.jpg", "split": "test", "sentences": ["a port ."]},
    ]}  # fmt: skip
    f = tmp_path / "dataset_x.json"
    f.write_text(json.dumps(data))
    records = load_captions(f)
    assert [(r.image, [v.one_sentence for v in r.variants]) for r in records] == [
        ("a.jpg", ["a farm .", "fields"]), ("b.jpg", ["a port ."])]
    ann = load_annotations(f)
    assert ann.images == ["b.jpg"] and ann.captions == ["a port ."] and ann.split == "test"
    assert [r.image for r in load_captions(f, split="test")] == ann.images
    with pytest.raises(InputError, match="splits present: test, train"):
        load_captions(f, split="val")
