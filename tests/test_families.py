"""Every family in vlm.FAMILIES (the family table in docs/models.md) runs: a tiny generated model of that
family's text architecture and projector type goes through the family's real llama-cpp-python
chat handler and gives output that is valid under the caption schema."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from edge_t2t.describe import prompts, testvlm
from edge_t2t.describe.gguf_check import check_pair
from edge_t2t.describe.vlm import FAMILIES, VLM, VLMConfig
from edge_t2t.describe.vlm_shapes import TINY_FAMILIES

# The generic handler is run on two architectures it serves: SmolVLM (llama + idefics3) and Gemma 3.
CASES = sorted(TINY_FAMILIES)


def test_every_family_has_a_tiny_model():
    """No family can drop out of the run below unnoticed: the table and the models match."""
    covered = {shape.family for shape in TINY_FAMILIES.values()}
    assert covered == set(FAMILIES)


def _validate(value, schema: dict, path: str = "$") -> list[str]:
    """The subset of JSON Schema that prompts.schema uses; returns what is wrong."""
    errors = []
    kind = schema.get("type")
    if kind == "object":
        if not isinstance(value, dict):
            return [f"{path}: not an object"]
        errors += [f"{path}: missing {k}" for k in schema.get("required", []) if k not in value]
        props = schema.get("properties", {})
        if schema.get("additionalProperties") is False:
            errors += [f"{path}: extra key {k}" for k in value if k not in props]
        for k, sub in props.items():
            if k in value:
                errors += _validate(value[k], sub, f"{path}.{k}")
    elif kind == "array":
        if not isinstance(value, list):
            return [f"{path}: not an array"]
        if not schema.get("minItems", 0) <= len(value) <= schema.get("maxItems", len(value)):
            errors.append(f"{path}: {len(value)} items")
        for i, item in enumerate(value):
            errors += _validate(item, schema["items"], f"{path}[{i}]")
    elif kind == "string":
        if not isinstance(value, str):
            return [f"{path}: not a string"]
        if not schema.get("minLength", 0) <= len(value) <= schema.get("maxLength", len(value)):
            errors.append(f"{path}: length {len(value)}")
        if "enum" in schema and value not in schema["enum"]:
            errors.append(f"{path}: {value!r} not in enum")
    return errors


def _tight(schema: dict) -> dict:
    """The caption schema with every string and list bound shrunk, so a random model's answer stays
    short (the test is about the handler path, not about length)."""
    out = {k: (_tight(v) if isinstance(v, dict) else v) for k, v in schema.items()}
    if "properties" in out:
        out["properties"] = {k: _tight(v) for k, v in schema["properties"].items()}
    if "maxLength" in out:
        out["maxLength"] = min(out["maxLength"], 24)
    if out.get("type") == "array" and out.get("maxItems", 0) > 2:
        out["maxItems"] = max(2, out.get("minItems", 0))
    return out


SCHEMA = _tight(prompts.schema(1))
MAX_TOKENS = 320  # a token per character at worst: the tiny vocabularies have few long pieces


def test_validator_rejects_what_the_schema_forbids():
    schema = prompts.schema(1)
    good = {"variants": [{"one_sentence": "a", "features": [{"name": "x", "position": prompts.POSITIONS[0],
                                                                 "size": prompts.SIZES[0]}], "caption": "b"}]}
    assert _validate(good, schema) == []
    bad = json.loads(json.dumps(good))
    bad["variants"][0]["features"][0]["size"] = "huge"
    bad["variants"][0]["caption"] = "c" * (prompts.CAPTION_MAX + 1)
    del bad["variants"][0]["one_sentence"]
    assert len(_validate(bad, schema)) == 3


@pytest.fixture(scope="module")
def image(rsicd_samples) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.open(rsicd_samples / "airport_17.jpg").convert("RGB").save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def family_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("families")


@pytest.mark.parametrize("key", CASES)
def test_family_runs_through_its_chat_handler(key, family_dir, image):
    shape = TINY_FAMILIES[key]
    out = family_dir / shape.name
    manifest = testvlm.build_shape(shape.name, out, precisions=("F16",))
    model, mmproj = out / manifest["models"]["F16"], out / manifest["mmproj"]
    m_info, p_info = check_pair(model, mmproj)
    assert (m_info.architecture, p_info.projector_type) == (shape.text.arch, shape.vision.projector)

    # no --family: the test model names its own, as a real GGUF's metadata would lead to it
    with VLM(VLMConfig(model, mmproj, n_threads=1, variant_mode="sequential")) as vlm:
        assert vlm.family == shape.family
        assert vlm.is_test_model
        handler = type(vlm._llama.chat_handler).__name__
        assert handler == FAMILIES[shape.family].handler
        text = vlm.generate(image, prompts.build_prompt(1).text, json_schema=SCHEMA, max_tokens=MAX_TOKENS)
    # strict=False: llama-cpp-python 0.3.36's JSON grammar (char ::= [^"\\] | escapes) lets raw
    # control characters into strings, and random models use them; they are not a handler fault.
    answer = json.loads(text, strict=False)
    assert _validate(answer, SCHEMA) == [], text
    assert _validate(answer, prompts.schema(1)) == [], "the tight schema is a restriction of the real one"


@pytest.mark.parametrize("key", CASES)
def test_family_runs_the_parallel_variant_path(key, family_dir, image):
    """The parallel path renders the family's own template, encodes the image once and decodes
    two variants as two sequences, each under one variant's schema."""
    shape = TINY_FAMILIES[key]
    out = family_dir / shape.name
    manifest = testvlm.build_shape(shape.name, out, precisions=("F16",))
    model, mmproj = out / manifest["models"]["F16"], out / manifest["mmproj"]
    vp = prompts.build_variant_prompts(2)
    one = SCHEMA["properties"]["variants"]["items"]
    with VLM(VLMConfig(model, mmproj, n_threads=1)) as vlm:
        assert vlm.variant_mode == "parallel"
        res = vlm.describe_parallel([image], vp.shared, vp.suffixes, json_schema=one, max_tokens=MAX_TOKENS)
    assert len(res.texts[0]) == 2 and res.gen_tokens == sum(res.tokens[0])
    assert res.gen_steps == max(n if n < MAX_TOKENS else MAX_TOKENS - 1 for n in res.tokens[0])
    for text in res.texts[0]:
        assert _validate(json.loads(text, strict=False), one) == [], text
