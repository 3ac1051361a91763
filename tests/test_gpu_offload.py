"""--gpu-layers auto|all|N without llama.cpp: the fitting arithmetic, device choice, Dask workers'
spread, the memory estimate read from a real GGUF, error classification, and the store's record of
which device made a description set (schema v7). The runs on a device are in tests/test_gpu.py.

Expected numbers are worked out by hand in the comments, from the rules in gpu_offload's docstring:
headroom = max(256 MiB, 5% of the card); budget = free / workers sharing it - headroom - compute;
the projector first (when it fits), then layers from the end, the output layer last.
"""

from __future__ import annotations

import argparse
import sqlite3

import numpy as np
import pytest

from edge_t2t.describe import gpu_offload as go
from edge_t2t.describe.gpu_offload import GPUDevice, MemoryNeeds, plan_offload
from edge_t2t.errors import GPUError
from edge_t2t.index import schema
from edge_t2t.index.store import STORE_FILE, NewText, Store
from edge_t2t.records import Variant

MIB = 1 << 20
# 4 layers of 100 MiB, output 50 MiB, compute 200 MiB, projector 300 MiB
NEEDS = MemoryNeeds(layers=(100 * MIB,) * 4, output=50 * MIB, compute=200 * MIB, mmproj=300 * MIB)


def gpu(free_mib: int, total_mib: int = 4000, index: int = 0, software: bool = False, name: str = "Vulkan0") -> GPUDevice:
    return GPUDevice(index, name, "llvmpipe (LLVM 15)" if software else "Test GPU", "Vulkan", free_mib * MIB,
                     total_mib * MIB, software=software)  # fmt: skip


def test_parse_gpu_layers() -> None:
    assert [go.parse_gpu_layers(x) for x in ("auto", "ALL", " 3 ", "0")] == ["auto", "all", 3, 0]
    for bad in ("-1", "two", "1.5", ""):
        with pytest.raises(argparse.ArgumentTypeError):
            go.parse_gpu_layers(bad)


@pytest.mark.parametrize(("free_mib", "layers", "mmproj"), [
    (2000, 5, True),  # budget 2000-256-200 = 1544: projector (300), 4 layers (400) and the output (50)
    (900, 1, True),   # budget 444: projector, then 144 holds one layer of 100
    (700, 2, False),  # budget 244: the projector (300) does not fit; two layers (200) do
])  # fmt: skip
def test_auto_fits_what_the_free_memory_holds(free_mib: int, layers: int, mmproj: bool) -> None:
    plan = plan_offload("auto", [gpu(free_mib)], NEEDS)
    assert (plan.device.name, plan.n_gpu_layers, plan.mmproj_on_gpu) == ("Vulkan0", layers, mmproj)
    assert f"{layers}/5 layers" in plan.why


def test_auto_with_nothing_that_fits_stays_on_the_cpu() -> None:
    plan = plan_offload("auto", [gpu(400)], NEEDS)  # budget 400-256-200 < 0
    assert plan.device is None and plan.n_gpu_layers == 0 and not plan.on_gpu and "CPU only" in plan.why


def test_auto_headroom_is_a_share_of_a_large_card() -> None:
    # total 16000 MiB: headroom 800 (5%), not 256. free 1580: budget 1580-800-200 = 580: projector (300)
    # then 280 holds two layers. With the fixed 256 it would have held all four.
    plan = plan_offload("auto", [gpu(1580, total_mib=16000)], NEEDS)
    assert (plan.n_gpu_layers, plan.mmproj_on_gpu) == (2, True)


def test_auto_never_picks_a_software_device_but_all_and_n_do() -> None:
    soft = gpu(100_000, software=True)
    auto = plan_offload("auto", [soft], NEEDS)
    assert auto.device is None and "software device" in auto.why
    every = plan_offload("all", [soft], NEEDS)
    assert (every.device, every.n_gpu_layers, every.mmproj_on_gpu) == (soft, 5, True)
    three = plan_offload(3, [soft], NEEDS, mmproj_gpu=False)
    assert (three.n_gpu_layers, three.mmproj_on_gpu) == (3, False)
    assert plan_offload(9, [soft], NEEDS).n_gpu_layers == 5  # capped at the layers there are


def test_auto_takes_the_gpu_with_most_free_memory_over_a_software_one() -> None:
    devices = [gpu(100_000, software=True, name="Vulkan0"), gpu(1000, index=1, name="Vulkan1"),
               gpu(3000, index=2, name="Vulkan2")]  # fmt: skip
    assert plan_offload("auto", devices, NEEDS).device.name == "Vulkan2"


def test_zero_layers_means_no_device_at_all() -> None:
    plan = plan_offload(0, [gpu(100_000)], NEEDS)
    assert plan.device is None and not plan.mmproj_on_gpu


def test_a_gpu_asked_for_without_one_names_why_and_the_fix() -> None:
    with pytest.raises(GPUError, match=r"--gpu-layers all: no GPU device .*driver too old.*--gpu-layers auto or 0"):
        plan_offload("all", [], NEEDS, unusable="driver too old")
    assert "driver too old" in plan_offload("auto", [], NEEDS, unusable="driver too old").why


