"""The caption pipeline: find images -> load -> cache lookup -> describe -> cache put.

Where the images are described is an Executor that captioning is handed (CaptionSettings.executor,
caption_images(executor=)): InProcess, the default, loads the VLM in this process; a
cluster.ClusterSession sends each cache miss to Dask workers. Either gets the whole run as one
CaptionRun and hands every outcome back through it. One image's description (the VLM call, its
retry and checks) is describer.py's; the executors call it.

The VLM is loaded lazily, on the first cache miss, so a fully cached run never loads the model.
Model and mmproj hashes for the cache key come from the cache's file-hash memo instead, so even
a multi-GB GGUF is hashed once per (path, size, mtime).
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from ..errors import ImageError
from ..hashing import file_sha256
from ..images import DEFAULT_MAX_MEGAPIXELS, ImageBytes, LoadedImage, find_images, load_image
from ..records import CaptionRecord
from . import prompts
from .captions import CacheKey, CaptionCache
from .describer import CaptionOptions, Describer, ImageInput, UnusableAnswer, VLMDescriber, model_file_facts

if TYPE_CHECKING:  # llama_cpp is imported by vlm.py only when a model loads; the config is plain data
    from .vlm import VLMConfig

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

    def merge(self, other: CaptionSummary) -> None:
        """Add another run's counts to these (a scene's chips are described batch by batch, and
        `edge-t2t caption` reports plain images and scenes as one run): numbers add up, failures
        join, flags are set when either is."""
        for f in fields(self):
            mine, theirs = getattr(self, f.name), getattr(other, f.name)
            setattr(self, f.name, (mine or theirs) if isinstance(mine, bool) else mine + theirs)

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
def stop_after_current(notice: Callable[[str], None], message: str = "") -> Iterator[dict[str, bool]]:
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
    executor: Executor | None = None  # where images are described (None: InProcess); cluster.ClusterSession
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
                          on_result, settings.executor or InProcess(vlm_factory),
                          CaptionSummary(total=len(items)))  # fmt: skip


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
    executor: Executor | None = None,
) -> CaptionSummary:
    """Caption every image under `paths` (`edge-t2t caption`); return counts and failures.

    `vlm_cfg` is an edge_t2t.describe.vlm.VLMConfig (model, mmproj, family, threads, ...), or None for the
    one named by $EDGE_T2T_VLM/$EDGE_T2T_MMPROJ or found in models/vlm/. `cache=None`
    disables the cache. `max_tokens=None` sizes the cap to the schema (prompts.default_max_tokens).
    Each finished record goes to `on_record` as soon as it exists (so a
    caller writing JSONL loses nothing on Ctrl-C). A bad image is a Failure, never an exception.
    Ctrl-C stops after the current image and returns with `interrupted=True`.
    `executor` says where the images that miss the cache are described: InProcess(vlm_factory) by
    default (vlm_factory(cfg) makes the VLM; default vlm.VLM), or a cluster.ClusterSession (Dask).
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
                          on_result, executor or InProcess(vlm_factory), summary)  # fmt: skip


def _fail(summary: CaptionSummary, cb: Callbacks, path: Path | str, reason: str) -> Failure:
    failure = Failure(str(path), reason)
    summary.failed += 1
    summary.failures.append(failure)
    if cb.on_failure:
        cb.on_failure(failure)
    return failure


def _caption_items(items: list[tuple[T, ImageSource]], vlm_cfg: VLMConfig, opts: CaptionOptions,
                   cache: CaptionCache | None, cb: Callbacks, on_result: Callable[[T, CaptionRecord | Failure], None],
                   executor: Executor, summary: CaptionSummary) -> CaptionSummary:  # fmt: skip
    """The pipeline both entry points share: for each (tag, source) in order, load (a path is read
    once; ImageBytes are decoded as they are), look up the cache, describe on a miss, put, on the
    executor. Outcomes go to `on_result(tag, record | Failure)`; failures also to the Callbacks'
    on_failure."""
    started = time.perf_counter()

    def done(tag: T, record: CaptionRecord) -> None:
        summary.add(record)
        on_result(tag, record)

    def fail(tag: T, path: Path | str, reason: str) -> None:
        on_result(tag, _fail(summary, cb, path, reason))

    model_sha = mmproj_sha = ""
    if cache is not None and items:
        try:
            model_sha = file_sha256(vlm_cfg.model, cache)
            mmproj_sha = file_sha256(vlm_cfg.mmproj, cache)
        except OSError:
            model_sha = mmproj_sha = ""  # unreadable model: leave it to the VLM loader to explain
    try:
        executor.caption(CaptionRun(items, vlm_cfg, opts, cache, summary, (model_sha, mmproj_sha), done, fail,
                                    cb.on_notice or (lambda msg: None), cb.on_model_loaded))  # fmt: skip
    finally:
        summary.seconds = time.perf_counter() - started
    return summary


