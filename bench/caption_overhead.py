"""Overhead of the caption pipeline over a bare llama-cpp-python call, same run, same machine.

Arm "pipeline": edge_t2t.describe.captioning.caption_images on one image (cache disabled): find, read+hash,
decode, PNG hand-off, VLM.generate with the RSRT schema, parse, quality check.
Arm "bare": llama_cpp.Llama + the same chat handler, the image file sent as-is (data: URI), the same
prompt, schema, max_tokens, temperature and seed, then json.loads of the answer.

Both models are loaded once, before timing, and each arm makes one untimed warm-up call. The arms are interleaved image by image, in alternating
order, and repeated, because the machine is shared. Each image's time is split into the time inside
create_chat_completion (the model) and the rest (our code), so the overhead figure does not depend
on the two arms producing the same number of tokens.

    .venv/bin/python bench/caption_overhead.py [--images 5] [--reps 3] [--variants 1]
"""

from __future__ import annotations

import argparse
import base64
import json
import statistics
import time
from pathlib import Path

from _common import peak_rss_mib, percentile_ms, write_results

from edge_t2t import config
from edge_t2t.describe import prompts
from edge_t2t.describe.captioning import caption_images


def _rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


class Timed:
    """Wraps Llama.create_chat_completion to time the model call and read llama.cpp's perf counters."""

    def __init__(self, llama):
        import llama_cpp

        self.llama, self.lc = llama, llama_cpp
        self.inner = llama.create_chat_completion
        llama.create_chat_completion = self
        self.last: dict = {}

    def __call__(self, *args, **kwargs):
        self.lc.llama_perf_context_reset(self.llama.ctx)
        t0, c0 = time.perf_counter(), time.process_time()
        out = self.inner(*args, **kwargs)
        seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
        perf = self.lc.llama_perf_context(self.llama.ctx)
        usage = out.get("usage") or {}
        self.last = {
            "model_s": seconds,
            "model_cpu_s": cpu,
            "prompt_tokens": int(perf.n_p_eval) or int(usage.get("prompt_tokens", 0)),
            "prompt_ms": float(perf.t_p_eval_ms),
            "gen_tokens": int(usage.get("completion_tokens", 0)) or int(perf.n_eval),
            "gen_ms": float(perf.t_eval_ms),
        }
        return out


