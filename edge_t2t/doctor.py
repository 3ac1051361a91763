"""`edge-t2t doctor`: is this installation able to do its job, and if not, what to do.

Each check yields lines of three kinds: "ok" (a fact worth seeing), "note" (not an error, but
something the user may want: no VLM yet, no index yet) and "problem" (something is broken; the
line says how to fix it). Only problems make doctor fail.

llama.cpp is probed in a child process: a library compiled for instructions this CPU lacks dies
with SIGILL, and doctor must live to say so. So is Vulkan (a broken driver may crash its caller).
"""

from __future__ import annotations

import json
import os
import platform
import re
import signal
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

from . import __version__, config

# llama.cpp's compiled feature name -> the /proc/cpuinfo flag the CPU must report to run it.
_FEATURE_FLAGS = {
    "SSE3": "pni", "SSSE3": "ssse3", "AVX": "avx", "AVX2": "avx2", "F16C": "f16c", "FMA": "fma",
    "BMI2": "bmi2", "AVX512": "avx512f", "AVX512_VBMI": "avx512vbmi", "AVX512_VNNI": "avx512_vnni",
    "AVX512_BF16": "avx512_bf16", "AVX_VNNI": "avx_vnni",
}  # fmt: skip
_SHOWN_FLAGS = ("sse4_2", "avx", "avx2", "fma", "f16c", "bmi2", "avx512f")
REINSTALL = "reinstall from the bundle (install.sh NEWDIR) or, in a clone, run `make setup`"
SWITCH_BUILD = ("EDGE_T2T_LLAMA_BUILD=vulkan|portable|compat install.sh NEWDIR installs another llama.cpp build "
                "from the bundle (in a clone: `make .venv/.llama-vulkan` installs the vulkan one)")  # fmt: skip


@dataclass
class Line:
    check: str
    status: str  # "ok" | "note" | "problem"
    detail: str
    fix: str = ""


@dataclass
class Report:
    lines: list[Line] = field(default_factory=list)
    facts: dict = field(default_factory=dict)

    def add(self, check: str, status: str, detail: str, fix: str = "") -> None:
        self.lines.append(Line(check, status, detail, fix))

    @property
    def problems(self) -> list[Line]:
        return [x for x in self.lines if x.status == "problem"]

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict:
        return {"ok": self.ok, "problems": [f"{x.detail}; {x.fix}" if x.fix else x.detail for x in self.problems],
                "lines": [asdict(x) for x in self.lines], "facts": self.facts}  # fmt: skip


def cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def install_record() -> dict | None:
    """What install.sh wrote (bundle name, llama.cpp build), or None outside a bundle install."""
    try:
        return json.loads((config.INSTALL_SHARE / "install.json").read_text())
    except (OSError, ValueError):
        return None


def _python(rep: Report) -> None:
    libc = " ".join(platform.libc_ver()).strip() or "unknown libc"
    rep.facts["python"] = {"version": platform.python_version(), "executable": sys.executable,
                           "platform": platform.platform(), "libc": libc}  # fmt: skip
    # (Python older than 3.11 cannot import this package, so there is nothing to check here.)
    rep.add("python", "ok", f"Python {platform.python_version()} ({sys.executable}), {libc}, {platform.machine()}")


def _packages(rep: Report) -> None:
    from importlib import metadata  # here: it pulls in email.utils -> socket, which we keep out of imports

    try:
        requires = metadata.requires("edge-t2t") or []
    except metadata.PackageNotFoundError:
        rep.add("packages", "problem", "edge-t2t is not installed as a package", REINSTALL)
        return
    versions, missing, extras = {"edge-t2t": __version__}, [], {}
    for req in requires:
        name = re.split(r"[\s;<>=!~\[(]", req, maxsplit=1)[0]
        extra = re.search(r"extra\s*==\s*['\"]([^'\"]+)", req)
        try:
            versions[name] = metadata.version(name)
            if extra:
                extras.setdefault(extra[1], []).append(True)
        except metadata.PackageNotFoundError:
            if extra:
                extras.setdefault(extra[1], []).append(False)
            else:
                missing.append(name)
    rep.facts["packages"] = versions
    rep.facts["extras"] = {k: all(v) for k, v in extras.items()}
    shown = ", ".join(f"{k} {v}" for k, v in versions.items())
    rep.add("packages", "ok", shown)
    for name in missing:
        rep.add("packages", "problem", f"required package {name} is not installed", REINSTALL)


