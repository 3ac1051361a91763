"""The describe stage: one image in, one CaptionRecord out.

`Describer` is what the caption pipeline (captioning.py) asks of anything that writes
descriptions. The VLM implements it through `VLMDescriber` (a loaded edge_t2t.describe.vlm.VLM plus
the hashes of its files; describe_image below is its body, and what a cluster worker runs); the
synthetic scenes' ground truth implements it through `scenes.GroundTruthDescriber`, so tests can run
the pipeline with exact, known descriptions. Options travel as one CaptionOptions, the image as one
ImageInput (the PNG the model sees and its facts). No cache, no files, no side effects here.

Retry policy: an answer with no usable variant at all (unparsable, or cut off before the first
variant closed) is retried once with temperature 0.7. A greedy retry would give the same bytes,
so only a sampled one can help; it stays reproducible because the VLM's sampler seed is fixed.
Answers that parse but have quality problems (too few variants, duplicates, percentages) are
kept, with the problems in the record's `problems` field: they still carry retrieval signal, and
re-sampling would double the cost of every such image on a slow model for an uncertain gain.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from ..errors import EdgeT2TError, GPUError, ModelError
from ..images import LoadedImage, to_png_bytes
from ..records import CaptionRecord, Variant
from . import prompts

RETRY_TEMPERATURE = 0.7


@runtime_checkable
class Describer(Protocol):
    def describe(self, image: ImageInput, options: CaptionOptions) -> CaptionRecord:
        """Describe one image; raises UnusableAnswer when no usable variant came back."""
        ...


@dataclass
class VLMDescriber:
    """A loaded VLM as a Describer: generate (one sampled retry), parse, check, build the record,
    with the model files' paths and hashes recorded (verify checks them later)."""

    vlm: Any  # edge_t2t.describe.vlm.VLM, or a stand-in with the same methods (tests)
    model_sha: str
    mmproj_sha: str
    model_files: tuple[Path | str, Path | str]

    def describe(self, image: ImageInput, options: CaptionOptions) -> CaptionRecord:
        return describe_image(self.vlm, image, options, model_sha=self.model_sha, mmproj_sha=self.mmproj_sha,
                              model_files=self.model_files)  # fmt: skip


class UnusableAnswer(EdgeT2TError):
    """The model gave no usable variant for one image (after the retry)."""

    def __init__(self, message: str, retried: bool = False):
        super().__init__(message)
        self.retried = retried

    def __reduce__(self):  # picklable with its flag: a cluster worker raises it for the client
        return (type(self), (str(self), self.retried))


def model_file_facts(model: Any, mmproj: Any, model_sha: str, mmproj_sha: str) -> dict[str, str]:
    """The record's `model_path`/`model_sha256`/`mmproj_path`/`mmproj_sha256` extra keys: the index
    stores them so `verify` can tell when a model file changed. Absolute paths, as `verify` may run
    from another directory; the hashes are the ones already computed (cache key or VLM load)."""
    return {
        "model_path": str(Path(model).resolve()),
        "model_sha256": model_sha,
        "mmproj_path": str(Path(mmproj).resolve()),
        "mmproj_sha256": mmproj_sha,
    }


@dataclass(frozen=True)
class CaptionOptions:
    """What shapes one image's answer besides the image and the model files. Picklable, so a cluster
    worker describes with exactly the options the client built (cluster.py)."""

    prompt: prompts.Prompt
    json_schema: dict[str, Any]
    params: dict[str, Any]  # generation_params(): also the cache key's parameters
    max_megapixels: float
    bands: tuple[int, int, int] | None
    variant_prompts: prompts.VariantPrompts  # the parallel path's shared prompt and per-variant suffixes


@dataclass(frozen=True)
class ImageInput:
    """What the model needs of one loaded image: the PNG it sees and the facts its record keeps.
    Small and picklable (the PNG is the downscaled image), so it can travel to another machine."""

    path: str
    sha256: str
    width: int
    height: int
    notes: tuple[str, ...]
    png: bytes

    @classmethod
    def from_loaded(cls, loaded: LoadedImage) -> ImageInput:
        return cls(str(loaded.path), loaded.sha256, loaded.width, loaded.height, tuple(loaded.notes),
                   to_png_bytes(loaded.image))  # fmt: skip


