"""The RSRT prompt, its bounded schema, parsing (constrained, truncated, free text) and quality checks."""

from __future__ import annotations

import json
from pathlib import Path

import helpers_media as hm
import pytest

from edge_t2t.describe import prompts
from edge_t2t.errors import InputError
from edge_t2t.records import Feature, Variant


def _variant(i: int) -> dict:
    return {
        "one_sentence": f"A dense residential area number {i} with many houses.",
        "features": [{"name": f"road {i}", "position": "north-east", "size": "large"}],
        "caption": f"Houses line the roads; a park lies in the south of scene {i}.",
    }


def _walk_strings_and_arrays(node: dict, found: list) -> None:
    if node.get("type") in ("string", "array"):
        found.append(node)
    for child in node.get("properties", {}).values():
        _walk_strings_and_arrays(child, found)
    if isinstance(node.get("items"), dict):
        _walk_strings_and_arrays(node["items"], found)


@pytest.mark.parametrize("n", [1, 5, 7])
def test_schema_bounds_every_field(n: int) -> None:
    sch = prompts.schema(n)
    nodes: list = []
    _walk_strings_and_arrays(sch, nodes)
    assert nodes
    for node in nodes:
        if node["type"] == "string":
            assert "enum" in node or node.get("maxLength", 0) > 0, node
        else:
            assert "maxItems" in node and "minItems" in node, node
    top = sch["properties"]["variants"]
    assert top["minItems"] == top["maxItems"] == n
    feature = top["items"]["properties"]["features"]["items"]["properties"]
    assert set(feature["position"]["enum"]) == set(prompts.POSITIONS)
    assert set(feature["size"]["enum"]) == set(prompts.SIZES)
    assert not any("%" in s or any(ch.isdigit() for ch in s) for s in prompts.SIZES)


def test_schema_converts_to_a_llama_grammar() -> None:
    llama_grammar = hm.require("llama_cpp.llama_grammar", "llama-cpp-python is a core dependency: run `make setup`")
    gbnf = llama_grammar.json_schema_to_gbnf(json.dumps(prompts.schema(5)))
    assert "root" in gbnf and "north-east" in gbnf


def test_max_output_chars_covers_a_maximal_answer() -> None:
    long_feature = {"name": "x" * prompts.FEATURE_NAME_MAX, "position": "north-east", "size": "very large"}
    variant = {
        "one_sentence": "y" * prompts.ONE_SENTENCE_MAX,
        "features": [long_feature] * prompts.FEATURES_MAX,
        "caption": "z" * prompts.CAPTION_MAX,
    }
    answer = json.dumps({"variants": [variant] * 5})  # single spaces, as models write it
    assert len(answer) <= prompts.max_output_chars(5)
    assert prompts.default_max_tokens(5) * 3 >= prompts.max_output_chars(5)


def test_default_prompt_text_and_directions() -> None:
    p = prompts.build_prompt(5)
    assert p.version == prompts.PROMPT_VERSION and p.n_variants == 5
    assert "top = north" in p.text and "left = west" in p.text
    assert "percentages" in p.text
    for focus in prompts.FOCUSES:
        assert focus in p.text
    assert "Write 3 different descriptions" in prompts.build_prompt(3).text
    with pytest.raises(InputError):
        prompts.build_prompt(0)


def test_prompt_file_gets_its_own_version(tmp_path: Path) -> None:
    f = tmp_path / "p.txt"
    f.write_text('Give {n} descriptions as JSON like {"variants": []}.\n')
    a = prompts.build_prompt(4, f)
    assert a.text == 'Give 4 descriptions as JSON like {"variants": []}.'
    assert a.version.startswith("custom-") and len(a.version) == len("custom-") + 8
    f.write_text("Give {n} descriptions, briefly.")
    b = prompts.build_prompt(4, f)
    assert b.version != a.version != prompts.PROMPT_VERSION
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    with pytest.raises(InputError, match="empty"):
        prompts.build_prompt(4, empty)
    with pytest.raises(InputError, match="missing.txt"):
        prompts.build_prompt(4, tmp_path / "missing.txt")


def test_parse_constrained_json() -> None:
    text = json.dumps({"variants": [_variant(i) for i in range(3)]})
    out = prompts.parse_output(text, 3, constrained=True)
    assert len(out) == 3
    assert out[1].features == (Feature("road 1", "north-east", "large"),)
    assert prompts.check_quality(out, 3) == []


