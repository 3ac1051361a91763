"""The llama.cpp adapter: the only module in the package that imports llama_cpp.

A VLM is a GGUF text model plus an mmproj (vision projector). Both are checked by gguf_check
before llama.cpp is reached, because llama.cpp aborts or segfaults on some bad files. One image
goes in per call, always as a base64 data: URI (llama-cpp-python fetches any other URL over the
network), and the raw text comes back; parsing is the caller's business.

Beside it: vlm_parallel.py (several images' variants in one batch), vlm_sampling.py (each
sequence's sampler and the grammar) and vlm_devices.py (llama.cpp's backends and GPU devices). They
do not import llama_cpp; VLM hands them the llama_cpp module it imported, with its loaded Llama and
chat handler. Passing the module is the plainest way to keep this file the one place that loads
the native library, without a circle back to it. The chat families and their inference from GGUF
metadata live in families.py (no llama.cpp needed). Where the model runs (CPU, or how much of it
on which GPU) is planned in gpu_offload.py.
"""

from __future__ import annotations

import base64
import concurrent.futures
import ctypes
import functools
import json
import os
import re
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .. import config
from ..errors import GPUError, ImageError, ModelError, NoVLMError
from ..hashing import file_sha256
from . import gpu_offload, vlm_devices, vlm_log
from .families import FAMILIES, Family, infer_family
from .gguf_check import GGUFInfo, check_pair, inspect_gguf
from .model_files import named_pair, named_vlms, require_named
from .vlm_parallel import ParallelGenerator, ParallelResult, ParallelSettings
from .vlm_sampling import FirstCharIndex, json_schema_gbnf

# Room for the prompt and the answer on top of the image tokens when n_ctx is not given: the
# caption prompt (~1.4k chars) plus five JSON variants (~1.9k tokens of max_tokens) must fit.
_PROMPT_AND_OUTPUT_TOKENS = 3584

# The Llama object's own context in parallel mode, where generate() is not used (a 7B model's
# full-size KV cache would be ~2 GiB held for nothing).
_HANDLER_ONLY_CTX = 256

# Below this size a text model runs single-threaded unless n_threads is given.
_SMALL_MODEL_BYTES = 64 * 1024 * 1024

@dataclass
class VLMConfig:
    model: Path
    mmproj: Path
    family: str | None = None
    n_ctx: int | None = None
    n_threads: int | None = None
    # --gpu-layers: "auto", "all" or a number (gpu_offload.py); None: $EDGE_T2T_GPU_LAYERS, else "auto"
    n_gpu_layers: str | int | None = None
    mmproj_gpu: bool = True  # the projector on the GPU the text model uses, when it fits (--no-mmproj-gpu)
    # A local Dask worker's number and how many there are: workers spread over several GPUs, and
    # those sharing one split its free memory (cluster.py sets both).
    gpu_worker: int | None = None
    gpu_workers: int = 1
    seed: int = 0
    variant_mode: str = "parallel"  # "parallel" (describe_parallel) or "sequential" (generate)
    # mtmd's cap on one image's tokens (0/None: the mmproj's own preprocessing). Tiling projectors
    # upscale small images: SmolVLM (idefics3) makes a 224 px image 16 tiles + an overview (1,088
    # tokens, 17 encoder passes); a cap of 64 gives 1 tile + the overview (128 tokens, 2 passes).
    image_max_tokens: int | None = None
    # llama.cpp's fused attention kernel in the vision encoder and in the text model. Both change
    # the floating-point order of the attention, so both are in the caption cache key. Measured
    # (bench/parallel_decode_step.py, bench/parallel_context.py): in the encoder it saves 19-30% of
    # the CPU time (SmolVLM, nanoLLaVA shapes); in the text model it makes prompt processing ~18% faster but each decode step 30-50% slower
    # on the CPU, so it is off there.
    vision_flash_attn: bool = True
    flash_attn: bool = False


def _classify_dir(directory: Path) -> tuple[list[Path], list[Path], list[str]]:
    models, projs, broken = [], [], []
    for p in sorted(directory.glob("*.gguf")):
        try:
            info = inspect_gguf(p)
        except ModelError as exc:
            broken.append(str(exc))
            continue
        (projs if info.kind == "mmproj" else models).append(p)
    return models, projs, broken


