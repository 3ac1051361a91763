"""One component alone: a single-token decode step of a text GGUF at 1 and at 2 threads, interleaved.

Why it exists: on a 2-core machine shared with other work, llama.cpp's OpenMP workers wait at a
barrier after every graph node for a thread that is not scheduled, so 2 threads can be far slower
than 1. Run it before trusting a 2-thread figure from a busy machine; it records the load average.

    .venv/bin/python bench/decode_threads.py models/test-vlm/smolvlm-256m/smolvlm-256m.Q4_K_M.gguf --steps 4
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

from _common import write_results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--steps", type=int, default=8, help="decode steps per round")
    ap.add_argument("--rounds", type=int, default=2, help="rounds of (1 thread, 2 threads)")
    args = ap.parse_args()

    import llama_cpp

    from edge_t2t.describe import vlm  # silences llama.cpp's log

    vlm.silence_llama_logs()
    rows: dict[int, list[dict]] = {1: [], 2: []}
    for _ in range(args.rounds):
        for threads in (1, 2):
            llm = llama_cpp.Llama(model_path=args.model, n_ctx=512, n_threads=threads, n_threads_batch=threads, verbose=False)
            llm.eval([1] * 8)
            load = os.getloadavg()[0]
            t, c = time.perf_counter(), time.process_time()
            for _ in range(args.steps):
                llm.eval([5])
            rows[threads].append({"wall_ms": 1000 * (time.perf_counter() - t) / args.steps,
                                  "cpu_ms": 1000 * (time.process_time() - c) / args.steps, "load_avg_1m": load})  # fmt: skip
            llm.close()
            print(threads, rows[threads][-1], flush=True)
    summary = {t: {k: statistics.mean(r[k] for r in rs) for k in ("wall_ms", "cpu_ms", "load_avg_1m")} for t, rs in rows.items()}
    table = "| threads | wall ms / token | CPU ms / token | load avg (1 min) |\n|---:|---:|---:|---:|\n"
    table += "".join(f"| {t} | {s['wall_ms']:.0f} | {s['cpu_ms']:.0f} | {s['load_avg_1m']:.1f} |\n" for t, s in summary.items())
    table += (f"\n{Path(args.model).name}, one token per step, {args.steps} steps x {args.rounds} round(s), interleaved. "
              "One component alone (the text model's decode step). The machine was shared with other work.\n")  # fmt: skip
    write_results("decode_threads", {"model": Path(args.model).name, "args": vars(args), "rows": rows, "summary": summary}, table)
    print(table)


if __name__ == "__main__":
    main()
