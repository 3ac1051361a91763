"""Bad model files: each must end the command with one clear line naming the file, a normal
non-zero exit (never a signal, never a traceback), and for GGUF files before llama.cpp is loaded.

Every run is a subprocess, so a segfault or abort inside llama.cpp / onnxruntime shows up as a
negative return code instead of taking pytest down. An atexit hook in the child reports whether
llama_cpp was imported, which proves the header check (gguf_check, `gguf` package) stopped the
file before llama.cpp could see it.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import helpers_media as hm
import pytest

PROBE = (
    "import atexit, sys\n"
    "atexit.register(lambda: print('LLAMA_LOADED=%s' % ('llama_cpp' in sys.modules), file=sys.stderr))\n"
    "from edge_t2t.cli import main\n"
    "sys.exit(main(sys.argv[1:]))\n"
)


def _run(args: list[str], env: dict) -> tuple[subprocess.CompletedProcess, bool]:
    res = subprocess.run([sys.executable, "-c", PROBE, *args], capture_output=True, text=True, env=env,
                         cwd=hm.ROOT, timeout=hm.HANG_S)  # fmt: skip
    loaded = "LLAMA_LOADED=True" in res.stderr
    return res, loaded


def _assert_clean_error(res: subprocess.CompletedProcess, names: list[str]) -> str:
    assert res.returncode > 0, f"rc {res.returncode} (negative = killed by a signal): {res.stderr[-2000:]}"
    assert not hm.has_traceback(res.stderr), res.stderr[-3000:]
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("edge-t2t: error:")]
    assert len(errors) == 1, res.stderr[-2000:]
    assert any(n in errors[0] for n in names), f"{errors[0]!r} names none of {names}"
    return errors[0]


@pytest.fixture(scope="module")
def bad(tmp_path_factory: pytest.TempPathFactory) -> dict:
    model, mmproj = hm.test_vlm_files()
    d = tmp_path_factory.mktemp("badmodels")
    files = {"model": model, "mmproj": mmproj, "dir": d}
    files["truncated"] = hm.truncate(model, d / "truncated.gguf", 0.6)
    files["truncated_mmproj"] = hm.truncate(mmproj, d / "truncated-mmproj.gguf", 0.6)
    files["header_only"] = hm.truncate(model, d / "header-only.gguf", 0.002)
    files["not_gguf"] = hm.text_named_image(d / "notes.gguf")
    files["empty"] = hm.zero_byte(d / "empty.gguf")
    from edge_t2t.describe import testvlm

    # A well-formed mmproj that projects to 128 dimensions, for a text model of 256.
    files["wrong_proj"] = testvlm.write_mmproj(d / "mmproj-128.gguf", 0, projection_dim=testvlm.TextDims().n_embd // 2)
    files["image"] = hm.make_png(d / "img.png", 3)
    files["env"] = hm.child_env(d / "cache")
    return files


CASES = {
    "truncated model": ("truncated", "mmproj", ["truncated.gguf"]),
    "truncated header": ("header_only", "mmproj", ["header-only.gguf"]),
    "truncated mmproj": ("model", "truncated_mmproj", ["truncated-mmproj.gguf"]),
    "not a GGUF": ("not_gguf", "mmproj", ["notes.gguf"]),
    "empty file": ("empty", "mmproj", ["empty.gguf"]),
    "mmproj as model": ("mmproj", "mmproj", ["tiny-llava-mmproj"]),
    "model as mmproj": ("model", "model", ["tiny-llava.F16.gguf"]),
    "swapped pair": ("mmproj", "model", ["tiny-llava-mmproj", "tiny-llava.F16.gguf"]),
    "projection size mismatch": ("model", "wrong_proj", ["mmproj-128.gguf"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_gguf_through_caption(bad: dict, case: str) -> None:
    m, p, names = CASES[case]
    res, llama_loaded = _run(["caption", str(bad["image"]), "--vlm", str(bad[m]), "--mmproj", str(bad[p]),
                              "--no-cache", "--json"], bad["env"])  # fmt: skip
    line = _assert_clean_error(res, names)
    assert not llama_loaded, f"llama.cpp was loaded before the bad file was refused: {line}"
    assert res.stdout.strip() == ""


@pytest.mark.parametrize("case", ["truncated model", "swapped pair", "projection size mismatch"])
def test_bad_gguf_through_index(bad: dict, case: str, tmp_path: Path) -> None:
    m, p, names = CASES[case]
    res, llama_loaded = _run(["index", str(bad["image"]), "--index", str(tmp_path / "idx"), "--vlm", str(bad[m]),
                              "--mmproj", str(bad[p]), "--no-progress", "--json"], bad["env"])  # fmt: skip
    assert res.returncode != 0 and res.returncode > 0, res.stderr[-2000:]
    assert not hm.has_traceback(res.stderr), res.stderr[-3000:]
    assert not llama_loaded
    text = res.stderr + res.stdout
    assert any(n in text for n in names), text[-2000:]


def test_header_check_is_what_refuses_them(bad: dict) -> None:
    """The same files, straight at gguf_check.check_pair (the guard vlm.VLM runs first)."""
    from edge_t2t.describe.gguf_check import check_pair
    from edge_t2t.errors import ModelError

    for case, (m, p, names) in CASES.items():
        with pytest.raises(ModelError) as err:
            check_pair(bad[m], bad[p])
        msg = str(err.value)
        assert "\n" not in msg and any(n in msg for n in names), f"{case}: {msg}"
    check_pair(bad["model"], bad["mmproj"])  # and the good pair passes


# -- the ONNX embedder ----------------------------------------------------------------------------
def _embedder_copy(tmp_path: Path, damage) -> Path:
    from edge_t2t import config

    src = config.embedder_dir()
    dst = tmp_path / "embedder"
    dst.mkdir()
    manifest = json.loads((src / "manifest.json").read_text())
    for name in [*manifest["files"], "manifest.json"]:
        shutil.copy(src / name, dst / name)
    damage(dst / manifest["onnx"]["int8"])
    return dst


def _captions_file(tmp_path: Path) -> Path:
    path = tmp_path / "caps.jsonl"
    path.write_text(json.dumps({"image": "a.png", "variants": ["a river crosses a forest"]}) + "\n")
    return path


def _inside_a_weight(path: Path, n: int) -> int:
    """An offset where `n` bytes lie inside one int8 weight tensor's raw data (found with onnx's own
    reader, not with the code under test): any byte there is a valid int8 weight."""
    import onnx

    data = path.read_bytes()
    model = onnx.load(str(path))
    for t in sorted(model.graph.initializer, key=lambda t: -len(t.raw_data)):
        if t.data_type == onnx.TensorProto.INT8 and len(t.raw_data) > 2 * n:
            start = data.find(t.raw_data[:256])
            assert start > 0 and data.find(t.raw_data[:256], start + 1) == -1, t.name  # one place only
            return start + len(t.raw_data) // 2
    raise AssertionError(f"{path}: no int8 weight tensor of {2 * n} bytes or more")


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_corrupt_onnx_embedder(tmp_path: Path, damage: str) -> None:
    """A damaged file onnxruntime cannot load: one line naming it, exit 2."""
    hm.test_vlm_files()  # fails with the fix when models are not built

    def do(path: Path) -> None:
        if damage == "truncated":
            path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
        else:
            path.write_bytes(b"\x00\xffnot a protobuf" * 1000)

    emb = _embedder_copy(tmp_path, do)
    env = hm.child_env(tmp_path / "cache", EDGE_T2T_EMBEDDER=str(emb))
    res, _ = _run(["index", "--captions", str(_captions_file(tmp_path)), "--index", str(tmp_path / "idx"),
                   "--no-progress", "--json"], env)  # fmt: skip
    _assert_clean_error(res, [".int8.onnx", str(emb)])


def test_overwritten_onnx_weights_are_found_by_verify(tmp_path: Path) -> None:
    """4 KiB of one int8 weight tensor overwritten: the model still loads (any byte is an int8
    weight) and indexes, so nothing but the file's sha256 can tell, which is what `verify` reports."""
    hm.test_vlm_files()

    def do(path: Path) -> None:
        data = bytearray(path.read_bytes())
        at = _inside_a_weight(path, 4096)
        data[at : at + 4096] = b"\xff" * 4096
        path.write_bytes(bytes(data))

    emb = _embedder_copy(tmp_path, do)
    env = hm.child_env(tmp_path / "cache", EDGE_T2T_EMBEDDER=str(emb))
    res, _ = _run(["index", "--captions", str(_captions_file(tmp_path)), "--index", str(tmp_path / "idx"),
                   "--no-progress", "--json"], env)  # fmt: skip
    assert res.returncode == 0 and json.loads(res.stdout)["added"] == 1, res.stderr[-2000:]
    ver = subprocess.run([sys.executable, "-m", "edge_t2t", "verify", "--index", str(tmp_path / "idx"), "--json"],
                         capture_output=True, text=True, env=env, cwd=hm.ROOT, timeout=hm.HANG_S)  # fmt: skip
    rep = json.loads(ver.stdout)
    assert ver.returncode == 1 and any("sha256" in p and ".int8.onnx" in p for p in rep["problems"]), ver.stdout
