"""The generated test VLM: deterministic, small, marked as a test model, rebuilt only when needed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from edge_t2t.describe import testvlm
from edge_t2t.describe.gguf_check import check_pair, inspect_gguf


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("test-vlm")
    return out, testvlm.build_test_vlm(out, seed=0)


def test_build_writes_all_files_with_manifest(built):
    out, manifest = built
    assert manifest["test_model"] is True
    assert manifest["seed"] == 0
    expected = {testvlm.MODEL_FILE, testvlm.MMPROJ_FILE, *testvlm.QUANT_FILES.values()}
    assert set(manifest["files"]) == expected
    on_disk = json.loads((out / testvlm.MANIFEST).read_text())
    assert on_disk["files"] == manifest["files"]
    for name, entry in manifest["files"].items():
        path = out / name
        assert path.stat().st_size == entry["size"]
        assert testvlm.sha256_file(path) == entry["sha256"]
        assert entry["size"] < 5 * 1024 * 1024, f"{name} should stay a few MB at most"
    assert manifest["versions"]["gguf"] != "not installed"
    assert manifest["dimensions"]["image_tokens"] == 64


def test_quantized_files_are_smaller(built):
    _, manifest = built
    sizes = {name: entry["size"] for name, entry in manifest["files"].items()}
    f16 = sizes[testvlm.MODEL_FILE]
    assert sizes[testvlm.QUANT_FILES["Q8_0"]] < f16
    assert sizes[testvlm.QUANT_FILES["Q4_K_M"]] < sizes[testvlm.QUANT_FILES["Q8_0"]]


def test_metadata_marks_test_model_and_vocab(built):
    out, _ = built
    model, mmproj = check_pair(out / testvlm.MODEL_FILE, out / testvlm.MMPROJ_FILE)
    for info in (model, mmproj):
        assert info.is_test_model
        assert "TEST MODEL" in info.name and "seed 0" in info.name
    assert model.architecture == "llama" and mmproj.architecture == "clip"
    assert mmproj.projector_type == "mlp"
    assert mmproj.projection_dim == model.embedding_length == 256
    assert "USER:" in model.chat_template and "ASSISTANT:" in model.chat_template

    from gguf import GGUFReader, TokenType

    reader = GGUFReader(out / testvlm.MODEL_FILE)
    tokens = reader.fields["tokenizer.ggml.tokens"].contents()
    types = reader.fields["tokenizer.ggml.token_type"].contents()
    assert reader.fields["tokenizer.ggml.model"].contents() == "llama"
    assert 300 <= len(tokens) <= 600
    byte_ids = [i for i, t in enumerate(tokens) if t.startswith("<0x") and len(t) == 6]
    assert len(byte_ids) == 256
    assert all(types[i] == TokenType.BYTE for i in byte_ids)
    assert "<0x0A>" in tokens and tokens[:3] == ["<unk>", "<s>", "</s>"]


def test_quantized_model_keeps_test_marker(built):
    out, _ = built
    info = inspect_gguf(out / testvlm.QUANT_FILES["Q4_K_M"])
    assert info.is_test_model and info.kind == "model"
    assert info.file_type != inspect_gguf(out / testvlm.MODEL_FILE).file_type


def test_same_seed_is_byte_identical_and_other_seed_differs(built, tmp_path):
    _, first = built
    again = testvlm.build_test_vlm(tmp_path / "again", seed=0)
    assert again["reused"] is False
    assert {k: v["sha256"] for k, v in again["files"].items()} == {k: v["sha256"] for k, v in first["files"].items()}
    other = testvlm.build_test_vlm(tmp_path / "other", seed=1)
    for name in (testvlm.MODEL_FILE, testvlm.MMPROJ_FILE):
        assert other["files"][name]["sha256"] != first["files"][name]["sha256"]
    assert "seed 1" in inspect_gguf(tmp_path / "other" / testvlm.MODEL_FILE).name


def test_rebuild_only_when_needed(tmp_path):
    out = tmp_path / "vlm"
    first = testvlm.build_test_vlm(out, seed=3)
    assert first["reused"] is False
    assert testvlm.build_test_vlm(out, seed=3)["reused"] is True
    # a damaged file (same size, other bytes) is noticed through its sha256
    model = out / testvlm.MODEL_FILE
    data = bytearray(model.read_bytes())
    data[-1] ^= 0xFF
    model.write_bytes(bytes(data))
    rebuilt = testvlm.build_test_vlm(out, seed=3)
    assert rebuilt["reused"] is False
    assert testvlm.sha256_file(model) == first["files"][testvlm.MODEL_FILE]["sha256"]
    # another seed or force rebuilds too
    assert testvlm.build_test_vlm(out, seed=4)["reused"] is False
    assert testvlm.build_test_vlm(out, seed=4, force=True)["reused"] is False
    assert not list(out.glob(".*.tmp")), "no temp files left behind"


# ---- shape-true models (vlm_shapes.SHAPES) and the streamed builder ---------------------------

import re  # noqa: E402

from edge_t2t.describe.vlm_shapes import SHAPES, get_shape  # noqa: E402


def _shared_shapes(shared_data: Path) -> dict[str, dict]:
    data = json.loads((shared_data / "vlm" / "vlm_shapes.json").read_text())
    return {entry["hf_repo"]: entry for entry in data}


def _billions(text: str) -> float:
    value, unit = re.search(r"([\d.]+)\s*([MB])", text).groups()
    return float(value) / (1000 if unit == "M" else 1)


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_shape_matches_the_shared_model_facts(name, shared_data):
    """Every hyper-parameter the builder writes is the one ../shared/data/vlm records for the model."""
    shape = SHAPES[name]
    facts = _shared_shapes(shared_data)[shape.model_card.split(" ")[0]]
    t, v, ft, fv = shape.text, shape.vision, facts["text"], facts["vision"]
    assert (t.arch, t.n_layer, t.n_embd, t.n_ff, t.n_head, t.n_head_kv, t.hd, t.n_vocab, t.n_ctx_train) == (
        ft["general_architecture"], ft["n_layer"], ft["n_embd"], ft["n_ff"], ft["n_head"], ft["n_head_kv"],
        ft["head_dim"], ft["vocab_size"], ft["context_length"])
    assert t.tied_output == ft["tie_word_embeddings"]
    assert t.rope_theta == (ft["rope_theta"] or 10000.0)  # null: llama.cpp's default applies
    stored_blocks = fv.get("n_layer_gguf_block_count") or fv["n_layer"]
    assert (v.projector, v.image_size, v.patch_size, v.n_layer, v.n_embd, v.n_ff, v.n_head) == (
        fv["projector_type"], fv["image_size"], fv["patch_size"], stored_blocks, fv["hidden"], fv["n_ff"], fv["n_head"])
    total = testvlm.shape_params(shape)["total"] / 1e9
    assert total == pytest.approx(_billions(facts["params"]["total"]), rel=0.03)


def test_full_vocab_is_real_size_plausible_and_marks_specials():
    from gguf import TokenType

    shape = SHAPES["qwen2.5-vl-3b"]
    tokens, scores, types, eos = testvlm.build_full_vocab(shape.text.n_vocab, shape.specials, shape.eos)
    assert len(tokens) == len(set(tokens)) == len(scores) == len(types) == 151936
    assert tokens[eos] == "<|im_end|>" and types[eos] == TokenType.CONTROL
    assert {tokens[i] for i, k in enumerate(types) if k == TokenType.CONTROL} >= set(shape.specials)
    assert sum(k == TokenType.BYTE for k in types) == 256
    assert testvlm.reserved_tokens(shape) == sum(k != TokenType.NORMAL for k in types)
    wordlike = sum(bool(re.fullmatch("\u2581?[a-zA-Z]+", tok)) for tok in tokens)
    assert wordlike / len(tokens) > 0.95
    with pytest.raises(testvlm.ModelError):
        testvlm.build_full_vocab(100, shape.specials)


@pytest.fixture(scope="module")
def tiny_shape(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("shape") / "tiny-qwen2.5-vl"
    return out, testvlm.build_shape("tiny-qwen2.5-vl", out)


def test_shape_build_writes_one_model_per_precision_and_an_mmproj(tiny_shape):
    out, manifest = tiny_shape
    assert manifest["test_model"] is True and manifest["reused"] is False
    names = testvlm.shape_files("tiny-qwen2.5-vl")
    assert manifest["models"] == {p: names[p] for p in testvlm.SHAPE_PRECISIONS}
    assert set(manifest["files"]) == {*manifest["models"].values(), names["mmproj"]}
    types = set()
    for name in manifest["models"].values():
        info = inspect_gguf(out / name)
        assert info.kind == "model" and info.is_test_model and info.architecture == "qwen2vl"
        assert info.metadata["edge_t2t.family"] == "qwen2.5-vl"
        types.add(info.file_type)
    assert len(types) == 3
    sizes = [manifest["files"][manifest["models"][p]]["size"] for p in ("F16", "Q8_0", "Q4_K_M")]
    assert sizes == sorted(sizes, reverse=True)
    model, mmproj = check_pair(out / names["F16"], out / names["mmproj"])
    assert mmproj.kind == "mmproj" and mmproj.projector_type == "qwen2.5vl_merger" and mmproj.is_test_model
    assert mmproj.projection_dim == model.embedding_length
    assert mmproj.image_tokens_hint == (112 // 14) ** 2 // 4  # after the 2x2 merger, as clip.cpp counts
    assert manifest["params"]["total"] == testvlm.shape_params(get_shape("tiny-qwen2.5-vl"))["total"]
    assert json.loads((out / testvlm.MANIFEST).read_text())["files"] == manifest["files"]


def test_shape_build_is_reused_deterministic_and_seeded(tiny_shape, tmp_path):
    out, first = tiny_shape
    assert testvlm.build_shape("tiny-qwen2.5-vl", out)["reused"] is True
    names = testvlm.shape_files("tiny-qwen2.5-vl")
    testvlm.build_shape("tiny-qwen2.5-vl", tmp_path / "again", precisions=("F16",))
    for key in ("F16", "mmproj"):
        assert testvlm.sha256_file(tmp_path / "again" / names[key]) == testvlm.sha256_file(out / names[key])
    other = testvlm.build_shape("tiny-qwen2.5-vl", tmp_path / "other", precisions=("F16",), seed=1)
    assert other["reused"] is False
    assert testvlm.sha256_file(tmp_path / "other" / names["F16"]) != testvlm.sha256_file(out / names["F16"])
    # a request for more precisions than were built is not "up to date"
    assert testvlm.build_shape("tiny-qwen2.5-vl", tmp_path / "again", precisions=("F16", "Q8_0"))["reused"] is False


def test_quantized_only_build_drops_its_f16_source(tmp_path):
    manifest = testvlm.build_shape("tiny-nanollava", tmp_path, precisions=("Q4_K_M",))
    names = testvlm.shape_files("tiny-nanollava")
    assert (tmp_path / names["Q4_K_M"]).is_file() and (tmp_path / names["mmproj"]).is_file()
    assert not (tmp_path / names["F16"]).exists()
    assert set(manifest["models"]) == {"Q4_K_M"}
    assert not list(tmp_path.glob(".*.tmp"))


def test_bad_shape_and_precision_are_user_errors(tmp_path):
    from edge_t2t.errors import EdgeT2TError

    with pytest.raises(EdgeT2TError, match="unknown shape"):
        testvlm.build_shape("llava-99b", tmp_path)
    with pytest.raises(EdgeT2TError, match="unknown precision"):
        testvlm.build_shape("tiny-nanollava", tmp_path, precisions=("Q3_K",))


@pytest.mark.slow
def test_real_size_model_is_streamed_and_llama_cpp_loads_it(tmp_path):
    """SmolVLM-256M at its real shapes: written without holding the model in memory, accepted by
    the header check, and loaded by llama.cpp and libmtmd (the loaders refuse any tensor they do not
    expect or miss one they need)."""
    import tracemalloc

    shape = SHAPES["smolvlm-256m"]
    names = testvlm.shape_files(shape.name)
    tracemalloc.start()
    try:
        testvlm.write_shape_text_model(tmp_path / names["F16"], shape)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    size = (tmp_path / names["F16"]).stat().st_size
    assert size > 300e6 and peak < size / 4, f"peak {peak / 1e6:.0f} MB while writing {size / 1e6:.0f} MB"
    testvlm.write_shape_mmproj(tmp_path / names["mmproj"], shape)

    from edge_t2t.describe.vlm import VLM, VLMConfig

    with VLM(VLMConfig(tmp_path / names["F16"], tmp_path / names["mmproj"], n_ctx=512, n_threads=1)) as vlm:
        assert vlm.family == "mtmd" and vlm.is_test_model
        llama = vlm._llama
        assert llama.n_vocab() == shape.text.n_vocab
        assert llama.tokenize(b"<end_of_utterance>", add_bos=False, special=True) == [
            llama.token_eos()]
        out = llama.create_completion("storage tanks near a road", max_tokens=4, temperature=0.0)
        assert out["usage"]["completion_tokens"] == 4


def _cli(*args: str):
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "edge_t2t", "models", "build-test-vlm", *args],
                          capture_output=True, text=True, timeout=600)


def test_cli_shape_list_json_names_every_shape_with_its_parameters():
    proc = _cli("--shape", "list", "--json")
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    by_name = {r["name"]: r for r in rows}
    assert set(SHAPES) <= set(by_name)
    for name, shape in SHAPES.items():
        assert by_name[name]["params"] == testvlm.shape_params(shape)["total"]
        assert by_name[name]["source"] == shape.model_card
    assert 0.25e9 <= by_name["smolvlm-256m"]["params"] <= 0.5e9
    assert 1e9 <= by_name["nanollava-1.5"]["params"] <= 2e9
    assert 3e9 <= by_name["qwen2.5-vl-3b"]["params"] <= 4.5e9
    text = _cli("--shape", "list")
    assert "llava-1.5-7b" in text.stdout and "liuhaotian/llava-v1.5-7b" in text.stdout


def test_cli_builds_a_shape_and_refuses_bad_input(tmp_path):
    proc = _cli("--shape", "tiny-moondream2", "--precision", "Q8_0", "--out", str(tmp_path), "--json")
    assert proc.returncode == 0, proc.stderr
    manifest = json.loads(proc.stdout)
    assert manifest["models"] == {"Q8_0": "tiny-moondream2.Q8_0.gguf"} and manifest["test_model"] is True
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "manifest.json", "tiny-moondream2-mmproj.F16.gguf", "tiny-moondream2.Q8_0.gguf"]
    bad = _cli("--shape", "llava-99b", "--out", str(tmp_path / "x"))
    assert bad.returncode == 2 and "unknown shape 'llava-99b'" in bad.stderr and len(bad.stderr.splitlines()) == 1
    assert not (tmp_path / "x").exists()
    tiny = _cli("--precision", "F16", "--out", str(tmp_path / "y"))
    assert tiny.returncode == 2 and "--precision applies to --shape" in tiny.stderr
