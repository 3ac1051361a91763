"""The GPU path on Mesa's software Vulkan device (llvmpipe): no GPU needed, the same llama.cpp code.

`make test` installs the vulkan llama.cpp build (CPU and Vulkan backends loaded at run time) and
Mesa's Vulkan drivers. llama.cpp skips CPU-type Vulkan devices unless GGML_VK_VISIBLE_DEVICES
names them, and then runs on the CPU without a word; so every run here makes llvmpipe visible and
checks llama.cpp's own log (EDGE_T2T_LLAMA_LOG) for the device and the offload, never only our
record of it. Mesa caches the compiled shaders in ~/.cache/edge-t2t/mesa-shader-cache (its first
run compiles for minutes; later runs reuse them).

The tiny test VLM with 2 variants and 1,300 tokens for each (test_caption_cli's margin: enough for
the schema's longest answer even at one character per token), so its random-weight output closes
and parses.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import helpers_media as hm
import pytest
from gguf import GGUFReader

from edge_t2t.describe import gpu_offload
from edge_t2t.describe.gguf_check import inspect_gguf

ROOT = Path(__file__).resolve().parent.parent
SHADER_CACHE = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "edge-t2t" / "mesa-shader-cache"
OPTS = ["--variants", "2", "--max-tokens", "2600"]
ARGS = [*OPTS, "--json", "--no-cache"]
pytestmark = pytest.mark.slow


def gpu_env(tmp: Path, **extra: str) -> dict[str, str]:
    """A CLI child that sees llvmpipe as Vulkan0 and writes llama.cpp's log to tmp/llama.log."""
    return hm.child_env(tmp / "cache", GGML_VK_VISIBLE_DEVICES="0", EDGE_T2T_LLAMA_LOG=str(tmp / "llama.log"),
                        MESA_SHADER_CACHE_DIR=str(SHADER_CACHE), EDGE_T2T_THREADS="1", **extra)  # fmt: skip


def llama_log(tmp: Path) -> str:
    return (tmp / "llama.log").read_text(errors="replace")


@pytest.fixture(scope="module")
def tiny() -> dict:
    """The test VLM, its layer count as llama.cpp counts them (repeating layers + the output), an
    image, and a check that this machine is set up for the module (a failure names the fix)."""
    model, mmproj = hm.test_vlm_files()
    reader = GGUFReader(model)
    arch = reader.fields["general.architecture"].contents()
    layers = int(reader.fields[f"{arch}.block_count"].contents()) + 1
    lib = Path(hm.require("llama_cpp", "run `make setup`").__file__).parent / "lib"
    if not (lib / "libggml-vulkan.so").is_file():
        pytest.fail(f"the installed llama.cpp has no Vulkan backend module ({lib}): run `make .venv/.llama-vulkan`")
    vk = subprocess.run(["vulkaninfo", "--summary"], capture_output=True, text=True, timeout=120)
    if "PHYSICAL_DEVICE_TYPE_CPU" not in vk.stdout:
        pytest.fail("no software Vulkan device (llvmpipe): apt-get install mesa-vulkan-drivers vulkan-tools (`make test` does)")
    return {"model": model, "mmproj": mmproj, "layers": layers,
            "vlm": ["--vlm", str(model), "--mmproj", str(mmproj)]}  # fmt: skip


def _records(res: subprocess.CompletedProcess) -> list[dict]:
    assert res.returncode == 0 and not hm.has_traceback(res.stderr), res.stderr[-3000:]
    return [json.loads(line) for line in res.stdout.splitlines() if line.strip()]


def _assert_on_the_device(rec: dict, log: str, layers: int, mode: str) -> None:
    """The record and llama.cpp's own log agree: every layer and the projector on llvmpipe."""
    assert rec["variant_mode"] == mode and rec["backend"] == "Vulkan"
    assert rec["device"].startswith("Vulkan0 (llvmpipe") and rec["gpu_layers"] == f"{layers}/{layers}"
    assert rec["mmproj_device"] == "Vulkan0"
    assert re.search(r"using device Vulkan0 \(llvmpipe", log), log[-3000:]
    assert f"offloaded {layers}/{layers} layers to GPU" in log
    assert "CLIP using Vulkan0 backend" in log


