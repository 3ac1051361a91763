"""Parallel variants: one image encoding, N sequences in one batch (VLM.describe_parallel's machinery).

Each image is encoded once and its shared prompt decoded once; every variant of every image is then
one sequence of a single llama.cpp batch, each with its own sampler (vlm_sampling.SequenceSampler).

llama.cpp's bindings come in as arguments, not imports: the adapter (vlm.py) hands over the
llama_cpp module it imported (`lc`), its loaded Llama and its chat handler (whose `_mtmd_cpp` is
the mtmd bindings module). Only the adapter imports llama_cpp, so this module cannot load the native
library by itself, and the adapter stays the one place that decides when it is loaded.
"""

from __future__ import annotations

import concurrent.futures
import ctypes
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ImageError, ModelError
from . import vlm_log
from .vlm_sampling import FirstCharIndex, SequenceSampler

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


class ParallelContext:
    """A llama_context of its own with room for n_seq sequences (see ParallelSettings).

    The Llama object's context stays for the sequential path; this one is created on the first
    parallel call and grown (never shrunk) when a call needs more room. With a unified KV cache
    its size does not change the numbers (llama.cpp attends over the cells in use, not over
    n_ctx); with one stream per sequence each stream holds n_ctx / n_seq cells.
    """

    def __init__(self, lc: Any, llama: Any, n_threads: int, settings: ParallelSettings):
        self.lc, self.llama = lc, llama
        self.n_threads = n_threads
        self.settings = settings
        self.ctx: Any = None
        self.batch: Any = None
        self.n_ctx = self.n_seq = self.n_batch = 0

    def ensure(self, per_seq: int, total: int, n_seq: int, n_batch: int) -> Any:
        """Room for n_seq sequences of up to per_seq cells each, `total` cells in all."""
        lc = self.lc
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
        params = lc.llama_context_default_params()
        base = self.llama.context_params
        params.n_ctx, params.n_batch, params.n_ubatch = n_ctx, n_batch, min(self.settings.n_ubatch, n_batch)
        params.n_seq_max = n_seq
        params.kv_unified = unified
        params.n_threads = params.n_threads_batch = self.n_threads
        params.flash_attn_type = (lc.LLAMA_FLASH_ATTN_TYPE_ENABLED if self.settings.flash_attn
                                  else lc.LLAMA_FLASH_ATTN_TYPE_DISABLED)  # fmt: skip
        params.type_k, params.type_v = base.type_k, base.type_v
        params.offload_kqv = base.offload_kqv
        params.no_perf = False
        ctx = lc.llama_init_from_model(self.llama.model, params)
        if ctx is None:
            raise ModelError(f"llama.cpp could not create a {n_ctx}-token context for {n_seq} sequences{vlm_log.hint()}; "
                             "use --variant-mode sequential or fewer images per batch")  # fmt: skip
        self.ctx, self.n_ctx, self.n_seq, self.n_batch = ctx, n_ctx, n_seq, n_batch
        self.batch = lc.llama_batch_init(n_batch, 0, 1)
        return ctx

    def close(self) -> None:
        lc = self.lc
        if self.batch is not None:
            lc.llama_batch_free(self.batch)
            self.batch = None
        if self.ctx is not None:
            lc.llama_free(self.ctx)
            self.ctx = None

    def decode(self, entries: list[tuple[int, int, int, bool]]) -> None:
        """One llama_decode of (token, pos, seq_id, wants_logits) entries, in order."""
        b = self.batch
        for i, (tok, pos, seq, logits) in enumerate(entries):
            b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = tok, pos, 1, logits
            b.seq_id[i][0] = seq
        b.n_tokens = len(entries)
        rc = self.lc.llama_decode(self.ctx, b)
        if rc != 0:
            raise ModelError(f"llama_decode failed (code {rc}) in the parallel path{vlm_log.hint()}; "
                             "use --variant-mode sequential")  # fmt: skip


