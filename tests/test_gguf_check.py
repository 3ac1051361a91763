"""gguf_check turns every bad-file case into a ModelError before llama.cpp can crash on it."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from edge_t2t.describe import testvlm
from edge_t2t.describe.gguf_check import check_pair, inspect_gguf
from edge_t2t.errors import ModelError

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("pair")
    model = testvlm.write_text_model(d / "model.gguf", seed=0)
    mmproj = testvlm.write_mmproj(d / "mmproj.gguf", seed=0)
    return model, mmproj


def test_valid_pair(pair):
    model, mmproj = pair
    m, p = check_pair(model, mmproj)
    assert (m.kind, p.kind) == ("model", "mmproj")
    assert m.embedding_length == 256 and m.context_length == 4096
    assert p.projection_dim == 256 and p.image_tokens_hint == 64
    assert m.size == model.stat().st_size
    assert "v.patch_embd.weight" in p.tensor_names


def _error(model: Path, mmproj: Path) -> str:
    with pytest.raises(ModelError) as info:
        check_pair(model, mmproj)
    return str(info.value)


def test_missing_file(pair, tmp_path):
    model, mmproj = pair
    msg = _error(tmp_path / "nope.gguf", mmproj)
    assert "nope.gguf" in msg and "not found" in msg


def test_zero_byte_file(pair, tmp_path):
    empty = tmp_path / "empty.gguf"
    empty.write_bytes(b"")
    msg = _error(empty, pair[1])
    assert "empty.gguf" in msg and "0 bytes" in msg


def test_not_a_gguf(pair, tmp_path):
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"PK\x03\x04" + b"\0" * 4096)
    msg = _error(pair[0], fake)
    assert "fake.gguf" in msg and "not a GGUF" in msg


@pytest.mark.parametrize("keep", [0.999, 0.5, 0.01])
def test_truncated_file(pair, tmp_path, keep):
    model, mmproj = pair
    cut = tmp_path / "cut.gguf"
    data = model.read_bytes()
    cut.write_bytes(data[: int(len(data) * keep)])
    msg = _error(cut, mmproj)
    assert "cut.gguf" in msg and "truncated" in msg


def test_swapped_pair(pair):
    model, mmproj = pair
    msg = _error(mmproj, model)
    assert "swap --vlm and --mmproj" in msg


def test_mmproj_as_model_and_model_as_mmproj(pair):
    model, mmproj = pair
    assert "not a text model" in _error(mmproj, mmproj)
    assert "not a vision projector" in _error(model, model)


def test_projection_dim_mismatch(pair, tmp_path):
    other = testvlm.write_mmproj(tmp_path / "mmproj-128.gguf", seed=0, projection_dim=128)
    msg = _error(pair[0], other)
    assert "128" in msg and "256" in msg and "mmproj-128.gguf" in msg


@pytest.mark.parametrize("tensor", ["mm.2.weight", "mm.0.bias", "v.blk.0.attn_q.weight", "v.position_embd.weight"])
def test_missing_projector_tensor(pair, tmp_path, tensor):
    broken = testvlm.write_mmproj(tmp_path / "broken.gguf", seed=0, omit_tensors=(tensor,))
    msg = _error(pair[0], broken)
    assert tensor in msg and "broken.gguf" in msg


def test_bad_pair_never_reaches_llama_cpp(pair, tmp_path):
    """An mmproj without mm.2.weight segfaults llama.cpp; VLM() must refuse it first (own process)."""
    broken = testvlm.write_mmproj(tmp_path / "no-mm2.gguf", seed=0, omit_tensors=("mm.2.weight",))
    code = textwrap.dedent(
        f"""
        import sys
        from edge_t2t.errors import ModelError
        from edge_t2t.describe.vlm import VLM, VLMConfig
        try:
            VLM(VLMConfig(model={str(pair[0])!r}, mmproj={str(broken)!r}))
        except ModelError as exc:
            print("MODEL_ERROR", exc)
        print("LLAMA_LOADED", "llama_cpp" in sys.modules)
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "MODEL_ERROR" in proc.stdout and "mm.2.weight" in proc.stdout
    assert "LLAMA_LOADED False" in proc.stdout


def test_inspect_reports_file_type_and_seed(tmp_path):
    info = inspect_gguf(testvlm.write_text_model(tmp_path / "m.gguf", seed=2))
    assert info.file_type == 1  # MOSTLY_F16
    assert info.is_test_model and "seed 2" in info.name
