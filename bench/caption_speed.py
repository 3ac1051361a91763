"""Seconds per image of the two caption paths, sequential and parallel, per model shape x precision.

For each (shape, precision) a child process loads the VLM once and, image by image in alternating
order, runs the two paths exactly as `edge-t2t caption` calls them (captioning._run_sequential and
captioning._run_parallel: one attempt each, the retry left out so both arms do the same work):

- sequential: one create_chat_completion writes all N variants under the N-variant schema;
- parallel: the image encoded once, the shared prompt decoded once, the N variants generated as N
  sequences of one batch, each under ONE variant's schema with max_tokens / N tokens;
- multi (optional, --multi K): K images' sequences in one context, K x N sequences per batch.

It reports image encoding time, prompt and generation tokens/s, seconds per image of each arm and
their ratio (images/hour parallel over sequential, same run), peak RSS of the child and file sizes.

The shapes are random-weight GGUFs with real architectures (`edge-t2t models build-test-vlm
--shape NAME`, built here on demand). Random weights make constrained output run to the token
caps, so these timings are a worst case for the given cap. With --max-tokens below the default
(what the schema's longest answer needs, about 2,040 for 5 variants) the bench also projects the
full-cap time from the measured rates; the table says which figures are projections.

Each arm's CPU seconds are kept beside its wall seconds, with the 1-minute load average, because on
a machine shared with other work wall time mostly measures the others. There, run --threads 1:
with 2 threads llama.cpp's OpenMP workers wait at a barrier after every graph node for a thread
that is not scheduled, and a decode step of the SmolVLM shape took 7.3 s against 0.24 s on one
thread at load average 16 on 2 cores (bench/decode_threads.py).

SmolVLM (idefics3) upscales a 224 px image to 16 tiles + an overview (1,088 tokens, 17 encoder
passes); --image-max-tokens 64 (caption's flag) gives 1 tile + the overview (128 tokens, 2 passes).

    .venv/bin/python bench/caption_speed.py --shapes smolvlm-256m,nanollava-1.5 --precisions Q4_K_M,F16
    .venv/bin/python bench/caption_speed.py --vlm M.gguf --mmproj P.gguf          # your own model
    .venv/bin/python bench/caption_speed.py --variety                             # focus vs seed variants
"""

from __future__ import annotations

import argparse
import ctypes
import io
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from _common import ROOT, peak_rss_mib, write_results

from edge_t2t import config
from edge_t2t.describe import prompts


def _pngs(n: int) -> list[tuple[str, bytes]]:
    from PIL import Image

    out = []
    for p in sorted((config.shared_data_dir() / "rsicd" / "samples").glob("*.jpg"))[:n]:
        buf = io.BytesIO()
        Image.open(p).convert("RGB").save(buf, format="PNG")
        out.append((p.name, buf.getvalue()))
    return out


class _SeqTimer:
    """Wraps Llama.create_chat_completion: llama.cpp's perf counters for the sequential arm."""

    def __init__(self, llama):
        import llama_cpp

        self.llama, self.lc, self.inner, self.last = llama, llama_cpp, llama.create_chat_completion, {}
        llama.create_chat_completion = self

    def __call__(self, *args, **kwargs):
        self.lc.llama_perf_context_reset(self.llama.ctx)
        out = self.inner(*args, **kwargs)
        perf = self.lc.llama_perf_context(self.llama.ctx)
        self.last = {"prompt_tokens": int(perf.n_p_eval), "prompt_s": perf.t_p_eval_ms / 1000,
                     "gen_tokens": int(perf.n_eval), "gen_s": perf.t_eval_ms / 1000}  # fmt: skip
        return out


class _ParTimer:
    """Wraps VLM.describe_parallel to keep its ParallelResult (phase timings)."""

    def __init__(self, vlm):
        self.inner, self.last = vlm.describe_parallel, None
        vlm.describe_parallel = self

    def __call__(self, *args, **kwargs):
        self.last = self.inner(*args, **kwargs)
        return self.last