def describe_image(vlm: Any, image: ImageInput, opts: CaptionOptions, *, model_sha: str, mmproj_sha: str,
                   model_files: tuple[Any, Any]) -> CaptionRecord:  # fmt: skip
    """Describe ONE image with a loaded VLM: generate (one sampled retry), parse, check, build the
    record. No cache, no side effects, so a cluster worker runs exactly this. Raises
    UnusableAnswer when the model gives no usable variant (its `retried` says whether it retried)."""
    t0 = time.perf_counter()
    prompt, params = opts.prompt, opts.params
    json_schema = opts.json_schema
    n = prompt.n_variants
    try:
        described = describe(vlm, image.png, (prompt, opts.variant_prompts), json_schema, params)
    except GPUError:  # every further image would fail the same way: stop the run (finished ones are kept)
        raise
    except ModelError as exc:  # e.g. this image does not fit the context: fail the image, not the run
        raise UnusableAnswer(str(exc)) from None
    if not described.variants:
        snippet = " ".join(described.raw.split())[:80]
        raise UnusableAnswer(f"the model gave no usable description (after one retry); it wrote: {snippet!r}",
                             retried=described.retried)  # fmt: skip
    variants, retried, constrained = described.variants, described.retried, described.constrained
    problems = prompts.check_quality(variants, n)

    extra: dict[str, Any] = {
        **model_file_facts(getattr(vlm, "model_path", None) or model_files[0],
                       getattr(vlm, "mmproj_path", None) or model_files[1], model_sha, mmproj_sha),
        "model_name": getattr(vlm, "model_name", ""),
        # Where it was made (backend, device, layers on the GPU): not part of the cache key, so a
        # description made on the CPU serves a GPU run and the record still says the CPU made it.
        **(getattr(vlm, "placement", None) or {}),
        "width": image.width,
        "height": image.height,
    }
    if image.notes:
        extra["image_notes"] = list(image.notes)
    if problems:
        extra["problems"] = problems
    if retried:
        extra["retried"] = True
    return CaptionRecord(
        image=image.path,
        sha256=image.sha256,
        model=Path(getattr(vlm, "model_path", "") or "").name or str(getattr(vlm, "model_name", "")),
        mmproj=Path(getattr(vlm, "mmproj_path", "") or "").name,
        family=str(getattr(vlm, "family", "") or params["family"]),
        prompt_version=prompt.version,
        variants=variants,
        seconds=time.perf_counter() - t0,
        test_model=bool(getattr(vlm, "is_test_model", False)),
        cached=False,
        constrained=constrained,
        variant_mode=described.variant_mode,
        tokens_generated=described.tokens_generated,
        extra=extra,
    )


@dataclass
class Described:
    """One image's answer: the parsed variants and how they were made."""

    variants: list[Variant]
    raw: str  # the model's text (the variants' texts joined, on the parallel path)
    variant_mode: str  # "parallel" or "sequential": the path that wrote it
    tokens_generated: int
    constrained: bool
    retried: bool = False


def describe(vlm: Any, png: bytes, prompt_pair: tuple[prompts.Prompt, prompts.VariantPrompts],
             json_schema: dict[str, Any], params: dict[str, Any]) -> Described:  # fmt: skip
    """Describe ONE image (PNG bytes) with a loaded VLM: generate, parse, retry once if nothing usable.

    No cache, no files: the per-image step the pipeline (and a cluster worker) builds on. The
    parallel path (one image encoding, the variants as sequences of one batch) is used when
    params["variant_mode"] asks for it and the VLM offers it; otherwise one call writes all variants.
    Raises ModelError (the model failed) or ImageError (llama.cpp could not read the image).
    """
    prompt, variant_prompts = prompt_pair
    constrained = bool(getattr(vlm, "supports_grammar", True))
    parallel = (params.get("variant_mode", "parallel") == "parallel" and hasattr(vlm, "describe_parallel")
                and getattr(vlm, "variant_mode", "parallel") == "parallel")  # fmt: skip
    run = _run_parallel if parallel else _run_sequential
    what = variant_prompts if parallel else prompt
    variants, raw, tokens = run(vlm, png, what, json_schema, constrained, params, params["temperature"])
    retried = False
    if not variants:
        retried = True
        variants, raw, more = run(vlm, png, what, json_schema, constrained, params, RETRY_TEMPERATURE)
        tokens += more
    return Described(variants, raw, "parallel" if parallel else "sequential", tokens, constrained, retried)


def _run_sequential(vlm: Any, png: bytes, prompt: prompts.Prompt, json_schema: dict[str, Any], constrained: bool,
                    params: dict[str, Any], temperature: float) -> tuple[list[Variant], str, int]:  # fmt: skip
    """Today's single call: all variants in one answer. A sampled retry stays reproducible, as the
    VLM's sampler seed is fixed."""
    text = vlm.generate(png, prompt.text, json_schema=json_schema if constrained else None,
                        max_tokens=params["max_tokens"], temperature=temperature, mime="image/png")  # fmt: skip
    tokens = int(getattr(vlm, "last_tokens_generated", 0) or 0)
    return prompts.parse_output(text, prompt.n_variants, constrained), text, tokens


def _run_parallel(vlm: Any, png: bytes, vp: prompts.VariantPrompts, json_schema: dict[str, Any], constrained: bool,
                  params: dict[str, Any], temperature: float) -> tuple[list[Variant], str, int]:  # fmt: skip
    """One sequence per variant, each constrained to ONE variant's schema and capped at an equal
    share of the image's token budget (so both paths get the same total)."""
    n = vp.n_variants
    res = vlm.describe_parallel(
        [png], vp.shared, vp.suffixes, json_schema=prompts.variant_schema() if constrained else None,
        max_tokens=max(16, params["max_tokens"] // n), temperatures=temperature, mime="image/png",
    )  # fmt: skip
    texts = res.texts[0]
    variants = [v for t in texts for v in prompts.parse_output(t, 1, constrained)]
    return variants, "\n".join(texts), res.tokens_per_image[0]