def test_caption_on_the_device_both_paths_and_repeats_exactly(tiny: dict, tmp_path: Path) -> None:
    """All layers and the projector on the device, on the parallel path twice (the same variants,
    run to run, in separate processes) and on the sequential path. The parallel runs have two
    threads, so the sequences' samplers run on a thread pool: they must not call into the device
    from there (two threads fetching logits at once deadlocked llama.cpp's Vulkan backend)."""
    image = hm.make_png(tmp_path / "tile.png", seed=3)
    runs = []
    for i, (mode, threads) in enumerate((("parallel", "2"), ("parallel", "2"), ("sequential", "1"))):
        work = tmp_path / f"run{i}"
        work.mkdir()
        res = hm.run_cli("caption", str(image), *tiny["vlm"], *ARGS, "--gpu-layers", "all", "--variant-mode", mode,
                         "--threads", threads, env=gpu_env(work), timeout=1200)  # fmt: skip
        (rec,) = _records(res)
        _assert_on_the_device(rec, llama_log(work), tiny["layers"], mode)
        runs.append(rec)
    assert runs[0]["variants"] == runs[1]["variants"] and len(runs[0]["variants"]) == 2


def test_greedy_tokens_on_the_device_equal_the_cpus(tiny: dict, tmp_path: Path) -> None:
    """The text model alone, 20 greedy tokens from one prompt: on the CPU (--gpu-layers 0, llama.cpp
    given no device) and with every layer on llvmpipe, token for token."""
    script = textwrap.dedent('''
        import json, sys
        from pathlib import Path
        from edge_t2t.describe.vlm import VLM, VLMConfig
        out = {}
        for name, layers in (("cpu", 0), ("gpu", "all")):
            with VLM(VLMConfig(Path(sys.argv[1]), Path(sys.argv[2]), n_gpu_layers=layers, n_threads=1,
                               variant_mode="sequential")) as vlm:
                llama = vlm._llama  # the test reaches into the adapter for the raw token stream
                prompt = llama.tokenize(b"A satellite image of a river next to a forest, seen from above:")
                tokens = []
                for tok in llama.generate(prompt, top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0):
                    tokens.append(int(tok))
                    if len(tokens) == 20:
                        break
                out[name] = {"tokens": tokens, "placement": vlm.placement}
        print(json.dumps(out))
    ''')  # fmt: skip
    res = subprocess.run([sys.executable, "-c", script, str(tiny["model"]), str(tiny["mmproj"])], cwd=ROOT,
                         env=gpu_env(tmp_path), capture_output=True, text=True, timeout=1200)  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["cpu"]["placement"]["backend"] == "CPU" and out["gpu"]["placement"]["backend"] == "Vulkan"
    assert f"offloaded {tiny['layers']}/{tiny['layers']} layers to GPU" in llama_log(tmp_path)
    assert len(out["cpu"]["tokens"]) == 20
    assert out["gpu"]["tokens"] == out["cpu"]["tokens"]


def test_auto_offloads_fewer_layers_when_the_device_reports_little_memory(tiny: dict, tmp_path: Path) -> None:
    """--gpu-layers auto on a device whose reported free memory holds the projector and one layer:
    llama.cpp offloads exactly one layer (its log says so), and the caption is made, not refused.
    The fault hook reports llvmpipe as a hardware GPU with that much free memory (auto never
    chooses a software device)."""
    needs = gpu_offload.memory_needs(inspect_gguf(tiny["model"]), inspect_gguf(tiny["mmproj"]),
                                     _n_ctx(tiny))  # fmt: skip
    headroom = gpu_offload.HEADROOM_BYTES  # llvmpipe reports 2 GiB: 5% of it is under the fixed amount
    free = headroom + needs.compute + needs.mmproj + needs.layers_bytes(1) + needs.layers[-1] // 2
    image = hm.make_png(tmp_path / "tile.png", seed=4)
    fault = {"stage": "gpu_devices", "at": "*", "action": "report", "free_bytes": free, "software": False}
    res = hm.run_cli("caption", str(image), *tiny["vlm"], *ARGS, "--gpu-layers", "auto", env=gpu_env(tmp_path),
                     faults=[fault], timeout=1200)  # fmt: skip
    (rec,) = _records(res)
    assert f"offloaded 1/{tiny['layers']} layers to GPU" in llama_log(tmp_path)
    assert rec["gpu_layers"] == f"1/{tiny['layers']}" and rec["backend"] == "Vulkan" and rec["mmproj_device"] == "Vulkan0"


def _n_ctx(tiny: dict) -> int:
    """The context VLM sizes for the test VLM (what auto's KV estimate is for), asked of the adapter."""
    from edge_t2t.describe.families import FAMILIES
    from edge_t2t.describe.vlm import VLM

    return VLM._default_n_ctx(FAMILIES["llava-1.5"], inspect_gguf(tiny["model"]), inspect_gguf(tiny["mmproj"]))


