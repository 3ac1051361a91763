"""Do the shape-true test models load and run in the pinned llama.cpp, and how long do they take
to build?

For each shape of edge_t2t.describe.vlm_shapes.SHAPES: build the F16 pair with the product's builder
(testvlm.build_shape, what `edge-t2t models build-test-vlm --shape NAME --precision F16` runs),
then in a fresh process load it through edge_t2t.describe.vlm.VLM (GGUF header check, llama.cpp, libmtmd)
and caption one real RSICD image with the caption schema for a few tokens. A shape llama.cpp
cannot load shows up here as an error, not as a number. The files are removed afterwards unless
--keep.

--build-time NAME... times the full CLI build (F16 + Q8_0 + Q4_K_M) of the named shapes, the
figure behind the "< 2 minutes for a 0.25B and a 1B shape" goal.

    .venv/bin/python bench/shape_check.py                       # every shape (big ones take minutes)
    .venv/bin/python bench/shape_check.py --shapes smolvlm-256m nanollava-1.5 --build-time smolvlm-256m nanollava-1.5
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import ROOT, peak_rss_mib, write_results

sys.path.insert(0, str(ROOT))


def run_child(model: str, mmproj: str, max_tokens: int, threads: int) -> dict:
    """In a fresh process: load the pair (llama.cpp model + libmtmd projector, whose loaders refuse
    a missing, extra or mis-shaped tensor), then decode max_tokens tokens of text. With a negative
    max_tokens, caption one RSICD image for that many tokens instead (minutes per image on a busy
    2-core machine at these sizes: SmolVLM's 2048-px tiling alone is 17 ViT passes)."""
    import io

    from PIL import Image

    from edge_t2t import config
    from edge_t2t.describe import prompts
    from edge_t2t.describe.vlm import VLM, VLMConfig

    buf = io.BytesIO()
    Image.open(config.shared_data_dir() / "rsicd" / "samples" / "airport_17.jpg").convert("RGB").save(buf, "PNG")
    image = max_tokens < 0
    t0 = time.perf_counter()
    with VLM(VLMConfig(Path(model), Path(mmproj), n_threads=threads)) as vlm:
        loaded = time.perf_counter()
        if max_tokens < 0:
            max_tokens = -max_tokens
            text = vlm.generate(buf.getvalue(), prompts.build_prompt(1).text, json_schema=prompts.schema(1),
                                max_tokens=max_tokens)
        else:
            out = vlm._llama.create_completion("Storage tanks beside a road, north of a river:",
                                               max_tokens=max_tokens, temperature=0.0)
            text = out["choices"][0]["text"]
            assert out["usage"]["completion_tokens"] == max_tokens, out["usage"]
        done = time.perf_counter()
        family, n_ctx = vlm.family, vlm.n_ctx
    return {"family": family, "n_ctx": n_ctx, "load_s": round(loaded - t0, 2),
            "run_s": round(done - loaded, 2), "max_tokens": max_tokens, "image": image, "output_head": text[:80],
            "peak_rss_mib": round(peak_rss_mib(), 1)}


def reduced_depth(name: str, layers: int) -> str:
    """Register NAME with every width real but only `layers` text and vision blocks: what proves a
    3-8B shape loads (embedding, head, attention and FFN widths, vocabulary, image size, projector)
    without writing 7-16 GB on a shared machine. Depth only repeats blocks the loader has checked."""
    from dataclasses import replace

    from edge_t2t.describe.vlm_shapes import SHAPES

    shape = SHAPES[name]
    short = f"{name}@{layers}L"
    SHAPES[short] = replace(shape, name=short, text=replace(shape.text, n_layer=layers),
                            vision=replace(shape.vision, n_layer=layers + (1 if shape.vision.projector == "mlp" else 0)))
    return short


def check_shape(name: str, work: Path, threads: int, keep: bool, image_tokens: int) -> dict:
    from edge_t2t.describe import testvlm
    from edge_t2t.describe.vlm_shapes import get_shape

    shape = get_shape(name)
    out = work / name
    row = {"shape": name, "model_card": shape.model_card, "params": testvlm.shape_params(shape)}
    t0 = time.perf_counter()
    try:
        manifest = testvlm.build_shape(name, out, precisions=("F16",))
    except Exception as exc:  # a build failure is a result too
        return {**row, "ok": False, "error": f"build: {type(exc).__name__}: {exc}"}
    row["build_f16_s"] = round(time.perf_counter() - t0, 1)
    row["files_mib"] = {k: round(v["size"] / 2**20, 1) for k, v in manifest["files"].items()}
    cmd = [sys.executable, __file__, "--child", str(out / manifest["models"]["F16"]), str(out / manifest["mmproj"]),
           str(-image_tokens if image_tokens else 8), str(threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    if not keep:
        shutil.rmtree(out, ignore_errors=True)
    lines = [x for x in proc.stdout.splitlines() if x.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-3:]
        return {**row, "ok": False, "error": f"run (exit {proc.returncode}): {' | '.join(tail)}"}
    return {**row, "ok": True, **json.loads(lines[-1])}


def time_cli_build(name: str, work: Path) -> dict:
    """Wall time and CPU time of `edge-t2t models build-test-vlm --shape NAME` (all precisions). On a
    shared machine the CPU time is the steadier figure: a dedicated 2-core laptop needs about that
    (the writer is one thread; the quantizer uses both cores)."""
    import resource

    out = work / f"cli-{name}"
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "edge_t2t", "models", "build-test-vlm", "--shape", name,
                           "--out", str(out), "--json"], capture_output=True, text=True, cwd=ROOT)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    row = {"shape": name, "wall_s": round(wall, 1), "cpu_s": round(cpu, 1), "ok": proc.returncode == 0}
    if proc.returncode == 0:
        m = json.loads(proc.stdout)
        row.update(stages_s=m["seconds"], files_mib={k: round(v["size"] / 2**20, 1) for k, v in m["files"].items()})
    else:
        row["error"] = proc.stderr.strip()[-300:]
    shutil.rmtree(out, ignore_errors=True)
    return row


def main() -> int:
    from edge_t2t.describe.vlm_shapes import SHAPES

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="*", default=list(SHAPES), help="shapes to check (default: all)")
    ap.add_argument("--build-time", nargs="*", default=[], metavar="NAME", help="shapes whose full CLI build is timed")
    ap.add_argument("--reduce-depth", nargs="*", default=[], metavar="NAME",
                    help="also check these shapes at full width but 2 layers (see reduced_depth)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--image-tokens", type=int, default=0, metavar="N",
                    help="caption an RSICD image for N tokens instead of decoding 8 tokens of text")
    ap.add_argument("--work", type=Path, help="where the models are written (default: a temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep the built files")
    ap.add_argument("--name", default="shape_check", help="results file name")
    args = ap.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="edge-t2t-shapes-"))
    builds = []
    for name in args.build_time:
        builds.append(time_cli_build(name, work))
        print(json.dumps(builds[-1]), flush=True)
    rows = []
    for name in [*args.shapes, *(reduced_depth(n, 2) for n in args.reduce_depth)]:
        rows.append(check_shape(name, work, args.threads, args.keep, args.image_tokens))
        print(json.dumps(rows[-1]), flush=True)
    if not args.keep and args.work is None:
        shutil.rmtree(work, ignore_errors=True)

    md = ["| shape | params | F16 text + mmproj | build F16 | loads and runs | load | run (tokens) | peak RSS |",
          "|---|---:|---:|---:|---|---:|---:|---:|"]
    for r in rows:
        files = sum((r.get("files_mib") or {}).values())
        run = "yes" if r["ok"] else f"**no**: {r['error'][:120]}"
        md.append(f"| {r['shape']} | {r['params']['total'] / 1e9:.2f}B | {files / 1024:.2f} GiB | "
                  f"{r.get('build_f16_s', '-')} s | {run} | {r.get('load_s', '-')} s | "
                  f"{r.get('run_s', '-')} s ({r.get('max_tokens', '-')}{' + image' if r.get('image') else ''}) | "
                  f"{r.get('peak_rss_mib', '-')} MiB |")
    if builds:
        md += ["", "| full CLI build (F16 + Q8_0 + Q4_K_M) | wall | CPU | stages (wall) |", "|---|---:|---:|---|"]
        for b in builds:
            md.append(f"| {b['shape']} | {b['wall_s']} s | {b.get('cpu_s', '-')} s | {b.get('stages_s', b.get('error'))} |")
    md += ["", "`NAME@2L`: every width of the real model, 2 text and 2 vision blocks (see `reduced_depth`).",
           "", "Random weights: the output is meaningless; these rows say the pinned llama.cpp accepts and runs "
           "each shape, and what building it costs. The machine was shared with other work while this ran."]
    write_results(args.name, {"threads": args.threads, "shapes": rows, "cli_builds": builds}, "\n".join(md) + "\n")
    print("\n".join(md))
    return 0 if all(r["ok"] for r in rows) and all(b["ok"] for b in builds) else 1


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        print(json.dumps(run_child(sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]))))
        sys.exit(0)
    sys.exit(main())
