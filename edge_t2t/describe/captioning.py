"""The caption pipeline: find images -> load -> cache lookup -> VLM -> parse and check -> cache put.

The VLM is loaded lazily, on the first cache miss, so a fully cached run never loads the model.
Model and mmproj hashes for the cache key come from the cache's file-hash memo instead, so even
a multi-GB GGUF is hashed once per (path, size, mtime).

Retry policy: an answer with no usable variant at all (unparsable, or cut off before the first
variant closed) is retried once with temperature 0.7. A greedy retry would give the same bytes,
so only a sampled one can help; it stays reproducible because the VLM's sampler seed is fixed.
Answers that parse but have quality problems (too few variants, duplicates, percentages) are
kept, with the problems in the record's `problems` field: they still carry retrieval signal, and
re-sampling would double the cost of every such image on a slow model for an uncertain gain.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from ..errors import EdgeT2TError, GPUError, ImageError, ModelError
from ..hashing import file_sha256
from ..images import DEFAULT_MAX_MEGAPIXELS, ImageBytes, LoadedImage, find_images, load_image, to_png_bytes
from ..records import CaptionRecord, Variant
from . import prompts
from .captions import CacheKey, CaptionCache
from .describer import Describer, VLMDescriber

if TYPE_CHECKING:  # llama_cpp is imported by vlm.py only when a model loads; the config is plain data
    from .vlm import VLMConfig

RETRY_TEMPERATURE = 0.7

T = TypeVar("T")  # what a caller pairs with each image, handed back with its outcome
ImageSource = Path | ImageBytes  # a file read when its turn comes, or bytes already read and hashed


@dataclass
class Failure:
    path: str
    reason: str  # one line


@dataclass
class CaptionSummary:
    total: int = 0  # images found
    captioned: int = 0  # written by the model in this run
    cached: int = 0  # served from the cache
    failed: int = 0
    failures: list[Failure] = field(default_factory=list)
    with_problems: int = 0  # records (fresh or cached) kept with quality problems
    retries: int = 0
    seconds: float = 0.0
    load_seconds: float = 0.0  # loading the VLM (0 when it was never loaded)
    model_calls: int = 0  # generate() calls that reached the model
    model_loaded: bool = False
    test_model: bool = False
    interrupted: bool = False

    @property
    def done(self) -> int:
        return self.captioned + self.cached

    def add(self, record: CaptionRecord) -> None:
        """Count one finished record (fresh or cached)."""
        if record.cached:
            self.cached += 1
        else:
            self.captioned += 1
        self.test_model = self.test_model or record.test_model
        if record.extra.get("problems"):
            self.with_problems += 1

    def to_dict(self) -> dict[str, Any]:
        return {
            "total": self.total, "captioned": self.captioned, "cached": self.cached, "failed": self.failed,
            "failures": [{"path": f.path, "reason": f.reason} for f in self.failures],
            "with_problems": self.with_problems, "retries": self.retries,
            "seconds": round(self.seconds, 3), "load_seconds": round(self.load_seconds, 3),
            "model_calls": self.model_calls, "model_loaded": self.model_loaded,
            "test_model": self.test_model, "interrupted": self.interrupted,
        }  # fmt: skip


@dataclass
class Callbacks:
    """Hooks for the CLI (progress bar, printing); all optional."""

    on_total: Callable[[int], None] | None = None  # number of images found, before any work
    on_record: Callable[[CaptionRecord], None] | None = None
    on_failure: Callable[[Failure], None] | None = None
    on_model_loaded: Callable[[Any], None] | None = None  # the VLM object
    on_notice: Callable[[str], None] | None = None  # e.g. "finishing the current image..."


@contextmanager
def _stop_after_current(notice: Callable[[str], None], message: str = "") -> Iterator[dict[str, bool]]:
    """First Ctrl-C: finish the current image, then stop. Second Ctrl-C: stop at once.

    Only the main thread can take signals; elsewhere Ctrl-C stays a plain KeyboardInterrupt.
    """
    flag = {"stop": False}
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return

    def handler(signum: int, frame: object) -> None:
        if flag["stop"]:
            raise KeyboardInterrupt
        flag["stop"] = True
        notice(message or "interrupt: finishing the current image, then stopping (Ctrl-C again to stop now)")

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield flag
    finally:
        signal.signal(signal.SIGINT, previous)


@dataclass
class CaptionSettings:
    """How a run that indexes (or cuts scenes) describes its images: the flags that reach the
    caption pipeline, typed, handed from the CLI to the Indexer and the chip describer."""

    cache: CaptionCache | None = None
    max_tokens: int | None = None  # None: sized to the schema
    prompt_file: str | os.PathLike | None = None
    max_megapixels: float | None = None  # None: images.DEFAULT_MAX_MEGAPIXELS (chips are already small)
    cluster: Any | None = None  # a cluster.ClusterSession
    callbacks: Callbacks | None = None


def caption_sources(items: Sequence[tuple[T, ImageBytes]], vlm_cfg: VLMConfig | None, n_variants: int,
                    settings: CaptionSettings, on_result: Callable[[T, CaptionRecord | Failure], None],
                    vlm_factory: Callable[[Any], Any] | None = None) -> CaptionSummary:  # fmt: skip
    """Describe images whose bytes the caller already read and hashed (the indexer, scene chips), with a
    run's CaptionSettings. Each item is (tag, bytes); every outcome, a record or a Failure, goes to
    `on_result` with the tag of the item that asked, so nothing is matched by name. No file is opened:
    the sha256 a record carries is that of these bytes. Items not reached before Ctrl-C get no outcome
    (the summary says `interrupted`)."""
    resolved = caption_options(vlm_cfg, n_variants=n_variants, prompt_file=settings.prompt_file,
                               max_megapixels=settings.max_megapixels or DEFAULT_MAX_MEGAPIXELS,
                               max_tokens=settings.max_tokens)  # fmt: skip
    items = list(items)
    return _caption_items(items, resolved.vlm_cfg, resolved.options, settings.cache, settings.callbacks or Callbacks(),
                          on_result, vlm_factory, settings.cluster, CaptionSummary(total=len(items)))  # fmt: skip


def generation_params(vlm_cfg: VLMConfig, *, n_variants: int, max_tokens: int, temperature: float,
                      max_megapixels: float, bands: tuple[int, int, int] | None) -> dict[str, Any]:  # fmt: skip
    """Everything besides image, model, mmproj and prompt that changes the answer: the cache key."""
    params = {
        "family": vlm_cfg.family or "auto",  # auto-detection is a function of the model bytes
        "max_tokens": max_tokens,
        "temperature": temperature,
        "seed": vlm_cfg.seed,
        "variant_mode": vlm_cfg.variant_mode,
        "n_variants": n_variants,
        "max_megapixels": max_megapixels,
        "bands": list(bands) if bands else None,
    }
    if vlm_cfg.image_max_tokens:  # only when set, so existing cache keys stay valid
        params["image_max_tokens"] = int(vlm_cfg.image_max_tokens)
    # Flash attention reorders the attention's floating-point sums, so greedy decoding may pick
    # other tokens: records made with and without it are told apart.
    if vlm_cfg.vision_flash_attn:
        params["vision_flash_attn"] = True
    if vlm_cfg.flash_attn:
        params["flash_attn"] = True
    return params


def _default_vlm_factory(cfg: VLMConfig) -> Any:
    from .vlm import VLM

    return VLM(cfg)


@dataclass(frozen=True)
class _Resolved:
    vlm_cfg: VLMConfig
    options: CaptionOptions


def caption_options(vlm_cfg: VLMConfig | None, *, n_variants: int, prompt_file: str | os.PathLike | None,
                    max_megapixels: float, max_tokens: int | None, bands: tuple[int, int, int] | None = None,
                    temperature: float = 0.0) -> _Resolved:  # fmt: skip
    """The VLM to use (`vlm_cfg`, or the one named by $EDGE_T2T_VLM/$EDGE_T2T_MMPROJ or found in
    models/vlm/, else a ModelError that says how to supply one) and the CaptionOptions of a run."""
    if vlm_cfg is None:
        from .vlm import VLMConfig, resolve_vlm_paths

        vlm_cfg = VLMConfig(*resolve_vlm_paths(None, None))
    prompt = prompts.build_prompt(n_variants, prompt_file)
    variant_prompts = prompts.build_variant_prompts(n_variants, prompt_file)
    max_tokens = max_tokens or prompts.default_max_tokens(n_variants)
    params = generation_params(
        vlm_cfg, n_variants=n_variants, max_tokens=max_tokens, temperature=temperature,
        max_megapixels=max_megapixels, bands=bands,
    )  # fmt: skip
    return _Resolved(vlm_cfg, CaptionOptions(prompt, prompts.schema(n_variants), params, max_megapixels, bands,
                                             variant_prompts))  # fmt: skip


def caption_images(
    paths: Iterable[str | os.PathLike],
    vlm_cfg: VLMConfig | None,
    *,
    n_variants: int = prompts.DEFAULT_VARIANTS,
    prompt_file: str | os.PathLike | None = None,
    max_megapixels: float = DEFAULT_MAX_MEGAPIXELS,
    bands: tuple[int, int, int] | None = None,
    cache: CaptionCache | None = None,
    max_tokens: int | None = None,
    temperature: float = 0.0,
    on_record: Callable[[CaptionRecord], None] | None = None,
    callbacks: Callbacks | None = None,
    vlm_factory: Callable[[Any], Any] | None = None,
    cluster: Any | None = None,
) -> CaptionSummary:
    """Caption every image under `paths` (`edge-t2t caption`); return counts and failures.

    `vlm_cfg` is an edge_t2t.describe.vlm.VLMConfig (model, mmproj, family, threads, ...), or None for the
    one named by $EDGE_T2T_VLM/$EDGE_T2T_MMPROJ or found in models/vlm/. `cache=None`
    disables the cache. `max_tokens=None` sizes the cap to the schema (prompts.default_max_tokens).
    Each finished record goes to `on_record` as soon as it exists (so a
    caller writing JSONL loses nothing on Ctrl-C). A bad image is a Failure, never an exception.
    Ctrl-C stops after the current image and returns with `interrupted=True`.
    `cluster` (a cluster.ClusterSession) sends the images that miss the cache to Dask workers.
    Each file is read once, when its turn comes (ImageBytes.read), so only one image's bytes are held.
    """
    resolved = caption_options(vlm_cfg, n_variants=n_variants, prompt_file=prompt_file, max_megapixels=max_megapixels,
                               max_tokens=max_tokens, bands=bands, temperature=temperature)  # fmt: skip
    cb = callbacks or Callbacks()
    summary = CaptionSummary()
    image_paths = list(find_images(paths, on_error=lambda path, reason: _fail(summary, cb, path, reason)))
    summary.total = len(image_paths)
    if cb.on_total:
        cb.on_total(summary.total)

    emit_record = on_record or cb.on_record or (lambda r: None)

    def on_result(_path: Path, outcome: CaptionRecord | Failure) -> None:
        if isinstance(outcome, CaptionRecord):
            emit_record(outcome)

    return _caption_items([(path, path) for path in image_paths], resolved.vlm_cfg, resolved.options, cache, cb,
                          on_result, vlm_factory, cluster, summary)  # fmt: skip


def _fail(summary: CaptionSummary, cb: Callbacks, path: Path | str, reason: str) -> Failure:
    failure = Failure(str(path), reason)
    summary.failed += 1
    summary.failures.append(failure)
    if cb.on_failure:
        cb.on_failure(failure)
    return failure


def _caption_items(items: list[tuple[T, ImageSource]], vlm_cfg: VLMConfig, opts: CaptionOptions,
                   cache: CaptionCache | None, cb: Callbacks, on_result: Callable[[T, CaptionRecord | Failure], None],
                   vlm_factory: Callable[[Any], Any] | None, cluster: Any | None,
                   summary: CaptionSummary) -> CaptionSummary:  # fmt: skip
    """The pipeline both entry points share: for each (tag, source) in order, load (a path is read
    here, once; ImageBytes are decoded as they are), look up the cache, describe on a miss, put.
    Outcomes go to `on_result(tag, record | Failure)`; failures also to the Callbacks' on_failure."""
    started = time.perf_counter()

    def done(tag: T, record: CaptionRecord) -> None:
        summary.add(record)
        on_result(tag, record)

    def fail(tag: T, path: Path | str, reason: str) -> None:
        on_result(tag, _fail(summary, cb, path, reason))

    vlm = None
    model_sha = mmproj_sha = ""
    if cache is not None and items:
        try:
            model_sha = file_sha256(vlm_cfg.model, cache)
            mmproj_sha = file_sha256(vlm_cfg.mmproj, cache)
        except OSError:
            model_sha = mmproj_sha = ""  # unreadable model: leave it to the VLM loader to explain
    if cluster is not None:  # the same run on Dask workers; only this process writes (cluster.py)
        from .cluster import caption_on_cluster

        caption_on_cluster(cluster, items, vlm_cfg, opts, cache, summary, done, fail,
                           cb.on_notice or (lambda msg: None), (model_sha, mmproj_sha))  # fmt: skip
        summary.seconds = time.perf_counter() - started
        return summary

    def get_vlm() -> Any:
        nonlocal vlm, model_sha, mmproj_sha
        if vlm is None:
            t0 = time.perf_counter()
            vlm = (vlm_factory or _default_vlm_factory)(vlm_cfg)
            summary.load_seconds = time.perf_counter() - t0
            summary.model_loaded = True
            summary.test_model = summary.test_model or bool(getattr(vlm, "is_test_model", False))
            model_sha = model_sha or getattr(vlm, "model_sha256", "") or file_sha256(vlm_cfg.model)
            mmproj_sha = mmproj_sha or getattr(vlm, "mmproj_sha256", "") or file_sha256(vlm_cfg.mmproj)
            if cb.on_model_loaded:
                cb.on_model_loaded(vlm)
        return vlm

    notice = cb.on_notice or (lambda msg: None)
    try:
        with _stop_after_current(notice) as flag:
            for tag, source in items:
                path = source_path(source)
                if flag["stop"]:
                    summary.interrupted = True
                    break
                try:
                    record = _caption_one(source, get_vlm, cache, lambda: (model_sha, mmproj_sha), opts,
                                          model_files=(vlm_cfg.model, vlm_cfg.mmproj))  # fmt: skip
                except ImageError as exc:
                    fail(tag, path, str(exc).removeprefix(f"{path}: "))
                    continue
                except UnusableAnswer as exc:
                    summary.retries += exc.retried
                    fail(tag, path, str(exc))
                    continue
                except KeyboardInterrupt:  # second Ctrl-C, mid-image: drop this one
                    summary.interrupted = True
                    break
                summary.retries += bool(record.extra.get("retried")) and not record.cached
                done(tag, record)
            else:
                summary.interrupted = summary.interrupted or flag["stop"]
    except KeyboardInterrupt:  # outside the per-image try (e.g. between images, in a callback)
        summary.interrupted = True
    finally:
        if vlm is not None:
            summary.model_calls = int(getattr(vlm, "calls", 0))
            close = getattr(vlm, "close", None)
            if close:
                close()
        summary.seconds = time.perf_counter() - started
    return summary


