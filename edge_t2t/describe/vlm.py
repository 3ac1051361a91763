"""The llama.cpp adapter: the only module in the package that imports llama_cpp.

A VLM is a GGUF text model plus an mmproj (vision projector). Both are checked by gguf_check
before llama.cpp is reached, because llama.cpp aborts or segfaults on some bad files. One image
goes in per call, always as a base64 data: URI (llama-cpp-python fetches any other URL over the
network), and the raw text comes back; parsing is the caller's business.
"""

from __future__ import annotations

import base64
import collections
import concurrent.futures
import ctypes
import functools
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import config
from ..errors import ImageError, ModelError, NoVLMError
from ..hashing import file_sha256
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
    n_gpu_layers: int = 0
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


# ---- parallel variants: one image encoding, N sequences in one batch -----------------------------

VARIANT_MODES = ("parallel", "sequential")

# Splits the rendered chat prompt into the part shared by all variants (image included) and the
# template's tail (e.g. "ASSISTANT:"), which follows each variant's own suffix.
_SPLIT = "\u241eEDGE-T2T-VARIANT\u241e"


@dataclass
class ParallelResult:
    """What one parallel call produced: texts[i][v] is image i's variant v (raw JSON text)."""

    texts: list[list[str]]
    tokens: list[list[int]]  # tokens generated per sequence
    encode_s: float = 0.0  # vision encoder, all images
    prompt_tokens: int = 0  # prompt positions decoded (image embeddings, shared text, suffixes)
    prompt_s: float = 0.0  # decoding them (encoding excluded)
    gen_s: float = 0.0  # the batched generation loop
    gen_decode_s: float = 0.0  # of which in llama_decode (the rest: sampling, grammar, Python)
    gen_steps: int = 0  # llama_decode calls in the generation loop
    gen_tokens: int = 0
    # CPU seconds of this process per phase: on a machine shared with other work, wall time mostly
    # measures the others.
    encode_cpu_s: float = 0.0
    prompt_cpu_s: float = 0.0
    gen_cpu_s: float = 0.0

    @property
    def tokens_per_image(self) -> list[int]:
        return [sum(t) for t in self.tokens]


@dataclass(frozen=True)
class ParallelSettings:
    """How the parallel path's llama.cpp context is made.

    kv_unified: one KV buffer for all sequences (the shared prefix lives once; seq_cp only tags
    its cells) but every query then attends over every cell in use, the other sequences' tokens
    masked; False gives each sequence a stream of its own (the prefix copied into each) and
    attention over its own cells only. flash_attn: llama.cpp's fused attention kernel (on the CPU
    it skips masked cells). Both change the floating-point order of the attention, so they are
    part of the caption cache key (captioning.generation_params).
    """

    kv_unified: bool = True
    flash_attn: bool = False
    n_ubatch: int = 512

    @property
    def key(self) -> str:
        return f"{'unified' if self.kv_unified else 'streams'}{'+fa' if self.flash_attn else ''}"


