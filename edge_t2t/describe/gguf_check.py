"""Validate a GGUF text model + mmproj pair *before* llama.cpp sees it.

llama.cpp trusts its inputs: a truncated file, a swapped pair or an mmproj that lacks a tensor its
projector needs can abort or segfault the whole process. Here we read only the GGUF header with the
`gguf` package (memory-mapped; tensor data is never loaded) and turn every such case into a
ModelError that names the file and the fix.

Tensor names and projection sizes follow llama.cpp's tools/mtmd/clip.cpp (load_tensors and
clip_n_mmproj_embd).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ModelError

GGUF_MAGIC = b"GGUF"

# Tensors each projector type needs, beyond the vision tower itself. Where clip.cpp loads a tensor
# as optional but then uses it unconditionally, a missing one crashes the process, so we list it.
_PROJECTOR_TENSORS: dict[str, tuple[str, ...]] = {
    "mlp": ("mm.0.weight", "mm.0.bias", "mm.2.weight", "mm.2.bias"),
    "mlp_norm": (
        "mm.0.weight", "mm.0.bias", "mm.1.weight", "mm.1.bias",
        "mm.3.weight", "mm.3.bias", "mm.4.weight", "mm.4.bias",
    ),
    "ldp": tuple(
        [f"mm.model.mlp.{i}.{k}" for i in (1, 3) for k in ("weight", "bias")]
        + [
            f"mm.model.mb_block.{b}.block.{j}.{part}"
            for b in (1, 2)
            for j, parts in ((0, ("0.weight", "1.weight", "1.bias")),
                             (1, ("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias")),
                             (2, ("0.weight", "1.weight", "1.bias")))
            for part in parts
        ]
    ),
    "ldpv2": tuple(
        [f"mm.model.mlp.{i}.{k}" for i in (0, 2) for k in ("weight", "bias")]
        + ["mm.model.peg.0.weight", "mm.model.peg.0.bias"]
    ),
    "resampler": (
        "resampler.pos_embed_k", "resampler.query", "resampler.proj.weight", "resampler.kv.weight",
        *(f"resampler.attn.{p}.{k}" for p in ("q", "k", "v", "out") for k in ("weight", "bias")),
        *(f"resampler.ln_{p}.{k}" for p in ("q", "kv", "post") for k in ("weight", "bias")),
    ),
    "qwen2vl_merger": ("mm.0.weight", "mm.0.bias", "mm.2.weight", "mm.2.bias"),
    "qwen2.5vl_merger": ("mm.0.weight", "mm.0.bias", "mm.2.weight", "mm.2.bias"),
    "idefics3": ("mm.model.fc.weight",),  # SmolVLM
    "gemma3": ("mm.input_projection.weight", "mm.soft_emb_norm.weight"),
}
# Projector types whose vision tower is the classic CLIP/SigLIP ViT with learned positions.
_VIT_WITH_POSITIONS = {"mlp", "mlp_norm", "ldp", "ldpv2", "resampler"}


@dataclass
class GGUFInfo:
    path: Path
    kind: str  # "model" | "mmproj"
    architecture: str
    name: str
    is_test_model: bool
    size: int
    file_type: int | None
    embedding_length: int | None = None  # model
    chat_template: str | None = None  # model
    context_length: int | None = None  # model
    projection_dim: int | None = None  # mmproj: what the projector outputs (from tensor shapes)
    projector_type: str | None = None  # mmproj
    image_size: int | None = None  # mmproj
    patch_size: int | None = None  # mmproj
    minicpmv_version: int | None = None  # mmproj
    metadata: dict[str, Any] = field(default_factory=dict, repr=False)  # scalar/string keys only
    tensor_names: frozenset[str] = field(default_factory=frozenset, repr=False)
    tensor_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict, repr=False)  # ggml order
    tensor_bytes: dict[str, int] = field(default_factory=dict, repr=False)  # data size of each tensor

    @property
    def image_tokens_hint(self) -> int | None:
        """Tokens one image costs at the base resolution (tiling models use more), after the
        projector's merging as clip_n_output_tokens counts it: Gemma 3 at 896 px is 256, not 4096."""
        if not (self.image_size and self.patch_size):
            return None
        n = (self.image_size // self.patch_size) ** 2
        proj = self.projector_type or ""
        if proj == "resampler":
            return int(self.metadata.get("clip.minicpmv_query_num") or 64)
        if proj in ("idefics3", "gemma3"):
            merge = int(self.metadata.get("clip.vision.projector.scale_factor") or (4 if proj == "gemma3" else 1))
            return n // (merge * merge)
        if proj in ("qwen2vl_merger", "qwen2.5vl_merger"):
            return n // 4
        return n


# GGUF value types (gguf.GGUFValueType) -> struct format; 8 = string, 9 = array
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_SHORT_ARRAY = 64  # longer arrays (token lists, scores, merges) are skipped, never decoded


class _Header:
    """A GGUF header read straight from the memory map.

    gguf's GGUFReader builds Python objects for every element of every array: for a real
    vocabulary (49k-262k tokens, scores, types) that took 37 s to 3 minutes on a busy machine,
    before llama.cpp was even reached. This walks past long arrays by their lengths instead."""

    def __init__(self, buf: Any):
        self._buf, self._pos, self._unpack = buf, 0, struct.unpack_from
        magic, version = self._read("<4sI")
        if version < 2:
            raise ValueError(f"GGUF version {version} is too old (need 2 or later)")
        n_tensors, n_kv = self._read("<QQ")
        self.metadata: dict[str, Any] = {}
        for _ in range(n_kv):
            key = self._string()
            (vtype,) = self._read("<I")
            value = self._value(vtype)
            if value is not None:
                self.metadata[key] = value
        self.tensors: list[tuple[str, tuple[int, ...], int, int]] = []  # name, ne (ggml order), type, offset
        for _ in range(n_tensors):
            name = self._string()
            (n_dims,) = self._read("<I")
            dims = self._read(f"<{n_dims}Q")
            ttype, offset = self._read("<IQ")
            self.tensors.append((name, tuple(int(d) for d in dims), ttype, offset))
        align = int(self.metadata.get("general.alignment") or 32)
        self.data_offset = -(-self._pos // align) * align

    def _read(self, fmt: str) -> tuple:
        values = self._unpack(fmt, self._buf, self._pos)
        self._pos += struct.calcsize(fmt)
        return values

    def _string(self, decode: bool = True) -> str | None:
        (n,) = self._read("<Q")
        if self._pos + n > len(self._buf):
            raise ValueError("string runs past the end of the file")
        raw = self._buf[self._pos : self._pos + n]
        self._pos += n
        return bytes(raw).decode("utf-8", "replace") if decode else None

    def _value(self, vtype: int) -> Any:
        if vtype in _SCALARS:
            return self._read(_SCALARS[vtype])[0]
        if vtype == 8:
            return self._string()
        if vtype != 9:
            raise ValueError(f"unknown GGUF value type {vtype}")
        etype, n = self._read("<IQ")
        if etype == 8:  # string arrays are only vocabularies and merges here: skip them
            for _ in range(n):
                self._string(decode=False)
            return None
        if etype not in _SCALARS:
            raise ValueError(f"unsupported GGUF array element type {etype}")
        width = struct.calcsize(_SCALARS[etype])
        if n > _SHORT_ARRAY:
            self._pos += n * width
            return None
        return list(self._read(f"<{n}{_SCALARS[etype][1]}"))


def _tensor_nbytes(ne: tuple[int, ...], ttype: int) -> int:
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    block, size = GGML_QUANT_SIZES[GGMLQuantizationType(ttype)]
    n = 1
    for d in ne:
        n *= d
    return n // block * size


def inspect_gguf(path: Path) -> GGUFInfo:
    """Read a GGUF header (memory-mapped) and classify it; ModelError if it is not a sound GGUF."""
    path = Path(path)
    if not path.exists():
        raise ModelError(f"{path}: file not found; check the path (or run `edge-t2t models list`)")
    if not path.is_file():
        raise ModelError(f"{path}: not a regular file; pass the .gguf file itself, not a directory")
    size = path.stat().st_size
    if size == 0:
        raise ModelError(f"{path}: empty file (0 bytes), probably an interrupted copy; copy it again")
    with open(path, "rb") as fh:
        magic = fh.read(4)
    if magic != GGUF_MAGIC:
        raise ModelError(
            f"{path}: not a GGUF file (starts with {magic!r}, expected b'GGUF'); "
            "pass a llama.cpp .gguf model (convert it with llama.cpp's convert_hf_to_gguf.py)"
        )

    import mmap

    try:
        with open(path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            header = _Header(buf)
            data_end = max(
                (header.data_offset + off + _tensor_nbytes(ne, tt) for _, ne, tt, off in header.tensors),
                default=header.data_offset,
            )
            del buf  # no view may outlive the map
    # A cut or damaged header: struct.error (short read), ValueError (our checks, and gguf's enum for an
    # unknown tensor type), OverflowError (a huge count), KeyError/TypeError (a type without a size, an
    # alignment that is not a number). 6,000 mutated headers of the test VLM raised the first three.
    except (OSError, struct.error, ValueError, OverflowError, KeyError, TypeError) as exc:
        raise ModelError(
            f"{path}: truncated or corrupt GGUF ({size} bytes; {type(exc).__name__}: {exc}); "
            "download or copy the file again"
        ) from exc
    metadata = {k: v for k, v in header.metadata.items() if not k.startswith("GGUF.")}
    chat_template = metadata.get("tokenizer.chat_template")
    names = frozenset(t[0] for t in header.tensors)
    shapes = {t[0]: t[1] for t in header.tensors}
    nbytes = {name: _tensor_nbytes(ne, tt) for name, ne, tt, _ in header.tensors}
    if data_end > size:
        raise ModelError(
            f"{path}: truncated GGUF: its tensors need {data_end} bytes but the file has {size}; "
            "download or copy the file again"
        )

    arch = str(metadata.get("general.architecture") or "")
    # llama.cpp writes every mmproj with architecture "clip"; the tensor test covers odd converters.
    looks_like_projector = "token_embd.weight" not in names and any(n.startswith(("v.", "mm.")) for n in names)
    kind = "mmproj" if arch == "clip" or looks_like_projector else "model"
    info = GGUFInfo(
        path=path,
        kind=kind,
        architecture=arch,
        name=str(metadata.get("general.name") or ""),
        is_test_model=bool(metadata.get("edge_t2t.test_model", False)),
        size=size,
        file_type=metadata.get("general.file_type"),
        metadata=metadata,
        tensor_names=names,
        tensor_shapes=shapes,
        tensor_bytes=nbytes,
    )
    if kind == "model":
        info.embedding_length = metadata.get(f"{arch}.embedding_length")
        info.context_length = metadata.get(f"{arch}.context_length")
        info.chat_template = chat_template
    else:
        proj = metadata.get("clip.projector_type") or metadata.get("clip.vision.projector_type")
        if proj == "mlp" and "mm.3.weight" in names:
            proj = "mlp_norm"  # clip.cpp makes the same switch (Yi-style LLaVA)
        info.projector_type = str(proj) if proj else None
        info.image_size = metadata.get("clip.vision.image_size")
        info.patch_size = metadata.get("clip.vision.patch_size")
        info.minicpmv_version = metadata.get("clip.minicpmv_version")
        info.projection_dim = _projection_dim(info, metadata)
    return info


def _projection_dim(info: GGUFInfo, metadata: dict[str, Any]) -> int | None:
    """The projector's output width, from tensor shapes as clip_n_mmproj_embd computes it."""
    s = info.tensor_shapes
    source = {
        "mlp": ("mm.2.weight", 1),
        "mlp_norm": ("mm.3.bias", 0),
        "ldp": ("mm.model.mb_block.2.block.2.1.bias", 0),
        "ldpv2": ("mm.model.peg.0.bias", 0),
        "resampler": ("resampler.proj.weight", 0),
        "qwen2vl_merger": ("mm.2.bias", 0),
        "qwen2.5vl_merger": ("mm.2.bias", 0),
        "idefics3": ("mm.model.fc.weight", 1),
        "gemma3": ("mm.input_projection.weight", 0),  # used transposed by clip.cpp
    }.get(info.projector_type or "")
    if source and source[0] in s and len(s[source[0]]) > source[1]:
        return s[source[0]][source[1]]
    value = metadata.get("clip.vision.projection_dim")
    return int(value) if value is not None else None


def _missing_mmproj_tensors(info: GGUFInfo) -> list[str]:
    names = info.tensor_names
    proj = info.projector_type or ""
    need = list(_PROJECTOR_TENSORS.get(proj, ()))
    if proj in _PROJECTOR_TENSORS:
        need.append("v.patch_embd.weight")
        if proj in _VIT_WITH_POSITIONS:
            need.append("v.position_embd.weight")
        n_layer = int(info.metadata.get("clip.vision.block_count") or 0)
        for i in range(n_layer):
            p = f"v.blk.{i}"
            need += [f"{p}.attn_out.weight", f"{p}.ffn_down.weight"]
            if f"{p}.attn_qkv.weight" not in names:
                need += [f"{p}.attn_q.weight", f"{p}.attn_k.weight", f"{p}.attn_v.weight"]
    return [n for n in need if n not in names]


@dataclass(frozen=True)
class PairFixes:
    """The fix for a pair given the wrong way round, in the terms of the command that gave it."""

    swapped: str  # both files, each in the other's place
    model_is_mmproj: str  # a projector where the text model goes
    mmproj_is_model: str  # a text model where the projector goes


# caption, index, search --image and the Dask workers take the pair as --vlm/--mmproj (or the environment)
FLAG_FIXES = PairFixes(
    swapped="swap --vlm and --mmproj (or EDGE_T2T_VLM and EDGE_T2T_MMPROJ)",
    model_is_mmproj="pass the model .gguf as --vlm (EDGE_T2T_VLM) and this file as --mmproj",
    mmproj_is_model="pass the matching mmproj-*.gguf as --mmproj (EDGE_T2T_MMPROJ)",
)


def check_pair(model: Path, mmproj: Path, fixes: PairFixes = FLAG_FIXES) -> tuple[GGUFInfo, GGUFInfo]:
    """Validate a text model + mmproj pair; ModelError (naming the file and the fix) if unusable.
    `fixes`: how the command that was run takes the two files (default: --vlm/--mmproj)."""
    model, mmproj = Path(model), Path(mmproj)
    m = inspect_gguf(model)
    p = inspect_gguf(mmproj)
    if m.kind == "mmproj" and p.kind == "model":
        raise ModelError(f"{model} is a vision projector (mmproj) and {mmproj} is a text model: {fixes.swapped}")
    if m.kind == "mmproj":
        raise ModelError(f"{model} is a vision projector (mmproj), not a text model; {fixes.model_is_mmproj}")
    if p.kind == "model":
        raise ModelError(f"{mmproj} is a text model, not a vision projector (mmproj); {fixes.mmproj_is_model}")
    if not m.embedding_length:
        raise ModelError(
            f"{model}: no {m.architecture or '<arch>'}.embedding_length in its metadata; "
            "re-convert it with a current llama.cpp convert_hf_to_gguf.py"
        )
    if p.metadata.get("clip.has_vision_encoder") is False:
        raise ModelError(f"{mmproj}: this mmproj has no vision encoder (audio only?); pass an image mmproj")
    if not p.projector_type:
        raise ModelError(
            f"{mmproj}: no clip.projector_type in its metadata; re-convert it with a current llama.cpp"
        )
    missing = _missing_mmproj_tensors(p)
    if missing:
        shown = ", ".join(missing[:5]) + (f" (+{len(missing) - 5} more)" if len(missing) > 5 else "")
        raise ModelError(
            f"{mmproj}: the '{p.projector_type}' projector is missing required tensors: {shown}; "
            "this mmproj is incomplete or from another converter - download the mmproj that matches the model"
        )
    if p.projection_dim is not None and p.projection_dim != m.embedding_length:
        raise ModelError(
            f"{mmproj} projects images to {p.projection_dim} dimensions but {model} expects "
            f"{m.embedding_length}: they are not a pair; use the mmproj released with this model"
        )
    return m, p
