"""The llama.cpp adapter: the only module in the package that imports llama_cpp.

A VLM is a GGUF text model plus an mmproj (vision projector). Both are checked by gguf_check
before llama.cpp is reached, because llama.cpp aborts or segfaults on some bad files. One image
goes in per call, always as a base64 data: URI (llama-cpp-python fetches any other URL over the
network), and the raw text comes back; parsing is the caller's business.
"""

from __future__ import annotations

import base64
import collections
import ctypes
import functools
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import config
from .errors import ImageError, ModelError
from .fileio import sha256_file
from .gguf_check import GGUFInfo, check_pair, inspect_gguf
from .model_files import named_pair, named_vlms, require_named


@dataclass(frozen=True)
class Family:
    handler: str  # class name in llama_cpp.llama_chat_format
    supports_grammar: bool  # whether response_format / a JSON grammar reaches the sampler
    image_tokens: int  # context one image may take (upper estimate for tiling models)
    note: str = ""


FAMILIES: dict[str, Family] = {
    "llava-1.5": Family("Llava15ChatHandler", True, 576, "LLaVA-1.5 7B/13B, vicuna prompt"),
    "llava-1.6": Family("Llava16ChatHandler", True, 2880, "LLaVA-NeXT: up to 4 tiles + overview"),
    "bakllava": Family("Llava15ChatHandler", True, 576, "BakLLaVA-1 (Mistral + LLaVA-1.5 projector)"),
    "obsidian": Family("ObsidianChatHandler", True, 576, "Nous Obsidian 3B (ChatML with ###)"),
    "moondream2": Family("MoondreamChatHandler", True, 729, "moondream2 (SigLIP 378px)"),
    "nanollava": Family("NanoLlavaChatHandler", True, 729, "nanoLLaVA (Qwen1.5 0.5B + SigLIP)"),
    "minicpm-v-2.6": Family("MiniCPMv26ChatHandler", True, 640, "MiniCPM-V 2.6 (64 tokens/slice)"),
    "qwen2.5-vl": Family("Qwen25VLChatHandler", True, 1296, "Qwen2.5-VL (dynamic resolution)"),
    "mtmd": Family("MTMDChatHandler", True, 1024, "generic libmtmd, prompt from the GGUF chat template"),
}

# Room for the prompt and the answer on top of the image tokens when n_ctx is not given: the
# caption prompt (~1.4k chars) plus five JSON variants (~1.9k tokens of max_tokens) must fit.
_PROMPT_AND_OUTPUT_TOKENS = 3584

# Below this size a text model runs single-threaded unless n_threads is given.
_SMALL_MODEL_BYTES = 64 * 1024 * 1024

_SHA_CACHE: dict[tuple[str, int, int], str] = {}
_SHA_LOCK = threading.Lock()


def file_sha256(path: Path) -> str:
    """sha256 of a file, streamed, cached in memory per (path, size, mtime)."""
    st = os.stat(path)
    key = (str(Path(path).resolve()), st.st_size, st.st_mtime_ns)
    with _SHA_LOCK:
        if key in _SHA_CACHE:
            return _SHA_CACHE[key]
    digest = sha256_file(path)
    with _SHA_LOCK:
        _SHA_CACHE[key] = digest
    return digest


@dataclass
class VLMConfig:
    model: Path
    mmproj: Path
    family: str | None = None
    n_ctx: int | None = None
    n_threads: int | None = None
    n_gpu_layers: int = 0
    seed: int = 0


def infer_family(model_info: GGUFInfo, mmproj_info: GGUFInfo) -> str:
    """Pick a chat-handler family from GGUF metadata; "mtmd" (the GGUF's own template) if unsure."""
    md = {**mmproj_info.metadata, **model_info.metadata}
    text = " ".join(
        str(md.get(k) or "")
        for k in ("general.name", "general.basename", "general.finetune", "general.base_model.0.name")
    )
    text = f"{text} {model_info.name} {mmproj_info.name} {model_info.path.name} {mmproj_info.path.name}".lower()
    proj = mmproj_info.projector_type or ""
    if model_info.is_test_model:  # shape-true and per-family test models name their family
        return str(md.get("edge_t2t.family") or "llava-1.5")
    if proj == "resampler":
        return "minicpm-v-2.6" if mmproj_info.minicpmv_version in (None, 3) else "mtmd"
    if proj == "qwen2.5vl_merger" or "qwen2.5-vl" in text or "qwen2_5_vl" in text:
        return "qwen2.5-vl"
    if "moondream" in text:
        return "moondream2"
    if "nanollava" in text:
        return "nanollava"
    if "bakllava" in text:
        return "bakllava"
    if "obsidian" in text:
        return "obsidian"
    tiled = "clip.vision.image_grid_pinpoints" in md or md.get("clip.vision.mm_patch_merge_type") == "spatial_unpad"
    if tiled or any(k in text for k in ("llava-v1.6", "llava-1.6", "llava-next", "llava_next")):
        return "llava-1.6"
    if proj in ("mlp", "mlp_norm", "ldp", "ldpv2") and ("llava" in text or not model_info.chat_template):
        return "llava-1.5"
    return "mtmd"


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
        raise ModelError(_no_vlm_message(f"no {missing} given and {directory} does not exist"))
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
        raise ModelError(_no_vlm_message(f"no {what} in {directory}{extra}"))
    return found[0]