def _no_vlm_message(detail: str) -> str:
    where = config.user_vlm_dir()
    return (
        f"no vision-language model found ({detail}). Supply one of: "
        f"(1) copy a GGUF model and its mmproj into {where}/; "
        "(2) set EDGE_T2T_VLM=/path/model.gguf and EDGE_T2T_MMPROJ=/path/mmproj.gguf; "
        "(3) pass --vlm MODEL.gguf --mmproj MMPROJ.gguf. "
        "For a placeholder that only exercises the pipeline, run `edge-t2t models build-test-vlm` "
        f"and use the files in {config.test_vlm_dir()}/ (random weights, meaningless captions)."
    )


def resolve_vlm_paths(model: str | os.PathLike | None, mmproj: str | os.PathLike | None) -> tuple[Path, Path]:
    """Explicit arguments, else $EDGE_T2T_VLM / $EDGE_T2T_MMPROJ, else the one pair in models/vlm/,
    else the one pair added with `edge-t2t models add` (models/vlm/NAME/). --vlm may be such a NAME."""
    m = Path(model).expanduser() if model else None
    p = Path(mmproj).expanduser() if mmproj else None
    if m is None and os.environ.get("EDGE_T2T_VLM"):
        m = Path(os.environ["EDGE_T2T_VLM"]).expanduser()
    if p is None and os.environ.get("EDGE_T2T_MMPROJ"):
        p = Path(os.environ["EDGE_T2T_MMPROJ"]).expanduser()
    if m is not None and not m.exists() and len(m.parts) == 1 and m.suffix.lower() != ".gguf":
        # A name, not a file: a pair added with `edge-t2t models add ... --name NAME`.
        named_model, named_proj = require_named(str(m))
        m, p = named_model, p or named_proj
    if m is not None and p is not None:
        return m, p
    directory = config.user_vlm_dir()
    if not directory.is_dir():
        missing = "model" if m is None else "mmproj"
        raise NoVLMError(_no_vlm_message(f"no {missing} given and {directory} does not exist"))
    models, projs, broken = _classify_dir(directory)
    if m is None and p is None and not models and not projs:
        named = named_vlms()
        if len(named) > 1:
            raise ModelError(f"{directory} holds several added VLMs ({', '.join(v['name'] for v in named)}); "
                             "pick one with --vlm NAME or EDGE_T2T_VLM=NAME")
        if named:
            return named_pair(named[0])
    m = m or _only_one(directory, models, broken, "text models", "GGUF text model", "--vlm or EDGE_T2T_VLM")
    p = p or _only_one(directory, projs, broken, "mmproj files", "mmproj (vision projector) GGUF",
                       "--mmproj or EDGE_T2T_MMPROJ")
    return m, p


def _only_one(directory: Path, found: list[Path], broken: list[str], plural: str, what: str, flag: str) -> Path:
    """The single file of a kind in models/vlm/, or an error saying how to choose or supply one."""
    if len(found) > 1:
        raise ModelError(f"{directory} holds several {plural} ({', '.join(x.name for x in found)}); pick one with {flag}")
    if not found:
        extra = f"; unreadable: {'; '.join(broken)}" if broken else ""
        raise NoVLMError(_no_vlm_message(f"no {what} in {directory}{extra}"))
    return found[0]


# ---- llama.cpp logging: silenced, but the last lines are kept for error messages (vlm_log) --------

_LOG_CALLBACK: Any = None  # kept referenced: llama.cpp calls it from C for the process lifetime
# While a model loads, llama.cpp's info lines are kept here: they say where each part went.
_LOAD_LOG: list[str] | None = None


