"""The RSRT prompt: N structured descriptions of one remote-sensing image, and how to read them back.

Each variant is {one_sentence, features: [{name, position, size}], caption}, as in "Beyond Pixels"
(RSRT). Directions are fixed to the image frame (top = north); positions and sizes come from small
enums so the text embeds consistently and never carries made-up measurements.

The JSON schema bounds every string and array. With grammar-constrained decoding that bounds the
output length, so generation always terminates and the time per image is capped on real models.
The prompt text and the schema are versioned together: change either and bump PROMPT_VERSION, so
the caption cache never serves captions written for another prompt.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import InputError
from ..hashing import sha256_bytes
from ..records import Feature, Variant

PROMPT_VERSION = "rsrt-1"
DEFAULT_VARIANTS = 5
MAX_VARIANTS = 10

POSITIONS = (
    "north", "south", "east", "west", "centre",
    "north-east", "north-west", "south-east", "south-west", "across",
)  # fmt: skip
SIZES = ("small", "medium", "large", "very large")

# Bounds of the schema. They also bound the check_quality length rules.
ONE_SENTENCE_MAX = 160
CAPTION_MAX = 320
FEATURE_NAME_MAX = 40
FEATURES_MIN = 1
FEATURES_MAX = 6
MIN_TEXT_CHARS = 8  # shorter than this is not a description

# One focus per variant, so the N variants differ in content and wording, not just sampling noise.
FOCUSES = (
    "the overall scene type and land use",
    "the largest structures and how they are laid out",
    "roads, water, vegetation and open ground",
    "small objects, textures and colours",
    "the spatial relations between the main objects, using the compass directions",
)

_PROMPT = """You are describing one overhead remote-sensing image (satellite or aerial view).
Directions are fixed to the image: top = north, bottom = south, left = west, right = east.

Write {n} different descriptions of this image. Each description has:
- "one_sentence": one sentence that sums up the scene.
- "features": the main visible objects, each with "name", "position" (one of: {positions}) and "size" (one of: {sizes}).
- "caption": two or three sentences that describe the scene in detail: objects, their layout and spatial relations, colours and textures.

Rules:
- Describe only what is visible. Do not guess place names, dates, sensors or purposes you cannot see.
- Sizes are qualitative words from the list; never give numbers, measurements or percentages.
- Give each description a different focus and different wording:
{focuses}

Answer with JSON only, in this form: {{"variants": [{{"one_sentence": "...", "features": [{{"name": "...", "position": "...", "size": "..."}}], "caption": "..."}}, ...]}}"""

# The parallel form of the same prompt: one description, its focus given after the shared part.
_VARIANT_PROMPT = """You are describing one overhead remote-sensing image (satellite or aerial view).
Directions are fixed to the image: top = north, bottom = south, left = west, right = east.

Write one description of this image. It has:
- "one_sentence": one sentence that sums up the scene.
- "features": the main visible objects, each with "name", "position" (one of: {positions}) and "size" (one of: {sizes}).
- "caption": two or three sentences that describe the scene in detail: objects, their layout and spatial relations, colours and textures.

Rules:
- Describe only what is visible. Do not guess place names, dates, sensors or purposes you cannot see.
- Sizes are qualitative words from the list; never give numbers, measurements or percentages.