def run_one(model: Path, mmproj: Path, *, threads: int, n_images: int, variants: int, max_tokens: int,
            multi: int, reps: int, warm_up: bool, image_max_tokens: int = 0) -> dict:  # fmt: skip
    """One (model, precision): both arms, interleaved; runs in a child process (own peak RSS)."""
    from edge_t2t.describe.captioning import _run_parallel, _run_sequential
    from edge_t2t.describe.vlm import VLM, VLMConfig

    t0 = time.perf_counter()
    # Loaded for the sequential path (its full-size context); the parallel path makes its own.
    vlm = VLM(VLMConfig(model, mmproj, n_threads=threads, seed=0, variant_mode="sequential",
                        image_max_tokens=image_max_tokens or None))  # fmt: skip
    load_avg = [os.getloadavg()[0]]
    load_s = time.perf_counter() - t0
    seq_t, par_t = _SeqTimer(vlm._llama), _ParTimer(vlm)  # bench only: reach into the adapter for timings
    prompt, vp = prompts.build_prompt(variants), prompts.build_variant_prompts(variants)
    schema = prompts.schema(variants)
    params = {"max_tokens": max_tokens, "temperature": 0.0}
    images = _pngs(n_images)
    rows: dict[str, list[dict]] = {"sequential": [], "parallel": [], "multi": []}

    # CPU seconds of this process (all its threads) beside wall seconds: on a machine shared with
    # other work the wall time mostly measures the others; CPU time is the cross-check.
    def sequential(png: bytes) -> dict:
        t, c = time.perf_counter(), time.process_time()
        vs, _, tokens = _run_sequential(vlm, png, prompt, schema, True, params, 0.0)
        return {"s": time.perf_counter() - t, "cpu_s": time.process_time() - c, "tokens": tokens,
                "variants": len(vs), **seq_t.last}  # fmt: skip

    def parallel(png: bytes) -> dict:
        t, c = time.perf_counter(), time.process_time()
        vs, _, tokens = _run_parallel(vlm, png, vp, schema, True, params, 0.0)
        r = par_t.last
        return {"s": time.perf_counter() - t, "cpu_s": time.process_time() - c, "tokens": tokens,
                "variants": len(vs), "encode_s": r.encode_s,
                "prompt_tokens": r.prompt_tokens, "prompt_s": r.prompt_s, "gen_tokens": r.gen_tokens, "gen_s": r.gen_s,
                "gen_decode_s": r.gen_decode_s, "encode_cpu_s": r.encode_cpu_s, "prompt_cpu_s": r.prompt_cpu_s,
                "gen_cpu_s": r.gen_cpu_s}  # fmt: skip

    arms = {"sequential": sequential, "parallel": parallel}
    if warm_up:  # untimed: the first calls pay one-off allocation and page-in costs
        for arm in arms.values():
            arm(images[0][1])
    for rep in range(reps):
        for i, (name, png) in enumerate(images):
            order = ["sequential", "parallel"] if (rep + i) % 2 == 0 else ["parallel", "sequential"]
            for arm in order:
                r = arms[arm](png)
                rows[arm].append({"image": name, "load_avg_1m": os.getloadavg()[0], **r})
                load_avg.append(os.getloadavg()[0])
                print(f"  {model.name} {name} {arm:10s} {r['s']:7.1f}s {r['gen_tokens']} gen tok "
                      f"({r['gen_tokens'] / max(r['gen_s'], 1e-9):.1f}/s), {r['variants']} variants", file=sys.stderr, flush=True)  # fmt: skip
    if multi > 1 and len(images) >= multi:
        for _ in range(reps):
            batch = [png for _, png in images[:multi]]
            t, c = time.perf_counter(), time.process_time()
            r = vlm.describe_parallel(batch, vp.shared, vp.suffixes, json_schema=prompts.variant_schema(),
                                      max_tokens=max(16, max_tokens // variants))  # fmt: skip
            s = time.perf_counter() - t
            rows["multi"].append({"s": s / multi, "cpu_s": (time.process_time() - c) / multi, "images": multi,
                                  "encode_s": r.encode_s / multi,
                                  "prompt_tokens": r.prompt_tokens, "prompt_s": r.prompt_s,
                                  "gen_tokens": r.gen_tokens, "gen_s": r.gen_s})  # fmt: skip
            print(f"  {model.name} multi x{multi} {s / multi:7.1f}s/image ({r.gen_tokens / r.gen_s:.1f} gen tok/s)",
                  file=sys.stderr, flush=True)  # fmt: skip
    out = {
        "model": model.name, "mmproj": mmproj.name, "family": vlm.family, "test_model": vlm.is_test_model,
        "model_mib": model.stat().st_size / 2**20, "mmproj_mib": mmproj.stat().st_size / 2**20,
        "threads": vlm.n_threads, "load_s": load_s, "rows": rows, "image_max_tokens": image_max_tokens,
        "image": image_tokens(vlm, images[0][1]), "load_avg_1m": {"min": min(load_avg), "max": max(load_avg)},
    }  # fmt: skip
    vlm.close()
    out["peak_rss_mib"] = peak_rss_mib()
    return out


def image_tokens(vlm, png: bytes) -> dict:
    """What the mmproj's preprocessing makes of one image: encoder passes (image chunks) and tokens."""
    handler = vlm._handler  # bench only: the adapter's mtmd context
    mtmd = handler._mtmd_cpp
    bitmap = handler._create_bitmap_from_bytes(png)
    chunks = mtmd.mtmd_input_chunks_init()
    text = mtmd.mtmd_input_text()
    marker = mtmd.mtmd_default_marker()
    text.text, text.text_len, text.add_special, text.parse_special = marker, len(marker), True, True
    mtmd.mtmd_tokenize(handler.mtmd_ctx, chunks, ctypes.byref(text), (mtmd.mtmd_bitmap_p_ctypes * 1)(bitmap), 1)
    passes = tokens = 0
    for i in range(mtmd.mtmd_input_chunks_size(chunks)):
        c = mtmd.mtmd_input_chunks_get(chunks, i)
        if mtmd.mtmd_input_chunk_get_type(c) != mtmd.MTMD_INPUT_CHUNK_TYPE_TEXT:
            passes += 1
            tokens += int(mtmd.mtmd_input_chunk_get_n_tokens(c))
    mtmd.mtmd_input_chunks_free(chunks)
    mtmd.mtmd_bitmap_free(bitmap)
    return {"encoder_passes": passes, "image_tokens": tokens}


def _rate(rows: list[dict], tok: str, sec: str) -> float:
    t, s = sum(r[tok] for r in rows), sum(r[sec] for r in rows)
    return t / s if s else 0.0


def _par_s_at_equal_work(seq_row: dict, par_row: dict, gen_s: float) -> float:
    """A parallel row's seconds with its generation part (gen_s of its gen_tokens) scaled to the
    sequential row's token count, at the parallel row's own rate."""
    return par_row["s"] - par_row["gen_s"] + gen_s * seq_row["gen_tokens"] / max(par_row["gen_tokens"], 1)


def summarise(res: dict, variants: int, max_tokens: int) -> dict:
    seq, par, multi = res["rows"]["sequential"], res["rows"]["parallel"], res["rows"]["multi"]
    s_seq, s_par = statistics.mean(r["s"] for r in seq), statistics.mean(r["s"] for r in par)
    out = {
        "encode_s": statistics.mean(r["encode_s"] for r in par),
        "prompt_tokens": statistics.mean(r["prompt_tokens"] for r in par),
        "prompt_tok_s": _rate(par, "prompt_tokens", "prompt_s"),
        "seq_prompt_tok_s": _rate(seq, "prompt_tokens", "prompt_s"),
        "seq_gen_tok_s": _rate(seq, "gen_tokens", "gen_s"),
        "par_gen_tok_s": _rate(par, "gen_tokens", "gen_s"),
        # the parallel generation's time outside llama_decode: sampling, grammar, Python
        "par_gen_sampling_share": 1 - sum(r.get("gen_decode_s", 0.0) for r in par) / max(sum(r["gen_s"] for r in par), 1e-9),
        "seq_gen_tokens": statistics.mean(r["gen_tokens"] for r in seq),
        "par_gen_tokens": statistics.mean(r["gen_tokens"] for r in par),
        "seq_s_per_image": s_seq,
        "par_s_per_image": s_par,
        "ratio": s_seq / s_par,  # images/hour parallel over sequential
        "seq_cpu_s": statistics.mean(r["cpu_s"] for r in seq),
        "par_cpu_s": statistics.mean(r["cpu_s"] for r in par),
    }
    out["cpu_ratio"] = out["seq_cpu_s"] / out["par_cpu_s"]
    pairs = list(zip(seq, par, strict=True))
    # Per (rep, image) pair, since one image's figure moves by up to a quarter between runs.
    out["ratio_by_image"] = [a["s"] / b["s"] for a, b in pairs]
    # Random weights can make one path write twice the other's tokens for the same image; at equal
    # work, the parallel path's generation scaled to the sequential path's token count (its own rate).
    out["ratio_equal_work_by_image"] = [a["s"] / _par_s_at_equal_work(a, b, b["gen_s"]) for a, b in pairs]
    out["ratio_equal_work"] = statistics.mean(out["ratio_equal_work_by_image"])
    # The most the parallel path could give if its sampling (grammar, penalties, Python: the
    # generation time outside llama_decode) took no time: encoding, prompt and batched decode alone,
    # at equal work as above.
    no_sampling = [_par_s_at_equal_work(a, b, b.get("gen_decode_s", b["gen_s"])) for a, b in pairs]
    out["par_s_without_sampling"] = statistics.mean(no_sampling)
    out["ratio_ceiling"] = statistics.mean(a["s"] / x for (a, _), x in zip(pairs, no_sampling, strict=True))
    if multi:
        out["multi_images"] = multi[0]["images"]
        out["multi_s_per_image"] = statistics.mean(r["s"] for r in multi)
        out["multi_gen_tok_s"] = _rate(multi, "gen_tokens", "gen_s")
        out["multi_ratio"] = s_seq / out["multi_s_per_image"]
        out["multi_cpu_s"] = statistics.mean(r["cpu_s"] for r in multi)
        out["multi_cpu_ratio"] = out["seq_cpu_s"] / out["multi_cpu_s"]
    full = prompts.default_max_tokens(variants)
    if max_tokens < full:
        # Projection to the default cap: the fixed part (encode + prompt + hand-off) as measured, the
        # generation at the measured rate with every variant running to its cap (random weights do).
        fixed_seq = s_seq - statistics.mean(r["gen_s"] for r in seq)
        fixed_par = s_par - statistics.mean(r["gen_s"] for r in par)
        out["projected_full_cap"] = {
            "max_tokens": full,
            "seq_s_per_image": fixed_seq + full / out["seq_gen_tok_s"],
            "par_s_per_image": fixed_par + full / out["par_gen_tok_s"],
        }
        p = out["projected_full_cap"]
        p["ratio"] = p["seq_s_per_image"] / p["par_s_per_image"]
    return out


def variety(n_images: int, threads: int) -> dict:
    """Focus suffixes (greedy) against per-variant seeds (temperature 0.8), on the tiny test VLM.

    Distinctness = mean pairwise Jaccard distance of the variants' word sets, and the share of
    variant pairs that are identical. With random weights this measures the mechanism only:
    whether each method makes the sequences differ, not whether the difference is useful.
    """
    from edge_t2t.describe.testvlm import MMPROJ_FILE, MODEL_FILE, build_test_vlm
    from edge_t2t.describe.vlm import VLM, VLMConfig

    build_test_vlm(config.test_vlm_dir())
    vp = prompts.build_variant_prompts(5)
    plain = prompts.build_variant_prompts(5)
    out: dict[str, dict] = {}
    with VLM(VLMConfig(config.test_vlm_dir() / MODEL_FILE, config.test_vlm_dir() / MMPROJ_FILE, n_threads=threads)) as vlm:
        for method, suffixes, temps in (("focus suffix, greedy", vp.suffixes, 0.0),
                                        ("per-variant seed, temperature 0.8", [""] * 5, 0.8)):  # fmt: skip
            dists, same = [], 0
            for _, png in _pngs(n_images):
                r = vlm.describe_parallel([png], plain.shared, suffixes, json_schema=prompts.variant_schema(),
                                          max_tokens=200, temperatures=temps)  # fmt: skip
                words = [set(t.lower().split()) for t in r.texts[0]]
                for i in range(5):
                    for j in range(i + 1, 5):
                        union = words[i] | words[j]
                        dists.append(1 - len(words[i] & words[j]) / len(union) if union else 0.0)
                        same += r.texts[0][i] == r.texts[0][j]
            out[method] = {"mean_jaccard_distance": statistics.mean(dists), "identical_pairs": same / len(dists)}
    return out


def _write(results: list[dict], args: argparse.Namespace, max_tokens: int) -> str:
    table = ("| shape | precision | model MiB | image tokens (passes) | encode s | prompt tok/s | gen tok/s seq → par | "
             "s/image seq | s/image par | par ÷ seq images/h | CPU s seq → par (÷) | multi s/image | multi ÷ seq | "
             "peak RSS MiB | load avg |\n"
             "|---|---|---:|---:|---:|---:|---|---:|---:|---:|---|---:|---:|---:|---|\n")  # fmt: skip
    for r in results:
        if "error" in r:
            table += f"| {r['shape']} | {r['precision']} | failed: {r['error']} ||||||||||||\n"
            continue
        s = r["summary"]
        multi = (f"{s['multi_s_per_image']:.1f} | {s['multi_ratio']:.2f}×" if "multi_s_per_image" in s else "– | –")
        im, la = r.get("image", {}), r.get("load_avg_1m", {})
        table += (f"| {r['shape']} | {r['precision']} | {r['model_mib']:.0f} | {im.get('image_tokens', '?')} ({im.get('encoder_passes', '?')}) "
                  f"| {s['encode_s']:.2f} | {s['prompt_tok_s']:.0f} "
                  f"| {s['seq_gen_tok_s']:.1f} → {s['par_gen_tok_s']:.1f} | {s['seq_s_per_image']:.1f} "
                  f"| {s['par_s_per_image']:.1f} | **{s['ratio']:.2f}×** "
                  f"| {s['seq_cpu_s']:.0f} → {s['par_cpu_s']:.0f} ({s['cpu_ratio']:.2f}×) | {multi} | {r['peak_rss_mib']:.0f} "
                  f"| {la.get('min', 0):.1f}–{la.get('max', 0):.1f} |\n")  # fmt: skip
    table += ("\nPer image pair, and the ceiling: par ÷ seq if the parallel path's sampling (the generation time "
              "outside llama_decode) took no time, i.e. encoding, prompt and batched decode alone (mean over the pairs, "
              "at equal work). At equal work: the parallel path's generation time scaled to the sequential path's "
              "token count:\n\n"
              "| shape | precision | par ÷ seq, each image pair | same at equal work (mean) | s/image par without "
              "sampling | ceiling |\n|---|---|---|---|---:|---:|\n")  # fmt: skip
    for r in results:
        s = r.get("summary", {})
        if "ratio_ceiling" in s:
            pairs = ", ".join(f"{x:.2f}×" for x in s["ratio_by_image"])
            equal = ", ".join(f"{x:.2f}×" for x in s["ratio_equal_work_by_image"])
            table += (f"| {r['shape']} | {r['precision']} | {pairs} | {equal} ({s['ratio_equal_work']:.2f}×) "
                      f"| {s['par_s_without_sampling']:.1f} | {s['ratio_ceiling']:.2f}× |\n")  # fmt: skip
    proj = [r for r in results if "summary" in r and "projected_full_cap" in r["summary"]]
    if proj:
        table += f"\nProjected to the default cap ({prompts.default_max_tokens(args.variants)} tokens per image), from the rates above:\n\n"
        table += "| shape | precision | s/image seq | s/image par | images/h seq | images/h par | ratio |\n|---|---|---:|---:|---:|---:|---:|\n"
        for r in proj:
            p = r["summary"]["projected_full_cap"]
            table += (f"| {r['shape']} | {r['precision']} | {p['seq_s_per_image']:.0f} | {p['par_s_per_image']:.0f} "
                      f"| {3600 / p['seq_s_per_image']:.0f} | {3600 / p['par_s_per_image']:.0f} | {p['ratio']:.2f}× |\n")  # fmt: skip
    table += (f"\n{args.threads} threads, {args.variants} variants, max_tokens {max_tokens} per image "
              f"({max(16, max_tokens // args.variants)} per variant on the parallel path), {args.images} RSICD samples "
              f"x {args.reps} rep(s), arms interleaved; multi = {args.multi} images in one context; image_max_tokens "
              f"{args.image_max_tokens or 'the mmproj default'}. Random-weight "
              "shape models: constrained output runs to the caps, so the times are a worst case. The machine was "
              "shared with other work; ratios within one run are the meaningful figures.\n")  # fmt: skip
    write_results(args.name, {"args": vars(args), "max_tokens": max_tokens, "results": results}, table)
    return table


def grammar_cost(model: Path, steps: int = 60) -> dict:
    """One component alone: llama.cpp's grammar pass over the whole vocabulary against checking one
    token, per sampled token, on the variant schema (random logits; vocabulary only, no weights)."""
    import ctypes

    import llama_cpp as lc
    import numpy as np

    from edge_t2t.describe.vlm_sampling import json_schema_gbnf

    params = lc.llama_model_default_params()
    params.vocab_only = True
    m = lc.llama_model_load_from_file(str(model).encode(), params)
    vocab = lc.llama_model_get_vocab(m)
    n = lc.llama_vocab_n_tokens(vocab)
    grammar = lc.llama_sampler_init_grammar(vocab, json_schema_gbnf(lc, json.dumps(prompts.variant_schema(), sort_keys=True)), b"root")
    buf = np.zeros(n, dtype=np.dtype([("id", "<i4"), ("logit", "<f4"), ("p", "<f4")], align=True))
    one = np.zeros(1, dtype=buf.dtype)
    rng = np.random.default_rng(0)
    full_s = one_s = 0.0
    for _ in range(steps):
        buf["id"], buf["logit"] = np.arange(n), rng.standard_normal(n)
        cur = lc.llama_token_data_array(data=buf.ctypes.data_as(lc.llama_token_data_p), size=n, selected=-1, sorted=False)
        t = time.perf_counter()
        lc.llama_sampler_apply(grammar, ctypes.byref(cur))
        full_s += time.perf_counter() - t
        ok = np.isfinite(buf["logit"])
        tok = int(buf["id"][ok][np.argmax(buf["logit"][ok])])
        one["id"], one["logit"] = tok, 1.0
        single = lc.llama_token_data_array(data=one.ctypes.data_as(lc.llama_token_data_p), size=1, selected=-1, sorted=False)
        t = time.perf_counter()
        lc.llama_sampler_apply(grammar, ctypes.byref(single))
        one_s += time.perf_counter() - t
        lc.llama_sampler_accept(grammar, tok)
    lc.llama_sampler_free(grammar)
    lc.llama_model_free(m)
    return {"model": model.name, "n_vocab": n, "steps": steps,
            "full_pass_ms": 1000 * full_s / steps, "one_token_check_ms": 1000 * one_s / steps}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="smolvlm-256m,nanollava", help="comma-separated shape names")
    ap.add_argument("--precisions", default="Q4_K_M,F16")
    ap.add_argument("--vlm", help="your own text GGUF(s) instead of shapes (comma-separated: precisions of one model)")
    ap.add_argument("--mmproj")
    ap.add_argument("--images", type=int, default=2, help="RSICD samples per arm (max 5)")
    ap.add_argument("--reps", type=int, default=1)
    ap.add_argument("--variants", type=int, default=prompts.DEFAULT_VARIANTS)
    ap.add_argument("--max-tokens", type=int, default=None,
                    help="per-image cap, split evenly over the variants on the parallel path "
                         "(default: prompts.default_max_tokens, about 2040 for 5)")  # fmt: skip
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--image-max-tokens", type=int, default=0,
                    help="mtmd's cap on one image's tokens (0: the mmproj's own preprocessing), as caption's flag")  # fmt: skip
    ap.add_argument("--multi", type=int, default=2, help="also run K images in one context (0: skip)")
    ap.add_argument("--warm-up", action="store_true", help="one untimed call per arm first (costs an image encoding each)")
    ap.add_argument("--name", default="caption_speed", help="results file name under bench/results/")
    ap.add_argument("--combine", metavar="NAMES", help="merge these results files (comma-separated names) into --name")
    ap.add_argument("--variety", action="store_true", help="compare focus suffixes with per-variant seeds")
    ap.add_argument("--grammar-cost", metavar="GGUF", help="time the grammar pass alone on this model's vocabulary")
    ap.add_argument("--one", nargs=2, metavar=("MODEL", "MMPROJ"), help=argparse.SUPPRESS)  # child mode
    args = ap.parse_args()
    max_tokens = args.max_tokens or prompts.default_max_tokens(args.variants)
    kw = {"threads": args.threads, "n_images": args.images, "variants": args.variants,
          "max_tokens": max_tokens, "multi": args.multi, "reps": args.reps, "warm_up": args.warm_up,
          "image_max_tokens": args.image_max_tokens}  # fmt: skip

    if args.combine:  # several runs' results (e.g. one per shape, run side by side) in one table
        runs = [json.loads((ROOT / "bench" / "results" / f"{n}.json").read_text()) for n in args.combine.split(",")]
        # summaries again from the raw rows, so an older run gains the columns added since
        results = [{**r, "summary": summarise(r, run["args"]["variants"], run["max_tokens"])} if "rows" in r else r
                   for run in runs for r in run["results"]]  # fmt: skip
        caps = {run["args"].get("image_max_tokens") for run in runs}
        cap = caps.pop() if len(caps) == 1 else "per shape (see the image tokens column)"
        merged = argparse.Namespace(**{**runs[0]["args"], "name": args.name, "image_max_tokens": cap})
        print(_write(results, merged, runs[0]["max_tokens"]))
        return
    if args.one:
        print(json.dumps(run_one(Path(args.one[0]), Path(args.one[1]), **kw)))
        return
    if args.grammar_cost:
        g = grammar_cost(Path(args.grammar_cost))
        table = (f"| model | vocabulary | full grammar pass | one-token check |\n|---|---:|---:|---:|\n"
                 f"| {g['model']} | {g['n_vocab']} | {g['full_pass_ms']:.1f} ms | {g['one_token_check_ms']:.3f} ms |\n"
                 f"\nPer sampled token, variant schema, {g['steps']} steps with random logits (the grammar in "
                 "the states a random model reaches). One component alone; the machine was shared.\n")  # fmt: skip
        write_results("caption_grammar", g, table)
        print(table)
        return
    if args.variety:
        v = variety(args.images, 1)
        table = "| variants made by | mean pairwise Jaccard distance | identical pairs |\n|---|---:|---:|\n"
        table += "".join(f"| {k} | {x['mean_jaccard_distance']:.3f} | {x['identical_pairs']:.2f} |\n" for k, x in v.items())
        table += "\nTiny test VLM (random weights): this shows whether each method makes the sequences differ, not whether the difference is useful.\n"
        write_results("caption_variety", {"variety": v, "images": args.images}, table)
        print(table)
        return

    configs: list[tuple[str, str, Path, Path]] = []
    if args.vlm:
        for m in args.vlm.split(","):
            stem, _, prec = Path(m).stem.rpartition(".")
            configs.append((stem or prec, prec if stem else "", Path(m), Path(args.mmproj)))
    else:
        from edge_t2t.describe.testvlm import build_shape, shape_files

        for shape in args.shapes.split(","):
            precs = tuple(args.precisions.split(","))
            out_dir = config.test_vlm_dir() / shape
            print(f"building/reusing {shape} {precs} in {out_dir}", file=sys.stderr, flush=True)
            build_shape(shape, out_dir, precisions=precs)
            names = shape_files(shape)
            configs += [(shape, p, out_dir / names[p], out_dir / names["mmproj"]) for p in precs]

    results = []
    for shape, prec, model, mmproj in configs:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--one", str(model), str(mmproj),
               "--images", str(args.images), "--reps", str(args.reps), "--variants", str(args.variants),
               "--max-tokens", str(max_tokens), "--threads", str(args.threads), "--multi", str(args.multi),
               "--image-max-tokens", str(args.image_max_tokens),
               *(["--warm-up"] if args.warm_up else [])]  # fmt: skip
        print(f"{shape} {prec}: {model.name}", file=sys.stderr, flush=True)
        proc = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.PIPE, text=True)
        if proc.returncode != 0:
            results.append({"shape": shape, "precision": prec, "error": f"exit {proc.returncode}"})
            continue
        res = json.loads(proc.stdout.strip().splitlines()[-1])
        results.append({"shape": shape, "precision": prec, **res, "summary": summarise(res, args.variants, max_tokens)})
        _write(results, args, max_tokens)  # after each configuration, so a cut-short run keeps what it measured

    print(_write(results, args, max_tokens))


if __name__ == "__main__":
    main()