def silence_llama_logs() -> None:
    """Route llama.cpp's log (text model, ggml backends, mtmd) through one callback, then load the
    backends (so their start-up lines are routed too). Warnings and errors are kept for error
    messages (vlm_log). $EDGE_T2T_LLAMA_LOG=FILE appends every line to FILE: what llama.cpp did,
    e.g. which device took how many layers."""
    global _LOG_CALLBACK
    if _LOG_CALLBACK is not None:
        return
    import llama_cpp
    import llama_cpp.mtmd_cpp as mtmd_cpp

    log_path = os.environ.get("EDGE_T2T_LLAMA_LOG")
    log_file = open(log_path, "a", encoding="utf-8", errors="replace") if log_path else None  # noqa: SIM115 -- for the process lifetime
    warned = {"lost": False}

    @llama_cpp.llama_log_callback
    def _drop(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
        if not text:
            return
        line = text.decode("utf-8", "replace")
        if log_file is not None:
            log_file.write(line)
            log_file.flush()
        if _LOAD_LOG is not None:
            _LOAD_LOG.append(line)
        if level in (3, 4):  # GGML_LOG_LEVEL_WARN/ERROR: keep for the error message
            vlm_log.TAIL.append(line.strip())
            # A lost device ends in a C++ exception that aborts the process before Python can
            # speak: the one line is said here, first.
            if level == 4 and not warned["lost"] and gpu_offload.classify([line]) == "lost":
                warned["lost"] = True
                print(gpu_offload.DEVICE_LOST_MESSAGE, file=sys.stderr, flush=True)

    _LOG_CALLBACK = _drop
    llama_cpp.llama_log_set(_drop, ctypes.c_void_p(0))
    mtmd_cpp.mtmd_log_set(_drop, ctypes.c_void_p(0))
    mtmd_cpp.mtmd_helper_log_set(_drop, ctypes.c_void_p(0))
    vlm_devices.load_backends(llama_cpp)


VARIANT_MODES = ("parallel", "sequential")


def _init_mtmd(handler: Any, llama: Any, image_max_tokens: int | None, flash_attn: bool, device: int | None) -> None:
    """The handler's mtmd context (the vision encoder), made as its own _init_mtmd_context makes it
    but with mtmd's image_max_tokens, the encoder's flash attention and its device (ggml's handle;
    None: the CPU) chosen here (the handler copies the text model's flash-attention setting and
    takes the first GPU it finds, even at --gpu-layers 0). Both variant paths use it."""
    import llama_cpp

    mtmd = handler._mtmd_cpp
    params = mtmd.mtmd_context_params_default()
    params.use_gpu, params.print_timings, params.n_threads = device is not None, False, llama.n_threads
    params.device = device
    # AUTO: libmtmd enables it where the backend supports it (every CPU build) and falls back
    # otherwise; measured 19% (SmolVLM shape) and 30% (nanoLLaVA) less encoder CPU time.
    params.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_AUTO if flash_attn else llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
    if image_max_tokens:
        params.image_max_tokens = image_max_tokens
    ctx = mtmd.mtmd_init_from_file(handler.clip_model_path.encode(), llama.model, params)
    if ctx is None:
        raise ValueError(f"Failed to load mtmd context from: {handler.clip_model_path}")
    handler.mtmd_ctx = ctx

    def free() -> None:
        if handler.mtmd_ctx is not None:
            mtmd.mtmd_free(handler.mtmd_ctx)
            handler.mtmd_ctx = None

    llama._stack.callback(free)
    if not mtmd.mtmd_support_vision(ctx):
        raise ValueError(f"{handler.clip_model_path} has no vision encoder")


class VLM:
    """A loaded GGUF vision-language model. Use as a context manager, or call close()."""

    def __init__(self, cfg: VLMConfig):
        self.cfg = cfg
        self.model_path = Path(cfg.model)
        self.mmproj_path = Path(cfg.mmproj)
        self._llama: Any = None
        self._handler: Any = None
        self._parallel: ParallelGenerator | None = None
        self._parallel_settings = ParallelSettings(flash_attn=cfg.flash_attn)
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._first_chars: FirstCharIndex | None = None
        self.calls = 0
        self.last_tokens_generated = 0
        if cfg.variant_mode not in VARIANT_MODES:
            raise ModelError(f"unknown variant mode {cfg.variant_mode!r}; choose one of: {', '.join(VARIANT_MODES)}")
        self.variant_mode = cfg.variant_mode
        model_info, mmproj_info = check_pair(self.model_path, self.mmproj_path)
        self.model_info, self.mmproj_info = model_info, mmproj_info
        family = cfg.family or infer_family(model_info, mmproj_info)
        if family not in FAMILIES:
            raise ModelError(
                f"unknown VLM family {family!r} for {self.model_path}; choose one of: {', '.join(FAMILIES)}"
            )
        if family == "mtmd" and not model_info.chat_template:
            raise ModelError(
                f"{self.model_path} has no tokenizer.chat_template, so the generic 'mtmd' family cannot "
                f"build a prompt; pass --family (one of: {', '.join(f for f in FAMILIES if f != 'mtmd')})"
            )
        self.family = family
        spec = FAMILIES[family]
        self.supports_grammar = spec.supports_grammar
        self.model_name = model_info.name or self.model_path.stem
        self.is_test_model = model_info.is_test_model or mmproj_info.is_test_model
        self.n_threads = cfg.n_threads or self._default_threads(model_info)
        self.n_ctx = cfg.n_ctx or self._default_n_ctx(spec, model_info, mmproj_info)
        self.offload: gpu_offload.OffloadPlan | None = None
        # Where llama.cpp put the work, from its own log of the load: the caption records carry it.
        self.placement: dict[str, str] = {}
        self._load(spec)

    # Hashed on first use, not at load: the caption pipeline already has both hashes from its cache
    # key, and a real GGUF is gigabytes to read again.
    @functools.cached_property
    def model_sha256(self) -> str:
        return file_sha256(self.model_path)

    @functools.cached_property
    def mmproj_sha256(self) -> str:
        return file_sha256(self.mmproj_path)

    @staticmethod
    def _default_threads(model_info: GGUFInfo) -> int:
        # A tiny model's matrices are too small to split: measured on a busy 2-core machine,
        # 2 threads made the test VLM 6-25x slower than 1 (ggml's threads wait on each other).
        if model_info.size < _SMALL_MODEL_BYTES:
            return 1
        return config.default_threads()

    @staticmethod
    def _default_n_ctx(spec: Family, model_info: GGUFInfo, mmproj_info: GGUFInfo) -> int:
        image = max(spec.image_tokens if not model_info.is_test_model else 0, mmproj_info.image_tokens_hint or 0)
        n = -(-(image + _PROMPT_AND_OUTPUT_TOKENS) // 256) * 256
        if model_info.context_length:
            n = min(n, int(model_info.context_length))
        return n

    def _plan(self, lc: Any) -> gpu_offload.OffloadPlan:
        cfg = self.cfg
        request = cfg.n_gpu_layers if cfg.n_gpu_layers is not None else gpu_offload.default_request()
        devices, unusable = vlm_devices.gpu_devices(lc)
        needs = gpu_offload.memory_needs(self.model_info, self.mmproj_info, self.n_ctx)
        return gpu_offload.plan_offload(request, devices, needs, mmproj_gpu=cfg.mmproj_gpu, worker=cfg.gpu_worker,
                                        workers=cfg.gpu_workers, unusable=unusable)  # fmt: skip

    def _load(self, spec: Family) -> None:
        global _LOAD_LOG
        silence_llama_logs()
        import llama_cpp
        from llama_cpp import llama_chat_format

        vlm_log.clear()
        handler_cls = getattr(llama_chat_format, spec.handler)
        plan = self.offload = self._plan(llama_cpp)
        _LOAD_LOG = []
        try:
            handler = handler_cls(clip_model_path=str(self.mmproj_path), verbose=False)
            self._llama = llama_cpp.Llama(
                model_path=str(self.model_path),
                chat_handler=handler,
                # In parallel mode this context only carries the handler (model, mmproj, template):
                # the variants run in a context of their own, so this one stays small.
                n_ctx=self.n_ctx if self.variant_mode == "sequential" else _HANDLER_ONLY_CTX,
                n_batch=512,
                # Both explicit: n_threads_batch otherwise defaults to every CPU, which on a busy
                # machine made prompt processing ~100x slower.
                n_threads=self.n_threads,
                n_threads_batch=self.n_threads,
                # One device or none: SPLIT_MODE_NONE keeps llama.cpp on plan.device alone, and
                # main_gpu -1 leaves it no device at all (else, even at 0 layers, it would use a
                # GPU it finds for large batches).
                n_gpu_layers=plan.n_gpu_layers,
                split_mode=llama_cpp.LLAMA_SPLIT_MODE_NONE,
                main_gpu=plan.device.index if plan.device else -1,
                flash_attn=self.cfg.flash_attn,
                seed=self.cfg.seed,
                verbose=False,
            )
            # libmtmd loads lazily on the first chat call; load it now so a bad mmproj fails here.
            mmproj_device = vlm_devices.device_handle(llama_cpp, plan.device.name) if plan.mmproj_on_gpu else None
            _init_mtmd(handler, self._llama, self.cfg.image_max_tokens, self.cfg.vision_flash_attn, mmproj_device)
            self._handler = handler
        except (ValueError, RuntimeError, OSError) as exc:
            self.close()
            self._raise_if_gpu(exc, f"loading {self.model_path.name}")
            raise ModelError(
                f"llama.cpp could not load {self.model_path} with {self.mmproj_path}: {exc}{vlm_log.hint()}; "
                "check that both files are complete and belong together (or try another --family)"
            ) from exc
        finally:
            loaded, _LOAD_LOG = _LOAD_LOG, None
        self.placement = _placement(plan, "".join(loaded))

    def _raise_if_gpu(self, exc: BaseException, what: str) -> None:
        """A failure on the GPU as the one-line GPUError that names the fix (else nothing)."""
        plan = self.offload
        if plan is not None and plan.on_gpu and gpu_offload.classify(list(vlm_log.TAIL)) == "oom":
            raise GPUError(gpu_offload.out_of_memory_message(plan, what, vlm_log.hint())) from exc

    def generate(
        self,
        image: bytes,
        prompt: str,
        *,
        json_schema: dict | None = None,
        max_tokens: int = 512,
        temperature: float = 0.0,
        mime: str = "image/png",
    ) -> str:
        """Describe ONE image (encoded bytes: PNG/JPEG) following prompt; returns the raw text."""
        if self._llama is None:
            raise ModelError(f"{self.model_path}: this VLM was closed; create a new VLM")
        if not image:
            raise ImageError("empty image bytes given to VLM.generate; pass the encoded PNG/JPEG file content")
        if self.variant_mode != "sequential":
            raise ModelError(f"{self.model_path}: this VLM was loaded for parallel variants (describe_parallel); "
                             "load it with variant_mode='sequential' to call generate()")  # fmt: skip
        uri = f"data:{mime};base64,{base64.b64encode(image).decode('ascii')}"
        messages = [
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": uri}},
                    {"type": "text", "text": prompt},
                ],
            }
        ]
        kwargs: dict[str, Any] = {}
        if json_schema is not None and self.supports_grammar:
            kwargs["response_format"] = {"type": "json_object", "schema": json_schema}
        vlm_log.clear()
        self.calls += 1
        try:
            # The handlers reset the context and KV cache before each prompt; a fixed seed and a
            # fresh sampler per call make the result a function of (image, prompt, settings).
            out = self._llama.create_chat_completion(
                messages=messages,
                max_tokens=max_tokens,
                temperature=temperature,
                seed=self.cfg.seed,
                **kwargs,
            )
        except ValueError as exc:
            self._raise_if_gpu(exc, "describing an image")
            msg = str(exc)
            if "bitmap" in msg:
                raise ImageError(f"llama.cpp could not decode the image ({mime}): {msg}; pass PNG or JPEG bytes") from exc
            if "n_ctx" in msg:
                raise ModelError(
                    f"{self.model_path}: prompt + image do not fit the context ({msg}); "
                    f"raise n_ctx (now {self.n_ctx}) or shorten the prompt"
                ) from exc
            raise ModelError(f"{self.model_path}: generation failed: {msg}{vlm_log.hint()}") from exc
        except RuntimeError as exc:
            self._raise_if_gpu(exc, "describing an image")
            raise ModelError(f"{self.model_path}: generation failed: {exc}{vlm_log.hint()}") from exc
        self.last_tokens_generated = int((out.get("usage") or {}).get("completion_tokens") or 0)
        return out["choices"][0]["message"]["content"] or ""

    # ---- parallel variants ------------------------------------------------------------------------

    @property
    def parallel_settings(self) -> ParallelSettings:
        return self._parallel_settings

    @parallel_settings.setter
    def parallel_settings(self, settings: ParallelSettings) -> None:
        """Another context for the parallel path (made on the next call); benches compare them."""
        if settings != self._parallel_settings and self._parallel is not None:
            self._parallel.close()
            self._parallel = None
        self._parallel_settings = settings

    def describe_parallel(
        self,
        images: list[bytes],
        prompt: str,
        suffixes: list[str] | tuple[str, ...],
        *,
        json_schema: dict | None = None,
        max_tokens: int = 512,
        temperatures: list[float] | tuple[float, ...] | float = 0.0,
        mime: str = "image/png",
    ) -> ParallelResult:
        """Describe several images, len(suffixes) variants each, in one llama.cpp context.

        Each image is encoded once and its shared prompt (everything up to the variant's suffix)
        decoded once into its first sequence; the other variants' sequences get it by
        llama_memory_seq_cp (unified KV cache, so the cells are shared, not copied). Then every
        variant of every image is one sequence of a single batch, each with its own sampler chain and
        grammar (`json_schema` is ONE variant's schema), capped at `max_tokens` tokens per variant.
        Variant v samples with seed cfg.seed + v. The same inputs give the same batch, hence the
        same texts.
        """
        import llama_cpp as lc

        if self._llama is None:
            raise ModelError(f"{self.model_path}: this VLM was closed; create a new VLM")
        if not images or any(not im for im in images):
            raise ImageError("empty image bytes given to VLM.describe_parallel; pass the encoded PNG/JPEG file content")
        n_var = len(suffixes)
        temps = list(temperatures) if isinstance(temperatures, (list, tuple)) else [float(temperatures)] * n_var
        vlm_log.clear()
        self.calls += 1
        if self._parallel is None:
            self._parallel = ParallelGenerator(lc, self._llama, self._handler, self.n_threads, self._parallel_settings,
                                               model_path=self.model_path, family=self.family)  # fmt: skip
        gbnf = json_schema_gbnf(lc, json.dumps(json_schema, sort_keys=True)) if json_schema is not None and self.supports_grammar else None
        vocab = self._llama._model.vocab
        first_chars = self._first_char_index(vocab, lc.llama_vocab_n_tokens(vocab)) if gbnf is not None else None
        try:
            res = self._parallel.describe(images, prompt, suffixes, gbnf=gbnf, max_tokens=max_tokens, temperatures=temps,
                                          seed=self.cfg.seed, mime=mime, first_chars=first_chars,
                                          pool=self._sampling_pool())  # fmt: skip
        except ModelError as exc:
            self._raise_if_gpu(exc, "describing an image")
            raise
        self.last_tokens_generated = res.gen_tokens
        return res

    def _first_char_index(self, vocab: Any, n_vocab: int) -> FirstCharIndex:
        """Built once per loaded model (a pass over the vocabulary: ~1 s at 152k tokens)."""
        if self._first_chars is None:
            import llama_cpp

            self._first_chars = FirstCharIndex(llama_cpp, vocab, n_vocab)
        return self._first_chars

    def _sampling_pool(self) -> concurrent.futures.ThreadPoolExecutor | None:
        """Threads for the sequences' samplers when llama.cpp has more than one: between two decode
        steps the other cores are idle, and llama.cpp's grammar pass (ctypes) and numpy release the
        GIL. Each sampler is independent of the others, so the tokens are the same either way."""
        if self.n_threads < 2:
            return None
        if self._pool is None:
            self._pool = concurrent.futures.ThreadPoolExecutor(self.n_threads, thread_name_prefix="edge-t2t-sampler")
        return self._pool

    def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown()
        parallel, self._parallel = self._parallel, None
        if parallel is not None:
            parallel.close()  # before the model it was made from
        llama, self._llama = self._llama, None
        if llama is not None:
            llama.close()  # also frees the mtmd context (registered on the Llama's exit stack)

    def __enter__(self) -> VLM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        # A destructor must not raise: a VLM whose __init__ failed has no _llama yet (AttributeError);
        # at interpreter exit llama_cpp's ctypes globals may already be None (TypeError when called).
        except (AttributeError, TypeError, OSError):
            pass