class ParallelGenerator:
    """The parallel path of one loaded model: its own context (ParallelContext, made on the first
    call) and the batched generation of several images' variants.

    `lc` is the llama_cpp module, `llama` the adapter's Llama (its context only carries the
    handler), `handler` its chat handler with the mtmd (vision encoder) context loaded.
    """

    def __init__(self, lc: Any, llama: Any, handler: Any, n_threads: int, settings: ParallelSettings, *,
                 model_path: Path, family: str):  # fmt: skip
        self.lc, self.llama, self.handler = lc, llama, handler
        self.context = ParallelContext(lc, llama, n_threads, settings)
        self.model_path, self.family = model_path, family

    @property
    def settings(self) -> ParallelSettings:
        return self.context.settings

    def close(self) -> None:
        self.context.close()

    def _render_split(self, prompt: str, uri: str) -> tuple[str, str]:
        """The family's chat prompt for (image, prompt + SPLIT), cut at SPLIT: (shared head, tail).

        Rendered exactly as the family's handler renders it for the sequential path (its own
        template, default system message, media marker), so both paths see the same framing.
        """
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        fmt, llama, handler = self.lc.llama_chat_format, self.llama, self.handler
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
        handler, mtmd = self.handler, self.handler._mtmd_cpp
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

    def _eval_prefix(self, chunks: Any, seq: int, res: ParallelResult) -> int:
        """Decode one image's shared prefix into sequence `seq`; returns the next position."""
        pc, mtmd, mctx = self.context, self.handler._mtmd_cpp, self.handler.mtmd_ctx
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
                raise ModelError(f"{self.model_path}: the vision encoder failed on this image{vlm_log.hint()}")
            t1, c1 = time.perf_counter(), time.process_time()
            new_past = self.lc.llama_pos(0)
            rc = mtmd.mtmd_helper_decode_image_chunk(mctx, pc.ctx, chunk, mtmd.mtmd_get_output_embd(mctx), n_past,
                                                     seq, pc.n_batch, ctypes.byref(new_past),
                                                     mtmd.mtmd_helper_post_decode_callback(), None)  # fmt: skip
            if rc != 0:
                raise ModelError(f"{self.model_path}: decoding the image embeddings failed (code {rc}){vlm_log.hint()}")
            res.encode_s, res.encode_cpu_s = res.encode_s + t1 - t0, res.encode_cpu_s + c1 - c0
            res.prompt_s += time.perf_counter() - t1
            res.prompt_cpu_s += time.process_time() - c1
            res.prompt_tokens += int(mtmd.mtmd_input_chunk_get_n_tokens(chunk))
            n_past = new_past.value
        return n_past


    def describe(
        self,
        images: list[bytes],
        prompt: str,
        suffixes: list[str] | tuple[str, ...],
        *,
        gbnf: bytes | None,
        max_tokens: int,
        temperatures: list[float],
        seed: int,
        mime: str,
        first_chars: FirstCharIndex | None,
        pool: concurrent.futures.Executor | None,
    ) -> ParallelResult:
        """Describe several images, len(suffixes) variants each (see VLM.describe_parallel).

        gbnf is ONE variant's grammar (None: free text); variant v samples at temperatures[v] with
        seed + v; first_chars speeds up the grammar (vlm_sampling); pool runs the sequences' samplers
        side by side (None: one after another).
        """
        lc, llama = self.lc, self.llama
        vocab = llama._model.vocab
        n_var = len(suffixes)
        res = ParallelResult(texts=[], tokens=[])
        uri = f"data:{mime};base64,"  # any unique string: the image travels as a bitmap, not a URL
        head, tail = self._render_split(prompt, uri + "x")
        suffix_toks = [llama.tokenize((s + tail).encode("utf-8"), add_bos=False, special=True) for s in suffixes]
        mtmd = self.handler._mtmd_cpp
        chunk_lists = []
        samplers: list[Any] = []
        try:
            for im in images:
                chunk_lists.append(self._image_chunks(head, im, mime))
            prefix = [int(mtmd.mtmd_helper_get_n_tokens(c)) for c in chunk_lists]
            per_image = sum(map(len, suffix_toks)) + n_var * max_tokens
            n_seq = len(images) * n_var
            pc = self.context
            per_seq = max(prefix) + max(map(len, suffix_toks)) + max_tokens + 16
            pc.ensure(per_seq, sum(prefix) + len(images) * per_image + 16, n_seq,
                      len(images) * sum(map(len, suffix_toks)) + n_seq)  # fmt: skip
            lc.llama_memory_clear(lc.llama_get_memory(pc.ctx), True)
            mem = lc.llama_get_memory(pc.ctx)
            pos: list[int] = []
            for i, chunks in enumerate(chunk_lists):
                base = i * n_var
                n_past = self._eval_prefix(chunks, base, res)
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
            samplers = [SequenceSampler(lc, vocab, n_vocab, gbnf, temperatures[s % n_var], seed + s % n_var, first_chars)
                        for s in range(n_seq)]  # fmt: skip
            generated: list[list[int]] = [[] for _ in range(n_seq)]
            active = list(range(n_seq))
            t0, c0 = time.perf_counter(), time.process_time()
            while active:
                entries, still = [], []
                # The logits are fetched here, on this thread: llama_get_logits_ith synchronizes the
                # backend and reorders the outputs, which is not safe from several threads at once
                # (two sampler threads deadlocked on a Vulkan device); the samplers only read them.
                logits = [lc.llama_get_logits_ith(pc.ctx, out_idx[s]) for s in active]
                if pool is not None and len(active) > 1:
                    picked = list(pool.map(lambda s, lg: samplers[s].sample(pc.ctx, out_idx[s], lg), active, logits))
                else:
                    picked = [samplers[s].sample(pc.ctx, out_idx[s], lg) for s, lg in zip(active, logits, strict=True)]
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
                mtmd.mtmd_input_chunks_free(c)
        for i in range(len(images)):
            seqs = generated[i * n_var : (i + 1) * n_var]
            res.texts.append([llama.detokenize(g).decode("utf-8", "replace") for g in seqs])
            res.tokens.append([len(g) for g in seqs])
        res.gen_tokens = sum(map(len, generated))
        return res
