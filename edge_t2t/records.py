"""The data that crosses module borders: structured descriptions and caption records.

A *variant* is one RSRT-style description of an image: a one-sentence summary, a list of visible
features with positions (top = north, left = west) and qualitative sizes, and a detailed caption.
A VLM writes several variants per image; an image's score for a query is the maximum cosine over
the texts embedded from its variants.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class Feature:
    name: str
    position: str = ""  # north, south, east, west, centre, north-east, ..., across
    size: str = ""  # small, medium, large, ... (qualitative; never percentages)

    def text(self) -> str:
        """'large river (west)' style rendering used when the variant is embedded."""
        words = " ".join(w for w in (self.size, self.name) if w)
        return f"{words} in the {self.position}" if self.position else words

    @classmethod
    def from_any(cls, obj: Any) -> Feature:
        """From our dict form, or from a bare string as some RSRT exports have."""
        if isinstance(obj, str):
            return cls(name=obj.strip())
        if isinstance(obj, dict):
            name = obj.get("name") or obj.get("feature") or obj.get("object") or ""
            return cls(
                name=str(name).strip(),
                position=str(obj.get("position") or obj.get("location") or "").strip(),
                size=str(obj.get("size") or "").strip(),
            )
        raise ValueError(f"a feature must be a string or an object, got {type(obj).__name__}")


@dataclass(frozen=True)
class Variant:
    one_sentence: str
    features: tuple[Feature, ...] = ()
    caption: str = ""

    def features_text(self) -> str:
        return "; ".join(f.text() for f in self.features if f.name)

    def joined_text(self) -> str:
        """The paper's form: the three fields joined into one text."""
        parts = [self.one_sentence.strip(), self.features_text(), self.caption.strip()]
        return " ".join(p if p.endswith(".") else p + "." for p in parts if p)

    def field_texts(self) -> list[str]:
        """One text per non-empty field (the alternative embedding mode)."""
        return [t for t in (self.one_sentence.strip(), self.features_text(), self.caption.strip()) if t]

    def to_dict(self) -> dict[str, Any]:
        return {
            "one_sentence": self.one_sentence,
            "features": [asdict(f) for f in self.features],
            "caption": self.caption,
        }

    @classmethod
    def from_dict(cls, obj: dict[str, Any]) -> Variant:
        feats = obj.get("features", obj.get("feature", []))
        if isinstance(feats, (str, dict)):
            feats = [feats]
        return cls(
            one_sentence=str(obj.get("one_sentence") or "").strip(),
            features=tuple(Feature.from_any(f) for f in feats or []),
            caption=str(obj.get("caption") or "").strip(),
        )


@dataclass
class CaptionRecord:
    """One image's descriptions, as `edge-t2t caption` writes them (one JSON line each)."""

    image: str
    sha256: str
    model: str
    mmproj: str
    family: str
    prompt_version: str
    variants: list[Variant]
    seconds: float = 0.0
    test_model: bool = False
    cached: bool = False
    constrained: bool = True  # False when the family could not take a grammar (free-text fallback)
    # The path that wrote the variants: "parallel" (one image encoding, one sequence per variant)
    # or "sequential" (one call writes them all); "" for descriptions imported from elsewhere.
    variant_mode: str = ""
    tokens_generated: int | None = None  # output tokens, retry included; None when not known
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        out = {
            "image": self.image,
            "sha256": self.sha256,
            "model": self.model,
            "mmproj": self.mmproj,
            "family": self.family,
            "prompt_version": self.prompt_version,
            "variants": [v.to_dict() for v in self.variants],
            "seconds": round(self.seconds, 4),
            "test_model": self.test_model,
            "cached": self.cached,
            "constrained": self.constrained,
        }
        if self.variant_mode:
            out["variant_mode"] = self.variant_mode
        if self.tokens_generated is not None:
            out["tokens_generated"] = self.tokens_generated
        out.update(self.extra)
        return out

    @classmethod
    def imported(cls, image: str, variants: list[Variant], fmt: str, extra: dict[str, Any] | None = None) -> CaptionRecord:
        """A record read from a caption file (model "imported:<fmt>"), not written by a VLM."""
        return cls(image=image, sha256="", model=f"imported:{fmt}", mmproj="", family="", prompt_version="imported",
                   variants=variants, test_model=False, cached=False, constrained=False, extra=extra or {})  # fmt: skip

    @classmethod
    def from_dict(cls, obj: dict[str, Any]) -> CaptionRecord:
        known = {
            "image", "sha256", "model", "mmproj", "family", "prompt_version", "variants",
            "seconds", "test_model", "cached", "constrained", "variant_mode", "tokens_generated",
        }
        tokens = obj.get("tokens_generated")
        return cls(
            image=str(obj["image"]),
            sha256=str(obj.get("sha256") or ""),
            model=str(obj.get("model") or ""),
            mmproj=str(obj.get("mmproj") or ""),
            family=str(obj.get("family") or ""),
            prompt_version=str(obj.get("prompt_version") or ""),
            variants=[Variant.from_dict(v) for v in obj.get("variants") or []],
            seconds=float(obj.get("seconds") or 0.0),
            test_model=bool(obj.get("test_model", False)),
            cached=bool(obj.get("cached", False)),
            constrained=bool(obj.get("constrained", True)),
            variant_mode=str(obj.get("variant_mode") or ""),
            tokens_generated=int(tokens) if isinstance(tokens, (int, float)) else None,
            extra={k: v for k, v in obj.items() if k not in known},
        )