def _child(code: str, what: str) -> tuple[subprocess.CompletedProcess | None, str]:
    """Run `code` in a child Python: (its result, "") or (None, why it did not answer)."""
    try:
        return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300), ""
    except subprocess.TimeoutExpired:
        return None, f"{what} took over 300 s"


def _cpu_and_llama(rep: Report) -> None:
    flags = cpu_flags()
    record = install_record()
    rep.facts["cpu_flags"] = sorted(f for f in _SHOWN_FLAGS if f in flags)
    shown = " ".join(f if f in flags else f"-{f}" for f in _SHOWN_FLAGS) if flags else "unknown (no /proc/cpuinfo)"
    code = "import json\nfrom edge_t2t.describe.vlm import llama_system_info\nprint(json.dumps(llama_system_info()))"
    res, late = _child(code, "loading llama.cpp")
    info = json.loads(res.stdout) if res is not None and res.returncode == 0 else {}
    # The bundle's install record names its build; a clone's says what it was compiled with.
    from_source = "vulkan (built from source)" if "vulkan" in info.get("backend_modules", []) else "built from source (pip)"
    build = (record or {}).get("llama_build", from_source)
    rep.facts["llama_build"] = build
    rep.add("cpu", "ok", f"CPU flags: {shown}; llama.cpp build: {build}")
    if res is None:
        rep.add("llama.cpp", "problem", late, "check the machine's load, then rerun")
        return
    if res.returncode < 0:
        sig = signal.Signals(-res.returncode).name
        rep.add("llama.cpp", "problem", f"llama.cpp crashed on load ({sig})",
                "this build needs CPU instructions this machine lacks: reinstall with "
                "EDGE_T2T_LLAMA_BUILD=compat install.sh NEWDIR")  # fmt: skip
        return
    if res.returncode != 0:
        last = (res.stderr.strip().splitlines() or ["?"])[-1]
        rep.add("llama.cpp", "problem", f"llama-cpp-python does not import: {last}", REINSTALL)
        return
    rep.facts["llama_cpp"] = info
    rep.add("llama.cpp", "ok", f"llama-cpp-python {info['llama_cpp_python']}, backends {', '.join(info['backends'])}: "
            f"{info['system_info']}")
    if flags:
        lacking = [f for f, on in info["features"].items() if on == "1" and f in _FEATURE_FLAGS
                   and _FEATURE_FLAGS[f] not in flags]  # fmt: skip
        if lacking:
            rep.add("llama.cpp", "problem", f"llama.cpp was built for {', '.join(lacking)}, which this CPU lacks "
                    "(expect 'illegal instruction')", "reinstall with EDGE_T2T_LLAMA_BUILD=compat install.sh NEWDIR")


def _gpu(rep: Report) -> None:
    """The Vulkan devices the machine has (name, type, memory, driver), the ones llama.cpp offloads
    to, and how to get the GPU used when it is not."""
    res, late = _child("from edge_t2t.describe.vulkan_probe import main\nmain([])", "asking Vulkan for its devices")
    if res is None or res.returncode != 0:
        why = late or f"the Vulkan probe failed ({(res.stderr.strip().splitlines() or ['?'])[-1]})"
        rep.facts["gpu"] = {"vulkan": None, "llama_devices": [], "unusable": why}
        rep.add("gpu", "note", f"{why}; describing runs on the CPU", "check the GPU driver, then rerun doctor")
        return
    vk = json.loads(res.stdout)
    info = rep.facts.get("llama_cpp", {})
    used = info.get("gpu_devices", [])
    unusable = info.get("gpu_unusable", "")
    rep.facts["gpu"] = {"vulkan": vk, "llama_devices": used, "unusable": unusable}
    if not vk["loader"] or vk["error"]:
        rep.add("gpu", "note", f"{vk['error']}: describing runs on the CPU")
    for d in vk["devices"]:
        kind = "software device, slower than the CPU: never used by --gpu-layers auto" if d["type"] == "cpu" else d["type"]
        rep.add("gpu", "ok", f"Vulkan device {d['index']}: {d['name']} ({kind}), {d['memory_bytes'] >> 20} MiB, "
                f"driver {d['driver']}, Vulkan {d['api_version']}")  # fmt: skip
    for d in used:
        soft = ", software: only with --gpu-layers all|N" if d["software"] else ""
        rep.add("gpu", "ok", f"llama.cpp offloads to {d['name']} ({d['description']}, {d['backend']}): "
                f"{d['free_bytes'] >> 20} of {d['total_bytes'] >> 20} MiB free{soft}")  # fmt: skip
    hardware = [d for d in used if not d["software"]]
    if hardware:
        best = max(hardware, key=lambda d: d["free_bytes"])  # auto's choice (gpu_offload.plan_offload)
        rep.add("gpu", "ok", f"--gpu-layers auto (the default) describes on {best['name']}", SWITCH_BUILD)
    elif unusable:
        rep.add("gpu", "note", f"this machine's GPU is not used: {unusable}", SWITCH_BUILD)
    else:
        rep.add("gpu", "note", "no GPU llama.cpp can use: describing runs on the CPU", SWITCH_BUILD)


