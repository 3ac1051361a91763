"""Synthetic scenes: deterministic pixels, truthful ground truth, uniquely-satisfied queries."""

from __future__ import annotations

import hashlib
import json
import re

import pytest

from edge_t2t.demo import scenes as S
from edge_t2t.records import CaptionRecord

CARDINALS = ("north", "south", "east", "west")


@pytest.fixture(scope="module")
def scene_sets():
    return {seed: S.make_scenes(40, seed) for seed in (0, 1)}


def _pixels_hash(scene) -> str:
    return hashlib.sha256(scene.image.tobytes()).hexdigest()


def _kinds_named(text: str) -> set[str]:
    low = text.lower()
    return {k for k, words in S.VOCABULARY.items() if any(re.search(rf"\b{re.escape(w)}", low) for w in words)}


def _centre(obj) -> tuple[float, float]:
    x0, y0, x1, y1 = obj.bbox
    return (x0 + x1) / 2, (y0 + y1) / 2


def _pixel_direction_holds(a, b, cardinal: str) -> bool:
    """Independent of scenes.direction_of: compare box centres in pixels (top = north, left = west)."""
    (ax, ay), (bx, by) = _centre(a), _centre(b)
    return {"east": ax > bx, "west": ax < bx, "north": ay < by, "south": ay > by}[cardinal]


def test_same_seed_same_pixels_and_objects():
    a, b = S.make_scenes(6, seed=3), S.make_scenes(6, seed=3)
    assert [_pixels_hash(s) for s in a] == [_pixels_hash(s) for s in b]
    assert [s.objects for s in a] == [s.objects for s in b]
    # Scene i does not depend on how many scenes were asked for.
    assert _pixels_hash(S.make_scenes(2, seed=3)[1]) == _pixels_hash(a[1])
    other = S.make_scenes(6, seed=4)
    assert {_pixels_hash(s) for s in a}.isdisjoint({_pixels_hash(s) for s in other})
    assert a[0].image.size == (256, 256)


def test_layout_is_consistent(scene_sets):
    for scene in scene_sets[0] + scene_sets[1]:
        kinds = [o.kind for o in scene.objects]
        assert len(kinds) == len(set(kinds)), "one object per kind per scene"
        area = [o for o in scene.objects if not o.linear]
        assert len(area) >= 2
        cells = [(o.row, o.col) for o in area]
        assert len(cells) == len(set(cells)), "area objects never share a cell"
        for o in scene.objects:
            assert o.kind in S.KINDS and o.size in S.SIZES
            x0, y0, x1, y1 = o.bbox
            assert 0 <= x0 < x1 <= 256 and 0 <= y0 < y1 <= 256
            if o.linear:
                assert o.orientation in ("north-south", "east-west")
                assert not any((c.row == o.row if o.col is None else c.col == o.col) for c in area)
            else:
                assert o.region == S.region_name(o.row, o.col)


def test_five_distinct_variants_with_provenance(scene_sets):
    for scene in scene_sets[0][:10]:
        rec = S.describe(scene, seed=0)
        assert rec.model == "ground-truth:scenes" and rec.prompt_version == "scenes-1" and not rec.test_model
        assert len(rec.variants) == 5
        assert len({v.joined_text() for v in rec.variants}) == 5
        for v in rec.variants:
            assert v.one_sentence and v.caption and len(v.features) == len(scene.objects)


def test_descriptions_only_mention_placed_objects(scene_sets):
    for seed, scenes in scene_sets.items():
        for scene in scenes:
            placed = scene.kinds()
            for v in S.describe(scene, seed=seed).variants:
                for text in (v.one_sentence, v.features_text(), v.caption):
                    named = _kinds_named(text)
                    assert named <= placed, f"{scene.id}: {text!r} names {named - placed}"
                # Every placed object is listed among the features.
                assert _kinds_named(v.features_text()) == placed


def test_features_are_true_with_positions_in_enum_and_no_percentages(scene_sets):
    for scene in scene_sets[0]:
        truth = {o.kind: o for o in scene.objects}
        for v in S.describe(scene).variants:
            for f in v.features:
                assert f.position in S.POSITIONS and f.size in S.SIZES
                (kind,) = _kinds_named(f.name)
                assert (f.position, f.size) == (truth[kind].region, truth[kind].size)
            text = v.joined_text()
            assert "%" not in text and "percent" not in text.lower()
            assert not re.search(r"\d", text), text


_REL = [
    re.compile(r"^(?P<a>.+?) lies? to the (?P<d>[a-z-]+) of the (?P<b>.+)$"),
    re.compile(r"^To the (?P<d>[a-z-]+) of the (?P<b>.+?) there (?:is|are) (?P<a>.+)$"),
    re.compile(r"^The (?P<b>.+?) has (?P<a>.+) to its (?P<d>[a-z-]+)$"),
]