Answer with JSON only, in this form: {{"one_sentence": "...", "features": [{{"name": "...", "position": "...", "size": "..."}}], "caption": "..."}}"""

_FOCUS_SUFFIX = "\nFocus of this description: {focus}."


@dataclass(frozen=True)
class Prompt:
    text: str
    version: str  # goes into the cache key
    n_variants: int


@dataclass(frozen=True)
class VariantPrompts:
    """The parallel form: one shared prompt asking for ONE description, plus one short suffix per
    variant naming its focus. The shared part (image included) is evaluated once; each suffix starts
    its own sequence, so the variants differ by content, not by sampling noise."""

    shared: str
    suffixes: tuple[str, ...]
    version: str

    @property
    def n_variants(self) -> int:
        return len(self.suffixes)


def _check_n(n: int) -> None:
    if not 1 <= n <= MAX_VARIANTS:
        raise InputError(f"--variants must be between 1 and {MAX_VARIANTS}, got {n}")


def default_prompt_text(n: int = DEFAULT_VARIANTS) -> str:
    _check_n(n)
    focuses = "\n".join(f"  {i + 1}. {FOCUSES[i % len(FOCUSES)]}" for i in range(n))
    return _PROMPT.format(n=n, positions=", ".join(POSITIONS), sizes=", ".join(SIZES), focuses=focuses)


def build_prompt(n: int = DEFAULT_VARIANTS, prompt_file: str | os.PathLike | None = None) -> Prompt:
    """The built-in RSRT prompt, or a user prompt file (plain text; `{n}` becomes the variant count).

    A user prompt gets the version `custom-<first 8 hex of sha256(text)>`, so captions written for
    it never mix with captions of the built-in prompt (or of another edit of the file) in the cache.
    """
    _check_n(n)
    if prompt_file is None:
        return Prompt(default_prompt_text(n), PROMPT_VERSION, n)
    path = Path(prompt_file)
    try:
        raw = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: cannot read the prompt file ({exc}); give a UTF-8 text file") from None
    if not raw.strip():
        raise InputError(f"{path}: the prompt file is empty; write the instructions, with {{n}} for the count")
    sha8 = sha256_bytes(raw.encode("utf-8"))[:8]
    # Plain replace, not str.format: a prompt quoting JSON examples is full of braces.
    return Prompt(raw.replace("{n}", str(n)).strip(), f"custom-{sha8}", n)


def build_variant_prompts(n: int = DEFAULT_VARIANTS, prompt_file: str | os.PathLike | None = None) -> VariantPrompts:
    """The parallel form of build_prompt. A user prompt file is used with `{n}` = 1 (it asks for one
    description) and gets the same focus suffixes; its version is `custom-<sha8>` as in build_prompt."""
    _check_n(n)
    suffixes = tuple(_FOCUS_SUFFIX.format(focus=FOCUSES[i % len(FOCUSES)]) for i in range(n))
    if prompt_file is None:
        shared = _VARIANT_PROMPT.format(positions=", ".join(POSITIONS), sizes=", ".join(SIZES))
        return VariantPrompts(shared, suffixes, PROMPT_VERSION)
    one = build_prompt(1, prompt_file)
    return VariantPrompts(one.text, suffixes, one.version)


def variant_schema() -> dict[str, Any]:
    """JSON schema of ONE variant (the parallel path's per-sequence grammar), every field bounded."""
    feature = {
        "type": "object",
        "properties": {
            "name": {"type": "string", "minLength": 1, "maxLength": FEATURE_NAME_MAX},
            "position": {"type": "string", "enum": list(POSITIONS)},
            "size": {"type": "string", "enum": list(SIZES)},
        },
        "required": ["name", "position", "size"],
        "additionalProperties": False,
    }
    return {
        "type": "object",
        "properties": {
            "one_sentence": {"type": "string", "minLength": 1, "maxLength": ONE_SENTENCE_MAX},
            "features": {"type": "array", "items": feature, "minItems": FEATURES_MIN, "maxItems": FEATURES_MAX},
            "caption": {"type": "string", "minLength": 1, "maxLength": CAPTION_MAX},
        },
        "required": ["one_sentence", "features", "caption"],
        "additionalProperties": False,
    }


def schema(n_variants: int = DEFAULT_VARIANTS) -> dict[str, Any]:
    """JSON schema of the answer, every field bounded so constrained decoding terminates."""
    _check_n(n_variants)
    variant = variant_schema()
    return {
        "type": "object",
        "properties": {
            "variants": {"type": "array", "items": variant, "minItems": n_variants, "maxItems": n_variants}
        },
        "required": ["variants"],
        "additionalProperties": False,
    }


def max_output_chars(n_variants: int = DEFAULT_VARIANTS) -> int:
    """Upper bound on the characters of a schema-valid answer (JSON syntax with single spaces)."""
    per_feature = FEATURE_NAME_MAX + max(map(len, POSITIONS)) + max(map(len, SIZES)) + 50  # keys, quotes, braces
    per_variant = ONE_SENTENCE_MAX + CAPTION_MAX + FEATURES_MAX * per_feature + 80
    return n_variants * per_variant + 20


def max_variant_chars() -> int:
    """Upper bound on the characters of ONE schema-valid variant object (the parallel path's cap)."""
    return max_output_chars(1) - 20


def default_max_tokens(n_variants: int = DEFAULT_VARIANTS) -> int:
    """Enough tokens for an answer at the schema's bounds (English + JSON runs 3-4 characters a
    token), so a real model is never cut off mid-answer, and never more: the bound caps the time."""
    return -(-max_output_chars(n_variants) // 3)


# ---------------------------------------------------------------- parsing


def _variants_from_obj(obj: Any) -> list[Variant] | None:
    if isinstance(obj, dict):
        for key in ("variants", "descriptions", "captions"):
            if isinstance(obj.get(key), list):
                obj = obj[key]
                break
        else:
            if "one_sentence" in obj or "caption" in obj:
                obj = [obj]
    if not isinstance(obj, list):
        return None
    out = []
    for item in obj:
        if isinstance(item, dict):
            try:
                out.append(Variant.from_dict(item))
            except ValueError:
                continue
        elif isinstance(item, str) and item.strip():
            out.append(Variant(one_sentence=item.strip()))
    return out


def _salvage_truncated(text: str) -> list[Variant]:
    """Complete variant objects from an answer cut off by max_tokens: `{"variants": [{..}, {..}, {.`"""
    match = re.search(r'"variants"\s*:\s*\[', text)
    pos = match.end() if match else text.find("[") + 1
    if pos <= 0:
        return []
    decoder = json.JSONDecoder(strict=False)
    found = []
    while True:
        while pos < len(text) and text[pos] in " \t\r\n,":
            pos += 1
        if pos >= len(text) or text[pos] != "{":
            break
        try:
            item, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError:
            break
        if isinstance(item, dict):
            found.append(Variant.from_dict(item))
    return found


def _first_json(text: str) -> Any:
    """The first JSON value in `text`, skipping prose or a ``` fence around it."""
    decoder = json.JSONDecoder(strict=False)
    for i, ch in enumerate(text):
        if ch in "{[":
            try:
                return decoder.raw_decode(text, i)[0]
            except json.JSONDecodeError:
                continue
    return None


_ITEM_START = re.compile(r"^\s*(?:\d+[.):]|[-*\u2022]|(?:description|variant)\s*\d+\s*[:.)-])\s*", re.I)
_LABEL = re.compile(r"^\s*(one[_ ]sentence|features?|caption)\s*[:=-]\s*", re.I)


def _split_free_text(text: str, n: int) -> list[Variant]:
    """Free text -> variants: a numbered or bulleted list, else paragraphs, else sentences."""
    lines = text.strip().splitlines()
    chunks: list[list[str]] = []
    if sum(1 for line in lines if _ITEM_START.match(line)) >= 2:
        for line in lines:
            if _ITEM_START.match(line):
                chunks.append([_ITEM_START.sub("", line, count=1)])
            elif chunks and line.strip():
                chunks[-1].append(line.strip())
    else:
        paragraphs = [p for p in re.split(r"\n\s*\n", text.strip()) if p.strip()]
        if len(paragraphs) < 2:
            sentences = re.split(r"(?<=[.!?])\s+", text.strip())
            size = max(1, -(-len(sentences) // n))
            paragraphs = [" ".join(sentences[i : i + size]) for i in range(0, len(sentences), size)]
        chunks = [p.splitlines() for p in paragraphs]
    out = []
    for chunk in chunks:
        fields: dict[str, str] = {}
        loose = []
        for line in chunk:
            m = _LABEL.match(line)
            if m:
                key = m.group(1).lower().replace(" ", "_").rstrip("s")
                fields[key] = line[m.end() :].strip()
            elif line.strip():
                loose.append(line.strip())
        body = " ".join(loose).strip()
        one = fields.get("one_sentence") or (re.split(r"(?<=[.!?])\s+", body, maxsplit=1)[0] if body else "")
        caption = fields.get("caption") or (body[len(one) :].strip() if body.startswith(one) else body)
        feats = tuple(
            Feature(name=f.strip()) for f in re.split(r"[;,]", fields.get("feature", "")) if f.strip()
        )
        if one or caption:
            out.append(Variant(one_sentence=one, features=feats, caption=caption))
    return out


def parse_output(text: str, n_variants: int, constrained: bool) -> list[Variant]:
    """The variants in a model's answer (at most `n_variants`); [] when nothing usable is there.

    Constrained output is JSON by construction, but may be cut off by max_tokens: complete variants
    before the cut are kept. Control characters inside strings are accepted (llama-cpp-python's JSON
    grammar lets a raw newline into a string). Unconstrained output is tried as JSON first (most models comply), then
    split as free text (numbered list, paragraphs or sentences).
    """
    text = (text or "").strip()
    if not text:
        return []
    variants = None
    try:
        variants = _variants_from_obj(json.loads(text, strict=False))
    except json.JSONDecodeError:
        variants = _salvage_truncated(text) or None
        if not variants and not constrained:
            variants = _variants_from_obj(_first_json(text))
    if not variants and not constrained:
        variants = _split_free_text(text, n_variants)
    return [v for v in (variants or []) if v.one_sentence or v.caption or v.features][:n_variants]


_PERCENT = re.compile(r"\d\s*(%|percent\b|per cent\b)", re.I)


def check_quality(variants: list[Variant], n: int) -> list[str]:
    """Problems with a set of variants, as short phrases; [] when it looks right."""
    problems = []
    if len(variants) != n:
        problems.append(f"{len(variants)} variants instead of {n}")
    seen: dict[str, int] = {}
    for i, v in enumerate(variants, 1):
        if not v.one_sentence.strip():
            problems.append(f"variant {i}: empty one_sentence")
        elif len(v.one_sentence.strip()) < MIN_TEXT_CHARS:
            problems.append(f"variant {i}: one_sentence too short")
        elif len(v.one_sentence) > ONE_SENTENCE_MAX * 2:
            problems.append(f"variant {i}: one_sentence too long")
        if not v.caption.strip():
            problems.append(f"variant {i}: empty caption")
        elif len(v.caption.strip()) < MIN_TEXT_CHARS:
            problems.append(f"variant {i}: caption too short")
        elif len(v.caption) > CAPTION_MAX * 2:
            problems.append(f"variant {i}: caption too long")
        if not v.features:
            problems.append(f"variant {i}: no features")
        elif any(not f.name.strip() for f in v.features):
            problems.append(f"variant {i}: feature with an empty name")
        texts = [v.one_sentence, v.caption, *(f.name for f in v.features)]
        if any(_PERCENT.search(t) for t in texts):
            problems.append(f"variant {i}: percentages present")
        key = " ".join(v.joined_text().lower().split())
        if key in seen:
            problems.append(f"variant {i}: duplicate of variant {seen[key]}")
        else:
            seen[key] = i
    return problems
