"""Images per hour on the CPU path and the GPU path, sequential and parallel variants, per model shape
and precision, in one run, with the device named; and whether the two paths' descriptions agree.

For each (shape, precision) and each path a child process loads the VLM once and describes the
same images with both variant paths, exactly as `edge-t2t caption` calls them
(captioning._run_sequential and captioning._run_parallel; one attempt each, no retry):

- cpu: --gpu-layers 0 (llama.cpp has no device at all: nothing goes to a GPU);
- gpu: --gpu-layers GPU_LAYERS (default all) with the projector on the device. Where the device is
  llama.cpp's choice, the record of the load (llama.cpp's own "offloaded N/M layers to GPU" and
  "CLIP using ... backend" lines) names it; a GPU arm whose log shows no offload is reported as
  failed, never timed as if it were the GPU.

--cpu-cores N pins the CPU arm to N cores (default 2: the field laptop the README's CPU figures come
from), so a run on a many-core GPU machine still compares against a 2-core CPU.

Agreement: per image and variant path, the GPU's variant texts against the CPU's, exact matches and
the mean common prefix. Greedy decoding on another backend sums in another order, so texts can part
where two tokens nearly tie (random-weight models tie often); the tests check token-for-token
equality of a short greedy run separately (tests/test_gpu.py).

On Mesa's software Vulkan device (llvmpipe, no GPU on the machine: --software-device makes it
visible) the figures prove only that the numbers are produced and that the outputs agree: llvmpipe
runs the GPU code on the same CPU, slower than the CPU path. On a real GPU:

    .venv/bin/python bench/gpu_speed.py --shapes qwen2.5-vl-3b,llava-1.5-7b --precisions Q4_K_M --images 3 --name gpu_speed_<card>
    .venv/bin/python bench/gpu_speed.py --software-device --shapes test,smolvlm-256m --precisions F16 --max-tokens 256
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import ROOT, write_results
from caption_speed import _pngs

from edge_t2t import config
from edge_t2t.describe import prompts

MODES = ("sequential", "parallel")


def run_arm(model: Path, mmproj: Path, *, gpu_layers: str, threads: int, n_images: int, variants: int,
            max_tokens: int, image_max_tokens: int = 0) -> dict:  # fmt: skip
    """One path (child process): load once, then per image the sequential and the parallel path."""
    from edge_t2t.describe.captioning import _run_parallel, _run_sequential
    from edge_t2t.describe.gpu_offload import parse_gpu_layers
    from edge_t2t.describe.vlm import VLM, VLMConfig

    t0 = time.perf_counter()
    vlm = VLM(VLMConfig(model, mmproj, n_threads=threads, seed=0, variant_mode="sequential",
                        n_gpu_layers=parse_gpu_layers(gpu_layers), image_max_tokens=image_max_tokens or None))  # fmt: skip
    load_s = time.perf_counter() - t0
    prompt, vp = prompts.build_prompt(variants), prompts.build_variant_prompts(variants)
    schema = prompts.schema(variants)
    params = {"max_tokens": max_tokens, "temperature": 0.0}
    rows = []
    load = [os.getloadavg()[0]]
    for name, png in _pngs(n_images):
        for mode in MODES:
            t, c = time.perf_counter(), time.process_time()
            if mode == "sequential":
                variants_out, raw, tokens = _run_sequential(vlm, png, prompt, schema, True, params, 0.0)
                texts = [raw]
            else:
                variants_out, raw, tokens = _run_parallel(vlm, png, vp, schema, True, params, 0.0)
                texts = raw.split("\n")
            rows.append({"image": name, "mode": mode, "s": time.perf_counter() - t, "cpu_s": time.process_time() - c,
                         "tokens": tokens, "variants": len(variants_out), "texts": texts})  # fmt: skip
        load.append(os.getloadavg()[0])
    placement = dict(vlm.placement)
    vlm.close()
    return {"load_s": load_s, "placement": placement, "rows": rows, "load_avg": max(load)}


def _agreement(cpu: dict, gpu: dict) -> dict:
    """Per variant path: exact text matches and mean common prefix (characters), GPU against CPU."""
    out = {}
    for mode in MODES:
        pairs = [(a, b) for ra, rb in zip(cpu["rows"], gpu["rows"], strict=True) if ra["mode"] == rb["mode"] == mode
                 for a, b in zip(ra["texts"], rb["texts"], strict=False)]  # fmt: skip
        prefix = [len(os.path.commonprefix([a, b])) / max(1, len(a), len(b)) for a, b in pairs]
        out[mode] = {"texts": len(pairs), "identical": sum(a == b for a, b in pairs),
                     "common_prefix_share": sum(prefix) / max(1, len(prefix))}  # fmt: skip
    return out


def _per_hour(arm: dict, mode: str) -> float:
    secs = [r["s"] for r in arm["rows"] if r["mode"] == mode]
    return 3600 * len(secs) / sum(secs) if secs else 0.0


def _configs(args: argparse.Namespace) -> list[tuple[str, str, Path, Path]]:
    from edge_t2t.describe.testvlm import MMPROJ_FILE, build_shape, build_test_vlm, shape_files

    out = []
    precs = tuple(args.precisions.split(","))
    for shape in args.shapes.split(","):
        if shape == "test":  # the tiny test VLM (F16, Q8_0, Q4_K_M)
            d = config.test_vlm_dir()
            build_test_vlm(d)
            out += [("test", p, d / f"tiny-llava.{p}.gguf", d / MMPROJ_FILE) for p in precs]
            continue
        d = config.test_vlm_dir() / shape
        print(f"building/reusing {shape} {precs} in {d}", file=sys.stderr, flush=True)
        build_shape(shape, d, precisions=precs)
        names = shape_files(shape)
        out += [(shape, p, d / names[p], d / names["mmproj"]) for p in precs]
    return out


def _child(args: argparse.Namespace, model: Path, mmproj: Path, path: str, log: Path) -> dict:
    env = {**os.environ, "EDGE_T2T_LLAMA_LOG": str(log)}
    env.setdefault("MESA_SHADER_CACHE_DIR", str(config.cache_dir() / "mesa-shader-cache"))
    if args.software_device:
        env["GGML_VK_VISIBLE_DEVICES"] = "0"
    gpu_layers = "0" if path == "cpu" else args.gpu_layers
    cmd = [sys.executable, str(Path(__file__).resolve()), "--arm", str(model), str(mmproj), gpu_layers,
           "--images", str(args.images), "--variants", str(args.variants), "--max-tokens", str(args.max_tokens),
           "--threads", str(args.threads), "--image-max-tokens", str(args.image_max_tokens)]  # fmt: skip
    if path == "cpu" and args.cpu_cores:  # a 2-core laptop's CPU path, on whatever machine runs the bench
        cores = sorted(os.sched_getaffinity(0))[: args.cpu_cores]
        cmd = ["taskset", "-c", ",".join(map(str, cores)), *cmd]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        return {"error": f"exit {proc.returncode}: {proc.stderr.strip().splitlines()[-1:]}"}
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    text = log.read_text(errors="replace") if log.exists() else ""
    res["log_offload"] = [ln.strip() for ln in text.splitlines() if "offloaded" in ln or "CLIP using" in ln]
    if path == "gpu" and res["placement"].get("backend", "CPU") == "CPU":
        return {"error": f"no offload: llama.cpp's log says {res['log_offload']} (no GPU device visible?)", **res}
    return res


def _write(results: list[dict], args: argparse.Namespace) -> str:
    soft = args.software_device
    table = ("| shape | precision | device | path | images/h sequential | images/h parallel | GPU ÷ CPU (par) "
             "| identical texts seq / par | common prefix seq / par | load avg |\n"
             "|---|---|---|---|---:|---:|---:|---:|---:|---:|\n")  # fmt: skip
    for r in results:
        cpu, gpu = r["arms"].get("cpu", {}), r["arms"].get("gpu", {})
        for path, arm in (("cpu", cpu), ("gpu", gpu)):
            if "error" in arm or not arm:
                table += f"| {r['shape']} | {r['precision']} | - | {path} | failed: {arm.get('error', 'not run')} |||||\n"
                continue
            p = arm["placement"]
            device = "CPU" if p.get("backend") == "CPU" else f"{p['device']} ({p['gpu_layers']} layers, projector {p['mmproj_device']})"
            ratio = agree = prefix = ""
            if path == "gpu" and cpu.get("rows"):
                ratio = f"{_per_hour(gpu, 'parallel') / max(1e-9, _per_hour(cpu, 'parallel')):.2f}×"
                a = r["agreement"]
                agree = " / ".join(f"{a[m]['identical']}/{a[m]['texts']}" for m in MODES)
                prefix = " / ".join(f"{a[m]['common_prefix_share']:.0%}" for m in MODES)
            table += (f"| {r['shape']} | {r['precision']} | {device} | {path} | {_per_hour(arm, 'sequential'):.1f} "
                      f"| {_per_hour(arm, 'parallel'):.1f} | {ratio} | {agree} | {prefix} | {arm['load_avg']:.1f} |\n")  # fmt: skip
    table += (f"\n{args.images} RSICD sample image(s) per path, {args.variants} variants, cap {args.max_tokens} tokens "
              f"per image, greedy; CPU arm on {args.cpu_cores or 'all'} core(s), {args.threads} llama.cpp thread(s); "
              f"GPU arm --gpu-layers {args.gpu_layers}"
              f"{f', --image-max-tokens {args.image_max_tokens}' if args.image_max_tokens else ''}. "
              "Random-weight shape models: constrained output runs to the caps.\n")  # fmt: skip
    if soft:
        table += ("\n**Software device (Mesa llvmpipe): these figures show only that both paths run and whether their "
                  "outputs agree. llvmpipe executes the GPU code on this same CPU; its speed says nothing about a "
                  "GPU.**\n")  # fmt: skip
    data = {"args": vars(args), "software_device": soft, "results": results}
    write_results(args.name, data, table)
    return table


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="test,smolvlm-256m",
                    help="comma-separated shape names; 'test' is the tiny test VLM (default: test,smolvlm-256m)")  # fmt: skip
    ap.add_argument("--precisions", default="F16")
    ap.add_argument("--images", type=int, default=1, help="RSICD samples per path (max 5)")
    ap.add_argument("--variants", type=int, default=prompts.DEFAULT_VARIANTS)
    ap.add_argument("--max-tokens", type=int, default=None, help="per-image cap (default: what the schema needs)")
    ap.add_argument("--threads", type=int, default=2, help="llama.cpp CPU threads in both arms")
    ap.add_argument("--cpu-cores", type=int, default=2, help="pin the CPU arm to this many cores (0: no pinning)")
    ap.add_argument("--gpu-layers", default="all", help="the GPU arm's --gpu-layers (default all)")
    ap.add_argument("--image-max-tokens", type=int, default=0,
                    help="cap one image's tokens, as caption's flag (0: the mmproj's own; SmolVLM: 64 = 2 encoder passes)")  # fmt: skip
    ap.add_argument("--software-device", action="store_true",
                    help="make Mesa's llvmpipe visible to llama.cpp (GGML_VK_VISIBLE_DEVICES=0): no GPU needed, "
                         "no speed meaning")  # fmt: skip
    ap.add_argument("--name", default="gpu_speed", help="results file name under bench/results/")
    ap.add_argument("--arm", nargs=3, metavar=("MODEL", "MMPROJ", "GPU_LAYERS"), help=argparse.SUPPRESS)  # child mode
    args = ap.parse_args()
    args.max_tokens = args.max_tokens or prompts.default_max_tokens(args.variants)
    if args.arm:
        print(json.dumps(run_arm(Path(args.arm[0]), Path(args.arm[1]), gpu_layers=args.arm[2], threads=args.threads,
                                 n_images=args.images, variants=args.variants, max_tokens=args.max_tokens,
                                 image_max_tokens=args.image_max_tokens)))  # fmt: skip
        return
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for shape, prec, model, mmproj in _configs(args):
            entry = {"shape": shape, "precision": prec, "model_mib": model.stat().st_size / 2**20, "arms": {}}
            for path in ("cpu", "gpu"):
                print(f"{shape} {prec} {path}: {model.name}", file=sys.stderr, flush=True)
                entry["arms"][path] = _child(args, model, mmproj, path, Path(tmp) / f"{shape}.{prec}.{path}.log")
            if all("rows" in entry["arms"][p] for p in ("cpu", "gpu")):
                entry["agreement"] = _agreement(entry["arms"]["cpu"], entry["arms"]["gpu"])
            results.append(entry)
            _write(results, args)  # after each configuration, so a cut-short run keeps what it measured
    print(_write(results, args))


if __name__ == "__main__":
    main()