def test_parse_keeps_complete_variants_of_a_truncated_answer() -> None:
    text = json.dumps({"variants": [_variant(i) for i in range(3)]})
    cut = text[: text.index("scene 2")]  # cut inside the third variant
    out = prompts.parse_output(cut, 3, constrained=True)
    assert [v.one_sentence for v in out] == [_variant(0)["one_sentence"], _variant(1)["one_sentence"]]
    assert "2 variants instead of 3" in prompts.check_quality(out, 3)
    assert prompts.parse_output('{"variants": [{"one_sentence": "abc', 3, True) == []
    assert prompts.parse_output("", 3, True) == []


def test_parse_free_text_json_inside_prose() -> None:
    text = "Sure! Here it is:\n```json\n" + json.dumps({"variants": [_variant(0), _variant(1)]}) + "\n```"
    out = prompts.parse_output(text, 2, constrained=False)
    assert [v.caption for v in out] == [_variant(0)["caption"], _variant(1)["caption"]]


def test_parse_free_text_numbered_list() -> None:
    text = (
        "1. A large airport with two runways. Planes stand near the terminal in the north.\n"
        "2. An airfield seen from above. Long grey runways cross the scene from west to east.\n"
        "3. Aircraft parked on an apron. Green fields surround the airport.\n"
    )
    out = prompts.parse_output(text, 3, constrained=False)
    assert len(out) == 3
    assert out[0].one_sentence == "A large airport with two runways."
    assert out[0].caption == "Planes stand near the terminal in the north."
    assert out[2].one_sentence.startswith("Aircraft parked")


def test_parse_free_text_labelled_paragraphs() -> None:
    text = (
        "One sentence: A river crosses farmland.\nFeatures: river, fields, bridge\n"
        "Caption: A wide river runs from north to south between green fields.\n\n"
        "One sentence: Farmland beside a river.\nCaption: Rectangular fields fill the east."
    )
    out = prompts.parse_output(text, 5, constrained=False)
    assert len(out) == 2
    assert out[0].one_sentence == "A river crosses farmland."
    assert [f.name for f in out[0].features] == ["river", "fields", "bridge"]
    assert out[1].caption == "Rectangular fields fill the east."


def test_parse_limits_to_n() -> None:
    text = json.dumps({"variants": [_variant(i) for i in range(6)]})
    assert len(prompts.parse_output(text, 4, constrained=True)) == 4


def test_check_quality_flags_each_problem() -> None:
    good = Variant.from_dict(_variant(0))
    dup = Variant.from_dict(_variant(0))
    empty = Variant(one_sentence="", features=(), caption="")
    percent = Variant(one_sentence="Buildings cover 40% of the image area.", features=(Feature("x"),),
                      caption="About 30 percent is water along the coast.")  # fmt: skip
    short = Variant(one_sentence="Roofs.", features=(Feature("roof"),), caption="y" * (prompts.CAPTION_MAX * 2 + 1))
    problems = prompts.check_quality([good, dup, empty, percent, short], 6)
    text = " | ".join(problems)
    assert "5 variants instead of 6" in text
    assert "variant 2: duplicate of variant 1" in text
    assert "variant 3: empty one_sentence" in text and "variant 3: empty caption" in text
    assert "variant 3: no features" in text
    assert "variant 4: percentages present" in text
    assert "variant 5: one_sentence too short" in text and "variant 5: caption too long" in text
    assert prompts.check_quality([good], 1) == []


def test_variant_prompts_share_one_prompt_and_differ_by_focus(tmp_path) -> None:
    vp = prompts.build_variant_prompts(5)
    assert vp.n_variants == 5 and vp.version == prompts.PROMPT_VERSION
    assert "Write one description" in vp.shared and len(set(vp.suffixes)) == 5
    assert all(f in s for f, s in zip(prompts.FOCUSES, vp.suffixes, strict=True))
    assert prompts.schema(5)["properties"]["variants"]["items"] == prompts.variant_schema()
    pf = tmp_path / "p.txt"
    pf.write_text("Describe this image {n} time(s) as JSON.")
    custom = prompts.build_variant_prompts(2, pf)
    assert custom.shared == "Describe this image 1 time(s) as JSON." and custom.version.startswith("custom-")


def test_raw_control_characters_in_strings_are_accepted() -> None:
    # llama-cpp-python's JSON grammar allows a raw newline inside a string; the answer still counts.
    one = '{"one_sentence": "a line\nbreak here", "features": [{"name": "pond", "position": "north", "size": "small"}], "caption": "x\ty"}'
    (v,) = prompts.parse_output(one, 1, True)
    assert v.one_sentence == "a line\nbreak here" and v.features[0].name == "pond"
    assert len(prompts.parse_output('{"variants": [' + one + ", " + one[:20], 5, True)) == 1