class Borrowed:
    """Lends a loaded VLM to caption_images without letting it close it."""

    def __init__(self, vlm):
        self._vlm = vlm

    def __getattr__(self, name):
        return getattr(self._vlm, name)

    def close(self):
        pass


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=5, help="how many RSICD samples (max 5)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--variants", type=int, default=1)
    ap.add_argument("--max-tokens", type=int, default=1300)
    ap.add_argument("--threads", type=int, default=1, help="llama.cpp threads for both arms (1 is fastest for the tiny test model)")
    ap.add_argument("--vlm", help="text GGUF (default: the generated test VLM)")
    ap.add_argument("--mmproj")
    args = ap.parse_args()

    import llama_cpp
    from llama_cpp import llama_chat_format

    from edge_t2t.describe.testvlm import MMPROJ_FILE, MODEL_FILE, build_test_vlm
    from edge_t2t.describe.vlm import FAMILIES, VLM, VLMConfig

    if args.vlm:
        model, mmproj = Path(args.vlm), Path(args.mmproj)
    else:
        build_test_vlm(config.test_vlm_dir())
        model, mmproj = config.test_vlm_dir() / MODEL_FILE, config.test_vlm_dir() / MMPROJ_FILE
    images = sorted((config.shared_data_dir() / "rsicd" / "samples").glob("*.jpg"))[: args.images]
    # The sequential path: the bare arm is one create_chat_completion call (bench/caption_speed.py
    # measures the parallel path against it).
    cfg = VLMConfig(model=model, mmproj=mmproj, n_threads=args.threads, seed=0, variant_mode="sequential")

    rss0 = _rss_mib()
    vlm = VLM(cfg)
    rss_pipeline = _rss_mib() - rss0
    timed_pipeline = Timed(vlm._llama)  # bench only: reach into the adapter to time the model call
    handler_cls = getattr(llama_chat_format, FAMILIES[vlm.family].handler)
    rss1 = _rss_mib()
    bare = llama_cpp.Llama(
        model_path=str(model), chat_handler=handler_cls(clip_model_path=str(mmproj), verbose=False),
        n_ctx=vlm.n_ctx, n_batch=512, n_threads=args.threads, n_threads_batch=args.threads, seed=0, verbose=False,
    )  # fmt: skip
    rss_bare = _rss_mib() - rss1
    timed_bare = Timed(bare)
    prompt = prompts.build_prompt(args.variants)
    schema = prompts.schema(args.variants)

    def run_pipeline(img: Path) -> dict:
        t0, c0 = time.perf_counter(), time.process_time()
        recs: list = []
        s = caption_images([img], cfg, n_variants=args.variants, cache=None, max_tokens=args.max_tokens,
                           on_record=recs.append, vlm_factory=lambda c: Borrowed(vlm))  # fmt: skip
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        assert s.failed == 0, s.failures
        return {**timed_pipeline.last, "wall_s": wall, "cpu_s": cpu, "retries": s.retries,
                "variants": len(recs[0].variants)}  # fmt: skip

    def run_bare(img: Path) -> dict:
        t0, c0 = time.perf_counter(), time.process_time()
        uri = "data:image/jpeg;base64," + base64.b64encode(img.read_bytes()).decode("ascii")
        out = bare.create_chat_completion(
            messages=[{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": uri}}, {"type": "text", "text": prompt.text}]}],
            max_tokens=args.max_tokens, temperature=0.0, seed=0,
            response_format={"type": "json_object", "schema": schema},
        )  # fmt: skip
        try:
            n = len(json.loads(out["choices"][0]["message"]["content"])["variants"])
        except (ValueError, KeyError):
            n = 0
        return {**timed_bare.last, "wall_s": time.perf_counter() - t0, "cpu_s": time.process_time() - c0,
                "retries": 0, "variants": n}  # fmt: skip

    rows: dict[str, list[dict]] = {"pipeline": [], "bare": []}
    arms = {"pipeline": run_pipeline, "bare": run_bare}
    for arm in arms.values():  # untimed warm-up: first calls pay one-off allocation and page-in costs
        arm(images[0])
    for rep in range(args.reps):
        for i, img in enumerate(images):
            order = ["pipeline", "bare"] if (rep + i) % 2 == 0 else ["bare", "pipeline"]
            for arm in order:
                r = arms[arm](img)
                r["image"] = img.name
                rows[arm].append(r)
                print(f"rep {rep} {img.name:28s} {arm:8s} wall {r['wall_s']:6.2f}s model {r['model_s']:6.2f}s "
                      f"cpu {r['cpu_s']:6.2f}s (model {r['model_cpu_s']:6.2f}s) prompt {r['prompt_tokens']} "
                      f"gen {r['gen_tokens']} tok", flush=True)  # fmt: skip

    def summary(arm: str) -> dict:
        rs = rows[arm]
        walls = [r["wall_s"] for r in rs]
        outside = [r["wall_s"] - r["model_s"] for r in rs]
        cpus = [r["cpu_s"] for r in rs]
        cpu_outside = [r["cpu_s"] - r["model_cpu_s"] for r in rs]
        gen_tok, gen_ms = sum(r["gen_tokens"] for r in rs), sum(r["gen_ms"] for r in rs)
        p_tok, p_ms = sum(r["prompt_tokens"] for r in rs), sum(r["prompt_ms"] for r in rs)
        return {
            "images_timed": len(rs),
            "mean_s_per_image": statistics.mean(walls),
            "p50_ms": percentile_ms(walls, 50),
            "images_per_min": 60 / statistics.mean(walls),
            "mean_outside_model_ms": statistics.mean(outside) * 1000,
            "mean_cpu_s_per_image": statistics.mean(cpus),
            "cpu_ms_per_generated_token": sum(cpus) * 1000 / max(1, sum(r["gen_tokens"] for r in rs)),
            "mean_cpu_outside_model_ms": statistics.mean(cpu_outside) * 1000,
            "outside_model_share": sum(outside) / sum(walls),
            "ms_per_generated_token_end_to_end": sum(walls) * 1000 / max(1, gen_tok),
            "generated_tokens_mean": gen_tok / len(rs),
            "gen_tokens_per_s": gen_tok / (gen_ms / 1000) if gen_ms else 0.0,
            "prompt_tokens_per_s": p_tok / (p_ms / 1000) if p_ms else 0.0,
            "prompt_tokens_mean": p_tok / len(rs),
            "retries": sum(r["retries"] for r in rs),
            "rss_after_load_mib": rss_pipeline if arm == "pipeline" else rss_bare,
        }

    sp, sb = summary("pipeline"), summary("bare")
    ratios = {
        "time_per_image_pipeline_over_bare": sp["mean_s_per_image"] / sb["mean_s_per_image"],
        "time_per_generated_token_pipeline_over_bare": sp["ms_per_generated_token_end_to_end"]
        / sb["ms_per_generated_token_end_to_end"],
        "cpu_per_image_pipeline_over_bare": sp["mean_cpu_s_per_image"] / sb["mean_cpu_s_per_image"],
        "cpu_per_generated_token_pipeline_over_bare": sp["cpu_ms_per_generated_token"] / sb["cpu_ms_per_generated_token"],
        "pipeline_overhead_share": sp["outside_model_share"],  # goal <= 0.05
        "extra_ms_per_image_outside_model": sp["mean_outside_model_ms"] - sb["mean_outside_model_ms"],
    }
    data = {
        "model": model.name, "mmproj": mmproj.name, "family": vlm.family, "test_model": vlm.is_test_model,
        "images": [p.name for p in images], "reps": args.reps, "variants": args.variants,
        "max_tokens": args.max_tokens, "threads": args.threads,
        "pipeline": sp, "bare": sb, "ratios": ratios, "peak_rss_mib_process": peak_rss_mib(), "rows": rows,
    }  # fmt: skip
    table = (
        "| arm | s/image | images/min | outside model (ms/image) | CPU s/image | CPU ms/gen token | gen tok/image "
        "| gen tok/s | prompt tok/s | ms/gen token (end to end) |\n|---|---|---|---|---|---|---|---|---|---|\n"
    )
    for name, s in (("pipeline (edge-t2t caption path)", sp), ("bare llama-cpp-python", sb)):
        table += (
            f"| {name} | {s['mean_s_per_image']:.2f} | {s['images_per_min']:.1f} | {s['mean_outside_model_ms']:.1f} "
            f"| {s['mean_cpu_s_per_image']:.2f} | {s['cpu_ms_per_generated_token']:.2f} "
            f"| {s['generated_tokens_mean']:.0f} | {s['gen_tokens_per_s']:.1f} | {s['prompt_tokens_per_s']:.1f} "
            f"| {s['ms_per_generated_token_end_to_end']:.2f} |\n"
        )
    table += (
        f"\nRatios (pipeline / bare): time per image {ratios['time_per_image_pipeline_over_bare']:.3f}, "
        f"time per generated token {ratios['time_per_generated_token_pipeline_over_bare']:.3f}; "
        f"CPU per image {ratios['cpu_per_image_pipeline_over_bare']:.3f}, "
        f"CPU per generated token {ratios['cpu_per_generated_token_pipeline_over_bare']:.3f}. "
        f"Pipeline time outside the model call: {100 * ratios['pipeline_overhead_share']:.2f}% of its wall time "
        f"(goal <= 5%), {ratios['extra_ms_per_image_outside_model']:.1f} ms/image more than the bare arm's.\n\n"
        f"Model: {model.name} ({'generated test model, random weights' if vlm.is_test_model else vlm.model_name}), "
        f"{args.variants} variant(s), max_tokens {args.max_tokens}, {args.threads} threads, "
        f"{len(images)} RSICD samples x {args.reps} reps, arms interleaved. RSS after load: pipeline VLM "
        f"{rss_pipeline:.0f} MiB, bare Llama {rss_bare:.0f} MiB; process peak {peak_rss_mib():.0f} MiB.\n"
    )
    path = write_results("caption_overhead", data, table)
    print(table)
    print(f"wrote {path}")
    vlm.close()
    bare.close()


if __name__ == "__main__":
    main()
