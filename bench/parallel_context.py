"""The parallel caption path under different llama.cpp context settings, arms interleaved.

Why it exists: the parallel path batches the 5 variants, but at F16 its generation ran at only
1.8-2.1x the sequential path's tokens/s, while a bare decode loop with a short prompt gave
2.7-3.4x. Our prompts are long (nanoLLaVA: 1,367 prompt tokens), and with a unified KV cache
every sequence's query attends over every cell in use, the other sequences' tokens masked. This
bench runs the product's parallel call (captioning._run_parallel -> VLM.describe_parallel) on one
image with each ParallelSettings arm and reports, per arm:

- prompt (image embeddings + shared text) and generation tokens/s;
- per decode step: time in llama_decode against the rest (sampling, grammar, Python);
- ms per decode step in each quarter of the generation (the context grows as it runs);
- whether the generated text is the same as the first arm's (some settings change the
  floating-point order of the attention, so greedy decoding may pick other tokens).

    .venv/bin/python bench/parallel_context.py --shape smolvlm-256m --precision F16 --image-max-tokens 64
    .venv/bin/python bench/parallel_context.py --shape nanollava-1.5 --precision F16 --arms unified,streams+fa
"""

from __future__ import annotations

import argparse
import hashlib
import os
import statistics
import sys
import time

from _common import write_results
from caption_speed import _ParTimer, _pngs, _SeqTimer

from edge_t2t import config
from edge_t2t.describe import prompts

ARMS = ("seq", "seq+fa", "seq-before", "before", "unified", "unified-novfa", "unified+fa", "streams", "streams+fa")


