"""The air-gapped bundle (issue 12): `make bundle`, then install.sh and the tool with no network.

Inside a network namespace holding only a loopback interface (`unshare -n`, lo up), with an empty
HOME, no pip cache, no pip configuration and PIP_NO_INDEX=1: unpack the archive into a new
directory, run install.sh, `edge-t2t doctor`, index the demo's ground-truth captions and search
them. Nothing may try the network: the namespace makes any attempt fail, and an audit hook in
every Python process of the run (pip's included) records and refuses any socket connect or name
lookup, so an attempt that a program would otherwise shrug off still fails this test.

The first run on a machine builds the bundle (the llama.cpp compat CPU backend compiles for a few
minutes); later runs reuse dist/ while its inputs are unchanged.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest
from test_offline import _isolation

from edge_t2t.demo import scenes

ROOT = Path(__file__).resolve().parent.parent
pytestmark = [pytest.mark.slow, pytest.mark.linux_only]  # the bundle is for Linux

AUDIT_HOOK = '''
import os, socket, sys
_LOCAL = {None, "localhost", "127.0.0.1", "::1", b"localhost", b"127.0.0.1"}
def _hook(event, args):
    if event == "socket.connect" and args[0].family == socket.AF_UNIX:
        return
    if event in ("socket.getaddrinfo", "socket.gethostbyname") and args[0] in _LOCAL:
        return
    if event in ("socket.connect", "socket.getaddrinfo", "socket.gethostbyname", "socket.sendto"):
        with open(os.environ["EDGE_T2T_NET_LOG"], "a") as fh:
            fh.write(f"{os.getpid()} {sys.argv[:3]} {event} {args[1:] if event == 'socket.connect' else args[:2]}\\n")
        raise OSError("network attempt refused by tests/test_bundle.py")
sys.addaudithook(_hook)
'''

SCRIPT = r'''
set -euo pipefail
ip link set lo up
mkdir "$WORK/unpacked"
tar -xzf "$ARCHIVE" -C "$WORK/unpacked"
top=$(ls "$WORK/unpacked")
t0=$(date +%s%N)
"$WORK/unpacked/$top/install.sh" "$WORK/target"
echo "INSTALL_SECONDS=$(( ($(date +%s%N) - t0) / 1000000 ))e-3"
"$WORK/target/bin/edge-t2t" doctor --json > "$WORK/doctor.json"
captions=$("$WORK/target/bin/python" -c "import sys; from edge_t2t.demo.scenes import write_scene_set; print(write_scene_set(sys.argv[1], n=40)[1])" "$WORK/scenes")
"$WORK/target/bin/edge-t2t" index --captions "$captions" --index "$WORK/idx" --json --no-progress > "$WORK/index.json"
"$WORK/target/bin/edge-t2t" search "$QUERY" --index "$WORK/idx" --json -k 10 > "$WORK/search.jsonl"
# the documentation, where install.sh put it and where the installed tool looks (issue 27)
"$WORK/target/bin/python" -c "from edge_t2t import config; print(config.docs_dir())" > "$WORK/docs_dir.txt"
# the main archive alone carries no fp32 model: asking for it names the optional archive
"$WORK/target/bin/edge-t2t" embed "a river" --precision fp32 2> "$WORK/fp32.err" && exit 9 || true
'''


def _expected_build() -> str:
    """install.sh's choice on this machine, worked out from other sources: the CPU's flags
    (/proc/cpuinfo) and Debian's vulkaninfo (a device that is not of CPU type is a GPU)."""
    flags = set(next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
                .split(":", 1)[1].split())  # fmt: skip
    if not {"avx", "avx2", "fma", "f16c", "bmi2"} <= flags:
        return "compat"
    vk = subprocess.run(["vulkaninfo", "--summary"], capture_output=True, text=True, timeout=120)
    types = re.findall(r"deviceType\s*=\s*(\w+)", vk.stdout)
    return "vulkan" if any(t != "PHYSICAL_DEVICE_TYPE_CPU" for t in types) else "portable"


def _python() -> str:
    """The interpreter this venv was made from: install.sh must not depend on our virtualenv."""
    exe = Path(sys.base_prefix) / "bin" / f"python{sys.version_info.major}.{sys.version_info.minor}"
    return str(exe if exe.exists() else shutil.which("python3"))


