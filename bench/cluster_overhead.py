"""What describing on Dask workers costs: images/min with --workers 1 and --workers 2 against the plain
local path, same images, same model, same settings, one run.

Arms (all through edge_t2t.describe.captioning.caption_images, the function `edge-t2t caption` calls, cache off
so every image is described every time):
  local      the plain path: one process, one VLM
  process    the plain path in a second, spawned process (no Dask): separates what running the model
             in another process costs from what Dask costs
  workers=1  a local Dask cluster of 1 worker process (its VLM gets all the CPU threads)
  workers=2  a local Dask cluster of 2 worker processes (threads split between them)

Model load and cluster start are one-off costs and are left out: the local VLM is loaded once before
timing, and each cluster is warmed up on other images until every worker holds its model. The arms
are interleaved, round by round in rotating order, because the machine is shared.

Two overhead figures for --workers 1, the goal being under 5% per image:
  - end to end: time per image with workers=1 over the local path's, minus 1;
  - worker idle share: the part of the wall time in which the single worker was not inside
    describe_image (record.seconds, timed on the worker), set against the same share for the local
    path (time outside VLM.generate). It is less sensitive to the machine's other load.

    .venv/bin/python bench/cluster_overhead.py [--rounds 2] [--vlm M.gguf --mmproj P.gguf]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from _common import peak_rss_mib, vlm_pair, write_results

from edge_t2t import config
from edge_t2t.describe.captioning import caption_images
from edge_t2t.describe.describer import ImageInput
from edge_t2t.images import load_image


class TimedVLM:
    """Lends a loaded VLM to caption_images (which must not close it) and times its generate calls."""

    def __init__(self, vlm):
        self._vlm = vlm
        self.model_s = 0.0

    def __getattr__(self, name):
        return getattr(self._vlm, name)

    def generate(self, *args, **kwargs):
        t0 = time.perf_counter()
        try:
            return self._vlm.generate(*args, **kwargs)
        finally:
            self.model_s += time.perf_counter() - t0

    def close(self):
        pass


def _process_arm(conn, cfg, kw) -> None:
    """The 'process' arm: a plain spawned process that loads the VLM once and describes on request."""
    from edge_t2t.describe.vlm import VLM

    timed = TimedVLM(VLM(cfg))
    conn.send("ready")
    while (images := conn.recv()) is not None:
        timed.model_s = 0.0
        recs: list = []
        t0 = time.perf_counter()
        s = caption_images(images, cfg, on_record=recs.append, vlm_factory=lambda c: timed, **kw)
        conn.send({"wall_s": time.perf_counter() - t0, "busy": timed.model_s, "total": s.total,
                   "captioned": s.captioned, "failed": s.failed, "model_calls": s.model_calls})  # fmt: skip


def _image_set(folder: Path, n: int, warmup: int) -> tuple[list[Path], list[Path]]:
    """n distinct timed images and `warmup` others: the RSICD samples, then flipped and rotated copies
    (new bytes, so new tasks; the cluster dedupes equal bytes)."""
    from PIL import Image, ImageOps

    samples = sorted((config.shared_data_dir() / "rsicd" / "samples").glob("*.jpg"))
    if not samples:
        raise SystemExit("no RSICD samples in ../shared/data/rsicd/samples")
    makers = [lambda im: im, ImageOps.mirror, ImageOps.flip, lambda im: im.rotate(90), lambda im: im.rotate(270)]
    out: list[Path] = []
    for i in range(n + warmup):
        src = samples[i % len(samples)]
        with Image.open(src) as im:
            img = makers[(i // len(samples)) % len(makers)](im.convert("RGB"))
            p = folder / f"{i:03d}_{src.stem}.png"
            img.save(p)
        out.append(p)
    return out[:n], out[n:]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=10, help="distinct images per arm and round")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--variants", type=int, default=1)
    ap.add_argument("--max-tokens", type=int, default=1300)
    ap.add_argument("--vlm", help="text GGUF (default: the generated test VLM)")
    ap.add_argument("--mmproj")
    ap.add_argument("--workers", default="1,2", help="cluster sizes to compare with the local path")
    args = ap.parse_args()

    from edge_t2t.describe.cluster import PLUGIN_NAME, open_cluster
    from edge_t2t.describe.vlm import VLM, VLMConfig

    model, mmproj = vlm_pair(args.vlm, args.mmproj)
    cfg = VLMConfig(model=model, mmproj=mmproj)
    sizes = [int(x) for x in args.workers.split(",")]
    kw = {"n_variants": args.variants, "max_tokens": args.max_tokens, "cache": None}
    tmp = tempfile.TemporaryDirectory(prefix="cluster_overhead_")
    images, warm = _image_set(Path(tmp.name), args.images, 2 * max(sizes) + 2)

    # The client's own work per image (decode, hash, downscale, PNG for the worker): what caps how many
    # workers one client can feed. A component figure, timed alone.
    t0 = time.perf_counter()
    for p in images:
        ImageInput.from_loaded(load_image(p))
    client_ms = (time.perf_counter() - t0) * 1000 / len(images)

    vlm = VLM(cfg)
    test_model, model_name = vlm.is_test_model, vlm.model_name
    timed = TimedVLM(vlm)
    caption_images(warm[:1], cfg, vlm_factory=lambda c: timed, **kw)  # page-in, first-call allocations

    import multiprocessing

    parent_end, child_end = multiprocessing.get_context("spawn").Pipe()
    child = multiprocessing.get_context("spawn").Process(target=_process_arm, args=(child_end, cfg, kw))
    child.start()
    parent_end.recv()
    parent_end.send(warm[:1])
    parent_end.recv()

    stack = {}
    for n in sizes:  # clusters stay up for the whole run, so the rounds can interleave
        cm = open_cluster(workers=n)
        session = cm.__enter__()
        stack[n] = (cm, session)
        t0 = time.perf_counter()
        for _ in range(5):
            caption_images(warm, cfg, executor=session, **kw)
            loaded = session.client.run(lambda dask_worker: dask_worker.plugins[PLUGIN_NAME].vlm is not None)
            if len(loaded) == n and all(loaded.values()):
                break
        print(f"workers={n}: started and warmed up in {time.perf_counter() - t0:.1f} s "
              f"({sum(loaded.values())}/{n} workers hold the model)", flush=True)  # fmt: skip

    arms = ["local", "process"] + [f"workers={n}" for n in sizes]
    rows: dict[str, list[dict]] = {a: [] for a in arms}
    for r in range(args.rounds):
        order = arms[r % len(arms):] + arms[: r % len(arms)]
        for arm in order:
            if arm == "process":
                t0 = time.perf_counter()
                parent_end.send(images)
                got = parent_end.recv()
                wall = time.perf_counter() - t0
                row = {"round": r, "wall_s": wall, "images": got["total"], "described": got["captioned"],
                       "failed": got["failed"], "model_busy_s": got["busy"], "model_calls": got["model_calls"]}  # fmt: skip
            else:
                recs: list = []
                timed.model_s = 0.0
                session = None if arm == "local" else stack[int(arm.split("=")[1])][1]
                t0 = time.perf_counter()
                s = caption_images(images, cfg, on_record=recs.append, executor=session,
                                   vlm_factory=(lambda c: timed) if session is None else None, **kw)  # fmt: skip
                wall = time.perf_counter() - t0
                busy = timed.model_s if session is None else sum(rec.seconds for rec in recs)
                row = {"round": r, "wall_s": wall, "images": s.total, "described": s.captioned, "failed": s.failed,
                       "model_busy_s": busy, "model_calls": s.model_calls}  # fmt: skip
            rows[arm].append(row)
            print(f"round {r} {arm:10s} {wall:7.1f} s  {60 * row['images'] / wall:6.1f} img/min  described "
                  f"{row['described']} failed {row['failed']}  busy {row['model_busy_s']:.1f} s", flush=True)  # fmt: skip

    for cm, _ in stack.values():
        cm.__exit__(None, None, None)
    parent_end.send(None)
    child.join()
    vlm.close()

    def summary(arm: str) -> dict:
        rs = rows[arm]
        wall = sum(r["wall_s"] for r in rs)
        n = sum(r["images"] for r in rs)
        workers = int(arm.split("=")[1]) if "=" in arm else 1
        return {
            "s_per_image": wall / n,
            "images_per_min": 60 * n / wall,
            "per_round_images_per_min": [60 * r["images"] / r["wall_s"] for r in rs],
            # share of the wall time in which the model (each worker) was not describing
            "idle_share": 1 - sum(r["model_busy_s"] for r in rs) / (wall * workers),
            "failed_per_round": statistics.mean(r["failed"] for r in rs),
        }

    sums = {a: summary(a) for a in arms}
    base = sums["local"]
    for a in arms:
        sums[a]["time_per_image_over_local"] = sums[a]["s_per_image"] / base["s_per_image"]
        sums[a]["speedup_over_local"] = base["s_per_image"] / sums[a]["s_per_image"]
    w1 = sums.get("workers=1")
    ratios = {}
    if w1:
        ratios = {
            "overhead_per_image_end_to_end": w1["time_per_image_over_local"] - 1,  # goal < 0.05
            "overhead_idle_share_added": w1["idle_share"] - base["idle_share"],  # goal < 0.05
            # Dask alone: --workers 1 against the same path in a plain second process
            "workers1_over_process_time_per_image": w1["s_per_image"] / sums["process"]["s_per_image"],
            "process_over_local_time_per_image": sums["process"]["time_per_image_over_local"],
        }
    per_image_s = base["s_per_image"]
    data = {
        "model": model.name, "test_model": test_model, "model_name": model_name, "images": len(images),
        "rounds": args.rounds, "variants": args.variants, "max_tokens": args.max_tokens,
        "client_ms_per_image": client_ms, "arms": sums, "ratios": ratios, "rows": rows,
        "peak_rss_mib_client": peak_rss_mib(),
    }  # fmt: skip
    table = "| arm | s/image | images/min | × local time/image | worker idle share |\n|---|---:|---:|---:|---:|\n"
    for a in arms:
        s = sums[a]
        table += (f"| {a} | {s['s_per_image']:.2f} | {s['images_per_min']:.1f} | {s['time_per_image_over_local']:.3f} "
                  f"| {100 * s['idle_share']:.1f}% |\n")  # fmt: skip
    if ratios:
        table += (
            f"\nScheduling overhead at --workers 1: {100 * ratios['overhead_per_image_end_to_end']:+.1f}% time per "
            f"image end to end, {100 * ratios['overhead_idle_share_added']:+.1f} points of worker idle time over the "
            "local path's (goal: under 5%). "
            f"Against the plain path in a second process (no Dask), --workers 1 takes "
            f"{ratios['workers1_over_process_time_per_image']:.3f}x the time per image; that process takes "
            f"{ratios['process_over_local_time_per_image']:.3f}x the local path's.\n"
        )
    table += (
        f"\nClient work per image (decode, hash, PNG for the worker), timed alone: {client_ms:.0f} ms. "
        f"One client can feed about {per_image_s * 1000 / max(client_ms, 1e-6):.0f} workers at this model's "
        f"{per_image_s:.1f} s/image before it becomes the bottleneck.\n"
        f"\nModel: {model.name} ({'generated TEST model, random weights: it measures the machinery, not a real VLM' if test_model else model_name}), "
        f"{args.variants} variant(s), max_tokens {args.max_tokens}; {len(images)} distinct images x {args.rounds} "
        "rounds per arm, arms interleaved; cache off; model load and cluster start excluded. "
        "The machine was shared with other work while this ran.\n"
    )  # fmt: skip
    path = write_results("cluster_overhead", data, table)
    print(table)
    print(f"wrote {path}")
    tmp.cleanup()


if __name__ == "__main__":
    main()
