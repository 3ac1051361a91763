"""Building the ONNX embedder from a sentence-transformers folder, without torch."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest

from edge_t2t.cli import main as cli_main
from edge_t2t.embed.onnx_build import (
    BUILDER_VERSION,
    build_embedder,
    default_source_dir,
    is_up_to_date,
    read_safetensors,
    read_source,
    sha256_file,
)
from edge_t2t.errors import ModelError


@pytest.fixture(scope="session")
def source() -> Path:
    return default_source_dir()


@pytest.fixture(scope="session")
def built(tmp_path_factory, source) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("embedder")
    return out, build_embedder(source, out)


def _mirror(source: Path, dst: Path, replace: dict[str, object] | None = None) -> Path:
    """dst with symlinks to every file of source, except `replace` (relative path -> JSON or bytes)."""
    replace = replace or {}
    for f in source.rglob("*"):
        if not f.is_file():
            continue
        rel = f.relative_to(source)
        target = dst / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        if str(rel) in replace:
            value = replace[str(rel)]
            target.write_bytes(value if isinstance(value, bytes) else json.dumps(value).encode())
        else:
            target.symlink_to(f)
    return dst


def _write_safetensors(path: Path, tensors: dict[str, tuple[str, np.ndarray]]) -> None:
    header, blobs, offset = {}, [], 0
    for name, (dtype, arr) in tensors.items():
        raw = arr.tobytes()
        header[name] = {"dtype": dtype, "shape": list(arr.shape), "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    head = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(head)) + head + b"".join(blobs))


# -- the build ---------------------------------------------------------------------------------


def test_build_writes_all_files_with_hashes(built, source):
    out, manifest = built
    assert manifest["skipped"] is False
    assert manifest["name"] == "all-MiniLM-L6-v2"
    assert (manifest["dim"], manifest["pooling"], manifest["max_tokens"], manifest["normalize"]) == (384, "mean", 256, True)
    assert manifest["builder_version"] == BUILDER_VERSION
    assert set(manifest["versions"]) == {"onnx", "onnxruntime", "tokenizers"}
    assert set(manifest["onnx"].values()) == {"all-MiniLM-L6-v2.fp32.onnx", "all-MiniLM-L6-v2.int8.onnx"}
    for name, digest in manifest["files"].items():
        assert sha256_file(out / name) == digest
    assert manifest["source_weights_sha256"] == sha256_file(source / "model.safetensors")
    assert json.loads((out / "manifest.json").read_text()) == {k: v for k, v in manifest.items() if k != "skipped"}
    assert not list(out.glob("*.tmp*"))
    # int8 weights are a quarter of fp32; the fp32 word-embedding table keeps it above that.
    assert (out / manifest["onnx"]["int8"]).stat().st_size < 0.75 * (out / manifest["onnx"]["fp32"]).stat().st_size


def test_graph_has_dynamic_batch_and_sequence(built):
    import onnx

    out, manifest = built
    model = onnx.load(str(out / manifest["onnx"]["fp32"]), load_external_data=False)
    dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in model.graph.input}
    assert dims == {"input_ids": ["batch", "sequence"], "attention_mask": ["batch", "sequence"]}
    assert [o.name for o in model.graph.output] == ["token_embeddings", "sentence_embedding"]
    ops = {n.op_type for n in model.graph.node}
    assert {"LayerNormalization", "Erf", "Softmax"} <= ops


def test_int8_graph_quantises_per_row(built):
    """No per-call (per-tensor dynamic) activation quantisation: every integer GEMM takes codes made
    by a per-axis QuantizeLinear, and Q, K, V share one GEMM per layer."""
    import onnx

    out, manifest = built
    model = onnx.load(str(out / manifest["onnx"]["int8"]))
    ops = [n.op_type for n in model.graph.node]
    assert "DynamicQuantizeLinear" not in ops and "MatMul" in ops  # attention products stay fp32
    assert ops.count("MatMulInteger") == 4 * manifest["layers"]
    quantizers = {n.output[0]: n for n in model.graph.node if n.op_type == "QuantizeLinear"}
    for node in model.graph.node:
        if node.op_type == "MatMulInteger":
            q = quantizers[node.input[0]]
            assert {a.name: a.i for a in q.attribute} == {"axis": 0}
    weights = {i.name: i for i in model.graph.initializer}
    assert weights["l0_qkv.weight_int8"].dims == [384, 3 * 384] and weights["l0_qkv.weight_int8"].data_type == onnx.TensorProto.INT8
    assert manifest["int8_scales"] == {"activations": "per-row", "weights": "per-column", "word_embeddings": "per-row"}


def test_int8_word_table_is_int8_with_a_scale_per_row(built, source):
    """The word-embedding table (84% of the old int8 file) is stored as int8 codes with one scale
    per row, and dequantizes to within half a step of the source table."""
    import onnx
    from onnx import numpy_helper

    out, manifest = built
    model = onnx.load(str(out / manifest["onnx"]["int8"]))
    weights = {i.name: i for i in model.graph.initializer}
    assert not any(i.data_type == onnx.TensorProto.FLOAT and i.dims == [30522, 384] for i in weights.values())
    codes = numpy_helper.to_array(weights["embeddings.word_embeddings.weight_int8"])
    scale = numpy_helper.to_array(weights["embeddings.word_embeddings.row_scale"])
    assert codes.dtype == np.int8 and codes.shape == (30522, 384) and scale.shape == (30522, 1)
    table = read_safetensors(source / "model.safetensors")["embeddings.word_embeddings.weight"]
    assert np.abs(codes * scale - table).max() <= scale.max() / 2 + 1e-7
    assert (np.abs(codes).max(axis=1) == 127).mean() > 0.99  # each row uses its full range
    # the int8 file is now mostly int8: under 30% of fp32 (it was 65% with a float32 table)
    assert (out / manifest["onnx"]["int8"]).stat().st_size < 0.30 * (out / manifest["onnx"]["fp32"]).stat().st_size


def test_int8_rows_are_independent_in_the_raw_graph(built):
    """Straight through onnxruntime: a sequence padded inside a batch gives the same pooled vector
    (and token rows) as alone."""
    import onnxruntime as ort

    out, manifest = built
    sess = ort.InferenceSession(str(out / manifest["onnx"]["int8"]), providers=["CPUExecutionProvider"])
    short = [101, 2307, 2058, 1037, 2314, 102]
    long = [101] + [2000 + i for i in range(40)] + [102]
    ids = np.zeros((2, len(long)), np.int64)
    ids[0, : len(short)], ids[1] = short, long
    mask = (ids != 0).astype(np.int64)
    tok_b, pooled_b = sess.run(None, {"input_ids": ids, "attention_mask": mask})
    alone = np.array([short], np.int64)
    tok_a, pooled_a = sess.run(None, {"input_ids": alone, "attention_mask": np.ones_like(alone)})
    np.testing.assert_allclose(pooled_b[0], pooled_a[0], atol=1e-5)
    np.testing.assert_allclose(tok_b[0, : len(short)], tok_a[0], atol=1e-4)


def test_built_model_matches_reference(built, reference):
    from edge_t2t.embed.embedder import Embedder

    texts, ref = reference[0][:20], reference[1][:20]
    vecs = Embedder(built[0], precision="fp32", threads=2).embed(texts)
    assert float((vecs * ref).sum(1).min()) >= 0.9999
    vecs = Embedder(built[0], precision="int8", threads=2).embed(texts)
    assert float((vecs * ref).sum(1).min()) >= 0.97


def test_second_build_is_skipped_and_force_check(built, source, capsys):
    out, manifest = built
    before = {f: (out / f).stat().st_mtime_ns for f in manifest["files"]}
    again = build_embedder(source, out)
    assert again["skipped"] is True
    assert {f: (out / f).stat().st_mtime_ns for f in manifest["files"]} == before
    assert cli_main(["models", "build-embedder", "--out", str(out)]) == 0
    assert "up to date" in capsys.readouterr().out
    assert is_up_to_date(source, out)


def test_stale_manifest_is_not_up_to_date(built, source, tmp_path):
    out, manifest = built
    copy = tmp_path / "copy"
    copy.mkdir()
    for f in manifest["files"]:
        (copy / f).symlink_to(out / f)
    (copy / "manifest.json").write_text(json.dumps({**manifest, "builder_version": "0"}))
    assert not is_up_to_date(source, copy)
    (copy / "manifest.json").write_text(json.dumps({**manifest, "source_weights_sha256": "0" * 64}))
    assert not is_up_to_date(source, copy)
    (copy / "manifest.json").write_text(json.dumps(manifest))
    assert is_up_to_date(source, copy)


def test_cls_pooling_builds_and_pools_first_token(source, tmp_path):
    import onnxruntime as ort

    pooling = json.loads((source / "1_Pooling" / "config.json").read_text())
    pooling.update(pooling_mode_mean_tokens=False, pooling_mode_cls_token=True)
    src = _mirror(source, tmp_path / "src", {"1_Pooling/config.json": pooling})
    manifest = build_embedder(src, tmp_path / "out", name="cls-test")
    assert manifest["pooling"] == "cls" and manifest["name"] == "cls-test"
    sess = ort.InferenceSession(str(tmp_path / "out" / "cls-test.fp32.onnx"), providers=["CPUExecutionProvider"])
    ids = np.array([[101, 2307, 102, 0], [101, 2307, 3720, 102]], dtype=np.int64)
    mask = (ids != 0).astype(np.int64)
    tokens, pooled = sess.run(None, {"input_ids": ids, "attention_mask": mask})
    np.testing.assert_allclose(pooled, tokens[:, 0], atol=1e-6)


# -- unsupported sources -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("model_type", "gpt2", "model_type 'gpt2'"),
        ("hidden_act", "relu", "hidden_act 'relu'"),
        ("position_embedding_type", "relative_key", "relative_key"),
    ],
)
def test_unsupported_architecture(source, tmp_path, field, value, message):
    cfg = json.loads((source / "config.json").read_text())
    cfg[field] = value
    src = _mirror(source, tmp_path / "src", {"config.json": cfg})
    with pytest.raises(ModelError, match=message) as err:
        build_embedder(src, tmp_path / "out")
    assert "config.json" in str(err.value)
    assert not (tmp_path / "out").exists()


def test_unsupported_pooling(source, tmp_path):
    pooling = json.loads((source / "1_Pooling" / "config.json").read_text())
    pooling.update(pooling_mode_mean_tokens=False, pooling_mode_lasttoken=True)
    src = _mirror(source, tmp_path / "src", {"1_Pooling/config.json": pooling})
    with pytest.raises(ModelError, match=r"1_Pooling/config\.json: pooling lasttoken"):
        read_source(src)


def test_missing_tensor_names_the_file_and_tensor(source, tmp_path):
    tiny = tmp_path / "tiny.safetensors"
    _write_safetensors(tiny, {"embeddings.word_embeddings.weight": ("F32", np.zeros((4, 384), np.float32))})
    src = _mirror(source, tmp_path / "src", {"model.safetensors": tiny.read_bytes()})
    with pytest.raises(ModelError, match=r"model\.safetensors: tensor 'embeddings\.position_embeddings\.weight' is missing"):
        build_embedder(src, tmp_path / "out")


def test_not_a_sentence_transformers_folder(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ModelError, match=r"modules\.json|model\.safetensors|tokenizer\.json"):
        build_embedder(tmp_path, tmp_path / "out")
    with pytest.raises(ModelError, match="not a directory"):
        build_embedder(tmp_path / "config.json", tmp_path / "out")


def test_modules_json_must_be_a_module_list(source, tmp_path):
    src = _mirror(source, tmp_path / "src", {"modules.json": {"not": "a list"}})
    with pytest.raises(ModelError, match=r"modules\.json is not a list"):
        read_source(src)


def test_cli_reports_unsupported_model(source, tmp_path, capsys):
    cfg = json.loads((source / "config.json").read_text())
    cfg["model_type"] = "gpt2"
    src = _mirror(source, tmp_path / "src", {"config.json": cfg})
    rc = cli_main(["models", "build-embedder", "--from", str(src), "--out", str(tmp_path / "out")])
    assert rc == ModelError.exit_code
    assert "gpt2" in capsys.readouterr().err


# -- safetensors reader ---------------------------------------------------------------------------


def test_read_safetensors_dtypes(tmp_path):
    a = np.arange(6, dtype=np.float32).reshape(2, 3) / 7
    h = np.array([1.5, -2.25], dtype=np.float16)
    bf = (np.array([3.0, -0.5], dtype=np.float32).view(np.uint32) >> 16).astype(np.uint16)
    i = np.array([[0, 1, 2]], dtype=np.int64)
    path = tmp_path / "t.safetensors"
    _write_safetensors(path, {"a": ("F32", a), "h": ("F16", h), "bf": ("BF16", bf), "i": ("I64", i)})
    got = read_safetensors(path)
    np.testing.assert_array_equal(got["a"], a)
    np.testing.assert_array_equal(got["h"], h.astype(np.float32))
    np.testing.assert_array_equal(got["bf"], [3.0, -0.5])
    np.testing.assert_array_equal(got["i"], i)
    assert got["h"].dtype == np.float32


def test_read_safetensors_rejects_garbage(tmp_path):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(struct.pack("<Q", 10**9) + b"{}")
    with pytest.raises(ModelError, match="bad.safetensors"):
        read_safetensors(path)


def test_models_list_json(built, monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("EDGE_T2T_EMBEDDER", str(built[0]))
    monkeypatch.setenv("EDGE_T2T_MODELS_DIR", str(tmp_path))
    assert cli_main(["models", "list", "--json"]) == 0
    found = json.loads(capsys.readouterr().out)
    assert found["embedder"]["manifest"]["name"] == "all-MiniLM-L6-v2"
    assert found["test_vlm"]["manifest"] is None and found["user_vlm"]["gguf"] == []


def test_models_cli_build_test_vlm_and_list(tmp_path, monkeypatch, capsys):
    out = tmp_path / "test-vlm"
    assert cli_main(["models", "build-test-vlm", "--out", str(out), "--seed", "3"]) == 0
    printed = capsys.readouterr().out
    manifest = json.loads((out / "manifest.json").read_text())
    for name in manifest["files"]:
        assert name in printed and (out / name).is_file()
    assert "built" in printed and "seed 3" in printed
    assert cli_main(["models", "build-test-vlm", "--out", str(out), "--seed", "3"]) == 0
    assert "up to date" in capsys.readouterr().out

    models = tmp_path / "models"
    (models / "vlm").mkdir(parents=True)
    (models / "vlm" / "mine.gguf").write_bytes(b"GGUF" + b"\0" * 60)
    out.rename(models / "test-vlm")
    monkeypatch.setenv("EDGE_T2T_MODELS_DIR", str(models))
    monkeypatch.setenv("EDGE_T2T_EMBEDDER", str(tmp_path / "no-embedder"))
    assert cli_main(["models", "list", "--json"]) == 0
    found = json.loads(capsys.readouterr().out)
    assert found["embedder"]["manifest"] is None
    assert found["test_vlm"]["manifest"]["seed"] == 3
    assert [Path(g["file"]).name for g in found["user_vlm"]["gguf"]] == ["mine.gguf"]
    assert cli_main(["models", "list"]) == 0
    text = capsys.readouterr().out
    assert "not built" in text and "mine.gguf" in text
