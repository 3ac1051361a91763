"""Search CPU time, the lean index (this checkout) against the layout before it (issue 25), as an
interleaved A/B: old and new alternate, each in a fresh process, `--rounds` times, over the same
queries; the figure is the ratio of the medians of per-query CPU time. A single bench run on a
shared machine scatters by ±30%; alternating the two in one sitting cancels most of that.

The two indexes are bench/index_size.py's, built by each layout's own code from the same captions
file and vectors (its work directory holds the vector cache and the queries):

    git worktree add --detach /tmp/old a603b70
    head -2000 /tmp/index-size/captions-000000.jsonl > /tmp/caps-2000.jsonl
    .venv/bin/python bench/index_size.py --child /tmp/ab-old --code /tmp/old --layout old --mode sentences \\
        --work /tmp/index-size --captions /tmp/caps-2000.jsonl
    .venv/bin/python bench/index_size.py --child /tmp/ab-new --code . --layout new --mode sentences \\
        --work /tmp/index-size --captions /tmp/caps-2000.jsonl
    .venv/bin/python bench/search_ab.py --old-code /tmp/old --old-index /tmp/ab-old --new-index /tmp/ab-new
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve()
MODES = ("rescore", "exact")


def child(code: str, index: str, work: str) -> None:
    """Per-query CPU milliseconds of every query in each vector mode, through the layout's own entry point."""
    sys.path.insert(0, str(Path(code).resolve()))
    sys.path.insert(0, str(HERE.parent))
    import index_size

    emb = index_size.CachedEmbedder(Path(work))
    search, close = index_size.searcher_for(Path(index), emb)
    queries = json.loads((Path(work) / "queries.json").read_text())
    out = {}
    try:
        search(queries[0], "rescore")  # warm: views mapped
        for mode in MODES:
            cpu = []
            for q in queries:
                c0 = time.process_time()
                search(q, mode)
                cpu.append((time.process_time() - c0) * 1000)
            out[mode] = float(np.median(cpu))
    finally:
        close()
    print(json.dumps(out))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--old-code", type=Path, help="a checkout of the code before the lean layout")
    ap.add_argument("--old-index", type=Path)
    ap.add_argument("--new-index", type=Path)
    ap.add_argument("--work", type=Path, default=Path("/tmp/index-size"), help="bench/index_size.py's work directory")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--name", default="search_ab")
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(*args.child, str(args.work))
        return 0
    if not (args.old_code and args.old_index and args.new_index):
        ap.error("--old-code, --old-index and --new-index are needed (see the commands above)")
    sys.path.insert(0, str(HERE.parent))
    from _common import write_results

    arms = {"old": (args.old_code, args.old_index), "new": (HERE.parent.parent, args.new_index)}
    runs: dict[str, list[dict]] = {"old": [], "new": []}
    load = [os.getloadavg()[0]]
    for _ in range(args.rounds):
        for name, (code, index) in arms.items():
            res = subprocess.run([sys.executable, str(HERE), "--child", str(code), str(index), "--work", str(args.work)],
                                 capture_output=True, text=True, check=True)  # fmt: skip
            runs[name].append(json.loads(res.stdout.strip().splitlines()[-1]))
    load.append(os.getloadavg()[0])
    ratio = {m: float(np.median([r[m] for r in runs["new"]]) / np.median([r[m] for r in runs["old"]])) for m in MODES}
    table = "| vector mode | old, ms CPU per query (each run) | lean, ms CPU per query (each run) | lean / old (medians) |\n"
    table += "|---|---|---|---:|\n"
    for m in MODES:
        table += (f"| {m} | {', '.join(f'{r[m]:.2f}' for r in runs['old'])} "
                  f"| {', '.join(f'{r[m]:.2f}' for r in runs['new'])} | {ratio[m]:.3f} |\n")  # fmt: skip
    table += (f"\nMedian per-query CPU time of the same queries (`{args.work / 'queries.json'}`), k 10, dense, each run "
              f"a fresh process, old and new alternating, {args.rounds} rounds; indexes {args.old_index} and "
              f"{args.new_index}; load average {load[0]:.1f} before, {load[1]:.1f} after.\n")
    write_results(args.name, {"runs": runs, "ratio": ratio, "load": load, "rounds": args.rounds}, table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