@dataclass
class CaptionRun:
    """One run's work as an executor gets it: the (tag, source) items in order, what shapes the
    answers, and where each outcome goes. An executor hands every described or cached record to
    done(tag, record) and every failure to fail(tag, path, reason); items it did not reach get
    neither, and it sets summary.interrupted."""

    items: list[tuple[Any, ImageSource]]
    vlm_cfg: VLMConfig
    opts: CaptionOptions
    cache: CaptionCache | None
    summary: CaptionSummary
    shas: tuple[str, str]  # the model files' sha256 when the cache's memo knew them, else ""
    done: Callable[[Any, CaptionRecord], None]
    fail: Callable[[Any, Path | str, str], None]
    notice: Callable[[str], None]
    on_model_loaded: Callable[[Any], None] | None = None


class Executor(Protocol):
    """Where a run's images are described: InProcess (here) or cluster.ClusterSession (Dask)."""

    def caption(self, run: CaptionRun) -> None: ...


class InProcess:
    """Describe in this process. The VLM (vlm_factory(cfg), default vlm.VLM) is loaded on the first
    image that misses the cache and closed when the run ends; with keep_loaded it stays loaded for
    the next run until close() (scene chips are described batch by batch with one model)."""

    def __init__(self, vlm_factory: Callable[[Any], Any] | None = None, *, keep_loaded: bool = False):
        self.vlm_factory = vlm_factory
        self.keep_loaded = keep_loaded
        self._kept: Any = None

    def close(self) -> None:
        vlm, self._kept = self._kept, None
        if vlm is not None and getattr(vlm, "close", None):
            vlm.close()

    def _load(self, cfg: VLMConfig) -> Any:
        if self._kept is not None:
            return self._kept
        vlm = (self.vlm_factory or _default_vlm_factory)(cfg)
        if self.keep_loaded:
            self._kept = vlm
        return vlm

    def caption(self, run: CaptionRun) -> None:
        summary, vlm_cfg = run.summary, run.vlm_cfg
        vlm = None
        calls_before = 0  # a kept VLM counts its calls over every run; this run's are the difference
        model_sha, mmproj_sha = run.shas

        def get_vlm() -> Any:
            nonlocal vlm, calls_before, model_sha, mmproj_sha
            if vlm is None:
                t0 = time.perf_counter()
                vlm = self._load(vlm_cfg)
                calls_before = int(getattr(vlm, "calls", 0))
                summary.load_seconds = time.perf_counter() - t0
                summary.model_loaded = True
                summary.test_model = summary.test_model or bool(getattr(vlm, "is_test_model", False))
                model_sha = model_sha or getattr(vlm, "model_sha256", "") or file_sha256(vlm_cfg.model)
                mmproj_sha = mmproj_sha or getattr(vlm, "mmproj_sha256", "") or file_sha256(vlm_cfg.mmproj)
                if run.on_model_loaded:
                    run.on_model_loaded(vlm)
            return vlm

        try:
            with stop_after_current(run.notice) as flag:
                for tag, source in run.items:
                    path = source_path(source)
                    if flag["stop"]:
                        summary.interrupted = True
                        break
                    try:
                        record = _caption_one(source, get_vlm, run.cache, lambda: (model_sha, mmproj_sha), run.opts,
                                              model_files=(vlm_cfg.model, vlm_cfg.mmproj))  # fmt: skip
                    except ImageError as exc:
                        run.fail(tag, path, str(exc).removeprefix(f"{path}: "))
                        continue
                    except UnusableAnswer as exc:
                        summary.retries += exc.retried
                        run.fail(tag, path, str(exc))
                        continue
                    except KeyboardInterrupt:  # second Ctrl-C, mid-image: drop this one
                        summary.interrupted = True
                        break
                    summary.retries += bool(record.extra.get("retried")) and not record.cached
                    run.done(tag, record)
                else:
                    summary.interrupted = summary.interrupted or flag["stop"]
        except KeyboardInterrupt:  # outside the per-image try (e.g. between images, in a callback)
            summary.interrupted = True
        finally:
            if vlm is not None:
                summary.model_calls = int(getattr(vlm, "calls", 0)) - calls_before
                if not self.keep_loaded and getattr(vlm, "close", None):
                    vlm.close()


def source_path(source: ImageSource) -> Path:
    """The path an image source names (an ImageBytes keeps the one it was read from)."""
    return source.path if isinstance(source, ImageBytes) else Path(source)


def load_source(source: ImageSource, opts: CaptionOptions) -> LoadedImage:
    """Decode a source for the model: a path is read now (once); ImageBytes are decoded as they are."""
    return load_image(source, max_megapixels=opts.max_megapixels, bands=opts.bands)


def serve_cached(hit: CaptionRecord, path: Path | str, model_files: tuple[Any, Any], model_sha: str,
                 mmproj_sha: str) -> CaptionRecord:  # fmt: skip
    """A record from the cache (or another path's answer for the same bytes) as this path's record."""
    hit.image = str(path)  # the same bytes may live under another name now
    hit.cached = True
    # The key's hashes are those of the model files named now (which may have moved since).
    hit.extra.update(model_file_facts(*model_files, model_sha, mmproj_sha))
    return hit


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