def _placement(plan: gpu_offload.OffloadPlan, log: str) -> dict[str, str]:
    """Where the parts went, as llama.cpp's log of the load says ("offloaded 3/3 layers to GPU",
    "CLIP using Vulkan0 backend"), falling back on the plan where a line is missing."""
    layers = re.search(r"offloaded (\d+)/(\d+) layers to GPU", log)
    n, total = (int(layers[1]), int(layers[2])) if layers else (plan.n_gpu_layers, plan.n_layer + 1)
    clip = re.search(r"CLIP using (\S+) backend", log)
    mmproj = clip[1] if clip else (plan.device.name if plan.mmproj_on_gpu and plan.device else "CPU")
    on_gpu = plan.device is not None and (n > 0 or mmproj != "CPU")
    return {"backend": plan.device.backend if on_gpu else "CPU", "device": plan.device.label if on_gpu else "CPU",
            "gpu_layers": f"{n}/{total}", "mmproj_device": mmproj}  # fmt: skip


# ---- what the installed llama.cpp is (for `edge-t2t doctor`) ------------------------------------


def llama_system_info() -> dict:
    """llama-cpp-python's version, the CPU features its llama.cpp was compiled with, its backends and
    the GPU devices it can offload to.

    Call it in a child process when unsure of the build: a library compiled for AVX2 can die with
    SIGILL on a CPU without it."""
    silence_llama_logs()
    import llama_cpp

    # A build whose backends load at run time reports no CPU features until its CPU module is loaded.
    vlm_devices.load_backends(llama_cpp)
    text = llama_cpp.llama_print_system_info().decode("utf-8", "replace").strip()
    features = {k: v for k, v in re.findall(r"([A-Z][A-Z0-9_]*) = (\w+)", text)}
    devices, unusable = vlm_devices.gpu_devices(llama_cpp)
    return {"llama_cpp_python": llama_cpp.__version__, "system_info": text, "features": features,
            "backends": vlm_devices.backends(llama_cpp), "backend_modules": vlm_devices.dynamic_backends(llama_cpp),
            "gpu_devices": [asdict(d) for d in devices], "gpu_unusable": unusable}  # fmt: skip