# ---- llama.cpp logging: silenced, but the last lines are kept for error messages ----------------

_LOG_TAIL: collections.deque[str] = collections.deque(maxlen=20)
_LOG_CALLBACK: Any = None  # kept referenced: llama.cpp calls it from C for the process lifetime


def _silence_llama_logs() -> None:
    global _LOG_CALLBACK
    if _LOG_CALLBACK is not None:
        return
    import llama_cpp
    import llama_cpp.mtmd_cpp as mtmd_cpp

    @llama_cpp.llama_log_callback
    def _drop(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
        if level in (3, 4) and text:  # GGML_LOG_LEVEL_WARN/ERROR: keep for the error message
            _LOG_TAIL.append(text.decode("utf-8", "replace").strip())

    _LOG_CALLBACK = _drop
    llama_cpp.llama_log_set(_drop, ctypes.c_void_p(0))
    mtmd_cpp.mtmd_log_set(_drop, ctypes.c_void_p(0))
    mtmd_cpp.mtmd_helper_log_set(_drop, ctypes.c_void_p(0))


def _log_hint() -> str:
    lines = [x for x in _LOG_TAIL if x]
    return f" (llama.cpp said: {' | '.join(lines[-3:])})" if lines else ""


class VLM:
    """A loaded GGUF vision-language model. Use as a context manager, or call close()."""

    def __init__(self, cfg: VLMConfig):
        self.cfg = cfg
        self.model_path = Path(cfg.model)
        self.mmproj_path = Path(cfg.mmproj)
        self._llama: Any = None
        self.calls = 0
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

    def _load(self, spec: Family) -> None:
        _silence_llama_logs()
        import llama_cpp
        from llama_cpp import llama_chat_format

        _LOG_TAIL.clear()
        handler_cls = getattr(llama_chat_format, spec.handler)
        try:
            handler = handler_cls(clip_model_path=str(self.mmproj_path), verbose=False)
            self._llama = llama_cpp.Llama(
                model_path=str(self.model_path),
                chat_handler=handler,
                n_ctx=self.n_ctx,
                n_batch=512,
                # Both explicit: n_threads_batch otherwise defaults to every CPU, which on a busy
                # machine made prompt processing ~100x slower.
                n_threads=self.n_threads,
                n_threads_batch=self.n_threads,
                n_gpu_layers=self.cfg.n_gpu_layers,
                seed=self.cfg.seed,
                verbose=False,
            )
            # libmtmd loads lazily on the first chat call; load it now so a bad mmproj fails here.
            handler._init_mtmd_context(self._llama)
        except (ValueError, RuntimeError, OSError) as exc:
            self.close()
            raise ModelError(
                f"llama.cpp could not load {self.model_path} with {self.mmproj_path}: {exc}{_log_hint()}; "
                "check that both files are complete and belong together (or try another --family)"
            ) from exc

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
        _LOG_TAIL.clear()
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
            msg = str(exc)
            if "bitmap" in msg:
                raise ImageError(f"llama.cpp could not decode the image ({mime}): {msg}; pass PNG or JPEG bytes") from exc
            if "n_ctx" in msg:
                raise ModelError(
                    f"{self.model_path}: prompt + image do not fit the context ({msg}); "
                    f"raise n_ctx (now {self.n_ctx}) or shorten the prompt"
                ) from exc
            raise ModelError(f"{self.model_path}: generation failed: {msg}{_log_hint()}") from exc
        except RuntimeError as exc:
            raise ModelError(f"{self.model_path}: generation failed: {exc}{_log_hint()}") from exc
        return out["choices"][0]["message"]["content"] or ""

    def close(self) -> None:
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
        except Exception:
            pass


# ---- what the installed llama.cpp is (for `edge-t2t doctor`) ------------------------------------


def llama_system_info() -> dict:
    """llama-cpp-python's version and the CPU features its llama.cpp was compiled with.

    Call it in a child process when unsure of the build: a library compiled for AVX2 can die with
    SIGILL on a CPU without it."""
    import re

    import llama_cpp

    text = llama_cpp.llama_print_system_info().decode("utf-8", "replace").strip()
    features = {k: v for k, v in re.findall(r"([A-Z][A-Z0-9_]*) = (\w+)", text)}
    return {"llama_cpp_python": llama_cpp.__version__, "system_info": text, "features": features}


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
    _silence_llama_logs()
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{key}")
    params.nthread = config.default_threads()
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.tmp")
    _LOG_TAIL.clear()
    try:
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), ctypes.byref(params))
        if rc != 0 or not tmp.exists():
            raise ModelError(f"quantizing {src} to {key} failed (code {rc}){_log_hint()}")
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)
    return dst
