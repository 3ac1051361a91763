"""One component alone: the parallel path's decode step (N sequences sharing a long prefix) under each
context setting, arms alternating every few steps so that a shared machine's load falls on all alike.

Why it exists: on a 2-core machine shared with other work, whole-image runs of different arms
differ more by the load they met than by their settings. Here every arm holds its own llama.cpp
context (made by the product's ParallelContext) with the same prefix and sequences, and the arms
take turns, `--block` decode steps each, so each arm's figure at a given context length was
measured within seconds of the others'. Tokens are fixed ids: the attention's cost does not
depend on their values. `single` is one sequence alone (the sequential path's decode step).

    .venv/bin/python bench/parallel_decode_step.py models/test-vlm/nanollava-1.5/nanollava-1.5.F16.gguf --prefix 1367
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

from _common import write_results

ARMS = ("single", "single+fa", "unified", "unified+fa", "streams", "streams+fa")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", help="text GGUF")
    ap.add_argument("--arms", default="single,unified,unified+fa,streams,streams+fa")
    ap.add_argument("--prefix", type=int, default=1367, help="shared prompt tokens (nanoLLaVA's caption prompt: 1367)")
    ap.add_argument("--seqs", type=int, default=5)
    ap.add_argument("--steps", type=int, default=400, help="decode steps per arm (tokens per sequence)")
    ap.add_argument("--block", type=int, default=10, help="steps per turn")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--name", default=None)
    args = ap.parse_args()

    import llama_cpp as lc

    from edge_t2t.describe import vlm as vlm_mod
    from edge_t2t.describe.vlm_parallel import ParallelContext

    vlm_mod.silence_llama_logs()
    llama = lc.Llama(model_path=args.model, n_ctx=256, n_threads=args.threads, n_threads_batch=args.threads, verbose=False)
    arms = args.arms.split(",")
    state = {}
    for arm in arms:
        base, _, fa = arm.partition("+")
        n_seq = 1 if base == "single" else args.seqs
        pc = ParallelContext(lc, llama, args.threads, vlm_mod.ParallelSettings(kv_unified=base != "streams",
                                                                                     flash_attn=fa == "fa"))  # fmt: skip
        pc.ensure(args.prefix + args.steps + 16, args.prefix + n_seq * args.steps + 16, n_seq, 512)
        t, c = time.perf_counter(), time.process_time()
        toks = [(7 * i) % 1000 + 100 for i in range(args.prefix)]
        for j in range(0, len(toks), 512):
            pc.decode([(tk, j + k, 0, False) for k, tk in enumerate(toks[j : j + 512])])
        mem = lc.llama_get_memory(pc.ctx)
        for s in range(1, n_seq):
            lc.llama_memory_seq_cp(mem, 0, s, -1, -1)
        state[arm] = {"pc": pc, "n_seq": n_seq, "pos": args.prefix, "prefill_s": time.perf_counter() - t,
                      "prefill_cpu_s": time.process_time() - c, "steps": []}  # fmt: skip
        print(f"  {arm}: prefix {args.prefix} tokens {state[arm]['prefill_cpu_s']:.1f} CPU s", file=sys.stderr, flush=True)
    loads = []
    for turn in range(args.steps // args.block):
        loads.append(os.getloadavg()[0])
        for arm in arms if turn % 2 == 0 else arms[::-1]:
            st = state[arm]
            for _ in range(args.block):
                entries = [(500 + s, st["pos"], s, True) for s in range(st["n_seq"])]
                t, c = time.perf_counter(), time.process_time()
                st["pc"].decode(entries)  # the first step after seq_cp also copies the streams
                st["steps"].append((time.process_time() - c, time.perf_counter() - t))
                st["pos"] += 1
        if turn % 10 == 0:
            print(f"  step {turn * args.block}: " + ", ".join(f"{a} {1000 * state[a]['steps'][-1][0]:.0f} ms"
                                                             for a in arms), file=sys.stderr, flush=True)  # fmt: skip
    summary = {}
    for arm in arms:
        st = state[arm]
        cpu = [c for c, _ in st["steps"][1:]]  # the first step pays the stream copies: reported apart
        wall = [w for _, w in st["steps"][1:]]
        n = len(cpu)
        quarters = [statistics.mean(cpu[i * n // 4 : (i + 1) * n // 4]) * 1000 for i in range(4)]
        summary[arm] = {"n_seq": st["n_seq"], "prefill_cpu_s": st["prefill_cpu_s"], "first_step_cpu_ms": 1000 * st["steps"][0][0],
                        "cpu_ms_per_step": 1000 * statistics.mean(cpu), "wall_ms_per_step": 1000 * statistics.mean(wall),
                        "cpu_ms_quarters": quarters,
                        "tok_per_cpu_s": st["n_seq"] / statistics.mean(cpu)}  # fmt: skip
        st["pc"].close()
    llama.close()
    ref = summary[arms[0]]["tok_per_cpu_s"]
    table = (f"| arm | sequences | prefix CPU s | first step CPU ms | CPU ms/step | wall ms/step | CPU ms/step by quarter "
             f"(context {args.prefix} → {args.prefix + args.steps} per sequence) | tokens per CPU s | ÷ {arms[0]} |\n"
             "|---|---:|---:|---:|---:|---:|---|---:|---:|\n")  # fmt: skip
    for arm, m in summary.items():
        table += (f"| {arm} | {m['n_seq']} | {m['prefill_cpu_s']:.1f} | {m['first_step_cpu_ms']:.0f} | {m['cpu_ms_per_step']:.0f} "
                  f"| {m['wall_ms_per_step']:.0f} | {' / '.join(f'{x:.0f}' for x in m['cpu_ms_quarters'])} "
                  f"| {m['tok_per_cpu_s']:.1f} | {m['tok_per_cpu_s'] / ref:.2f}× |\n")  # fmt: skip
    table += (f"\n{Path(args.model).name}, {args.threads} thread(s), a {args.prefix}-token shared prefix, {args.steps} decode "
              f"steps per arm in turns of {args.block}; load average {min(loads):.1f}-{max(loads):.1f} on a machine shared "
              "with other work. One component alone (the text model's decode step; no sampling, no grammar, no image "
              "encoder). single = one sequence (the sequential path's step); unified = one KV buffer for all "
              "sequences; streams = one KV stream per sequence (prefix copied by seq_cp; the copy is paid in the "
              "first step); +fa = flash attention.\n")  # fmt: skip
    out = args.name or f"parallel_decode_step_{Path(args.model).stem}"
    write_results(out, {"args": vars(args), "summary": summary,
                        "steps": {a: state[a]["steps"] for a in arms}}, table)  # fmt: skip
    print(table)


if __name__ == "__main__":
    main()