def _clean_env(work: Path, **extra: str) -> dict:
    home = work / "home"
    home.mkdir(exist_ok=True)
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("EDGE_T2T_", "PIP_", "VIRTUAL_ENV", "PYTHON", "XDG_"))}  # fmt: skip
    env.update(HOME=str(home), XDG_CACHE_HOME=str(home / ".cache"), PATH="/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin",
               PIP_NO_INDEX="1", PIP_NO_CACHE_DIR="1", PIP_CONFIG_FILE=os.devnull, PYTHON=_python(), **extra)
    return env


@pytest.fixture(scope="module")
def archive() -> Path:
    res = subprocess.run(["make", "--no-print-directory", "bundle"], cwd=ROOT, capture_output=True, text=True,
                         timeout=3600)  # fmt: skip
    assert res.returncode == 0, (res.stdout + res.stderr)[-4000:]
    found = sorted((ROOT / "dist").glob("edge-t2t-*.tar.gz"))
    assert len(found) == 1, found
    with tarfile.open(found[0]) as tar:
        names = tar.getnames()
    tops = {n.split("/", 1)[0] for n in names}
    assert len(tops) == 1 and f"{tops.pop()}/install.sh" in names
    return found[0]


@pytest.fixture(scope="module")
def optional_archive(archive: Path) -> Path:
    found = sorted((ROOT / "dist" / "optional").glob("edge-t2t-*-optional.tar.gz"))
    assert len(found) == 1 and found[0].name == archive.name.replace(".tar.gz", "-optional.tar.gz"), found
    return found[0]


def _unpack(dest: Path, *archives: Path) -> Path:
    """Unpack the archives into dest (the optional one merges into the main one's top directory)."""
    for arc in archives:
        with tarfile.open(arc) as tar:
            tar.extractall(dest, filter="data")
    (top,) = dest.iterdir()
    return top


