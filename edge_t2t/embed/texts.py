"""What text is embedded for a description: the one rule the indexer, search by image, scene
chips, the quantization report and the benches share. A change here changes every index built
after it, so it lives apart from any one stage."""

from __future__ import annotations

import re
from typing import Any, NamedTuple

from ..records import Variant

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def caption_sentences(caption: str) -> list[str]:
    """A caption cut at sentence ends (., !, ? followed by white space); empty pieces dropped."""
    return [t.strip() for t in _SENTENCE_END.split(caption.strip()) if t.strip()]


def variant_texts(variant: Variant, text_mode: str) -> list[tuple[str, str]]:
    """(field, text) pairs to embed for one variant, per text mode (modes.TEXT_MODES):

    joined     one text, the three fields joined (the paper's form): field 'joined'
    fields     one text per field: 'one_sentence', 'features', 'caption'
    sentences  one text per short statement: 'one_sentence', one 'feature' per feature
               ('large storage tanks in the south'), one 'sentence' per caption sentence.
               Short queries meet texts of their own size instead of a long text that mentions
               five other things (bench/results/text_mode.md: held-out MRR 0.29 -> 0.41).
    """
    if text_mode == "joined":
        text = variant.joined_text()
        return [("joined", text)] if text else []
    if text_mode == "sentences":
        pairs = [("one_sentence", variant.one_sentence.strip())]
        pairs += [("feature", f.text()) for f in variant.features if f.name]
        pairs += [("sentence", t) for t in caption_sentences(variant.caption)]
        seen: set[str] = set()
        out = []
        for name, text in pairs:
            if text and text not in seen:  # a repeated text adds nothing to a max, only storage
                seen.add(text)
                out.append((name, text))
        return out
    fields = (
        ("one_sentence", variant.one_sentence.strip()),
        ("features", variant.features_text()),
        ("caption", variant.caption.strip()),
    )
    return [(name, text) for name, text in fields if text]


def description_texts(variants: list[Variant], text_mode: str) -> list[str]:
    """Every text embedded for one description (all its variants), in order."""
    return [t for v in variants for _, t in variant_texts(v, text_mode)]


class PlannedText(NamedTuple):
    """One text to embed and store, with whose description it is (an indexer's pending image, a
    scene's chip window) and which variant and field it came from."""

    owner: Any
    ordinal: int  # the variant's position in its description
    field: str
    variant: Variant
    text: str


def plan_texts(owner: Any, variants: list[Variant], text_mode: str) -> list[PlannedText]:
    """The texts to embed for one description, tagged with their owner."""
    return [PlannedText(owner, i, fld, v, txt) for i, v in enumerate(variants) for fld, txt in variant_texts(v, text_mode)]
