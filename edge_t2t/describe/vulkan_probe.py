"""What Vulkan sees on this machine: the loader, its physical devices, their type, driver and memory.

Asked of the system's Vulkan loader (libvulkan.so.1) through ctypes, with nothing but the standard
library, so that it answers before edge-t2t is installed (install.sh runs it from the bundle's wheel
to pick the llama.cpp build) and without loading llama.cpp (doctor). llama.cpp's Vulkan backend
numbers the same physical devices, but hides CPU-type ones (Mesa's llvmpipe) unless
GGML_VK_VISIBLE_DEVICES names them; this probe lists every device, with its type, so the caller can
tell a GPU from a software device.

Run as a program it prints one JSON object: {"loader": bool, "error": str, "devices": [...]}; with
--has-gpu it prints nothing and exits 0 when a non-CPU device is present, 1 otherwise.
"""

from __future__ import annotations

import ctypes
import json
import sys
from dataclasses import asdict, dataclass

# VkPhysicalDeviceType
DEVICE_TYPES = {0: "other", 1: "integrated", 2: "discrete", 3: "virtual", 4: "cpu"}
_API_1_1 = (1 << 22) | (1 << 12)  # VK_MAKE_API_VERSION(0, 1, 1, 0)
_STYPE_PROPERTIES_2 = 1000059001
_STYPE_DRIVER_PROPERTIES = 1000196000
_MEMORY_HEAP_DEVICE_LOCAL = 0x1
# ggml's Vulkan backend needs Vulkan 1.2 (it creates its instance with that API version).
MIN_API = (1, 2)


@dataclass
class VulkanDevice:
    index: int  # the loader's order: GGML_VK_VISIBLE_DEVICES counts in it
    name: str
    type: str  # discrete | integrated | virtual | cpu | other
    api_version: str  # what the driver supports, e.g. "1.3.230"
    driver: str  # driver name and version string, e.g. "llvmpipe (Mesa 22.3.6 (LLVM 15.0.6))"
    memory_bytes: int  # device-local heaps, summed

    @property
    def is_cpu(self) -> bool:
        return self.type == "cpu"

    @property
    def api_too_old(self) -> bool:
        return tuple(int(x) for x in self.api_version.split(".")[:2]) < MIN_API


@dataclass
class VulkanReport:
    loader: bool  # libvulkan.so.1 could be loaded
    error: str  # why nothing could be listed ("" when the listing worked)
    devices: list[VulkanDevice]

    @property
    def gpus(self) -> list[VulkanDevice]:
        """Devices a user would call a GPU: any type but a CPU (llvmpipe, SwiftShader)."""
        return [d for d in self.devices if not d.is_cpu]

    def to_dict(self) -> dict:
        return {"loader": self.loader, "error": self.error, "devices": [asdict(d) for d in self.devices]}


def _version(v: int) -> str:
    return f"{v >> 22 & 0x7F}.{v >> 12 & 0x3FF}.{v & 0xFFF}"


class _AppInfo(ctypes.Structure):
    _fields_ = [("sType", ctypes.c_int), ("pNext", ctypes.c_void_p), ("pApplicationName", ctypes.c_char_p),
                ("applicationVersion", ctypes.c_uint32), ("pEngineName", ctypes.c_char_p),
                ("engineVersion", ctypes.c_uint32), ("apiVersion", ctypes.c_uint32)]  # fmt: skip


class _InstanceInfo(ctypes.Structure):
    _fields_ = [("sType", ctypes.c_int), ("pNext", ctypes.c_void_p), ("flags", ctypes.c_uint32),
                ("pApplicationInfo", ctypes.POINTER(_AppInfo)), ("enabledLayerCount", ctypes.c_uint32),
                ("ppEnabledLayerNames", ctypes.c_void_p), ("enabledExtensionCount", ctypes.c_uint32),
                ("ppEnabledExtensionNames", ctypes.c_void_p)]  # fmt: skip


def _cstr(buf: bytes) -> str:
    return buf.split(b"\0", 1)[0].decode("utf-8", "replace")