def test_install_help_names_every_extra_the_optional_archive_carries() -> None:
    """install.sh --help, step 2, says what the optional archive holds: the extras are those
    build_bundle.py puts there (every user extra of pyproject.toml), not a list written once.
    Needs no bundle."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("build_bundle", ROOT / "packaging" / "build_bundle.py")
    build_bundle = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build_bundle)
    extras = build_bundle.project()["extras"]
    res = subprocess.run(["bash", str(ROOT / "packaging" / "install.sh"), "--help"], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    step2 = " ".join(re.search(r"^2\. (.*?)^3\. ", res.stdout, re.S | re.M)[1].split())
    named = re.search(r"optional archive \(fp32 embedder, ([a-z/]+) extras\)", step2)
    assert named, step2
    assert sorted(named[1].split("/")) == extras == ["cluster", "geo", "web"]


def test_main_archive_is_under_150_mb(archive: Path, optional_archive: Path) -> None:
    """The issue's goal for the bundle without VLM files; the fp32 embedder and the extras are in
    the optional archive, which unpacks into the same top directory."""
    assert archive.stat().st_size < 150e6, archive.stat().st_size
    with tarfile.open(archive) as tar:
        main = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    with tarfile.open(optional_archive) as tar:
        names = tar.getnames()
    assert {n.split("/", 1)[0] for n in names} == {archive.name.removesuffix(".tar.gz")}
    optional = {n.split("/", 1)[1] for n in names if "/" in n}
    files = {n for n in optional if "." in Path(n).name}
    assert "SHA256SUMS.optional" in files and any(n.endswith(".fp32.onnx") for n in files)
    assert any(Path(n).name.startswith("rasterio-") for n in files)
    assert not (files & main), files & main  # nothing is carried twice
    main_wheels = {Path(n).name for n in main if n.endswith(".whl")}
    assert not {Path(n).name for n in files if n.endswith(".whl")} & main_wheels
    assert not any(n.endswith(".fp32.onnx") or Path(n).name.startswith("rasterio-") for n in main)


def test_install_and_search_with_no_network(archive: Path, tmp_path: Path, capsys) -> None:
    prefix = _isolation()
    if prefix is None:
        pytest.fail("no network namespace available (unshare -n / -rn refused); this test needs one")
    audit = tmp_path / "audit"
    audit.mkdir()
    (audit / "sitecustomize.py").write_text(AUDIT_HOOK)
    net_log = tmp_path / "network-attempts.log"
    query, expected = scenes.directional_queries(scenes.make_scenes(40, 0))[0]
    env = _clean_env(tmp_path, WORK=str(tmp_path), ARCHIVE=str(archive), QUERY=query,
                     PYTHONPATH=str(audit), EDGE_T2T_NET_LOG=str(net_log))  # fmt: skip
    res = subprocess.run([*prefix, "bash", "-c", SCRIPT], env=env, cwd=tmp_path, capture_output=True, text=True,
                         timeout=1800)  # fmt: skip
    attempts = net_log.read_text() if net_log.exists() else ""
    assert attempts == "", f"network attempts during the offline install/run:\n{attempts}"
    assert res.returncode == 0, (res.stdout + res.stderr)[-5000:]
    doctor = json.loads((tmp_path / "doctor.json").read_text())
    assert doctor["ok"], doctor["problems"]
    build = _expected_build()
    assert doctor["facts"]["llama_build"] == build and f"llama.cpp build: {build} (" in res.stderr
    assert any(f["group"] == "embedder" and f["status"] == "ok" for f in doctor["facts"]["model_files"])
    assert Path(doctor["facts"]["models_dir"]) == tmp_path / "target" / "share" / "edge-t2t" / "models"
    summary = json.loads((tmp_path / "index.json").read_text())
    assert summary["added"] == 40 and not summary["failures"]
    hits = [json.loads(line) for line in (tmp_path / "search.jsonl").read_text().splitlines() if line.strip()]
    # the installed copy ranks as the checkout does: the directional query's scene first (test_serve
    # asserts the same on the same 40 scenes, embedder and query)
    assert len(hits) == 10 and Path(hits[0]["image"]).stem == expected, (query, expected, hits)
    assert "not installed: it comes in the bundle's optional archive" in (tmp_path / "fp32.err").read_text()
    docs = tmp_path / "target" / "share" / "doc" / "edge-t2t"
    assert (tmp_path / "docs_dir.txt").read_text().strip() == str(docs)
    guides = sorted(p.name for p in (ROOT / "docs").glob("*.md"))
    assert sorted(p.name for p in (docs / "docs").glob("*.md")) == guides
    for md in [docs / "README.md", *(docs / "docs").glob("*.md")]:  # each page rendered beside itself
        page = md.with_suffix(".html").read_text(encoding="utf-8")
        assert page.startswith("<!DOCTYPE html>") and 'href="' in page and ".md\"" not in page, md
    assert "no optional archive here" in res.stderr
    seconds = re.search(r"INSTALL_SECONDS=([\d.e-]+)", res.stdout)
    with capsys.disabled():
        print(f"\n[test_bundle] {archive.name}: {archive.stat().st_size / 2**20:.1f} MiB; install.sh took "
              f"{float(seconds[1]) if seconds else float('nan'):.1f} s in {' '.join(prefix)}")


@pytest.mark.parametrize("victim", ["wheels/common/edge_t2t-*.whl", "models/embedder/*.int8.onnx",
                                    "models/embedder/*.fp32.onnx", "wheels/optional/rasterio-*.whl"])
def test_damaged_file_stops_install_before_anything(archive: Path, optional_archive: Path, tmp_path: Path,
                                                    victim: str) -> None:
    top = _unpack(tmp_path / "unpacked", archive, optional_archive)
    path = next(top.glob(victim))
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01  # one byte changed
    path.write_bytes(bytes(data))
    target = tmp_path / "target"
    res = subprocess.run(["bash", str(top / "install.sh"), str(target)], env=_clean_env(tmp_path),
                         capture_output=True, text=True, timeout=600)  # fmt: skip
    assert res.returncode == 2, res.stderr
    assert f"damaged bundle: {path.relative_to(top).as_posix()}: checksum mismatch" in res.stderr
    assert not target.exists()


def test_install_refuses_an_existing_target(archive: Path, tmp_path: Path) -> None:
    with tarfile.open(archive) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith("/install.sh"))
        tar.extractall(tmp_path / "unpacked", members=[member], filter="data")
    (tmp_path / "target").mkdir()
    res = subprocess.run(["bash", str(tmp_path / "unpacked" / member.name), str(tmp_path / "target")],
                         env=_clean_env(tmp_path), capture_output=True, text=True, timeout=60)  # fmt: skip
    assert res.returncode == 2 and "already exists" in res.stderr, res.stderr


def test_compat_build_installs_and_captions(archive: Path, optional_archive: Path, tmp_path: Path) -> None:
    """The compat llama.cpp build (no AVX/AVX2/FMA/F16C) installs, says so, and runs the real model
    path: the test VLM is added with `models add` and captions one scene through it. The optional
    archive is unpacked over the main one, so the fp32 embedder and the extras come too."""
    from helpers_media import test_vlm_files

    model, mmproj = test_vlm_files()
    top = _unpack(tmp_path / "unpacked", archive, optional_archive)
    target = tmp_path / "target"
    env = _clean_env(tmp_path, EDGE_T2T_LLAMA_BUILD="compat")
    res = subprocess.run(["bash", str(top / "install.sh"), str(target)], env=env, capture_output=True, text=True,
                         timeout=1200)  # fmt: skip
    assert res.returncode == 0, (res.stdout + res.stderr)[-4000:]
    assert "llama.cpp build: compat" in res.stderr

    def tool(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(target / "bin" / "edge-t2t"), *args], env=env, cwd=tmp_path, capture_output=True,
                              text=True, timeout=600)  # fmt: skip

    doctor = json.loads(tool("doctor", "--json").stdout)
    features = doctor["facts"]["llama_cpp"]["features"]
    assert doctor["facts"]["llama_build"] == "compat"
    assert not any(features.get(f) == "1" for f in ("AVX", "AVX2", "FMA", "F16C", "BMI2", "AVX512")), features
    assert doctor["ok"], doctor["problems"]
    assert "optional archive present" in res.stderr
    fp32 = tool("embed", "a river", "--precision", "fp32")
    assert fp32.returncode == 0 and len(json.loads(fp32.stdout.splitlines()[0])["vector"]) == 384, fp32.stderr
    extras = subprocess.run([str(target / "bin" / "python"), "-c", "import rasterio, distributed"], env=env,
                            capture_output=True, text=True, timeout=300)  # fmt: skip
    assert extras.returncode == 0, extras.stderr[-2000:]
    assert tool("models", "add", str(model), str(mmproj), "--name", "tiny").returncode == 0
    scene_dir = tmp_path / "scenes"
    scenes.write_scene_set(scene_dir, n=1)
    res = tool("caption", str(next(scene_dir.glob("*.png"))), "--variants", "1", "--json", "--no-cache")
    assert res.returncode in (0, 1), res.stderr[-3000:]  # 1: the random-weight model's text did not parse
    record = json.loads(res.stdout.splitlines()[0])
    # found by itself: the pair added above is the only VLM this installation has
    assert record["test_model"] and record["model"] == model.name and record["variants"]


VULKAN_SCRIPT = r'''
set -euo pipefail
ip link set lo up
"$WORK/unpacked/$TOP/install.sh" "$WORK/target"
"$WORK/target/bin/edge-t2t" models add "$MODEL" "$MMPROJ" --name tiny
"$WORK/target/bin/edge-t2t" doctor --json > "$WORK/doctor.json" || true
GGML_VK_VISIBLE_DEVICES=0 EDGE_T2T_LLAMA_LOG="$WORK/llama.log" "$WORK/target/bin/edge-t2t" caption "$IMAGE" \
    --variants 2 --json --no-cache --gpu-layers all > "$WORK/record.json"
'''


def test_vulkan_build_installs_and_captions_on_the_device(archive: Path, tmp_path: Path) -> None:
    """The bundle's third flavour (llama.cpp's CPU and Vulkan backends, loaded at run time), chosen
    with EDGE_T2T_LLAMA_BUILD=vulkan, installs inside a network namespace and captions with every
    layer and the projector on Mesa's software Vulkan device; llama.cpp's own log says so."""
    from helpers_media import make_png, test_vlm_files

    prefix = _isolation()
    if prefix is None:
        pytest.fail("no network namespace available (unshare -n / -rn refused); this test needs one")
    model, mmproj = test_vlm_files()
    top = _unpack(tmp_path / "unpacked", archive)
    image = make_png(tmp_path / "tile.png", seed=5)
    shaders = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "edge-t2t" / "mesa-shader-cache"
    env = _clean_env(tmp_path, EDGE_T2T_LLAMA_BUILD="vulkan", WORK=str(tmp_path), TOP=top.name, MODEL=str(model),
                     MMPROJ=str(mmproj), IMAGE=str(image), MESA_SHADER_CACHE_DIR=str(shaders), EDGE_T2T_THREADS="1")  # fmt: skip
    res = subprocess.run([*prefix, "bash", "-c", VULKAN_SCRIPT], env=env, cwd=tmp_path, capture_output=True,
                         text=True, timeout=1800)  # fmt: skip
    assert res.returncode == 0, (res.stdout + res.stderr)[-5000:]
    assert "llama.cpp build: vulkan (EDGE_T2T_LLAMA_BUILD)" in res.stderr
    doctor = json.loads((tmp_path / "doctor.json").read_text())
    assert doctor["facts"]["llama_build"] == "vulkan"
    assert {"CPU", "Vulkan"} <= set(doctor["facts"]["llama_cpp"]["backends"])
    log = (tmp_path / "llama.log").read_text(errors="replace")
    (record,) = [json.loads(x) for x in (tmp_path / "record.json").read_text().splitlines() if x.strip()]
    layers = record["gpu_layers"].split("/")[1]
    assert f"offloaded {layers}/{layers} layers to GPU" in log and "CLIP using Vulkan0 backend" in log
    assert record["backend"] == "Vulkan" and record["device"].startswith("Vulkan0 (llvmpipe")
    assert record["gpu_layers"] == f"{layers}/{layers}" and len(record["variants"]) == 2


# -- the compat build on a CPU without AVX: qemu-user emulating an older CPU ------------------------

QEMU_SCRIPT = r'''
import sys
from pathlib import Path
import llama_cpp
assert Path(llama_cpp.__file__).is_relative_to(sys.argv[1]), llama_cpp.__file__
print("SYSTEM_INFO", llama_cpp.llama_print_system_info().decode(), flush=True)
if len(sys.argv) > 2:  # the product's model path: load the pair, encode the picture, decode a few tokens
    from edge_t2t.demo import scenes
    from edge_t2t.images import to_png_bytes
    from edge_t2t.describe.vlm import VLM, VLMConfig
    png = to_png_bytes(scenes.make_scenes(1, 0)[0].image)
    with VLM(VLMConfig(model=Path(sys.argv[2]), mmproj=Path(sys.argv[3]), n_threads=1, variant_mode="sequential")) as vlm:
        text = vlm.generate(png, "Describe this image.", max_tokens=8)
    print("GENERATED", repr(text), flush=True)
'''


def _qemu_run(wheel_dir: Path, cpu: str, *args: str) -> subprocess.CompletedProcess:
    """Run QEMU_SCRIPT with the llama_cpp unpacked in wheel_dir, in qemu-user emulating `cpu`.

    qemu-user raises SIGILL for any instruction the emulated CPU model does not have, as the real
    CPU would; the rest of the process (Python, numpy) is this venv's and picks its code paths at
    run time from what the emulated CPUID reports."""
    env = {**os.environ, "PYTHONPATH": str(wheel_dir), "OMP_NUM_THREADS": "1"}
    return subprocess.run(["qemu-x86_64", "-cpu", cpu, sys.executable, "-c", QEMU_SCRIPT, str(wheel_dir), *args],
                          env=env, capture_output=True, text=True, timeout=900)  # fmt: skip


@pytest.mark.x86_64_only
def test_compat_build_runs_on_a_cpu_without_avx(archive: Path, tmp_path: Path) -> None:
    """Under qemu-user with -cpu Nehalem (SSE4.2, no AVX/AVX2/FMA/F16C), the bundle's compat build
    loads the test VLM, encodes a picture and generates; the portable build dies there with an
    illegal instruction, and runs under -cpu Haswell (so it is the CPU model that kills it)."""
    from helpers_media import test_vlm_files

    if shutil.which("qemu-x86_64") is None:
        pytest.fail("qemu-user is not installed: apt-get install qemu-user (`make test` does it as root)")

    model, mmproj = test_vlm_files()
    unpacked = {}
    with tarfile.open(archive) as tar:
        for member in tar.getmembers():
            match = re.search(r"/wheels/llama-(portable|compat)/[^/]+\.whl$", member.name)
            if match:
                wheel = tmp_path / Path(member.name).name
                wheel.write_bytes(tar.extractfile(member).read())
                unpacked[match[1]] = tmp_path / match[1]
                with zipfile.ZipFile(wheel) as zf:
                    zf.extractall(unpacked[match[1]])
    assert set(unpacked) == {"portable", "compat"}

    compat = _qemu_run(unpacked["compat"], "Nehalem", str(model), str(mmproj))
    assert compat.returncode == 0, (compat.stdout + compat.stderr)[-3000:]
    info = re.search(r"SYSTEM_INFO (.*)", compat.stdout)[1]
    assert "SSE3 = 1" in info and not re.search(r"\b(AVX|AVX2|FMA|F16C|BMI2) = 1", info), info
    assert "GENERATED" in compat.stdout

    portable = _qemu_run(unpacked["portable"], "Nehalem")
    assert portable.returncode in (-4, 132), (portable.returncode, portable.stdout, portable.stderr[-2000:])
    assert "Illegal instruction" in portable.stderr and "SYSTEM_INFO" not in portable.stdout

    control = _qemu_run(unpacked["portable"], "Haswell")
    assert control.returncode == 0, control.stderr[-2000:]
    assert "AVX2 = 1" in control.stdout
