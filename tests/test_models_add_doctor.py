"""`edge-t2t models add/verify`, named-VLM resolution, and `edge-t2t doctor` (issue 12)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import helpers_media as hm
import pytest

from edge_t2t import config, doctor
from edge_t2t.cli import main
from edge_t2t.describe import model_files
from edge_t2t.describe.vlm import resolve_vlm_paths
from edge_t2t.errors import InputError, ModelError


@pytest.fixture(scope="module")
def pair() -> tuple[Path, Path]:
    """The built test VLM (model, mmproj), found before any test points the models folder elsewhere."""
    model, mmproj = hm.test_vlm_files()
    return Path(model), Path(mmproj)


@pytest.fixture
def models_dir(tmp_path: Path, monkeypatch, pair) -> Path:
    """An empty models folder, with the clone's built embedder still in reach."""
    embedder = config.embedder_dir()
    monkeypatch.setenv("EDGE_T2T_MODELS_DIR", str(tmp_path / "models"))
    monkeypatch.setenv("EDGE_T2T_EMBEDDER", str(embedder))
    for var in ("EDGE_T2T_VLM", "EDGE_T2T_MMPROJ"):
        monkeypatch.delenv(var, raising=False)
    return tmp_path / "models"


def test_add_copies_checks_and_lists(pair, models_dir: Path, capsys) -> None:
    model, mmproj = pair
    assert main(["models", "add", str(model), str(mmproj), "--name", "tiny", "--json"]) == 0
    manifest = json.loads(capsys.readouterr().out)
    folder = models_dir / "vlm" / "tiny"
    assert Path(manifest["dir"]) == folder and manifest["family"] == "llava-1.5" and manifest["test_model"]
    for role, src in (("model", model), ("mmproj", mmproj)):
        stored = folder / manifest[role]["file"]
        assert stored.is_file() and not stored.is_symlink()
        assert manifest[role]["sha256"] == model_files.sha256_file(src) == model_files.sha256_file(stored)
        assert manifest[role]["size"] == src.stat().st_size
    assert json.loads((folder / "manifest.json").read_text())["model"] == manifest["model"]
    assert main(["models", "list", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)["user_vlm"]["named"]
    assert [v["name"] for v in listed] == ["tiny"]
    assert main(["models", "list"]) == 0
    assert "tiny: " in capsys.readouterr().out
    # the same name again is refused unless --force
    with pytest.raises(InputError, match="already exists"):
        model_files.add_vlm(model, mmproj, "tiny")
    assert model_files.add_vlm(model, mmproj, "tiny", force=True)["name"] == "tiny"


def test_list_says_what_lies_in_models_vlm(pair, models_dir: Path, capsys) -> None:
    """`models list`'s line about models/vlm/ holds whatever is there: it said "user GGUF files: none
    in models/vlm" above the VLM `models add` had just put in models/vlm/NAME/."""
    model, mmproj = pair
    vlm_dir = models_dir / "vlm"

    def user_lines() -> list[str]:
        assert main(["models", "list"]) == 0
        lines = capsys.readouterr().out.splitlines()
        return lines[next(i for i, line in enumerate(lines) if line.startswith("test VLM:")) + 1 :]

    assert user_lines() == [f"user VLMs: none in {vlm_dir}; install one with `edge-t2t models add MODEL.gguf MMPROJ.gguf`"]
    model_files.add_vlm(model, mmproj, "tiny")
    lines = user_lines()
    assert lines[0] == "added VLMs (`edge-t2t models add`):" and lines[1].startswith("  tiny: ") and len(lines) == 2
    (vlm_dir / "loose.gguf").write_bytes(model.read_bytes())  # a file dropped beside the added folder
    lines = user_lines()
    assert lines[0] == f"user GGUF files lying loose in {vlm_dir}:" and lines[1].startswith("  loose.gguf  ")
    assert lines[2] == "added VLMs (`edge-t2t models add`):" and len(lines) == 4


def test_add_refuses_a_swapped_pair_and_bad_names(pair, models_dir: Path) -> None:
    model, mmproj = pair
    with pytest.raises(ModelError, match="give the model file first"):
        model_files.add_vlm(mmproj, model, "x")
    with pytest.raises(InputError, match="not a usable folder name"):
        model_files.add_vlm(model, mmproj, "../escape")
    assert not (models_dir / "vlm" / "x").exists()
    assert not list((models_dir / "vlm").glob(".*")), "no temp folder left behind"


def test_add_names_the_fix_in_its_own_arguments(pair, models_dir: Path, capsys) -> None:
    """`models add` takes the pair as two files in order: a mix-up is fixed by their order, not by the
    --vlm/--mmproj flags of caption and index (whose wording tests/test_gguf_check.py keeps)."""
    model, mmproj = (p.resolve() for p in pair)  # as add_vlm names them
    usage = "edge-t2t models add MODEL.gguf MMPROJ.gguf"
    for files, said in (
        ((mmproj, model), f"{mmproj} is a vision projector (mmproj) and {model} is a text model: "
                          f"give the model file first, then the projector: {usage}"),
        ((mmproj, mmproj), f"{mmproj} is a vision projector (mmproj), not a text model; "
                           f"give the text model .gguf first and its projector second: {usage}"),
        ((model, model), f"{model} is a text model, not a vision projector (mmproj); "
                         f"give the matching mmproj-*.gguf second: {usage}"),
    ):  # fmt: skip
        assert main(["models", "add", *map(str, files)]) == 2
        err = " ".join(capsys.readouterr().err.split())
        assert said in err and "--vlm" not in err and "--mmproj" not in err, err
    assert not (models_dir / "vlm").exists() or not any((models_dir / "vlm").iterdir())


def test_link_and_verify_catch_a_changed_byte(pair, models_dir: Path, tmp_path: Path, capsys) -> None:
    model, mmproj = pair
    own = tmp_path / "own"
    own.mkdir()
    for src in (model, mmproj):
        (own / src.name).write_bytes(src.read_bytes())
    manifest = model_files.add_vlm(own / model.name, own / mmproj.name, "linked", link=True)
    linked = Path(manifest["dir"]) / model.name
    assert linked.is_symlink() and linked.resolve() == (own / model.name).resolve()
    assert main(["models", "verify"]) == 0
    capsys.readouterr()
    data = bytearray((own / model.name).read_bytes())
    data[len(data) // 3] ^= 0x01
    (own / model.name).write_bytes(bytes(data))
    assert main(["models", "verify", "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    bad = [f for f in report["files"] if f["status"] != "ok"]
    assert [Path(f["path"]).name for f in bad] == [model.name] and bad[0]["status"] == "mismatch"
    assert any(model.name in p and "--name linked --force" in p for p in report["problems"])


def test_index_and_caption_find_added_models(pair, models_dir: Path) -> None:
    model, mmproj = pair
    with pytest.raises(ModelError, match="no vision-language model"):
        resolve_vlm_paths(None, None)
    model_files.add_vlm(model, mmproj, "first")
    folder = models_dir / "vlm" / "first"
    assert resolve_vlm_paths(None, None) == (folder / model.name, folder / mmproj.name)
    model_files.add_vlm(model, mmproj, "second")
    with pytest.raises(ModelError, match=r"several added VLMs \(first, second\)"):
        resolve_vlm_paths(None, None)
    assert resolve_vlm_paths("second", None) == (models_dir / "vlm" / "second" / model.name,
                                                 models_dir / "vlm" / "second" / mmproj.name)
    with pytest.raises(ModelError, match="no VLM named 'third'.*first, second"):
        resolve_vlm_paths("third", None)


def test_doctor_is_happy_then_names_each_problem(pair, models_dir: Path, tmp_path: Path, capsys) -> None:
    assert main(["doctor", "--index", str(tmp_path / "none"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] and report["problems"] == []
    checks = {line["check"] for line in report["lines"]}
    assert {"python", "packages", "cpu", "llama.cpp", "onnxruntime", "models", "embedder", "vlm", "index"} <= checks
    assert report["facts"]["llama_cpp"]["llama_cpp_python"] == "0.3.36"
    assert "CPUExecutionProvider" in report["facts"]["onnxruntime"]["providers"]
    # a damaged added model is a problem with its fix, and doctor fails
    model, mmproj = pair
    manifest = model_files.add_vlm(model, mmproj, "tiny")
    stored = Path(manifest["dir"]) / mmproj.name
    data = bytearray(stored.read_bytes())
    data[len(data) // 2] ^= 0x01
    stored.write_bytes(bytes(data))
    assert main(["doctor", "--index", str(tmp_path / "none")]) == 1
    out = capsys.readouterr().out
    assert "PROBLEM" in out and str(stored) in out and "1 problem found" in out


def test_doctor_reports_a_llama_build_this_cpu_cannot_run(monkeypatch) -> None:
    rep = doctor.Report()
    monkeypatch.setattr(doctor, "cpu_flags", lambda: {"sse4_2", "avx"})  # an older CPU: no AVX2/FMA/F16C
    doctor._cpu_and_llama(rep)
    # Whether this build has AVX2 code paths, asked of llama.cpp here rather than read from doctor's
    # own parsing: the portable build has them (the CPU lacks them: a problem naming the compat
    # build); the compat build has none (nothing to report about AVX2).
    import llama_cpp

    from edge_t2t.describe import vlm_devices

    vlm_devices.load_backends(llama_cpp)  # the vulkan build reports its CPU features once its CPU module is loaded
    avx2_problem = any(x.status == "problem" and "AVX2" in x.detail and "compat" in x.fix for x in rep.lines)
    assert avx2_problem == (b"AVX2 = 1" in llama_cpp.llama_print_system_info()), [x.detail for x in rep.lines]

    def crashed(*args, **kwargs):  # what a SIGILL on import looks like from the parent
        return subprocess.CompletedProcess(args, -4, "", "")

    rep = doctor.Report()
    monkeypatch.setattr(doctor.subprocess, "run", crashed)
    doctor._cpu_and_llama(rep)
    assert [x.detail for x in rep.problems] == ["llama.cpp crashed on load (SIGILL)"]
    assert "EDGE_T2T_LLAMA_BUILD=compat" in rep.problems[0].fix