def test_dask_workers_spread_over_gpus_and_share_their_memory() -> None:
    roomy = [gpu(8000, index=0, name="Vulkan0"), gpu(8000, index=1, name="Vulkan1")]
    picked = [plan_offload("auto", roomy, NEEDS, worker=w, workers=3).device.name for w in range(3)]
    assert picked == ["Vulkan0", "Vulkan1", "Vulkan0"]
    devices = [gpu(1000, index=0, name="Vulkan0"), gpu(1000, index=1, name="Vulkan1")]
    # Vulkan0 is shared by workers 0 and 2: budget 1000/2-256-200 = 44, nothing fits; Vulkan1 has worker 1
    # alone: 1000-256-200 = 544: projector (300) and two layers (200).
    assert plan_offload("auto", devices, NEEDS, worker=0, workers=3).device is None
    one = plan_offload("auto", devices, NEEDS, worker=1, workers=3)
    assert (one.n_gpu_layers, one.mmproj_on_gpu) == (2, True)


def test_memory_needs_of_the_test_vlm_from_its_gguf() -> None:
    """Per-layer bytes = the blk.i tensors' data + that layer's f16 KV cache, counted here with the
    gguf package's own reader."""
    import helpers_media as hm
    from gguf import GGUFReader

    from edge_t2t.describe.gguf_check import inspect_gguf

    model, mmproj = hm.test_vlm_files()
    reader = GGUFReader(model)
    arch = reader.fields["general.architecture"].contents()
    n_layer = int(reader.fields[f"{arch}.block_count"].contents())
    n_embd = int(reader.fields[f"{arch}.embedding_length"].contents())
    n_head = int(reader.fields[f"{arch}.attention.head_count"].contents())
    kv_field = reader.fields.get(f"{arch}.attention.head_count_kv")
    n_head_kv = int(kv_field.contents()) if kv_field else n_head
    weights = [sum(int(t.n_bytes) for t in reader.tensors if t.name.startswith(f"blk.{i}.")) for i in range(n_layer)]
    n_ctx = 1024
    kv = n_ctx * n_head_kv * (n_embd // n_head) * 2 * 2  # K and V, f16
    needs = go.memory_needs(inspect_gguf(model), inspect_gguf(mmproj), n_ctx)
    assert needs.layers == tuple(w + kv for w in weights)
    assert needs.mmproj > sum(int(t.n_bytes) for t in GGUFReader(mmproj).tensors)


def test_classify_llama_cpp_failures() -> None:
    assert go.classify(["ggml_vulkan: Device memory allocation of size 123 failed.", "unable to allocate Vulkan0 buffer"]) == "oom"
    assert go.classify(["llama_kv_cache: failed to allocate buffer for kv cache"]) == "oom"
    assert go.classify(["ggml_vulkan: device lost on Vulkan0"]) == "lost"
    assert go.classify(["llama_model_load: error loading model: bad magic"]) == ""


def test_out_of_memory_message_names_fewer_layers_and_the_cpu() -> None:
    plan = plan_offload("all", [gpu(8000)], NEEDS)  # 5 of 5 layers
    msg = go.out_of_memory_message(plan, "loading m.gguf", " (llama.cpp said: x)")
    assert "Vulkan0 (Test GPU)" in msg and "5/5 layers and the projector" in msg
    assert "--gpu-layers 4" in msg and "--gpu-layers 0" in msg and "running the same command again resumes" in msg
    assert "\n" not in msg


def test_store_keeps_the_device_of_each_description_set(tmp_path) -> None:
    """A v6 store, upgraded to the lean layout (v7) and then v8, gains backend/device (NULL for what it held); the same model on the CPU and on a GPU
    are two description sets, and provenance says which images each made."""
    ix = tmp_path / "ix"
    ix.mkdir()
    conn = sqlite3.connect(ix / STORE_FILE, isolation_level=None)
    assert schema.migrate(conn, schema.MIGRATIONS[:6]) == 6
    conn.execute("INSERT INTO descriptions(id, model, mmproj, family, prompt_version, test_model, constrained) "
                 "VALUES (5, 'm.gguf', 'p.gguf', 'llava-1.5', 'v1', 0, 1)")
    conn.execute("INSERT INTO images(id, path, sha256, status, source, description_id, indexed_at) "
                 "VALUES (1, '/x/old.png', 'aa', 'ok', 'vlm', 5, 1.0)")
    conn.close()
    base = {"model": "m.gguf", "mmproj": "p.gguf", "family": "llava-1.5", "prompt_version": "v1"}
    with Store(ix) as st:
        assert st.conn.execute("PRAGMA user_version").fetchone()[0] == schema.SCHEMA_VERSION == 8
        with st.transaction():
            for path, backend, device in (("/x/a.png", "CPU", "CPU"), ("/x/b.png", "Vulkan", "Vulkan0 (Test GPU)"),
                                          ("/x/c.png", "Vulkan", "Vulkan0 (Test GPU)")):  # fmt: skip
                image_id = st.put_image(path, sha256=path, provenance={**base, "backend": backend, "device": device})
                st.add_texts(image_id, [NewText(0, "joined", Variant("s"), "s", np.ones(8, np.float32))])
        made = {(p["backend"], p["device"]): p["images"] for p in st.provenance()}
    assert made == {(None, None): 1, ("CPU", "CPU"): 1, ("Vulkan", "Vulkan0 (Test GPU)"): 2}
