"""Search latency of `edge-t2t serve` end to end, against the CLI's cold start, in the same run.

An index of N texts (default 100,000) is seeded the way bench/index_growth.py does it (SQLite rows
in bulk, then the snapshot by IndexDir.rebuild; deterministic clustered vectors under the real
int8 embedder's identity, 5 texts per image, text mode joined, i8). Then:

- `python -m edge_t2t serve --index DIR` runs as a real server process on loopback. Each request
  is `GET /api/search?q=...&k=10` on a fresh HTTP connection, timed from connect to the parsed
  JSON body: HTTP, the real int8 embedder on the query, the ranking, the SQLite reads and the JSON.
  Three kinds of query, interleaved: plain words (dense, the default mode), words with a place
  ("... in the east": dense with the structure pool of 50 images) and plain words in hybrid mode;
  The server's Server-Timing header gives its own share (queue, embed, rank, rows), so the rest is
  HTTP, Flask and JSON;
- `edge-t2t search QUERY --index DIR -k 10 --json` as a process (index_growth.search_cli): start,
  imports, embedder load, open, search, print.

The rankings against synthetic vectors mean nothing; the timings are those of the product's path.

    .venv/bin/python bench/serve_latency.py                  # 100k texts, 100 requests per kind
    .venv/bin/python bench/serve_latency.py --texts 10000 --requests 20 --name serve_latency_smoke
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlencode

from _common import ROOT, percentile_ms, process_tree, write_results
from index_growth import ClusteredVectors, real_identity, search_cli, seed

KINDS = {
    "dense, plain words": ("storage tanks beside a harbour {i}", "dense"),
    "dense, with a place": ("a runway near a lake in the east {i}", "dense"),
    "hybrid, plain words": ("a bridge over a river {i}", "hybrid"),
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(port: int, path: str, timeout: float = 60.0) -> tuple[int, bytes, float]:
    """(status, body, the server's own search time in seconds from its Server-Timing header, else nan)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        timing = resp.getheader("Server-Timing") or ""
        dur = float(timing.split("dur=", 1)[1]) / 1000 if "dur=" in timing else float("nan")
        return resp.status, resp.read(), dur
    finally:
        conn.close()


def start_server(index_dir: Path, processes: int) -> tuple[subprocess.Popen, int, float]:
    port = free_port()
    t0 = time.perf_counter()
    # The audit log (a line per request) goes to a file: on the stderr pipe, unread, it would fill it.
    proc = subprocess.Popen([sys.executable, "-m", "edge_t2t", "serve", "--index", str(index_dir), "--port", str(port),
                             "--audit-log", str(index_dir.parent / "audit.log"), "--processes", str(processes)],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)  # fmt: skip
    while True:
        if proc.poll() is not None:
            raise SystemExit(f"serve exited {proc.returncode}: {proc.stderr.read()[-2000:]}")
        try:
            if get(port, "/api/info", timeout=5)[0] == 200:
                return proc, port, time.perf_counter() - t0
        except OSError:
            time.sleep(0.1)


def measure_requests(port: int, n: int) -> dict:
    seconds: dict[str, list[float]] = {kind: [] for kind in KINDS}
    inside: dict[str, list[float]] = {kind: [] for kind in KINDS}
    for text, mode in KINDS.values():  # warm each path once: page cache, first-call costs
        status, body, _ = get(port, "/api/search?" + urlencode({"q": text.format(i="warm"), "k": 10, "mode": mode}))
        assert status == 200, body[:500]
    for i in range(n):
        for kind, (text, mode) in KINDS.items():
            path = "/api/search?" + urlencode({"q": text.format(i=i), "k": 10, "mode": mode})
            t0 = time.perf_counter()
            status, body, dur = get(port, path)
            hits = json.loads(body)["hits"]
            seconds[kind].append(time.perf_counter() - t0)
            inside[kind].append(dur)
            assert status == 200 and len(hits) == 10, body[:500]
    out = {kind: {"p50_ms": percentile_ms(s, 50), "p99_ms": percentile_ms(s, 99), "n": len(s),
                  "server_search_p50_ms": percentile_ms(inside[kind], 50)}
           for kind, s in seconds.items()}
    every = [x for s in seconds.values() for x in s]
    out["all"] = {"p50_ms": percentile_ms(every, 50), "p99_ms": percentile_ms(every, 99), "n": len(every),
                  "server_search_p50_ms": percentile_ms([x for s in inside.values() for x in s], 50)}
    return out


def main() -> int:
    from edge_t2t.serve_pool import default_processes

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--texts", type=int, default=100_000, help="texts in the index (default 100,000)")
    ap.add_argument("--requests", type=int, default=100, help="requests per kind of query (default 100)")
    ap.add_argument("--processes", default=f"{default_processes()},0",
                    help=f"serve --processes values, one server each (default: serve's default here, {default_processes()}, "
                         "then 0: the searches in the server's own threads)")  # fmt: skip
    ap.add_argument("--cli-repeats", type=int, default=5)
    ap.add_argument("--name", default="serve_latency")
    args = ap.parse_args()
    load_at_start = " / ".join(f"{x:.2f}" for x in os.getloadavg())

    work = Path(tempfile.mkdtemp(prefix="serve-latency-"))
    t_all = time.perf_counter()
    servers = []
    try:
        identity, manifest = real_identity()
        index_dir = work / "index"
        t0 = time.perf_counter()
        seed(index_dir, ClusteredVectors(identity, manifest), args.texts)
        seed_s = time.perf_counter() - t0
        print(f"seeded {args.texts:,} texts in {seed_s:.0f} s", flush=True)
        for processes in (int(x) for x in args.processes.split(",")):
            proc, port, startup_s = start_server(index_dir, processes)
            try:
                served = measure_requests(port, args.requests)
                memory = process_tree(proc.pid)
            finally:
                proc.terminate()
                proc.wait(timeout=30)
            servers.append({"processes": processes, "startup_s": startup_s, "served": served, "memory": memory})
        cli = search_cli(index_dir, args.cli_repeats)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    rows, notes = [], []
    for s in servers:
        searching = f"{s['processes']} search processes" if s["processes"] else "threads (--processes 0)"
        rows += [f"| {searching} | `GET /api/search`, {kind} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | "
                 f"{r['server_search_p50_ms']:.1f} | {r['n']} | {cli['p50_s'] * 1000 / r['p50_ms']:.0f}× |"
                 for kind, r in s["served"].items() if kind != "all"]  # fmt: skip
        p50 = s["served"]["dense, plain words"]["p50_ms"]
        m = s["memory"]
        notes.append(f"- {searching}: ready {s['startup_s']:.1f} s after start (imports, embedder, index open); "
                     f"{m['processes']} processes, PSS {m['pss_mib']:.0f} MiB in all (the server's own peak RSS "
                     f"{m['peak_rss_mib']:.0f} MiB). Goal p50 < 50 ms (dense, the default): "
                     f"**{'met' if p50 < 50 else 'not met'}** ({p50:.1f} ms).")  # fmt: skip
    table = "\n".join([
        f"Index of {args.texts:,} texts (5 per image, joined, i8), k = 10; load average at the start {load_at_start}.",
        "",
        "| server | call | p50 ms | p99 ms | of it inside the server (p50 ms) | n | CLI cold start ÷ this p50 |",
        "|---|---|---:|---:|---:|---:|---:|",
        *rows,
        f"| – | `edge-t2t search` (new process: imports, embedder, open, search) | {cli['p50_s'] * 1000:.0f} | "
        f"max {cli['max_s'] * 1000:.0f} | – | {args.cli_repeats} | 1× |",
        "",
        *notes,
        f"- CLI peak RSS {cli['peak_rss_mib']:.0f} MiB. Whole run {time.perf_counter() - t_all:.0f} s.",
    ])
    write_results(args.name, {"texts": args.texts, "requests_per_kind": args.requests, "seed_seconds": seed_s,
                              "servers": servers, "cli": cli, "goal_p50_ms": 50,
                              "goal_met": all(s["served"]["dense, plain words"]["p50_ms"] < 50 for s in servers),
                              "note": "ratios within this run are the figures to read", "load_average_at_start": load_at_start},
                  table)  # fmt: skip
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
