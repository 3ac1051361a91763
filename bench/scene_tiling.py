"""Tiling + reading large scenes: chips per second and peak RSS across scene sizes, against the time
a VLM needs to describe the same chips.

For each scene size (synthetic GeoTIFF mosaics from edge_t2t/scene/mosaic.py: UTM, tiled, deflate), a
fresh child process runs the product's path, edge_t2t.scene.tiling: open the scene (one stretch per
scene), plan its chips (a decimated no-data mask read per chip), and read every chip as the 8-bit
RGB picture the VLM gets, plus its PNG hand-off. Peak RSS is the child's own (ru_maxrss), next to
a child that only imports the same libraries.

The peer is the VLM on the same chips, through the same ChipDescriber that `index` uses. No
shape-true VLM was available when this ran (branch issue-11b had none), so the tiny random-weight
test model stands in: it is far faster than any real VLM, so the ratio is an upper bound.

    .venv/bin/python bench/scene_tiling.py [--sizes 2048,8192,20480] [--chip 512] [--vlm-chips 3]
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

from _common import ROOT, write_results

WORK = Path("/tmp/edge-t2t-bench-scenes")


def _child(path: str, chip: int, overlap: float) -> dict:
    from edge_t2t.images import to_png_bytes
    from edge_t2t.scene.tiling import open_scene, plan_chips

    t0 = time.perf_counter()
    scene = open_scene(path)
    t1 = time.perf_counter()
    plans = plan_chips(scene, chip, overlap)
    t2 = time.perf_counter()
    read_s = png_s = 0.0
    n = 0
    for p in plans:
        if p.skipped:
            continue
        a = time.perf_counter()
        image = scene.read_chip(p.window)
        b = time.perf_counter()
        to_png_bytes(image)
        png_s += time.perf_counter() - b
        read_s += b - a
        n += 1
    scene.close()
    return {
        "width": scene.width, "height": scene.height, "dtype": scene.dtype, "bands": scene.count,
        "chips": n, "skipped": len(plans) - n, "open_s": t1 - t0, "plan_s": t2 - t1, "read_s": read_s,
        "png_s": png_s, "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "stretch": scene.stretch.source if scene.stretch else "",
    }  # fmt: skip


def _baseline() -> dict:
    import numpy  # noqa: F401
    import PIL.Image  # noqa: F401
    import rasterio  # noqa: F401

    import edge_t2t.scene.tiling  # noqa: F401

    return {"peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def _run_child(*args: str) -> dict:
    out = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def _vlm_seconds_per_chip(scene_path: Path, chip: int, n_chips: int, variants: int) -> dict:
    """The VLM's time per chip on the first chips of a scene, through index's ChipDescriber."""
    from edge_t2t import config
    from edge_t2t.describe.vlm import VLMConfig
    from edge_t2t.scene.scene_index import ChipDescriber
    from edge_t2t.scene.tiling import chip_name, open_scene, plan_windows

    d = config.test_vlm_dir()
    cfg = VLMConfig(model=d / "tiny-llava.F16.gguf", mmproj=d / "tiny-llava-mmproj.F16.gguf")
    describer = ChipDescriber(cfg, variants, {"cache": None})
    with open_scene(scene_path) as scene:
        wins = plan_windows(scene.width, scene.height, chip, 0.125)[:n_chips]
        named = [(chip_name(scene_path, w), scene.read_chip(w)) for w in wins]
    describer.describe(named[:1])  # model load and warm-up, untimed
    t0 = time.perf_counter()
    recs, fails, _ = describer.describe(named)
    seconds = time.perf_counter() - t0
    describer.close()
    return {"model": "tiny test VLM (random weights, 3 MB)", "variants": variants, "chips": len(named),
            "described": len(recs), "failed": len(fails), "seconds_per_chip": seconds / len(named)}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="2048,8192,20480")
    ap.add_argument("--chip", type=int, default=512)
    ap.add_argument("--overlap", type=float, default=0.125)
    ap.add_argument("--vlm-chips", type=int, default=3)
    ap.add_argument("--vlm-variants", type=int, default=5)
    ap.add_argument("--keep", action="store_true", help="keep the generated scenes in " + str(WORK))
    ap.add_argument("--child", nargs=3, metavar=("PATH", "CHIP", "OVERLAP"), help=argparse.SUPPRESS)
    ap.add_argument("--baseline", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(_child(args.child[0], int(args.child[1]), float(args.child[2]))))
        return
    if args.baseline:
        print(json.dumps(_baseline()))
        return

    from edge_t2t.scene.mosaic import write_mosaic

    WORK.mkdir(parents=True, exist_ok=True)
    cases = [(int(s), "uint8", 3) for s in args.sizes.split(",")] + [(8192, "uint16", 4)]
    rows = []
    baseline = _run_child("--baseline")["peak_rss_mib"]
    for size, dtype, bands in cases:
        path = WORK / f"scene_{size}_{dtype}x{bands}.tif"
        t0 = time.perf_counter()
        if not path.exists():
            grid = size // 256
            write_mosaic(path, grid=(grid, grid), tile=256, dtype=dtype, bands=bands, distinct_scenes=40)
        made = time.perf_counter() - t0
        r = _run_child("--child", str(path), str(args.chip), str(args.overlap))
        r["file_mib"] = path.stat().st_size / 2**20
        r["write_s"] = made
        r["tiling_s"] = r["open_s"] + r["plan_s"] + r["read_s"]
        r["chips_per_s"] = r["chips"] / r["tiling_s"]
        rows.append(r)
        print(f"{size}² {dtype}x{bands}: {r['chips']} chips, {r['chips_per_s']:.1f} chips/s, "
              f"peak RSS {r['peak_rss_mib']:.0f} MiB", file=sys.stderr)  # fmt: skip
    vlm = _vlm_seconds_per_chip(WORK / f"scene_{cases[0][0]}_uint8x3.tif", args.chip, args.vlm_chips, args.vlm_variants)
    rgb = [r for r in rows if r["dtype"] == "uint8"]
    peaks = [r["peak_rss_mib"] for r in rgb]
    per_chip = max(r["tiling_s"] / r["chips"] for r in rows)
    summary = {
        "peak_rss_ratio_max_over_min": max(peaks) / min(peaks),
        "goal_rss_flat_within_1_5x": max(peaks) / min(peaks) <= 1.5,
        "tiling_seconds_per_chip_worst": per_chip,
        "tiling_share_of_vlm_time": per_chip / vlm["seconds_per_chip"],
        "goal_under_5_percent": per_chip / vlm["seconds_per_chip"] < 0.05,
    }
    md = [
        f"Chip {args.chip} px, overlap {args.overlap}; tiled deflate GeoTIFFs (UTM). Shared 2-core machine: "
        "timings are noisy, the ratios are the figures.",
        "",
        "| scene | type | file | chips | skipped | open | plan (no-data) | read chips | chips/s | PNG hand-off | peak RSS |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        md.append(
            f"| {r['width']}² | {r['dtype']} × {r['bands']} | {r['file_mib']:.0f} MiB | {r['chips']} | {r['skipped']} | "
            f"{r['open_s']:.2f} s | {r['plan_s']:.2f} s | {r['read_s']:.2f} s | {r['chips_per_s']:.1f} | "
            f"{r['png_s'] / r['chips'] * 1000:.1f} ms/chip | {r['peak_rss_mib']:.0f} MiB |"
        )
    md += [
        "",
        f"Baseline (imports only): {baseline:.0f} MiB. Peak RSS max/min over the 8-bit sizes: "
        f"{summary['peak_rss_ratio_max_over_min']:.2f}× (goal ≤ 1.5×).",
        f"VLM peer: {vlm['model']}, {vlm['variants']} variants, {vlm['seconds_per_chip']:.2f} s per chip "
        f"({vlm['described']} of {vlm['chips']} described). Tiling + reading, worst case "
        f"{per_chip * 1000:.1f} ms per chip = {summary['tiling_share_of_vlm_time'] * 100:.2f}% of it (goal < 5%). "
        "A real VLM is slower than the tiny model, so the share is smaller with one.",
    ]
    write_results("scene_tiling", {"args": vars(args), "baseline_rss_mib": baseline, "rows": rows, "vlm": vlm,
                                   "summary": summary}, "\n".join(md) + "\n")  # fmt: skip
    print("\n".join(md))
    if not args.keep:
        shutil.rmtree(WORK, ignore_errors=True)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