def parse_arm(arm: str) -> tuple[str, bool, bool]:
    """(path or KV layout, the text model's flash attention, the vision encoder's) of an arm name.
    `before` is the parallel path as it was before these settings were measured: unified KV, no
    flash attention anywhere, the grammar's full pass on every refused greedy token, the sequences'
    samplers run one after another; `seq-before`
    the sequential path with the vision encoder as it was (no flash attention); `unified-novfa` the
    parallel path as it is but with the vision encoder's flash attention off (the encoder's A/B)."""
    if arm in ("before", "seq-before"):
        return "unified" if arm == "before" else "seq", False, False
    if arm == "unified-novfa":
        return "unified", False, False
    base, _, fa = arm.partition("+")
    if base not in ("seq", "unified", "streams") or fa not in ("", "fa"):
        raise SystemExit(f"unknown arm {arm!r}; choose from: {', '.join(ARMS)}")
    return base, fa == "fa", True


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="smolvlm-256m")
    ap.add_argument("--precision", default="F16")
    ap.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated, from: {', '.join(ARMS)}")
    ap.add_argument("--reps", type=int, default=1, help="rounds over the arms (order reversed every other round)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--max-tokens", type=int, default=None, help="per image (default: caption's default cap)")
    ap.add_argument("--image-max-tokens", type=int, default=0)
    ap.add_argument("--name", default=None, help="results name (default parallel_context_<shape>_<precision>)")
    args = ap.parse_args()

    from edge_t2t.describe import vlm as vlm_mod
    from edge_t2t.describe.captioning import _run_parallel
    from edge_t2t.describe.testvlm import shape_files
    from edge_t2t.describe.vlm import ParallelSettings
    from edge_t2t.describe.vlm_parallel import ParallelContext
    from edge_t2t.describe.vlm_sampling import SequenceSampler

    names = shape_files(args.shape)
    d = config.test_vlm_dir() / args.shape
    model, mmproj = d / names[args.precision], d / names["mmproj"]
    arms = args.arms.split(",")
    max_tokens = args.max_tokens or prompts.default_max_tokens(prompts.DEFAULT_VARIANTS)
    vp, schema = prompts.build_variant_prompts(prompts.DEFAULT_VARIANTS), prompts.schema(prompts.DEFAULT_VARIANTS)
    name, png = _pngs(1)[0]

    # Bench only: time every llama_decode of the parallel context (prompt and generation steps).
    steps: list[tuple[int, float]] = []
    inner = ParallelContext.decode

    def timed(self, entries):
        t, c = time.perf_counter(), time.process_time()
        inner(self, entries)
        steps.append((time.process_time() - c, time.perf_counter() - t))

    ParallelContext.decode = timed
    # One VLM per flash-attention setting (it also sets the vision encoder's and the sequential
    # context's); loaded for the sequential path, which describe_parallel can share.
    vlms, timers = {}, {}
    stages = SequenceSampler.STAGES
    for fa, vfa in sorted({parse_arm(a)[1:] for a in arms}):
        v = vlm_mod.VLM(vlm_mod.VLMConfig(model, mmproj, n_threads=args.threads, seed=0, variant_mode="sequential",
                                          image_max_tokens=args.image_max_tokens or None, flash_attn=fa,
                                          vision_flash_attn=vfa))  # fmt: skip
        vlms[fa, vfa], timers[fa, vfa] = v, (_SeqTimer(v._llama), _ParTimer(v))  # phase timings of each call
    prompt = prompts.build_prompt(prompts.DEFAULT_VARIANTS)
    rows: dict[str, list[dict]] = {a: [] for a in arms}
    for rep in range(args.reps):
        for arm in arms if rep % 2 == 0 else arms[::-1]:
            base, fa, vfa = parse_arm(arm)
            vlm = vlms[fa, vfa]
            SequenceSampler.STAGES = () if arm == "before" else stages
            if arm == "before":  # the samplers one after another, as before
                vlm._sampling_pool = lambda: None
            else:
                vlm.__dict__.pop("_sampling_pool", None)
            steps.clear()
            load = os.getloadavg()[0]
            t, c = time.perf_counter(), time.process_time()
            if base == "seq":
                text = vlm.generate(png, prompt.text, json_schema=schema, max_tokens=max_tokens, temperature=0.0)
                wall, cpu, perf = time.perf_counter() - t, time.process_time() - c, timers[fa, vfa][0].last
                rows[arm].append({"s": wall, "cpu_s": cpu, "load_avg_1m": load, **perf,
                                  "text_sha": hashlib.sha256(text.encode()).hexdigest()[:12]})  # fmt: skip
                print(f"  {arm:11s} {wall:6.1f}s wall, CPU {cpu:.1f}s, {perf['gen_tokens']} tokens, "
                      f"gen {perf['gen_tokens'] / perf['gen_s']:.1f} tok/s wall, load {load:.1f}", file=sys.stderr, flush=True)  # fmt: skip
                continue
            vlm.parallel_settings = ParallelSettings(kv_unified=base == "unified", flash_attn=fa)
            _run_parallel(vlm, png, vp, schema, True, {"max_tokens": max_tokens}, 0.0)
            wall, cpu = time.perf_counter() - t, time.process_time() - c
            res = timers[fa, vfa][1].last
            gen = [c for c, _ in steps[-res.gen_steps:]] if res.gen_steps else []  # CPU s per step
            q = [statistics.mean(part) * 1000 if part else 0.0 for part in _quarters(gen)]
            row = {
                "s": wall, "cpu_s": cpu, "load_avg_1m": load, "encode_s": res.encode_s,
                "prompt_tokens": res.prompt_tokens, "prompt_s": res.prompt_s,
                "gen_tokens": res.gen_tokens, "gen_s": res.gen_s, "gen_decode_s": res.gen_decode_s,
                "gen_steps": res.gen_steps, "step_ms_quarters": q, "encode_cpu_s": res.encode_cpu_s,
                "prompt_cpu_s": res.prompt_cpu_s, "gen_cpu_s": res.gen_cpu_s, "gen_decode_cpu_s": sum(gen),
                "tokens": res.tokens[0], "text_sha": hashlib.sha256("\x00".join(res.texts[0]).encode()).hexdigest()[:12],
            }  # fmt: skip
            rows[arm].append(row)
            print(f"  {arm:11s} {wall:6.1f}s wall, CPU s: encode {res.encode_cpu_s:.1f} prompt {res.prompt_cpu_s:.1f} "
                  f"gen {res.gen_cpu_s:.1f} (decode {sum(gen):.1f}), {res.gen_tokens} tokens, decode CPU ms/step by "
                  f"quarter {' '.join(f'{x:.0f}' for x in q)}, text {row['text_sha']}, load {load:.1f}",
                  file=sys.stderr, flush=True)  # fmt: skip
    for v in vlms.values():
        v.close()

    table = ""
    for arm in [a for a in arms if parse_arm(a)[0] == "seq"]:
        m = {k: statistics.mean(r[k] for r in rows[arm]) for k in ("s", "cpu_s", "prompt_s", "prompt_tokens", "gen_s", "gen_tokens")}
        table += (f"| {arm} (sequential path) | {m['s']:.1f} | {m['cpu_s']:.1f} | prompt incl. image {m['prompt_s']:.1f} s wall "
                  f"| gen {m['gen_s']:.1f} s wall ({m['gen_tokens'] / m['gen_s']:.1f} tok/s, llama.cpp's counters) "
                  f"| | | | | {m['gen_tokens']:.0f} | |\n")  # fmt: skip
    arms = [a for a in arms if parse_arm(a)[0] != "seq"]
    base = rows[arms[0]][0]["text_sha"] if arms else ""
    table = ("| arm | wall s/image | CPU s/image | encode CPU s | prompt CPU s (tok/CPU s) | gen CPU s (tok/CPU s) | "
             "of it llama_decode | sampling etc. CPU ms/step | decode CPU ms/step by quarter of the generation | "
             f"tokens | same text as {arms[0] if arms else '-'} |\n|---|---:|---:|---:|---|---|---:|---:|---|---:|---|\n") + table  # fmt: skip
    keys = ("s", "cpu_s", "encode_cpu_s", "prompt_cpu_s", "prompt_tokens", "gen_cpu_s", "gen_decode_cpu_s",
            "gen_tokens", "gen_steps")  # fmt: skip
    summary = {}
    for arm in arms:
        rs = rows[arm]
        m = {k: statistics.mean(r[k] for r in rs) for k in keys}
        m["step_ms_quarters"] = [statistics.mean(r["step_ms_quarters"][i] for r in rs) for i in range(4)]
        m["same_text"] = all(r["text_sha"] == base for r in rs)
        summary[arm] = m
        other_ms = 1000 * (m["gen_cpu_s"] - m["gen_decode_cpu_s"]) / max(m["gen_steps"], 1)
        table += (f"| {arm} | {m['s']:.1f} | {m['cpu_s']:.1f} | {m['encode_cpu_s']:.1f} "
                  f"| {m['prompt_cpu_s']:.1f} ({m['prompt_tokens'] / m['prompt_cpu_s']:.0f}) "
                  f"| {m['gen_cpu_s']:.1f} ({m['gen_tokens'] / m['gen_cpu_s']:.1f}) "
                  f"| {100 * m['gen_decode_cpu_s'] / m['gen_cpu_s']:.0f}% | {other_ms:.1f} "
                  f"| {' / '.join(f'{x:.0f}' for x in m['step_ms_quarters'])} "
                  f"| {m['gen_tokens']:.0f} | {'yes' if m['same_text'] else 'no'} |\n")  # fmt: skip
    loads = [r["load_avg_1m"] for rs in rows.values() for r in rs]
    table += (f"\n{args.shape} {args.precision}, {args.threads} thread(s), one RSICD image ({name}), max_tokens "
              f"{max_tokens} per image ({max(16, max_tokens // 5)} per variant), image_max_tokens "
              f"{args.image_max_tokens or 'the mmproj default'}, {args.reps} round(s), arms interleaved; load average "
              f"{min(loads):.1f}-{max(loads):.1f} on a machine shared with other work: ratios between arms are the "
              "meaningful figures, and CPU seconds (1 thread: the work itself) more than wall seconds. seq = the sequential path (one call writes all variants); unified = one KV buffer for all sequences; streams = one KV stream per "
              "sequence (prefix copied); +fa = flash attention in the text model and the vision encoder. The product's calls (captioning._run_parallel, VLM.generate).\n")  # fmt: skip
    out = args.name or f"parallel_context_{args.shape}_{args.precision}"
    write_results(out, {"args": vars(args), "rows": rows, "summary": summary}, table)
    print(table)


def _quarters(xs: list[float]) -> list[list[float]]:
    n = len(xs)
    return [xs[i * n // 4 : (i + 1) * n // 4] for i in range(4)]


if __name__ == "__main__":
    main()
