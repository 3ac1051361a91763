"""Where the VLM runs: `--gpu-layers auto|all|N`, the device, and how much of the model fits it.

llama.cpp offloads the text model layer by layer (the last N repeating layers; one more count is
the output layer) and the vision projector as a whole. `auto` (the default) picks the GPU with the
most free memory and offloads as many layers as fit, after setting aside room for the projector,
llama.cpp's compute buffers and the KV cache of every offloaded layer (sized for the context the
5 parallel variants use). A CPU-type Vulkan device (Mesa's llvmpipe, SwiftShader) is never chosen
by `auto`: it runs the same code as the CPU path through a software rasteriser, measured 17-35 ms a
token against 0.3 ms on the CPU for the test VLM. `all` and `N` take the first device llama.cpp
lists, software or not, since they were asked for by name.

The estimate is arithmetic over the GGUF tensor sizes and hyper-parameters (llama.cpp's own fitting
code lives in its `common` library, which llama-cpp-python does not ship). It errs on the large side
for the compute buffers; a device that still runs out raises GPUError with the fix (fewer layers).

Nothing here imports llama_cpp: the adapter (vlm.py) lists the devices and applies the plan.
"""

from __future__ import annotations

import argparse
import os
import re
from dataclasses import dataclass

from ..errors import GPUError, InputError
from .gguf_check import GGUFInfo

MIB = 1 << 20
# Left free on the device whatever the estimate says: the driver's own allocations, other programs,
# fragmentation. The larger of a fixed amount and a share of the card.
HEADROOM_BYTES = 256 * MIB
HEADROOM_SHARE = 0.05
N_UBATCH = 512  # llama.cpp's micro-batch in both variant paths (vlm.py, vlm_parallel.py)

GPU_LAYERS_HELP = (
    "text-model layers to run on a GPU: auto (default: as many as fit the GPU with the most free memory, "
    "none without a GPU; never a software Vulkan device such as llvmpipe), all, or a number (0: CPU only)"
)


