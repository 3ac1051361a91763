"""The generated test VLM: deterministic, small, marked as a test model, rebuilt only when needed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from edge_t2t import testvlm
from edge_t2t.gguf_check import check_pair, inspect_gguf


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