class _ParallelContext:
    """A llama_context of its own with room for n_seq sequences (see ParallelSettings).

    The Llama object's context stays for the sequential path; this one is created on the first
    parallel call and grown (never shrunk) when a call needs more room. With a unified KV cache
    its size does not change the numbers (llama.cpp attends over the cells in use, not over
    n_ctx); with one stream per sequence each stream holds n_ctx / n_seq cells.
    """

    def __init__(self, llama: Any, n_threads: int, settings: ParallelSettings):
        self.llama = llama
        self.n_threads = n_threads
        self.settings = settings
        self.ctx: Any = None
        self.batch: Any = None
        self.n_ctx = self.n_seq = self.n_batch = 0

    def ensure(self, per_seq: int, total: int, n_seq: int, n_batch: int) -> Any:
        """Room for n_seq sequences of up to per_seq cells each, `total` cells in all."""
        import llama_cpp

        unified = self.settings.kv_unified
        if self.ctx is not None and n_seq <= self.n_seq and n_batch <= self.n_batch and (
                total <= self.n_ctx if unified else per_seq <= self.n_ctx // self.n_seq):  # fmt: skip
            return self.ctx
        self.close()
        n_seq, n_batch = max(n_seq, self.n_seq), max(n_batch, self.n_batch, 512)
        if unified:
            n_ctx = -(-max(total, self.n_ctx) // 1024) * 1024
        else:  # llama.cpp gives each stream n_ctx / n_seq_max cells, and copies whole streams
            n_ctx = -(-max(per_seq, self.n_ctx // max(self.n_seq, 1)) // 256) * 256 * n_seq
        params = llama_cpp.llama_context_default_params()
        base = self.llama.context_params
        params.n_ctx, params.n_batch, params.n_ubatch = n_ctx, n_batch, min(self.settings.n_ubatch, n_batch)
        params.n_seq_max = n_seq
        params.kv_unified = unified
        params.n_threads = params.n_threads_batch = self.n_threads
        params.flash_attn_type = (llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED if self.settings.flash_attn
                                  else llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED)  # fmt: skip
        params.type_k, params.type_v = base.type_k, base.type_v
        params.offload_kqv = base.offload_kqv
        params.no_perf = False
        ctx = llama_cpp.llama_init_from_model(self.llama.model, params)
        if ctx is None:
            raise ModelError(f"llama.cpp could not create a {n_ctx}-token context for {n_seq} sequences{_log_hint()}; "
                             "use --variant-mode sequential or fewer images per batch")  # fmt: skip
        self.ctx, self.n_ctx, self.n_seq, self.n_batch = ctx, n_ctx, n_seq, n_batch
        self.batch = llama_cpp.llama_batch_init(n_batch, 0, 1)
        return ctx

    def close(self) -> None:
        import llama_cpp

        if self.batch is not None:
            llama_cpp.llama_batch_free(self.batch)
            self.batch = None
        if self.ctx is not None:
            llama_cpp.llama_free(self.ctx)
            self.ctx = None

    def decode(self, entries: list[tuple[int, int, int, bool]]) -> None:
        """One llama_decode of (token, pos, seq_id, wants_logits) entries, in order."""
        import llama_cpp

        b = self.batch
        for i, (tok, pos, seq, logits) in enumerate(entries):
            b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = tok, pos, 1, logits
            b.seq_id[i][0] = seq
        b.n_tokens = len(entries)
        rc = llama_cpp.llama_decode(self.ctx, b)
        if rc != 0:
            raise ModelError(f"llama_decode failed (code {rc}) in the parallel path{_log_hint()}; "
                             "use --variant-mode sequential")  # fmt: skip


def utf8_incomplete_tail(data: bytes) -> bytes:
    """The bytes at the end of `data` that start a UTF-8 character not finished yet (b"" if none).
    llama.cpp's grammar carries such a partial character into the next token's first bytes."""
    for back in range(1, min(4, len(data)) + 1):
        b = data[-back]
        if b & 0xC0 == 0x80:  # a continuation byte: look further back for the lead byte
            continue
        need = 2 if b & 0xE0 == 0xC0 else 3 if b & 0xF0 == 0xE0 else 4 if b & 0xF8 == 0xF0 else 1
        return data[-back:] if need > back else b""
    return b""


class _FirstCharIndex:
    """The vocabulary grouped by the first character of each token's text, for the grammar.

    llama.cpp's grammar accepts a token only if it accepts the token's first character as the next
    character, and it accepts a one-character token exactly when it accepts that character. So one
    grammar pass over the one-character tokens (probes) tells which first characters are allowed
    now, and only the tokens starting with one of them can be allowed. Where the JSON grammar is
    outside a free string, that is a small part of the vocabulary. Tokens whose first character has
    no one-character token, or whose text does not start with a whole UTF-8 character, are always
    checked; end-of-generation tokens too (the grammar allows them when its answer is complete).
    Tokens with empty text are never allowed by the grammar and are left out.
    """

    def __init__(self, vocab: Any, n_vocab: int):
        import llama_cpp as lc
        import numpy as np

        buf = ctypes.create_string_buffer(256)
        self.pieces: list[bytes] = []
        buckets: dict[str, list[int]] = {}
        probes: dict[str, int] = {}
        always: list[int] = []
        for tok in range(n_vocab):
            # special=True: the text llama.cpp's grammar sees (its token-to-piece cache)
            n = lc.llama_token_to_piece(vocab, tok, buf, len(buf), 0, True)
            if n < 0:  # longer than the buffer: -n is the length it needs
                buf = ctypes.create_string_buffer(-n)
                n = lc.llama_token_to_piece(vocab, tok, buf, len(buf), 0, True)
            piece = buf.raw[:n] if n > 0 else b""
            self.pieces.append(piece)
            if lc.llama_vocab_is_eog(vocab, tok):
                always.append(tok)
                continue
            if not piece or piece[0] == 0:
                continue
            first = _first_char(piece)
            if first is None:
                always.append(tok)
                continue
            buckets.setdefault(first, []).append(tok)
            if piece == first.encode("utf-8"):
                probes.setdefault(first, tok)
        for ch in [c for c in buckets if c not in probes]:
            always.extend(buckets.pop(ch))
        self.probe_chars = list(probes)
        self.probe_ids = np.array([probes[c] for c in self.probe_chars], dtype=np.int32)
        self.buckets = {c: np.array(ids, dtype=np.int32) for c, ids in buckets.items()}
        self.always = np.array(sorted(always), dtype=np.int32)
        self.n_vocab = n_vocab


def _first_char(piece: bytes) -> str | None:
    """The first character of a token's text, or None if it does not start with a whole one."""
    for n in (1, 2, 3, 4):
        try:
            return piece[:n].decode("utf-8")
        except UnicodeDecodeError:
            continue
    return None


_PENALTY_LAST_N, _REPEAT_PENALTY = 64, 1.1  # create_chat_completion's defaults


class _SequenceSampler:
    """One sequence's sampling: the sequential path's chain (repeat penalty, then greedy, in numpy,
    or top-k/top-p/min-p/temperature/seed) with the grammar checked on the chosen token first.

    llama.cpp's grammar sampler tests every vocabulary entry, which costs more than a small model's
    decode step (measured: tens of ms per token at a 49k vocabulary). So, as llama.cpp's own
    common sampler does, the chain picks a token without the grammar, the grammar checks only that
    token, and the full grammar pass runs only when it is refused. Under greedy decoding the token
    is the same as with the grammar applied first (the grammar only masks tokens, the penalty only
    scales them), so this changes speed, not output.
    """

    def __init__(self, vocab: Any, n_vocab: int, gbnf: bytes | None, temperature: float, seed: int,
                 first_chars: _FirstCharIndex | None = None):  # fmt: skip
        import llama_cpp as lc
        import numpy as np

        self.lc, self.n_vocab = lc, n_vocab
        self.first_chars = first_chars
        self.pending = b""  # an unfinished UTF-8 character at the end of the text so far
        self.chain = self.grammar = None
        # Greedy decoding runs in numpy: llama.cpp's penalty and greedy samplers walk the whole
        # vocabulary through a hash map, measured at ~3 ms a token at a 49k vocabulary (5 sequences:
        # more than a small model's decode step), against ~0.1 ms here. Same arithmetic, same token.
        self.greedy = temperature <= 0
        self.recent: collections.deque[int] = collections.deque(maxlen=_PENALTY_LAST_N)
        if not self.greedy:
            self.chain = lc.llama_sampler_chain_init(lc.llama_sampler_chain_default_params())
            # create_chat_completion's defaults (repeat_penalty 1.1 over the last 64 tokens), so both
            # paths sample the same way.
            lc.llama_sampler_chain_add(self.chain, lc.llama_sampler_init_penalties(n_vocab, _PENALTY_LAST_N, _REPEAT_PENALTY, 0.0, 0.0))
            for smp in (lc.llama_sampler_init_top_k(40), lc.llama_sampler_init_top_p(0.95, 1),
                        lc.llama_sampler_init_min_p(0.05, 1), lc.llama_sampler_init_temp(temperature),
                        lc.llama_sampler_init_dist(seed)):  # fmt: skip
                lc.llama_sampler_chain_add(self.chain, smp)
        if gbnf is not None:
            self.grammar = lc.llama_sampler_init_grammar(vocab, gbnf, b"root")
            if not self.grammar:
                self.free()
                raise ModelError("llama.cpp refused the variant grammar; use --variant-mode sequential")
        dtype = np.dtype([("id", "<i4"), ("logit", "<f4"), ("p", "<f4")], align=True)
        self.buf = np.zeros(n_vocab, dtype=dtype)
        self.buf["id"] = np.arange(n_vocab, dtype=np.int32)
        self.one = np.zeros(1, dtype=dtype)

    def _candidates(self, logits: Any) -> Any:
        import numpy as np

        # ids again too: top-k sorts the array in place, so the last call may have permuted them
        self.buf["id"] = np.arange(self.n_vocab, dtype=np.int32)
        self.buf["logit"] = np.ctypeslib.as_array(logits, shape=(self.n_vocab,))
        self.buf["p"] = 0.0
        return self.lc.llama_token_data_array(data=self.buf.ctypes.data_as(self.lc.llama_token_data_p),
                                              size=self.n_vocab, selected=-1, sorted=False)  # fmt: skip

    # After the grammar refuses the greedy token, it sees the best-scoring candidates first (the
    # top 1,024), then only the tokens whose first character it allows now (_FirstCharIndex), and
    # the whole vocabulary only if none of those is allowed. A full pass costs ~20 ms at a 49k
    # vocabulary and ~45 ms at 152k (5 sequences, often several per step); a real model's allowed
    # token is nearly always near the top. Where it is not (outside a free string, where the JSON
    # grammar allows a few characters), the top 8,192 rarely held one either (measured on the
    # nanoLLaVA shape: 225 of 250 refusals went on to the full pass), while the first-character
    # pass looks at the few tokens that can be allowed.
    STAGES: tuple[int, ...] = (1024,)

    def _penalized(self, logits: Any) -> Any:
        """llama.cpp's penalties (repeat 1.1 over the last 64 accepted tokens; a logit <= 0 is
        multiplied, a positive one divided, in float32), on a copy."""
        import numpy as np

        x = np.array(logits, dtype=np.float32, copy=True)
        if self.recent:
            ids = np.fromiter(set(self.recent), dtype=np.int64)
            v = x[ids]
            x[ids] = np.where(v <= 0, v * np.float32(_REPEAT_PENALTY), v / np.float32(_REPEAT_PENALTY))
        return x

    def _greedy(self, logits: Any) -> int:
        """Penalties, then greedy (the first highest logit)."""
        import numpy as np

        return int(np.argmax(self._penalized(logits)))

    def _greedy_allowed(self, logits: Any) -> int:
        """The token the full grammar pass then greedy would pick, with the pass run on the
        best-scoring candidates first. The grammar only masks tokens, so when a candidate whose
        penalized logit is >= t is allowed, the best of them beats every token below t; the cut is
        by value, so ties at t are all inside, and the lowest id wins a tie as in np.argmax. Then
        on the tokens whose first character the grammar allows: every allowed token is among them."""
        import numpy as np

        x = self._penalized(np.ctypeslib.as_array(logits, shape=(self.n_vocab,)))
        for k in self.STAGES:
            if k >= self.n_vocab:
                break
            t = np.partition(x, self.n_vocab - k)[self.n_vocab - k]
            best = self._best_allowed(np.flatnonzero(x >= t), x)
            if best is not None:
                return best
        if self.first_chars is not None and not self.pending:
            best = self._best_allowed(self._allowed_first_char_tokens(), x)
            if best is not None:
                return best
        cur = self._candidates(logits)
        self.lc.llama_sampler_apply(self.grammar, ctypes.byref(cur))
        return self._greedy(self.buf["logit"])

    def _grammar_allows(self, ids: Any, logits: Any) -> Any:
        """The grammar's verdict (a bool per id) on these token ids, handed these logits."""
        lc = self.lc
        part = self.buf[: len(ids)]  # a view: the full pass rewrites the whole buffer
        part["id"], part["logit"], part["p"] = ids, logits, 0.0
        cur = lc.llama_token_data_array(data=part.ctypes.data_as(lc.llama_token_data_p),
                                        size=len(ids), selected=-1, sorted=False)  # fmt: skip
        lc.llama_sampler_apply(self.grammar, ctypes.byref(cur))
        return part["logit"] > float("-inf")

    def _best_allowed(self, ids: Any, x: Any) -> int | None:
        """The allowed id of ascending `ids` with the highest penalized logit (the lowest id on a
        tie, as np.argmax over the whole vocabulary), or None if the grammar allows none."""
        import numpy as np

        ok = self._grammar_allows(ids, x[ids])
        return int(ids[np.argmax(np.where(ok, x[ids], -np.inf))]) if ok.any() else None

    def _allowed_first_char_tokens(self) -> Any:
        """Ascending ids of the tokens whose first character the grammar allows now, plus the
        tokens always checked (see _FirstCharIndex)."""
        import numpy as np

        fc = self.first_chars
        allowed = np.flatnonzero(self._grammar_allows(fc.probe_ids, 0.0))
        return np.sort(np.concatenate([fc.always, *(fc.buckets[fc.probe_chars[i]] for i in allowed)]))

    def _pick(self, logits: Any, cur: Any | None) -> int:
        """One token from the raw logits, or from `cur` (the candidates after the grammar pass)."""
        import numpy as np

        if self.greedy:
            return self._greedy(self.buf["logit"] if cur is not None else np.ctypeslib.as_array(logits, shape=(self.n_vocab,)))
        cur = cur if cur is not None else self._candidates(logits)
        self.lc.llama_sampler_apply(self.chain, ctypes.byref(cur))
        return int(self.buf["id"][cur.selected])

    def sample(self, ctx: Any, idx: int) -> int:
        lc = self.lc
        logits = lc.llama_get_logits_ith(ctx, idx)
        tok = self._pick(logits, None)
        if self.grammar is not None:
            self.one["id"], self.one["logit"], self.one["p"] = tok, 1.0, 0.0
            single = lc.llama_token_data_array(data=self.one.ctypes.data_as(lc.llama_token_data_p),
                                               size=1, selected=-1, sorted=False)  # fmt: skip
            lc.llama_sampler_apply(self.grammar, ctypes.byref(single))
            if not self.one["logit"][0] > float("-inf") and self.greedy:  # refused: the grammar first
                tok = self._greedy_allowed(logits)
            elif not self.one["logit"][0] > float("-inf"):  # refused: the full grammar pass, then the chain
                cur = self._candidates(logits)
                lc.llama_sampler_apply(self.grammar, ctypes.byref(cur))
                tok = self._pick(logits, cur)
            lc.llama_sampler_accept(self.grammar, tok)
            if self.first_chars is not None:
                self.pending = utf8_incomplete_tail(self.pending + self.first_chars.pieces[tok])
        if self.chain is not None:
            lc.llama_sampler_accept(self.chain, tok)
        self.recent.append(tok)
        return tok

    def free(self) -> None:
        for smp in (self.chain, self.grammar):
            if smp:
                self.lc.llama_sampler_free(smp)
        self.chain = self.grammar = None


def _init_mtmd(handler: Any, llama: Any, image_max_tokens: int | None, flash_attn: bool) -> None:
    """The handler's mtmd context (the vision encoder), made as its own _init_mtmd_context makes it
    but with mtmd's image_max_tokens and the encoder's flash attention chosen here (the handler
    only copies the text model's flash-attention setting). Both variant paths use it."""
    import llama_cpp

    mtmd = handler._mtmd_cpp
    params = mtmd.mtmd_context_params_default()
    params.use_gpu, params.print_timings, params.n_threads = True, False, llama.n_threads
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


@functools.lru_cache(maxsize=8)
def _gbnf(schema_json: str) -> bytes:
    from llama_cpp.llama_grammar import json_schema_to_gbnf

    return json_schema_to_gbnf(schema_json).encode("utf-8")


class VLM:
    """A loaded GGUF vision-language model. Use as a context manager, or call close()."""

    def __init__(self, cfg: VLMConfig):
        self.cfg = cfg
        self.model_path = Path(cfg.model)
        self.mmproj_path = Path(cfg.mmproj)
        self._llama: Any = None
        self._handler: Any = None
        self._parallel: _ParallelContext | None = None
        self._parallel_settings = ParallelSettings(flash_attn=cfg.flash_attn)
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._first_chars: _FirstCharIndex | None = None
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
                # In parallel mode this context only carries the handler (model, mmproj, template):
                # the variants run in a context of their own, so this one stays small.
                n_ctx=self.n_ctx if self.variant_mode == "sequential" else _HANDLER_ONLY_CTX,
                n_batch=512,
                # Both explicit: n_threads_batch otherwise defaults to every CPU, which on a busy
                # machine made prompt processing ~100x slower.
                n_threads=self.n_threads,
                n_threads_batch=self.n_threads,
                n_gpu_layers=self.cfg.n_gpu_layers,
                flash_attn=self.cfg.flash_attn,
                seed=self.cfg.seed,
                verbose=False,
            )
            # libmtmd loads lazily on the first chat call; load it now so a bad mmproj fails here.
            _init_mtmd(handler, self._llama, self.cfg.image_max_tokens, self.cfg.vision_flash_attn)
            self._handler = handler
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

    def _render_split(self, prompt: str, uri: str) -> tuple[str, str]:
        """The family's chat prompt for (image, prompt + SPLIT), cut at SPLIT: (shared head, tail).

        Rendered exactly as the family's handler renders it for the sequential path (its own
        template, default system message, media marker), so both paths see the same framing.
        """
        from jinja2.sandbox import ImmutableSandboxedEnvironment
        from llama_cpp import llama_chat_format as fmt

        llama, handler = self._llama, self._handler
        marker = handler._mtmd_cpp.mtmd_default_marker().decode("utf-8")
        messages: list[dict[str, Any]] = [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": uri}}, {"type": "text", "text": prompt + _SPLIT}]}]  # fmt: skip
        eos = llama.detokenize([llama.token_eos()])
        bos = llama.detokenize([llama.token_bos()])
        if isinstance(handler, fmt.MTMDChatHandler):
            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                extensions=[fmt.Jinja2ChatFormatter.IgnoreGenerationTags])  # fmt: skip
            env.filters["tojson"] = fmt.Jinja2ChatFormatter.tojson
            text = env.from_string(handler._get_chat_template(llama)).render(
                messages=handler._get_template_messages(messages, marker), add_generation_prompt=True,
                eos_token=handler._decode_token_piece(eos), bos_token=handler._decode_token_piece(bos),
                strftime_now=fmt.Jinja2ChatFormatter.strftime_now,
            )  # fmt: skip
            text = handler._postprocess_template_text(text, [uri], marker)
        else:
            if handler.DEFAULT_SYSTEM_MESSAGE is not None:
                messages.insert(0, {"role": "system", "content": handler.DEFAULT_SYSTEM_MESSAGE})
            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
            text = env.from_string(handler.CHAT_FORMAT).render(
                messages=messages, add_generation_prompt=True, eos_token=eos, bos_token=bos
            ).replace(uri, marker)  # fmt: skip
        if text.count(_SPLIT) != 1 or marker not in text.split(_SPLIT)[0]:
            raise ModelError(f"the {self.family} chat template cannot be split for parallel variants; "
                             "use --variant-mode sequential")  # fmt: skip
        head, tail = text.split(_SPLIT)
        return head, tail

    def _image_chunks(self, head: str, image: bytes, mime: str) -> Any:
        """mtmd chunks (text and image) of the shared head with the image in it; caller frees."""
        handler, mtmd = self._handler, self._handler._mtmd_cpp
        try:
            bitmap = handler._create_bitmap_from_bytes(image)
        except ValueError as exc:
            raise ImageError(f"llama.cpp could not decode the image ({mime}): {exc}; pass PNG or JPEG bytes") from exc
        chunks = mtmd.mtmd_input_chunks_init()
        try:
            text = mtmd.mtmd_input_text()
            raw = head.encode("utf-8")
            text.text, text.text_len, text.add_special, text.parse_special = raw, len(raw), True, True
            rc = mtmd.mtmd_tokenize(handler.mtmd_ctx, chunks, ctypes.byref(text),
                                    (mtmd.mtmd_bitmap_p_ctypes * 1)(bitmap), 1)  # fmt: skip
            if rc != 0:
                mtmd.mtmd_input_chunks_free(chunks)
                raise ModelError(f"{self.model_path}: mtmd could not tokenize the prompt with its image (code {rc})")
        finally:
            mtmd.mtmd_bitmap_free(bitmap)
        return chunks

    def _eval_prefix(self, pc: _ParallelContext, chunks: Any, seq: int, res: ParallelResult) -> int:
        """Decode one image's shared prefix into sequence `seq`; returns the next position."""
        import llama_cpp as lc

        mtmd, mctx = self._handler._mtmd_cpp, self._handler.mtmd_ctx
        n_past = 0
        for i in range(mtmd.mtmd_input_chunks_size(chunks)):
            chunk = mtmd.mtmd_input_chunks_get(chunks, i)
            if mtmd.mtmd_input_chunk_get_type(chunk) == mtmd.MTMD_INPUT_CHUNK_TYPE_TEXT:
                n = ctypes.c_size_t()
                ptr = mtmd.mtmd_input_chunk_get_tokens_text(chunk, ctypes.byref(n))
                toks = [ptr[j] for j in range(n.value)]
                t0, c0 = time.perf_counter(), time.process_time()
                for j in range(0, len(toks), pc.n_batch):
                    part = toks[j : j + pc.n_batch]
                    pc.decode([(t, n_past + j + k, seq, False) for k, t in enumerate(part)])
                res.prompt_s += time.perf_counter() - t0
                res.prompt_cpu_s += time.process_time() - c0
                n_past += len(toks)
                res.prompt_tokens += len(toks)
                continue
            t0, c0 = time.perf_counter(), time.process_time()
            if mtmd.mtmd_encode_chunk(mctx, chunk) != 0:
                raise ModelError(f"{self.model_path}: the vision encoder failed on this image{_log_hint()}")
            t1, c1 = time.perf_counter(), time.process_time()
            new_past = lc.llama_pos(0)
            rc = mtmd.mtmd_helper_decode_image_chunk(mctx, pc.ctx, chunk, mtmd.mtmd_get_output_embd(mctx), n_past,
                                                     seq, pc.n_batch, ctypes.byref(new_past),
                                                     mtmd.mtmd_helper_post_decode_callback(), None)  # fmt: skip
            if rc != 0:
                raise ModelError(f"{self.model_path}: decoding the image embeddings failed (code {rc}){_log_hint()}")
            res.encode_s, res.encode_cpu_s = res.encode_s + t1 - t0, res.encode_cpu_s + c1 - c0
            res.prompt_s += time.perf_counter() - t1
            res.prompt_cpu_s += time.process_time() - c1
            res.prompt_tokens += int(mtmd.mtmd_input_chunk_get_n_tokens(chunk))
            n_past = new_past.value
        return n_past

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
        _LOG_TAIL.clear()
        self.calls += 1
        llama, vocab = self._llama, self._llama._model.vocab
        res = ParallelResult(texts=[], tokens=[])
        uri = f"data:{mime};base64,"  # any unique string: the image travels as a bitmap, not a URL
        head, tail = self._render_split(prompt, uri + "x")
        suffix_toks = [llama.tokenize((s + tail).encode("utf-8"), add_bos=False, special=True) for s in suffixes]
        gbnf = _gbnf(json.dumps(json_schema, sort_keys=True)) if json_schema is not None and self.supports_grammar else None
        chunk_lists = []
        samplers: list[Any] = []
        try:
            for im in images:
                chunk_lists.append(self._image_chunks(head, im, mime))
            mtmd = self._handler._mtmd_cpp
            prefix = [int(mtmd.mtmd_helper_get_n_tokens(c)) for c in chunk_lists]
            per_image = sum(map(len, suffix_toks)) + n_var * max_tokens
            n_seq = len(images) * n_var
            if self._parallel is None:
                self._parallel = _ParallelContext(llama, self.n_threads, self._parallel_settings)
            pc = self._parallel
            per_seq = max(prefix) + max(map(len, suffix_toks)) + max_tokens + 16
            pc.ensure(per_seq, sum(prefix) + len(images) * per_image + 16, n_seq,
                      len(images) * sum(map(len, suffix_toks)) + n_seq)  # fmt: skip
            lc.llama_memory_clear(lc.llama_get_memory(pc.ctx), True)
            mem = lc.llama_get_memory(pc.ctx)
            pos: list[int] = []
            for i, chunks in enumerate(chunk_lists):
                base = i * n_var
                n_past = self._eval_prefix(pc, chunks, base, res)
                for v in range(1, n_var):
                    lc.llama_memory_seq_cp(mem, base, base + v, -1, -1)
                pos.extend([n_past] * n_var)
            # Every sequence's own suffix, one batch; logits only at each suffix's last token.
            entries, out_idx = [], []
            for s in range(n_seq):
                toks = suffix_toks[s % n_var]
                entries += [(t, pos[s] + k, s, k == len(toks) - 1) for k, t in enumerate(toks)]
                out_idx.append(len(entries) - 1)
                pos[s] += len(toks)
            t0, c0 = time.perf_counter(), time.process_time()
            pc.decode(entries)
            res.prompt_s += time.perf_counter() - t0
            res.prompt_cpu_s += time.process_time() - c0
            res.prompt_tokens += len(entries)
            n_vocab = lc.llama_vocab_n_tokens(vocab)
            first_chars = self._first_char_index(vocab, n_vocab) if gbnf is not None else None
            samplers = [_SequenceSampler(vocab, n_vocab, gbnf, temps[s % n_var], self.cfg.seed + s % n_var, first_chars)
                        for s in range(n_seq)]  # fmt: skip
            generated: list[list[int]] = [[] for _ in range(n_seq)]
            active = list(range(n_seq))
            pool = self._sampling_pool()
            t0, c0 = time.perf_counter(), time.process_time()
            while active:
                entries, still = [], []
                if pool is not None and len(active) > 1:
                    picked = list(pool.map(lambda s: samplers[s].sample(pc.ctx, out_idx[s]), active))
                else:
                    picked = [samplers[s].sample(pc.ctx, out_idx[s]) for s in active]
                for s, tok in zip(active, picked, strict=True):
                    if lc.llama_vocab_is_eog(vocab, tok):
                        continue
                    generated[s].append(tok)
                    if len(generated[s]) >= max_tokens:
                        continue
                    out_idx[s] = len(entries)
                    entries.append((tok, pos[s], s, True))
                    pos[s] += 1
                    still.append(s)
                active = still
                if entries:
                    t1 = time.perf_counter()
                    pc.decode(entries)
                    res.gen_decode_s += time.perf_counter() - t1
                    res.gen_steps += 1
            res.gen_s, res.gen_cpu_s = time.perf_counter() - t0, time.process_time() - c0
        finally:
            for sm in samplers:
                sm.free()
            for c in chunk_lists:
                self._handler._mtmd_cpp.mtmd_input_chunks_free(c)
        for i in range(len(images)):
            seqs = generated[i * n_var : (i + 1) * n_var]
            res.texts.append([llama.detokenize(g).decode("utf-8", "replace") for g in seqs])
            res.tokens.append([len(g) for g in seqs])
        res.gen_tokens = sum(map(len, generated))
        self.last_tokens_generated = res.gen_tokens
        return res

    def _first_char_index(self, vocab: Any, n_vocab: int) -> _FirstCharIndex:
        """Built once per loaded model (a pass over the vocabulary: ~1 s at 152k tokens)."""
        if self._first_chars is None:
            self._first_chars = _FirstCharIndex(vocab, n_vocab)
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