def test_caption_statements_are_true(scene_sets):
    checked_rel = checked_pos = 0
    for scene in scene_sets[0] + scene_sets[1]:
        truth = {o.kind: o for o in scene.objects}
        for v in S.describe(scene, seed=scene.seed).variants:
            for sentence in v.caption.rstrip(".").split(". "):
                rel = next((m for m in (p.match(sentence) for p in _REL) if m), None)
                if rel:
                    (ka,), (kb,) = _kinds_named(rel["a"]), _kinds_named(rel["b"])
                    for part in rel["d"].split("-"):
                        assert _pixel_direction_holds(truth[ka], truth[kb], part), (scene.id, sentence)
                    checked_rel += 1
                    continue
                named = _kinds_named(sentence)
                where = re.search(r"(?:in|through) the (north-west|north-east|south-west|south-east|north|south|"
                                  r"east|west|centre|middle)", sentence)
                if len(named) == 1 and where:
                    (kind,) = named
                    said = "centre" if where[1] == "middle" else where[1]
                    assert truth[kind].region == said, (scene.id, sentence)
                    checked_pos += 1
    assert checked_rel > 100 and checked_pos > 300  # the parser really saw the statements


@pytest.mark.parametrize("seed", [0, 1])
def test_directional_queries_are_uniquely_satisfied(seed, scene_sets):
    scenes = scene_sets[seed]
    specs = S.directional_query_specs(scenes)
    queries = S.directional_queries(scenes)
    assert 15 <= len(queries) <= 20
    assert len({q for q, _ in queries}) == len(queries)
    assert [(s.text, sid) for s, sid in specs] == queries
    by_id = {s.id: s for s in scenes}
    for spec, sid in specs:
        assert [s.id for s in scenes if spec.matches(s)] == [sid], spec.text
    # Independent check of the relational ones on pixel geometry of the expected scene.
    rel = re.compile(r"^(?:an? )?(?P<a>[a-z ]+?) (?P<d>north|south|east|west) of (?:an? )?(?P<b>[a-z ]+)$")
    checked = 0
    for query, sid in queries:
        m = rel.match(query)
        if m:
            scene = by_id[sid]
            (a,), (b,) = scene.find(m["a"]), scene.find(m["b"])
            assert _pixel_direction_holds(a, b, m["d"]), query
            checked += 1
    assert checked >= 3


def test_directional_queries_are_fixed():
    scenes = S.make_scenes(40, 0)
    assert S.directional_queries(scenes) == S.directional_queries(S.make_scenes(40, 0))


def test_write_scene_set(tmp_path):
    paths, captions = S.write_scene_set(tmp_path / "set", n=4, seed=2)
    assert len(paths) == 4 and all(p.is_file() and p.suffix == ".png" for p in paths)
    lines = captions.read_text().splitlines()
    assert len(lines) == 4
    for line, path in zip(lines, paths, strict=True):
        rec = CaptionRecord.from_dict(json.loads(line))
        assert (captions.parent / rec.image) == path
        assert rec.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
        assert len(rec.variants) == 5
    assert not list((tmp_path / "set").glob("*.tmp"))
    # The same seed writes the same pixels again.
    again, _ = S.write_scene_set(tmp_path / "again", n=4, seed=2)
    from PIL import Image

    assert Image.open(paths[3]).tobytes() == Image.open(again[3]).tobytes()


def test_ground_truth_is_a_describer_through_the_pipeline_types(tmp_path):
    """The scenes' ground truth implements describer.Describer: from the ImageInput the pipeline
    builds of a written scene file, it returns that scene's true record, under the file's name."""
    from edge_t2t.describe import prompts
    from edge_t2t.describe.captioning import CaptionOptions, ImageInput, UnusableAnswer
    from edge_t2t.describe.describer import Describer, VLMDescriber
    from edge_t2t.images import load_image

    scenes = S.make_scenes(3, seed=2)
    paths, _ = S.write_scene_set(tmp_path, n=3, seed=2)
    gt = S.GroundTruthDescriber(scenes, seed=2)
    assert isinstance(gt, Describer) and isinstance(VLMDescriber(None, "", "", ("", "")), Describer)
    opts = CaptionOptions(prompts.build_prompt(4), prompts.schema(4), {}, 4.0, None, prompts.build_variant_prompts(4))
    for scene, path in zip(scenes, paths, strict=True):
        image = ImageInput.from_loaded(load_image(path))
        rec = gt.describe(image, opts)
        assert rec.image == str(path) and rec.sha256 == image.sha256
        assert rec.variants == S.describe(scene, n_variants=4, seed=2).variants and len(rec.variants) == 4
    other = tmp_path / "other.png"
    scenes[0].image.rotate(90).save(other)
    with pytest.raises(UnusableAnswer, match="not one of the synthetic scenes"):
        gt.describe(ImageInput.from_loaded(load_image(other)), opts)