def source_path(source: ImageSource) -> Path:
    """The path an image source names (an ImageBytes keeps the one it was read from)."""
    return source.path if isinstance(source, ImageBytes) else Path(source)


def load_source(source: ImageSource, opts: CaptionOptions) -> LoadedImage:
    """Decode a source for the model: a path is read now (once); ImageBytes are decoded as they are."""
    return load_image(source, max_megapixels=opts.max_megapixels, bands=opts.bands)


class UnusableAnswer(EdgeT2TError):
    """The model gave no usable variant for one image (after the retry)."""

    def __init__(self, message: str, retried: bool = False):
        super().__init__(message)
        self.retried = retried

    def __reduce__(self):  # picklable with its flag: a cluster worker raises it for the client
        return (type(self), (str(self), self.retried))


def serve_cached(hit: CaptionRecord, path: Path | str, model_files: tuple[Any, Any], model_sha: str,
                 mmproj_sha: str) -> CaptionRecord:  # fmt: skip
    """A record from the cache (or another path's answer for the same bytes) as this path's record."""
    hit.image = str(path)  # the same bytes may live under another name now
    hit.cached = True
    # The key's hashes are those of the model files named now (which may have moved since).
    hit.extra.update(_model_files(*model_files, model_sha, mmproj_sha))
    return hit


