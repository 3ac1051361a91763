"""llama.cpp's backends and devices (ggml's registry), for the adapter (vlm.py) and doctor.

Like vlm_parallel.py, this module does not import llama_cpp: the adapter hands it the llama_cpp
module it imported. ggml's functions are reached through the libllama handle llama_cpp loaded, so
they resolve to the very libggml that llama.cpp uses (a second dlopen of the wheel's libggml.so, a
copy of libggml.so.0 since wheels hold no symlinks, would load a second registry).

The vulkan build loads its backends at run time (GGML_BACKEND_DL): libggml-cpu.so and
libggml-vulkan.so sit in llama_cpp/lib/, where llama.cpp's own loader does not look (it tries the
executable's folder and the working directory), and llama-cpp-python 0.3.36 never points it there.
load_backends() does. A build with the backends linked in registers the CPU by itself and is left
alone. Without a Vulkan loader, or with one older than Vulkan 1.2, the Vulkan module does not
register and the CPU one still does: the same build runs everywhere.
"""

from __future__ import annotations

import ctypes
import dataclasses
import os
from pathlib import Path
from typing import Any

from .gpu_offload import GPUDevice
from .vulkan_probe import probe

# enum ggml_backend_dev_type
_CPU, _GPU, _IGPU = 0, 1, 2


class _DevProps(ctypes.Structure):  # struct ggml_backend_dev_props (ggml-backend.h)
    _fields_ = [("name", ctypes.c_char_p), ("description", ctypes.c_char_p), ("memory_free", ctypes.c_size_t),
                ("memory_total", ctypes.c_size_t), ("type", ctypes.c_int), ("device_id", ctypes.c_char_p),
                ("caps", ctypes.c_bool * 5)]  # fmt: skip


_SIGNATURES = {
    "ggml_backend_reg_count": (ctypes.c_size_t, []),
    "ggml_backend_reg_get": (ctypes.c_void_p, [ctypes.c_size_t]),
    "ggml_backend_reg_name": (ctypes.c_char_p, [ctypes.c_void_p]),
    "ggml_backend_load_all_from_path": (None, [ctypes.c_char_p]),
    "ggml_backend_dev_count": (ctypes.c_size_t, []),
    "ggml_backend_dev_get": (ctypes.c_void_p, [ctypes.c_size_t]),
    "ggml_backend_dev_by_name": (ctypes.c_void_p, [ctypes.c_char_p]),
    "ggml_backend_dev_get_props": (None, [ctypes.c_void_p, ctypes.POINTER(_DevProps)]),
    "ggml_backend_dev_backend_reg": (ctypes.c_void_p, [ctypes.c_void_p]),
}
_state: dict[str, Any] = {}


def _ggml(lc: Any) -> Any:
    lib = _state.get("lib")
    if lib is None:
        lib = lc.llama_cpp._lib  # the CDLL of libllama.so; ggml's symbols resolve through its dependencies
        for name, (restype, argtypes) in _SIGNATURES.items():
            fn = getattr(lib, name)
            fn.restype, fn.argtypes = restype, argtypes
        _state["lib"] = lib
    return lib


def library_dir(lc: Any) -> Path:
    """Where llama-cpp-python loads its libraries from (LLAMA_CPP_LIB_PATH overrides, as in llama_cpp)."""
    return Path(os.environ.get("LLAMA_CPP_LIB_PATH") or Path(lc.__file__).parent / "lib")


def load_backends(lc: Any) -> None:
    """Register llama.cpp's backends when the build loads them at run time (see the module doc)."""
    if _state.get("loaded"):
        return
    lib = _ggml(lc)
    _state["dynamic"] = lib.ggml_backend_reg_count() == 0
    if _state["dynamic"]:
        lib.ggml_backend_load_all_from_path(str(library_dir(lc)).encode())
    _state["loaded"] = True


def backends(lc: Any) -> list[str]:
    """Names of the registered backends, e.g. ["Vulkan", "CPU"]."""
    load_backends(lc)
    lib = _ggml(lc)
    return [lib.ggml_backend_reg_name(lib.ggml_backend_reg_get(i)).decode() for i in range(lib.ggml_backend_reg_count())]


def dynamic_backends(lc: Any) -> list[str]:
    """The backend modules a run-time-loading build carries (libggml-<name>.so), e.g. ["cpu", "vulkan"],
    loaded or not; [] for a build with its backends linked in."""
    load_backends(lc)
    if not _state["dynamic"]:
        return []
    return sorted(p.name[len("libggml-"):-len(".so")] for p in library_dir(lc).glob("libggml-*.so")
                  if p.name != "libggml-base.so")  # fmt: skip


def _props(lib: Any, dev: int) -> _DevProps:
    props = _DevProps()
    lib.ggml_backend_dev_get_props(dev, ctypes.byref(props))
    return props


def gpu_devices(lc: Any) -> tuple[list[GPUDevice], str]:
    """The devices llama.cpp offloads a model to, in its order (discrete GPUs; integrated ones only
    when there is no discrete one, as llama.cpp picks them), and, when there is none, why the
    machine's GPUs cannot be used ("" when it simply has none)."""
    load_backends(lc)
    lib = _ggml(lc)
    vk = probe()
    software = {d.name for d in vk.devices if d.is_cpu}
    gpus: list[GPUDevice] = []
    igpus: list[GPUDevice] = []
    seen: set[bytes] = set()
    for i in range(lib.ggml_backend_dev_count()):
        dev = lib.ggml_backend_dev_get(i)
        p = _props(lib, dev)
        backend = lib.ggml_backend_reg_name(lib.ggml_backend_dev_backend_reg(dev)).decode()
        if p.type not in (_GPU, _IGPU) or backend == "RPC" or (p.device_id and p.device_id in seen):
            continue
        if p.device_id:
            seen.add(p.device_id)
        desc = (p.description or b"").decode("utf-8", "replace")
        found = GPUDevice(0, (p.name or b"").decode(), desc, backend, int(p.memory_free), int(p.memory_total),
                          software=backend == "Vulkan" and desc in software)  # fmt: skip
        (gpus if p.type == _GPU else igpus).append(found)
    ordered = [dataclasses.replace(d, index=i) for i, d in enumerate(gpus or igpus)]
    why = ""
    if not ordered and vk.gpus:
        names = ", ".join(d.name for d in vk.gpus)
        old = [d for d in vk.gpus if d.api_too_old]
        if "vulkan" not in dynamic_backends(lc) and "Vulkan" not in backends(lc):
            why = (f"this llama.cpp build has no Vulkan backend for {names}; install the bundle's vulkan build "
                   "(EDGE_T2T_LLAMA_BUILD=vulkan install.sh NEWDIR)")  # fmt: skip
        elif old:
            why = (f"the Vulkan driver of {old[0].name} supports Vulkan {old[0].api_version}, llama.cpp needs "
                   "1.2: update the GPU driver")  # fmt: skip
        else:
            why = f"llama.cpp's Vulkan backend did not take {names} (Vulkan loader: {vk.error or 'ok'})"
    return ordered, why


def device_handle(lc: Any, name: str) -> int:
    """ggml's handle of the device named `name` (for mtmd's projector)."""
    return _ggml(lc).ggml_backend_dev_by_name(name.encode())