def llama_cpp_import_error() -> str:
    """Why llama-cpp-python cannot be imported ("" when it can): the demo skips its VLM step then."""
    try:
        import llama_cpp  # noqa: F401
    except ImportError as exc:
        return str(exc)
    return ""


# ---- quantization --------------------------------------------------------------------------------

QUANT_TYPES = ("F16", "Q8_0", "Q6_K", "Q5_K_M", "Q5_0", "Q4_K_M", "Q4_K_S", "Q4_0", "Q3_K_M", "Q2_K")


def quantize_gguf(src: Path, dst: Path, ftype: str) -> Path:
    """Quantize a GGUF text model with llama.cpp's quantizer (not for mmproj files). Atomic."""
    src, dst = Path(src), Path(dst)
    key = ftype.upper()
    if key not in QUANT_TYPES:
        raise ModelError(f"unknown quantization type {ftype!r} for {dst}; choose one of: {', '.join(QUANT_TYPES)}")
    info = inspect_gguf(src)
    if info.kind != "model":
        raise ModelError(f"{src} is an mmproj; llama.cpp's quantizer only handles text models")
    silence_llama_logs()
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{key}")
    params.nthread = config.default_threads()
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.tmp")
    vlm_log.clear()
    try:
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), ctypes.byref(params))
        if rc != 0 or not tmp.exists():
            raise ModelError(f"quantizing {src} to {key} failed (code {rc}){vlm_log.hint()}")
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)
    return dst