def _model_files(model: Any, mmproj: Any, model_sha: str, mmproj_sha: str) -> dict[str, str]:
    """The record's `model_path`/`model_sha256`/`mmproj_path`/`mmproj_sha256` extra keys: the index
    stores them so `verify` can tell when a model file changed. Absolute paths, as `verify` may run
    from another directory; the hashes are the ones already computed (cache key or VLM load)."""
    return {
        "model_path": str(Path(model).resolve()),
        "model_sha256": model_sha,
        "mmproj_path": str(Path(mmproj).resolve()),
        "mmproj_sha256": mmproj_sha,
    }


def _caption_one(
    source: ImageSource,
    get_vlm: Callable[[], Any],
    cache: CaptionCache | None,
    shas: Callable[[], tuple[str, str]],
    opts: CaptionOptions,
    *,
    model_files: tuple[Any, Any],
) -> CaptionRecord:
    t0 = time.perf_counter()
    loaded = load_source(source, opts)
    path = loaded.path
    key = None
    model_sha, mmproj_sha = shas()
    prompt, params = opts.prompt, opts.params

    def served(hit: CaptionRecord) -> CaptionRecord:
        return serve_cached(hit, path, model_files, model_sha, mmproj_sha)

    if cache is not None and model_sha:
        key = CacheKey.make(loaded.sha256, model_sha, mmproj_sha, prompt.version, params)
        hit = cache.get(key)
        if hit is not None:
            return served(hit)

    vlm = get_vlm()
    model_sha, mmproj_sha = shas()  # without a cache, the hashes become known only when the model loads
    if cache is not None and key is None:
        key = CacheKey.make(loaded.sha256, model_sha, mmproj_sha, prompt.version, params)
        hit = cache.get(key)
        if hit is not None:
            return served(hit)

    describer: Describer = VLMDescriber(vlm, model_sha, mmproj_sha, model_files)
    record = describer.describe(ImageInput.from_loaded(loaded), opts)
    record.seconds = time.perf_counter() - t0  # loading and hashing the image count too
    if cache is not None and key is not None:
        cache.put(key, record)
    return record


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
        **_model_files(getattr(vlm, "model_path", None) or model_files[0],
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
