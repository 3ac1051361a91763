"""The llama.cpp adapter, through the real llama-cpp-python path, on the generated test VLM."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import helpers_media as hm
import pytest

from edge_t2t.describe import testvlm
from edge_t2t.describe.gguf_check import check_pair
from edge_t2t.describe.vlm import FAMILIES, VLM, VLMConfig, infer_family, quantize_gguf, resolve_vlm_paths
from edge_t2t.errors import ImageError, ModelError

SCHEMA = hm.BOUNDED_SCHEMA


@pytest.fixture(scope="module")
def images(rsicd_samples) -> dict[str, bytes]:
    return {name: hm.sample_png(rsicd_samples / name) for name in ("airport_17.jpg", "sparseresidential_268.jpg")}


@pytest.fixture(scope="module")
def model(vlm_dir):
    with VLM(VLMConfig(vlm_dir / testvlm.MODEL_FILE, vlm_dir / testvlm.MMPROJ_FILE, variant_mode="sequential")) as v:
        yield v


def test_loads_and_reports(model, vlm_dir):
    assert model.family == "llava-1.5"
    assert model.is_test_model and "TEST MODEL" in model.model_name
    assert model.supports_grammar
    assert model.model_sha256 == hashlib.sha256((vlm_dir / testvlm.MODEL_FILE).read_bytes()).hexdigest()
    assert model.mmproj_sha256 == hashlib.sha256((vlm_dir / testvlm.MMPROJ_FILE).read_bytes()).hexdigest()
    assert model.n_ctx >= 64 + 512
    assert model.n_threads == 1  # tiny model: single-threaded unless asked otherwise


def test_explicit_threads_and_context_are_used(vlm_dir):
    cfg = VLMConfig(vlm_dir / testvlm.MODEL_FILE, vlm_dir / testvlm.MMPROJ_FILE, n_threads=2, n_ctx=1024,
                    variant_mode="sequential")
    with VLM(cfg) as v:
        assert (v.n_threads, v.n_ctx) == (2, 1024)
        assert v._llama.n_ctx() == 1024


def test_generate_is_deterministic_and_depends_on_image(model, images):
    airport, residential = images["airport_17.jpg"], images["sparseresidential_268.jpg"]
    before = model.calls
    first = model.generate(airport, "Describe the image.", max_tokens=16)
    second = model.generate(airport, "Describe the image.", max_tokens=16)
    other = model.generate(residential, "Describe the image.", max_tokens=16)
    assert model.calls == before + 3
    assert isinstance(first, str) and first.strip()
    assert first == second
    assert other != first


def test_json_schema_output_parses(model, images):
    text = model.generate(images["airport_17.jpg"], "Describe the image as JSON.", json_schema=SCHEMA, max_tokens=200)
    obj = json.loads(text)
    assert set(SCHEMA["required"]) <= set(obj)
    assert obj["size"] in ("small", "medium", "large")
    assert len(obj["one_sentence"]) <= 40


def test_bad_image_bytes_raise_image_error(model):
    with pytest.raises(ImageError):
        model.generate(b"this is not an image", "Describe the image.", max_tokens=4)
    with pytest.raises(ImageError):
        model.generate(b"", "Describe the image.", max_tokens=4)


@pytest.mark.parametrize("ftype", ["Q8_0", "Q4_K_M"])
def test_quantized_variants_generate(vlm_dir, images, ftype):
    cfg = VLMConfig(vlm_dir / testvlm.QUANT_FILES[ftype], vlm_dir / testvlm.MMPROJ_FILE, variant_mode="sequential")
    with VLM(cfg) as v:
        out = v.generate(images["airport_17.jpg"], "Describe the image.", max_tokens=12)
        assert out.strip()
        obj = json.loads(v.generate(images["airport_17.jpg"], "JSON.", json_schema=SCHEMA, max_tokens=200))
        assert obj["size"] in ("small", "medium", "large")


def test_generic_mtmd_family_uses_gguf_template(vlm_dir, images):
    cfg = VLMConfig(vlm_dir / testvlm.MODEL_FILE, vlm_dir / testvlm.MMPROJ_FILE, family="mtmd", variant_mode="sequential")
    with VLM(cfg) as v:
        assert v.family == "mtmd"
        assert v.generate(images["airport_17.jpg"], "Describe the image.", max_tokens=8).strip()
    with pytest.raises(ModelError):
        v.generate(images["airport_17.jpg"], "closed", max_tokens=4)


def test_unknown_family_and_bad_pair_raise_model_error(vlm_dir):
    with pytest.raises(ModelError, match="unknown VLM family"):
        VLM(VLMConfig(vlm_dir / testvlm.MODEL_FILE, vlm_dir / testvlm.MMPROJ_FILE, family="nope"))
    with pytest.raises(ModelError, match="swap"):
        VLM(VLMConfig(vlm_dir / testvlm.MMPROJ_FILE, vlm_dir / testvlm.MODEL_FILE))


def test_infer_family_from_metadata(vlm_dir):
    m, p = check_pair(vlm_dir / testvlm.MODEL_FILE, vlm_dir / testvlm.MMPROJ_FILE)
    assert infer_family(m, p) == "llava-1.5"
    m.is_test_model = False
    m.name = "Moondream2"
    assert infer_family(m, p) == "moondream2"
    m.name = "some chat model"
    m.path, p.path = Path("chat.gguf"), Path("proj.gguf")  # "tiny-llava" in a file name means LLaVA
    assert infer_family(m, p) == "mtmd"  # has a chat template, no known name: generic handler
    m.chat_template = None
    assert infer_family(m, p) == "llava-1.5"  # LLaVA-style projector without a template
    p.projector_type = "resampler"
    assert infer_family(m, p) == "minicpm-v-2.6"
    p.projector_type = "qwen2.5vl_merger"
    assert infer_family(m, p) == "qwen2.5-vl"
    assert set(FAMILIES) >= {"llava-1.5", "llava-1.6", "bakllava", "moondream2", "nanollava",
                             "minicpm-v-2.6", "qwen2.5-vl", "mtmd"}


def test_quantize_rejects_mmproj_and_unknown_type(vlm_dir, tmp_path):
    with pytest.raises(ModelError, match="mmproj"):
        quantize_gguf(vlm_dir / testvlm.MMPROJ_FILE, tmp_path / "x.gguf", "Q8_0")
    with pytest.raises(ModelError, match="unknown quantization"):
        quantize_gguf(vlm_dir / testvlm.MODEL_FILE, tmp_path / "x.gguf", "Q9_X")
    assert not list(tmp_path.iterdir())


# ---- resolve_vlm_paths ---------------------------------------------------------------------------


@pytest.fixture
def models_home(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("EDGE_T2T_MODELS_DIR", str(tmp_path / "models"))
    monkeypatch.delenv("EDGE_T2T_VLM", raising=False)
    monkeypatch.delenv("EDGE_T2T_MMPROJ", raising=False)
    return tmp_path / "models"


def test_resolve_explicit_and_env(models_home, monkeypatch, vlm_dir):
    a, b = vlm_dir / testvlm.MODEL_FILE, vlm_dir / testvlm.MMPROJ_FILE
    assert resolve_vlm_paths(str(a), str(b)) == (a, b)
    monkeypatch.setenv("EDGE_T2T_VLM", str(a))
    monkeypatch.setenv("EDGE_T2T_MMPROJ", str(b))
    assert resolve_vlm_paths(None, None) == (a, b)


def test_resolve_discovers_pair_by_header(models_home, vlm_dir):
    user = models_home / "vlm"
    user.mkdir(parents=True)
    # neutral names: the mmproj is recognised by its GGUF header, not by "mmproj" in the name
    shutil.copy(vlm_dir / testvlm.MODEL_FILE, user / "b.gguf")
    shutil.copy(vlm_dir / testvlm.MMPROJ_FILE, user / "a.gguf")
    assert resolve_vlm_paths(None, None) == (user / "b.gguf", user / "a.gguf")
    shutil.copy(vlm_dir / testvlm.QUANT_FILES["Q8_0"], user / "c.gguf")
    with pytest.raises(ModelError, match="several text models"):
        resolve_vlm_paths(None, None)
    assert resolve_vlm_paths(str(user / "c.gguf"), None) == (user / "c.gguf", user / "a.gguf")


@pytest.mark.parametrize("command", ["index", "search"])
def test_cli_keeps_the_which_vlm_message(models_home, vlm_dir, tmp_path, capsys, command):
    """index and search fall back to 'no VLM' only when none is configured: two text models in
    models/vlm must reach the user as the precise 'pick one with --vlm' line, not a generic one."""
    from edge_t2t.cli import main

    user = models_home / "vlm"
    user.mkdir(parents=True)
    shutil.copy(vlm_dir / testvlm.MODEL_FILE, user / "b.gguf")
    shutil.copy(vlm_dir / testvlm.MMPROJ_FILE, user / "a.gguf")
    shutil.copy(vlm_dir / testvlm.QUANT_FILES["Q8_0"], user / "c.gguf")
    image = tmp_path / "x.png"
    image.write_bytes(b"not read")
    argv = (["index", str(tmp_path), "--index", str(tmp_path / "ix")] if command == "index"
            else ["search", "--image", str(image), "--index", str(tmp_path / "ix")])
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "several text models" in err and "--vlm" in err


def test_serve_starts_without_a_vlm_but_keeps_the_which_vlm_message(models_home, vlm_dir):
    """serve runs without a VLM when none is installed (search by example then covers indexed images
    only), but two text models in models/vlm are the precise 'pick one with --vlm' error, as for
    index and search: its narrowed except catches NoVLMError only."""
    from types import SimpleNamespace

    from edge_t2t.cli.serve import _vlm_config

    args = SimpleNamespace(vlm=None, mmproj=None)
    assert _vlm_config(args) is None  # models/vlm does not exist
    user = models_home / "vlm"
    user.mkdir(parents=True)
    assert _vlm_config(args) is None  # exists, empty
    shutil.copy(vlm_dir / testvlm.MODEL_FILE, user / "b.gguf")
    shutil.copy(vlm_dir / testvlm.MMPROJ_FILE, user / "a.gguf")
    assert _vlm_config(args).model == user / "b.gguf"
    shutil.copy(vlm_dir / testvlm.QUANT_FILES["Q8_0"], user / "c.gguf")
    with pytest.raises(ModelError, match="several text models .*pick one with --vlm"):
        _vlm_config(args)


def test_resolve_without_any_model_explains_how(models_home):
    with pytest.raises(ModelError) as info:
        resolve_vlm_paths(None, None)
    msg = str(info.value)
    for hint in ("models/vlm", "EDGE_T2T_VLM", "EDGE_T2T_MMPROJ", "--vlm", "--mmproj", "build-test-vlm"):
        assert hint in msg


def test_llama_cpp_load_failure_is_model_error(vlm_dir, tmp_path):
    """A file that passes gguf_check but that llama.cpp refuses: ModelError with llama.cpp's reason."""
    model = testvlm.write_text_model(tmp_path / "holey.gguf", seed=0, omit_tensors=("blk.1.ffn_down.weight",))
    with pytest.raises(ModelError) as info:
        VLM(VLMConfig(model, vlm_dir / testvlm.MMPROJ_FILE))
    msg = str(info.value)
    assert "holey.gguf" in msg and "blk.1.ffn_down.weight" in msg