def test_out_of_gpu_memory_stops_keeps_the_finished_and_resumes(tiny: dict, tmp_path: Path) -> None:
    """An index run whose device cannot allocate (ggml-vulkan's buffers forced below what the model
    needs: the allocation fails as it does when the card is full) stops with one line naming the
    fix and keeps the images it finished; the same command on a device that can resumes with the
    rest. The index then tells the CPU-made descriptions (from the caption cache, whose key has no
    device) from the one made on the device: `info` per description set, `verify` in its note."""
    images = tmp_path / "images"
    a, b, c = hm.make_pngs(images, 3, start_seed=10)
    cache = tmp_path / "cache"
    env_cpu = hm.child_env(cache, EDGE_T2T_THREADS="1")
    warm = hm.run_cli("caption", str(a), str(b), *tiny["vlm"], *OPTS, "--json", "--gpu-layers", "0",
                      env=env_cpu, timeout=1200)  # fmt: skip
    assert len(_records(warm)) == 2  # a and b are in the caption cache now
    index = tmp_path / "index"
    env = {**gpu_env(tmp_path), "EDGE_T2T_CACHE_DIR": str(cache)}
    argv = ("index", str(images), *tiny["vlm"], *OPTS, "--index", str(index), "--gpu-layers", "all", "--no-progress",
            "--json")  # fmt: skip
    res = hm.run_cli(*argv, env={**env, "GGML_VK_FORCE_MAX_BUFFER_SIZE": "4096"}, timeout=1200)
    assert res.returncode == 2 and not hm.has_traceback(res.stderr), res.stderr[-3000:]
    (line,) = [x for x in res.stderr.splitlines() if x.startswith("edge-t2t: error:")]
    assert "out of GPU memory on Vulkan0 (llvmpipe" in line and "--gpu-layers 0" in line, line
    assert re.search(r"--gpu-layers \d+\b", line.split("--gpu-layers 0")[0]), line  # fewer layers, named
    info = json.loads(hm.run_cli("info", "--index", str(index), "--json", env=env_cpu).stdout)
    assert info["counts"]["images_ok"] == 2  # a and b were committed before the device gave out
    again = hm.run_cli(*argv, env=env, timeout=1200)
    assert again.returncode == 0, again.stderr[-3000:]
    summary = json.loads(again.stdout)
    assert (summary["added"], summary["skipped"]) == (1, 2)
    info = json.loads(hm.run_cli("info", "--index", str(index), "--json", env=env_cpu).stdout)
    made = sorted((d["backend"], d["device"].split(" (")[0], d["images"]) for d in info["descriptions"])
    assert made == [("CPU", "CPU", 2), ("Vulkan", "Vulkan0", 1)], info["descriptions"]
    checked = hm.run_cli("verify", "--index", str(index), env=env_cpu)
    assert checked.returncode == 0 and "2 image(s) on the CPU; 1 image(s) on the GPU Vulkan0 (llvmpipe" in checked.stderr


def test_doctor_json_names_the_device(tiny: dict, tmp_path: Path) -> None:
    """doctor --json lists the Vulkan devices (llvmpipe, CPU type, as vulkaninfo says) and, with
    llvmpipe made visible, the device llama.cpp offloads to, marked as software."""
    res = hm.run_cli("doctor", "--json", env=gpu_env(tmp_path), timeout=600)
    facts = json.loads(res.stdout)["facts"]
    assert facts["llama_build"] == "vulkan (built from source)"
    assert "Vulkan" in facts["llama_cpp"]["backends"] and "CPU" in facts["llama_cpp"]["backends"]
    (vk,) = [d for d in facts["gpu"]["vulkan"]["devices"] if d["name"].startswith("llvmpipe")]
    assert vk["type"] == "cpu" and vk["memory_bytes"] > 0 and "Mesa" in vk["driver"]
    (dev,) = facts["gpu"]["llama_devices"]
    assert (dev["name"], dev["backend"], dev["software"]) == ("Vulkan0", "Vulkan", True)
    assert dev["description"] == vk["name"] and dev["total_bytes"] > 0
    hidden = json.loads(hm.run_cli("doctor", "--json", env=hm.child_env(tmp_path / "c2"), timeout=600).stdout)
    assert hidden["facts"]["gpu"]["llama_devices"] == []  # llama.cpp's default: a CPU-type device is skipped
