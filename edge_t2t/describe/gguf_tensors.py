"""Random-weight GGUF tensors for the shape-true test models (testvlm.build_shape): the tensor plan
of a shape's text model and projector, a pseudo-word vocabulary of a real size, and the streaming
writer, which generates and writes one tensor at a time, each from its own seed.

A real-size model does not fit comfortably in memory as F16 on a field laptop (LLaVA-1.5-7B is
13.5 GB), so nothing here builds it in memory: the writer declares every tensor's name and shape,
writes the header, then generates and writes each tensor in chunks of rows. Each tensor has its
own seed (seed, crc32 of its name), so a tensor's bytes do not depend on the ones before it.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ModelError

_CHUNK_VALUES = 8 * 1024 * 1024  # values generated per write (16 MiB of F16)
_N_SPECIAL_BASE = 3  # <unk>, <s>, </s>

# Words a remote-sensing description uses, so the gibberish at least looks like the domain.
WORDS = """
the a an of with and in on is are there many some several few large small medium long
green white gray dark bright dense sparse area areas building buildings house houses road roads
tree trees river lake sea beach bridge farmland field fields forest grass park parking lot lots car
cars plane planes airport runway runways terminal port ship ships boat boats harbor industrial
residential commercial church school stadium playground pond square mountain desert bare land
meadow viaduct railway station storage tank tanks baseball tennis court center north south east
west centre top bottom left right near beside around next across along image shows located
""".split()
# JSON pieces, so a grammar-constrained answer needs few tokens.
JSON_PIECES = ['{"', '":', '",', '"}', '":"', '","', '["', '"]', "},{", "[{", "}]", ": ", ", "]


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]  # numpy order (ggml's ne reversed): (rows = outputs, cols = inputs)
    init: str = "rand"  # rand | ones | zeros
    std: float = 0.0  # rand: 0 means unit gain, 1 / sqrt(fan_in)
    f32: bool = False  # norms, biases and a few small tensors clip.cpp wants in F32
    zero_rows: int = 0  # rand: rows left at 0 (output logits of control and byte tokens)

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * (4 if self.f32 or self.init != "rand" else 2)


def text_tensor_plan(t, n_reserved: int = _N_SPECIAL_BASE) -> list[TensorSpec]:
    """Tensors llama.cpp's loader creates for this text architecture (src/models/<arch>.cpp).

    The loader refuses a file with a tensor it does not create, so optional ones appear only where
    the real model has them (qkv biases for qwen2, output bias for phi2, ...). The output rows of
    the first n_reserved tokens (control and byte tokens) are 0, as in the tiny model: a random
    model then writes printable text, and stops only where a grammar leaves nothing but EOS."""
    e, f, hd = t.n_embd, t.n_ff, t.hd
    q, kv = t.n_head * hd, t.n_head_kv * hd
    layernorm = t.arch in ("phi2", "stablelm")  # LayerNorm with bias; the others use RMSNorm
    # Not even a tied head gets zero rows here: a zero embedding is 0/0 in qwen2vl's RMSNorm, whose
    # loader never reads the epsilon (real embeddings are never exactly zero).
    plan = [TensorSpec("token_embd.weight", (t.n_vocab, e))]

    def norm(name: str, n: int = e) -> list[TensorSpec]:
        out = [TensorSpec(f"{name}.weight", (n,), "ones")]
        return out + ([TensorSpec(f"{name}.bias", (n,), "zeros")] if layernorm else [])

    for i in range(t.n_layer):
        p = f"blk.{i}"
        plan += norm(f"{p}.attn_norm")
        if t.arch == "phi2":  # fused QKV, every linear with a bias, parallel attention + MLP
            plan += [TensorSpec(f"{p}.attn_qkv.weight", (q + 2 * kv, e)), TensorSpec(f"{p}.attn_qkv.bias", (q + 2 * kv,), "zeros")]
        else:
            plan += [TensorSpec(f"{p}.attn_q.weight", (q, e)), TensorSpec(f"{p}.attn_k.weight", (kv, e)),
                     TensorSpec(f"{p}.attn_v.weight", (kv, e))]
            if t.arch in ("qwen2", "qwen2vl"):
                plan += [TensorSpec(f"{p}.attn_q.bias", (q,), "zeros"), TensorSpec(f"{p}.attn_k.bias", (kv,), "zeros"),
                         TensorSpec(f"{p}.attn_v.bias", (kv,), "zeros")]
        plan.append(TensorSpec(f"{p}.attn_output.weight", (e, q)))
        if t.arch == "phi2":
            plan.append(TensorSpec(f"{p}.attn_output.bias", (e,), "zeros"))
        if t.arch == "gemma3":
            plan += [TensorSpec(f"{p}.attn_q_norm.weight", (hd,), "ones"), TensorSpec(f"{p}.attn_k_norm.weight", (hd,), "ones"),
                     TensorSpec(f"{p}.post_attention_norm.weight", (e,), "ones")]
        if t.arch != "phi2":
            plan += norm(f"{p}.ffn_norm")
            plan.append(TensorSpec(f"{p}.ffn_gate.weight", (f, e)))
        plan += [TensorSpec(f"{p}.ffn_up.weight", (f, e)), TensorSpec(f"{p}.ffn_down.weight", (e, f))]
        if t.arch == "phi2":
            plan += [TensorSpec(f"{p}.ffn_up.bias", (f,), "zeros"), TensorSpec(f"{p}.ffn_down.bias", (e,), "zeros")]
        if t.arch == "gemma3":
            plan.append(TensorSpec(f"{p}.post_ffw_norm.weight", (e,), "ones"))
    plan += norm("output_norm")
    if not t.tied_output:
        plan.append(TensorSpec("output.weight", (t.n_vocab, e), zero_rows=n_reserved))
        if t.arch == "phi2":
            plan.append(TensorSpec("output.bias", (t.n_vocab,), "zeros"))
    return plan


def vision_tensor_plan(v, n_embd_text: int) -> list[TensorSpec]:
    """Tensors clip.cpp's load_tensors and the projector's graph use (tools/mtmd/models/*.cpp)."""
    e, f, ps = v.n_embd, v.n_ff, v.patch_size
    side = v.image_size // ps
    rms = v.projector == "qwen2.5vl_merger"  # Qwen2.5-VL's ViT: RMSNorm, SwiGLU, 2D RoPE (no learned positions)

    def ln(name: str, n: int = e) -> list[TensorSpec]:
        return [TensorSpec(f"{name}.weight", (n,), "ones")] + ([] if rms else [TensorSpec(f"{name}.bias", (n,), "zeros")])

    def linear(name: str, rows: int, cols: int, std: float = 0.0) -> list[TensorSpec]:
        return [TensorSpec(f"{name}.weight", (rows, cols), std=std), TensorSpec(f"{name}.bias", (rows,), "zeros")]

    plan: list[TensorSpec] = []
    if v.class_embedding:
        plan.append(TensorSpec("v.class_embd", (e,), f32=True))
    plan.append(TensorSpec("v.patch_embd.weight", (e, 3, ps, ps)))
    if v.projector == "qwen2.5vl_merger":  # the temporal Conv3D split into two Conv2D kernels
        plan.append(TensorSpec("v.patch_embd.weight.1", (e, 3, ps, ps)))
    elif not v.class_embedding:
        plan.append(TensorSpec("v.patch_embd.bias", (e,), "zeros"))
    # F32: the SigLIP graph adds the table to F32 activations directly (ggml has no f32 + f16 add)
    if v.projector == "resampler":  # MiniCPM-V's 70x70 NaViT position buckets
        plan.append(TensorSpec("v.position_embd.weight", (70 * 70, e), f32=True))
    elif v.projector != "qwen2.5vl_merger":
        plan.append(TensorSpec("v.position_embd.weight", (side * side + (1 if v.class_embedding else 0), e), f32=True))
    if v.class_embedding:
        plan += ln("v.pre_ln")
    for i in range(v.n_layer):
        p = f"v.blk.{i}"
        plan += ln(f"{p}.ln1")
        for name in ("attn_q", "attn_k", "attn_v", "attn_out"):
            plan += linear(f"{p}.{name}", e, e)
        plan += ln(f"{p}.ln2")
        if v.use_silu:
            plan += linear(f"{p}.ffn_gate", f, e)
        plan += linear(f"{p}.ffn_up", f, e) + linear(f"{p}.ffn_down", e, f)
    if not v.class_embedding:
        plan += ln("v.post_ln")

    if v.projector == "mlp":
        hidden = v.mlp_hidden or n_embd_text
        plan += linear("mm.0", hidden, e) + linear("mm.2", n_embd_text, hidden)
        if v.pinpoints:
            plan.append(TensorSpec("v.image_newline", (n_embd_text,), f32=True))
    elif v.projector == "idefics3":
        plan.append(TensorSpec("mm.model.fc.weight", (n_embd_text, e * v.scale_factor**2)))
    elif v.projector == "qwen2.5vl_merger":
        plan += linear("mm.0", 4 * e, 4 * e) + linear("mm.2", n_embd_text, 4 * e)
    elif v.projector == "gemma3":
        # used transposed by the graph: rows are the vision width (clip_n_mmproj_embd reads ne[0])
        plan += [TensorSpec("mm.soft_emb_norm.weight", (e,), "ones"),
                 TensorSpec("mm.input_projection.weight", (e, n_embd_text), std=e**-0.5)]
    elif v.projector == "resampler":
        d = n_embd_text
        plan += [TensorSpec("resampler.query", (v.query_num, d), std=0.02, f32=True),
                 TensorSpec("resampler.pos_embed_k", (70 * 70, d), std=0.02, f32=True),
                 TensorSpec("resampler.kv.weight", (d, e)),
                 TensorSpec("resampler.proj.weight", (d, d))]
        for name in ("q", "k", "v", "out"):
            plan += linear(f"resampler.attn.{name}", d, d)
        for name in ("q", "kv", "post"):
            plan += [TensorSpec(f"resampler.ln_{name}.weight", (d,), "ones"), TensorSpec(f"resampler.ln_{name}.bias", (d,), "zeros")]
    else:
        raise ModelError(f"no tensor plan for projector type {v.projector!r}; add it to gguf_tensors.vision_tensor_plan")
    return plan


def reserved_tokens(shape) -> int:
    """Control and byte tokens at the head of a shape's vocabulary (see build_full_vocab)."""
    return _N_SPECIAL_BASE + 256 + len({*shape.specials, shape.eos} - {"<unk>", "<s>", "</s>"})


# ---- vocabulary -----------------------------------------------------------------------------------

_ONSETS = ("", "b", "c", "d", "f", "g", "h", "j", "k", "l", "m", "n", "p", "r", "s", "t", "v", "w", "y", "z",
           "br", "cr", "dr", "fr", "gr", "pr", "tr", "bl", "cl", "fl", "gl", "pl", "sl", "ch", "sh", "th", "st",
           "sp", "sc", "qu", "wh")
_VOWELS = ("a", "e", "i", "o", "u", "ai", "ea", "ee", "ou", "io", "oo", "y")
_CODAS = ("", "n", "r", "s", "t", "l", "m", "d", "nd", "st", "ng", "rt", "ck", "x", "ll", "ss", "nt", "ed", "er")


def _pseudo_words():
    """English-looking syllables, then pairs of them: the filler of a real-size vocabulary."""
    syllables = [o + v + c for o in _ONSETS for v in _VOWELS for c in _CODAS]
    yield from syllables
    for a in syllables:
        for b in syllables:
            yield a + b


def build_full_vocab(n_vocab: int, specials: tuple[str, ...] = (), eos: str = "</s>") -> tuple[list[str], list[float], list[int], int]:
    """A SentencePiece-style vocabulary of exactly n_vocab plausible tokens; returns (tokens, scores,
    types, eos id).

    Real-size, so the sampler, the grammar (which tests every candidate token) and the output
    matrix cost what they cost in a real model. Order: <unk> <s> </s>, the 256 byte tokens, the
    chat and image control tokens libmtmd looks up, newlines, characters, JSON pieces, domain words,
    then pseudo-words ("▁word" and "word") until the size is reached.
    """
    from gguf import TokenType

    tokens = ["<unk>", "<s>", "</s>"]
    types = [int(TokenType.UNKNOWN), int(TokenType.CONTROL), int(TokenType.CONTROL)]
    for b in range(256):
        tokens.append(f"<0x{b:02X}>")
        types.append(int(TokenType.BYTE))
    seen = set(tokens)

    def add(piece: str, kind: int) -> None:
        if piece not in seen and len(tokens) < n_vocab:
            seen.add(piece)
            tokens.append(piece)
            types.append(kind)

    for s in (*specials, eos):
        add(s, int(TokenType.CONTROL))
    if len(tokens) >= n_vocab:
        raise ModelError(f"a vocabulary of {n_vocab} tokens cannot hold the {len(tokens)} special ones; raise n_vocab")
    for piece in ["\n", "\n\n", "\u2581", *(chr(c) for c in range(33, 127)), *JSON_PIECES]:
        add(piece, int(TokenType.NORMAL))
    for word in WORDS:
        for piece in ("\u2581" + word, word, "\u2581" + word.capitalize()):
            add(piece, int(TokenType.NORMAL))
    for word in _pseudo_words():
        if len(tokens) >= n_vocab:
            break
        add("\u2581" + word, int(TokenType.NORMAL))
        add(word, int(TokenType.NORMAL))
    # SPM merges the highest-scoring pair first: longer pieces win, earlier ones break ties.
    scores = [0.0 if t != int(TokenType.NORMAL) else len(tok) - i * 1e-6 for i, (tok, t) in enumerate(zip(tokens, types, strict=True))]
    return tokens, scores, types, tokens.index(eos)


# ---- the streaming writer ---------------------------------------------------------------------------


def _f16_random(rng, n: int, std: float):
    """n random F16 values of about the given standard deviation, from raw random bits.

    Drawing normals costs ~60 ns a value on a busy 2-core machine (7 minutes for a 7B model); this
    costs a few: sign and mantissa random, exponent fixed, so |x| is uniform in [a, 2a) and the
    standard deviation is about 1.53 a."""
    import math

    import numpy as np

    bits = np.frombuffer(rng.bytes(2 * n), dtype=np.uint16).copy()
    exponent = min(30, max(1, 15 + math.floor(math.log2(std / 1.53))))
    bits &= 0x83FF
    bits |= np.uint16(exponent << 10)
    return bits.view(np.float16)


def _tensor_rng(seed: int, name: str):
    import zlib

    import numpy as np

    return np.random.default_rng([seed, zlib.crc32(name.encode())])


def _write_tensor(fout, spec: TensorSpec, seed: int) -> None:
    import numpy as np

    if spec.init != "rand":
        (np.ones if spec.init == "ones" else np.zeros)(spec.shape, dtype=np.float32).tofile(fout)
        return
    rng = _tensor_rng(seed, spec.name)
    fan_in = spec.shape[-1] if len(spec.shape) > 1 else spec.shape[0]
    if len(spec.shape) == 4:  # conv kernel: in_channels * kh * kw
        fan_in = spec.shape[1] * spec.shape[2] * spec.shape[3]
    std = spec.std or fan_in**-0.5
    row = spec.numel // spec.shape[0]
    rows_per_chunk = max(1, _CHUNK_VALUES // row)
    for start in range(0, spec.shape[0], rows_per_chunk):
        n_rows = min(rows_per_chunk, spec.shape[0] - start)
        chunk = _f16_random(rng, n_rows * row, std).reshape(n_rows, row)
        if start < spec.zero_rows:
            chunk[: spec.zero_rows - start] = 0
        (chunk.astype(np.float32) if spec.f32 else chunk).tofile(fout)


def stream_gguf(writer: Any, tmp: Path, path: Path, plan: list[TensorSpec], seed: int, progress=None) -> None:
    """Declare every tensor, write header and metadata, then each tensor's data in turn into tmp
    (the writer's file); replace path with it at the end."""
    import numpy as np

    for spec in plan:
        dtype = np.float32 if spec.f32 or spec.init != "rand" else np.float16
        writer.add_tensor_info(spec.name, spec.shape, np.dtype(dtype), spec.nbytes)

    def write() -> None:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        fout = writer.fout[0]
        for spec in plan:
            writer.write_padding(fout, fout.tell())
            start = fout.tell()
            _write_tensor(fout, spec, seed)
            if fout.tell() - start != spec.nbytes:  # a short write would only show as a corrupt file at load
                raise ModelError(f"{path}: tensor {spec.name} wrote {fout.tell() - start} bytes, expected {spec.nbytes}")
            writer.write_padding(fout, spec.nbytes)
            if progress is not None:
                progress(spec.nbytes)

    write_then_replace(writer, tmp, path, write)


def write_then_replace(writer: Any, tmp: Path, path: Path, write: Callable[[], None]) -> None:
    """Run write() (a GGUF writer's output goes to tmp), close the writer and put tmp at path; on any
    failure close it and remove tmp, so path is either the old file or the whole new one."""
    try:
        write()
        writer.close()
        os.replace(tmp, path)
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