def _onnxruntime(rep: Report) -> None:
    try:
        import onnxruntime as ort
    except ImportError as exc:
        rep.add("onnxruntime", "problem", f"onnxruntime does not import: {exc}", REINSTALL)
        return
    providers = ort.get_available_providers()
    rep.facts["onnxruntime"] = {"version": ort.__version__, "providers": providers}
    status = "ok" if "CPUExecutionProvider" in providers else "problem"
    rep.add("onnxruntime", status, f"onnxruntime {ort.__version__}, providers: {', '.join(providers)}",
            "" if status == "ok" else REINSTALL)


def _models(rep: Report) -> None:
    from .describe.model_files import named_vlms, verify_models
    from .embed.embedder import Embedder
    from .errors import EdgeT2TError

    rep.facts["models_dir"] = str(config.models_dir())
    emb_dir = config.embedder_dir()
    if not (emb_dir / "manifest.json").is_file():
        rep.add("models", "problem", f"no embedder in {emb_dir}",
                "run `edge-t2t models build-embedder` (or reinstall from the bundle)")
    check = verify_models()
    rep.facts["model_files"] = check.to_dict()["files"]
    for problem in check.problems:
        rep.add("models", "problem", problem)
    good = [f for f in check.files if f.status == "ok"]
    if good:
        rep.add("models", "ok", f"{len(good)} model files match their sha256 in {config.models_dir()}")
    if (emb_dir / "manifest.json").is_file() and check.ok:
        try:  # the real query path: tokenizer + int8 ONNX session
            vec = Embedder(precision="int8", threads=1).embed(["a river next to a road"])
            rep.add("embedder", "ok", f"embeds a query: {vec.shape[1]}-dim unit vector")
        except EdgeT2TError as exc:
            rep.add("embedder", "problem", str(exc))
    named = named_vlms()
    loose = sorted(p.name for p in config.user_vlm_dir().glob("*.gguf")) if config.user_vlm_dir().is_dir() else []
    rep.facts["vlms"] = [v["name"] for v in named]
    for v in named:
        rep.add("vlm", "ok", f"{v['name']}: {v['model']['file']} + {v['mmproj']['file']} (family {v['family']})")
    if loose:
        rep.add("vlm", "note", f"GGUF files in {config.user_vlm_dir()} without a manifest: {', '.join(loose)}",
                "add them with `edge-t2t models add MODEL.gguf MMPROJ.gguf` so their checksums are kept")
    env_vlm = os.environ.get("EDGE_T2T_VLM")
    if not named and not loose and not env_vlm:
        rep.add("vlm", "note", "no vision-language model installed: `index --captions` and `search` work, "
                "captioning images does not", "add one with `edge-t2t models add MODEL.gguf MMPROJ.gguf`")


def _index(rep: Report, index_dir: Path) -> None:
    from .errors import EdgeT2TError
    from .index.store import STORE_FILE
    from .index.verify import verify_index

    rep.facts["index"] = {"dir": str(index_dir)}
    if not (index_dir / STORE_FILE).is_file():
        rep.add("index", "note", f"no index at {index_dir} yet", "create one with `edge-t2t index PATH` "
                "(or pass --index DIR / set EDGE_T2T_INDEX)")
        return
    try:
        v = verify_index(index_dir, check_models=False)
    except EdgeT2TError as exc:
        rep.add("index", "problem", str(exc))
        return
    counts = v.checks.get("counts", {})
    rep.facts["index"].update(ok=v.ok, counts=counts)
    if v.ok:
        rep.add("index", "ok", f"{index_dir}: sound, {counts.get('images_ok', 0)} images")
    for problem in v.problems:
        rep.add("index", "problem", problem, f"run `edge-t2t verify --index {index_dir} --repair`")


def run_doctor(index_dir: Path) -> Report:
    rep = Report()
    for check in (_python, _packages, _cpu_and_llama, _gpu, _onnxruntime, _models):
        check(rep)
    _index(rep, index_dir)
    return rep