def parse_gpu_layers(text: str) -> str | int:
    """argparse type of --gpu-layers: "auto", "all" or a whole number >= 0."""
    value = str(text).strip().lower()
    if value in ("auto", "all"):
        return value
    if re.fullmatch(r"\d+", value):
        return int(value)
    raise argparse.ArgumentTypeError(f"{text!r}: give auto, all, or a number of layers (0 = CPU only)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """--gpu-layers and --no-mmproj-gpu for `caption` and `index`."""
    parser.add_argument("--gpu-layers", type=parse_gpu_layers, metavar="auto|all|N", help=GPU_LAYERS_HELP)
    parser.add_argument("--no-mmproj-gpu", action="store_true",
                        help="keep the vision projector on the CPU even when the text model uses a GPU")  # fmt: skip


def config_kwargs(args: argparse.Namespace) -> dict:
    """The VLMConfig fields those two flags set (None: $EDGE_T2T_GPU_LAYERS, else auto)."""
    return {"n_gpu_layers": args.gpu_layers, "mmproj_gpu": not args.no_mmproj_gpu}


def default_request() -> str | int:
    """--gpu-layers when not given: $EDGE_T2T_GPU_LAYERS, else auto."""
    value = os.environ.get("EDGE_T2T_GPU_LAYERS") or "auto"
    try:
        return parse_gpu_layers(value)
    except argparse.ArgumentTypeError as exc:
        raise InputError(f"EDGE_T2T_GPU_LAYERS={exc}") from None


@dataclass(frozen=True)
class GPUDevice:
    """A device llama.cpp can offload to, as the adapter lists it."""

    index: int  # position among llama.cpp's GPU devices for a model (its main_gpu)
    name: str  # ggml's name, e.g. "Vulkan0"
    description: str  # e.g. "NVIDIA GeForce RTX 3060", "llvmpipe (LLVM 15.0.6, 256 bits)"
    backend: str  # e.g. "Vulkan"
    free_bytes: int
    total_bytes: int
    software: bool = False  # a CPU-type Vulkan device: slower than the CPU path, never chosen by auto

    @property
    def label(self) -> str:
        return f"{self.name} ({self.description})"


@dataclass(frozen=True)
class MemoryNeeds:
    """Bytes a model needs on the device, per part (estimates; see the module docstring)."""

    layers: tuple[int, ...]  # each repeating layer: weights + its KV cache
    output: int  # the output layer (its weights, the final norm, the logits)
    compute: int  # llama.cpp's compute buffer for the offloaded layers
    mmproj: int  # the projector: weights + the encoder's compute buffer

    def layers_bytes(self, k: int) -> int:
        """The last k repeating layers (llama.cpp offloads from the end)."""
        return sum(self.layers[len(self.layers) - k :]) if k else 0


@dataclass(frozen=True)
class OffloadPlan:
    device: GPUDevice | None  # None: everything on the CPU
    n_gpu_layers: int  # llama.cpp's n_gpu_layers: 0..n_layer, or n_layer + 1 with the output layer
    n_layer: int  # repeating layers of the text model
    mmproj_on_gpu: bool
    why: str  # one line: how the plan was chosen

    @property
    def on_gpu(self) -> bool:
        return self.device is not None and (self.n_gpu_layers > 0 or self.mmproj_on_gpu)


def _meta(info: GGUFInfo, key: str) -> int | None:
    value = info.metadata.get(f"{info.architecture}.{key}")
    return int(value) if isinstance(value, (int, float)) and value > 0 else None


def memory_needs(model: GGUFInfo, mmproj: GGUFInfo, n_ctx: int) -> MemoryNeeds:
    """What offloading `model` (with a context of n_ctx cells, f16 KV cache) and `mmproj` costs."""
    n_layer = _meta(model, "block_count") or 0
    layers = [0] * n_layer
    for name, size in model.tensor_bytes.items():
        m = re.match(r"blk\.(\d+)\.", name)
        if m and int(m[1]) < n_layer:
            layers[int(m[1])] += size
    n_embd = _meta(model, "embedding_length") or 0
    n_head = _meta(model, "attention.head_count") or 1
    n_head_kv = _meta(model, "attention.head_count_kv") or n_head
    k_len = _meta(model, "attention.key_length") or n_embd // n_head
    v_len = _meta(model, "attention.value_length") or n_embd // n_head
    kv_per_layer = n_ctx * n_head_kv * (k_len + v_len) * 2
    n_ff = _meta(model, "feed_forward_length") or 4 * n_embd
    out_w = model.tensor_bytes.get("output.weight", model.tensor_bytes.get("token_embd.weight", 0))
    n_vocab = (model.tensor_shapes.get("output.weight") or model.tensor_shapes.get("token_embd.weight") or (0, 0))[-1]
    output = out_w + model.tensor_bytes.get("output_norm.weight", 0) + 4 * N_UBATCH * n_vocab
    # f32 activations of one micro-batch: attention scores over the whole context (no flash
    # attention in the text model), the hidden state and the feed-forward's intermediates.
    compute = 4 * N_UBATCH * (n_ctx * n_head + 4 * n_embd + 2 * n_ff)
    v = mmproj.metadata
    patches = ((mmproj.image_size or 0) // (mmproj.patch_size or 1)) ** 2
    v_embd = int(v.get("clip.vision.embedding_length") or 0)
    v_head = int(v.get("clip.vision.attention.head_count") or 1)
    encoder = 4 * patches * (patches * v_head + 8 * v_embd)
    return MemoryNeeds(tuple(w + kv_per_layer for w in layers), output, compute,
                       sum(mmproj.tensor_bytes.values()) + encoder)  # fmt: skip


def headroom(device: GPUDevice) -> int:
    return max(HEADROOM_BYTES, int(device.total_bytes * HEADROOM_SHARE))


def plan_offload(request: str | int, devices: list[GPUDevice], needs: MemoryNeeds, *, mmproj_gpu: bool = True,
                 worker: int | None = None, workers: int = 1, unusable: str = "") -> OffloadPlan:  # fmt: skip
    """The offload for --gpu-layers `request` on `devices` (llama.cpp's, in its order).

    worker, workers: a local Dask worker's number and how many there are, so that workers spread
    over the machine's GPUs (worker k takes GPU k mod n) and auto gives those sharing a GPU each its
    part of the free memory. unusable: why the machine's GPUs are not in `devices` (e.g. a driver
    too old for llama.cpp), said when a GPU was asked for."""
    n_layer = len(needs.layers)
    if request == 0:
        return OffloadPlan(None, 0, n_layer, False, "--gpu-layers 0: CPU only")
    hardware = [d for d in devices if not d.software]
    if request == "auto":
        if not hardware:
            why = "no GPU llama.cpp can use" + (f" ({unusable})" if unusable else "")
            if devices:
                why += f"; {', '.join(d.label for d in devices)} is a software device, slower than the CPU"
            return OffloadPlan(None, 0, n_layer, False, f"auto: {why}: CPU only")
        pool = hardware
    else:
        if not devices:
            raise GPUError(f"--gpu-layers {request}: no GPU device llama.cpp can use"
                           + (f" ({unusable})" if unusable else "")
                           + "; `edge-t2t doctor` lists what it sees; use --gpu-layers auto or 0 to describe on the CPU")
        pool = hardware or devices
    share = 1
    if worker is not None:
        device = pool[worker % len(pool)]
        share = len(range(worker % len(pool), max(workers, worker + 1), len(pool)))
    else:
        device = max(pool, key=lambda d: d.free_bytes) if request == "auto" else pool[0]
    if request != "auto":
        n = n_layer + 1 if request == "all" else min(int(request), n_layer + 1)
        return OffloadPlan(device, n, n_layer, mmproj_gpu, f"--gpu-layers {request} on {device.label}")

    budget = device.free_bytes // max(1, share) - headroom(device) - needs.compute
    on_gpu_mmproj = mmproj_gpu and needs.mmproj <= budget
    if on_gpu_mmproj:
        budget -= needs.mmproj
    k = 0
    while k < n_layer and needs.layers_bytes(k + 1) <= budget:
        k += 1
    n = k + 1 if k == n_layer and needs.layers_bytes(k) + needs.output <= budget else k
    free_mib = device.free_bytes // MIB
    shared = f" shared by {share} workers" if share > 1 else ""
    why = (f"auto: {n}/{n_layer + 1} layers{' and the projector' if on_gpu_mmproj else ''} fit "
           f"{device.label} ({free_mib} MiB free{shared})")  # fmt: skip
    if n == 0 and not on_gpu_mmproj:
        return OffloadPlan(None, 0, n_layer, False, why + ": CPU only")
    return OffloadPlan(device, n, n_layer, on_gpu_mmproj, why)


# ---- errors a user can act on ----------------------------------------------------------------------

_OUT_OF_MEMORY = re.compile(r"out of (device )?memory|OutOfDeviceMemory|unable to allocate|failed to allocate|"
                            r"exceeds device (memory|buffer)|ErrorOutOfHostMemory", re.I)  # fmt: skip
_DEVICE_LOST = re.compile(r"device lost|DeviceLost", re.I)


def classify(log_lines: list[str]) -> str:
    """What went wrong on the device, from llama.cpp's last log lines: "oom", "lost" or ""."""
    text = " | ".join(log_lines)
    if _DEVICE_LOST.search(text):
        return "lost"
    if _OUT_OF_MEMORY.search(text):
        return "oom"
    return ""


def out_of_memory_message(plan: OffloadPlan, what: str, detail: str) -> str:
    """One line: the device ran out while `what` (e.g. "loading model.gguf"), and the fix."""
    fewer = max(0, plan.n_gpu_layers - max(1, plan.n_gpu_layers // 4))
    fix = f"use fewer layers (--gpu-layers {fewer})" if plan.n_gpu_layers > 1 else "keep the projector on the CPU (--no-mmproj-gpu)"
    where = plan.device.label if plan.device else "the GPU"
    return (f"out of GPU memory on {where} while {what} with {plan.n_gpu_layers}/{plan.n_layer + 1} layers"
            f"{' and the projector' if plan.mmproj_on_gpu else ''} there{detail}; {fix}, or --gpu-layers 0 to "
            "describe on the CPU; finished images are kept, and running the same command again resumes")  # fmt: skip


DEVICE_LOST_MESSAGE = ("edge-t2t: error: the GPU stopped answering (device lost: a driver reset, a hang or the "
                       "card overheating); finished images are kept: run the same command again to resume, with "
                       "fewer --gpu-layers or --gpu-layers 0 if it happens again")  # fmt: skip