def probe() -> VulkanReport:
    """Every Vulkan physical device, in the loader's order. Never raises: a machine without a loader
    or a driver is an answer (loader False, or no devices), not an error."""
    try:
        vk = ctypes.CDLL("libvulkan.so.1")
    except OSError as exc:
        return VulkanReport(False, f"no Vulkan loader (libvulkan.so.1): {exc}", [])
    vk.vkGetInstanceProcAddr.restype = ctypes.c_void_p
    vk.vkGetInstanceProcAddr.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
    app = _AppInfo(0, None, b"edge-t2t", 1, b"edge-t2t", 1, _API_1_1)
    info = _InstanceInfo(1, None, 0, ctypes.pointer(app), 0, None, 0, None)
    instance = ctypes.c_void_p()
    rc = vk.vkCreateInstance(ctypes.byref(info), None, ctypes.byref(instance))
    if rc != 0:
        return VulkanReport(True, f"the Vulkan loader could not create an instance (VkResult {rc}): no usable driver", [])
    try:
        return VulkanReport(True, "", _devices(vk, instance))
    finally:
        destroy = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p)(
            vk.vkGetInstanceProcAddr(instance, b"vkDestroyInstance"))  # fmt: skip
        destroy(instance, None)


def _devices(vk: ctypes.CDLL, instance: ctypes.c_void_p) -> list[VulkanDevice]:
    def fn(name: bytes, *argtypes: type) -> ctypes._CFuncPtr:
        addr = vk.vkGetInstanceProcAddr(instance, name)
        return ctypes.CFUNCTYPE(ctypes.c_int, *argtypes)(addr) if addr else None

    enum = fn(b"vkEnumeratePhysicalDevices", ctypes.c_void_p, ctypes.POINTER(ctypes.c_uint32), ctypes.c_void_p)
    props1 = fn(b"vkGetPhysicalDeviceProperties", ctypes.c_void_p, ctypes.c_void_p)
    props2 = fn(b"vkGetPhysicalDeviceProperties2", ctypes.c_void_p, ctypes.c_void_p)
    memory = fn(b"vkGetPhysicalDeviceMemoryProperties", ctypes.c_void_p, ctypes.c_void_p)
    count = ctypes.c_uint32(0)
    if enum(instance, ctypes.byref(count), None) != 0 or not count.value:
        return []
    handles = (ctypes.c_void_p * count.value)()
    if enum(instance, ctypes.byref(count), handles) not in (0, 5):  # VK_INCOMPLETE (5) still fills the array
        return []
    out = []
    for i, dev in enumerate(handles[: count.value]):
        # The structs are read by offset from generous buffers: only their leading fields are needed.
        props = ctypes.create_string_buffer(4096)
        props1(dev, props)
        api, drv, _vendor, _device, dtype = (int.from_bytes(props.raw[o : o + 4], "little") for o in range(0, 20, 4))
        name = _cstr(props.raw[20:276])
        driver = _version(drv)
        if props2 is not None and api >= _API_1_1:
            # VkPhysicalDeviceProperties2 {sType, pNext, properties} -> VkPhysicalDeviceDriverProperties
            # {sType, pNext, driverID, driverName[256], driverInfo[256], conformanceVersion}
            drv_props = ctypes.create_string_buffer(1024)
            drv_props[0:4] = _STYPE_DRIVER_PROPERTIES.to_bytes(4, "little")
            p2 = ctypes.create_string_buffer(4096)
            p2[0:4] = _STYPE_PROPERTIES_2.to_bytes(4, "little")
            p2[8:16] = ctypes.addressof(drv_props).to_bytes(8, "little")
            props2(dev, p2)
            driver_name, driver_info = _cstr(drv_props.raw[20:276]), _cstr(drv_props.raw[276:532])
            driver = f"{driver_name} ({driver_info})" if driver_info else driver_name or driver
        mem = ctypes.create_string_buffer(1024)
        memory(dev, mem)
        # VkPhysicalDeviceMemoryProperties: typeCount, 32 types of 8 bytes, heapCount at 260, heaps
        # (size u64, flags u32, padding) from 264
        n_heaps = int.from_bytes(mem.raw[260:264], "little")
        local = 0
        for h in range(min(n_heaps, 16)):
            off = 264 + 16 * h
            if int.from_bytes(mem.raw[off + 8 : off + 12], "little") & _MEMORY_HEAP_DEVICE_LOCAL:
                local += int.from_bytes(mem.raw[off : off + 8], "little")
        out.append(VulkanDevice(i, name, DEVICE_TYPES.get(dtype, "other"), _version(api), driver, local))
    return out


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    report = probe()
    if args == ["--has-gpu"]:
        return 0 if report.gpus else 1
    print(json.dumps(report.to_dict(), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
