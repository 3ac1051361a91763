"""`edge-t2t serve` under load from 1, 4 and 16 clients while `edge-t2t index` adds images (issue 26).

Loopback only; every loop is bounded in time (--seconds per client count) and in count
(--max-requests per client count), and the script stops by itself.

- The index: N texts (default 100,000) seeded as bench/index_growth.py seeds them (deterministic
  clustered vectors under the real int8 embedder's identity, 5 texts per image, joined, i8), plus
  one batch of real pictures (synthetic scenes, 128 px) added by `edge-t2t index --captions`, so
  thumbnails can be asked for.
- The server: `python -m edge_t2t serve --index DIR --port P --audit-log FILE --processes N`, its
  own process on 127.0.0.1, once per N in --processes (default: serve's default, one search
  process per core up to 4, then 0: the searches in the server's own 4 threads, the peer it is
  compared with in the same run). Its CPU and memory are those of the server and its search
  processes together.
- The writer: for the whole of each client window, `edge-t2t index BATCH --captions ... --index DIR`
  runs again and again, each run adding --batch new pictures (the real embedder describes nothing:
  the captions are the scenes' ground truth; their texts are embedded) and saving a new snapshot
  generation. It runs at `nice --writer-nice` (default 10: indexing in the background while the
  team searches) with EDGE_T2T_THREADS=1.
- The clients: N threads in this process, each on its own keep-alive connection, each a seeded
  mix of `GET /api/search?q=...&k=10` (50%), `/api/similar?id=...&k=10` (20%), `/api/image?id=...`
  (15%) and `/thumb/ID` of a picture (15%).

Checked on every answer: status 200; for search and similar a `generation` between the snapshot
generation before the window and the one after it, 10 hits ranked 1..10 with scores not
increasing; for image details 5 variants. After the run every distinct (image id, variant, text)
seen in a hit is compared with the store: a hit read from half a snapshot would name a text the
store does not hold for that image. Any failure counts as an error. The audit log must hold one
line per request sent.

    .venv/bin/python bench/serve_load.py                                  # 100k texts, 60 s per client count
    .venv/bin/python bench/serve_load.py --texts 10000 --seconds 10 --name serve_load_smoke
    .venv/bin/python bench/serve_load.py --processes 0                    # the threads only
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from urllib.parse import urlencode

from _common import ROOT, percentile_ms, process_tree, write_results
from index_growth import TEXTS_PER_IMAGE, ClusteredVectors, real_identity, seed
from serve_latency import free_port

KIND_WEIGHTS = (("search", 50), ("similar", 20), ("image", 15), ("thumb", 15))
WORDS = ("storage tanks beside a harbour", "a runway near a lake in the east", "a bridge over a river",
         "dense houses north of a park", "farmland with a road in the west", "a stadium next to a parking lot")
K = 10


# -- the index and the writer ------------------------------------------------------------------------
def write_batches(root: Path, n_batches: int, per_batch: int) -> list[Path]:
    """Folders of synthetic scene pictures, each with the captions.jsonl that `index --captions` reads."""
    from edge_t2t.demo.scenes import write_scene_set

    out = []
    for b in range(n_batches):
        d = root / f"batch{b:03d}"
        write_scene_set(d, n=per_batch, seed=1000 + b, size=128)
        out.append(d)
    return out


def index_argv(index_dir: Path, batch: Path) -> list[str]:
    return [sys.executable, "-m", "edge_t2t", "index", str(batch), "--captions", str(batch / "captions.jsonl"),
            "--index", str(index_dir), "--no-progress"]


def generation(index_dir: Path) -> int:
    from edge_t2t.index import vindex

    return int((vindex.read_manifest(index_dir) or {}).get("generation", 0))


class Writer(threading.Thread):
    """`edge-t2t index` runs, one after another, until stopped (each finishes its batch)."""

    def __init__(self, index_dir: Path, batches: list[Path], nice: int):
        super().__init__(daemon=True)
        self.index_dir, self.batches, self.nice = index_dir, batches, nice
        self.stop = threading.Event()
        self.runs: list[dict] = []
        self.failures: list[str] = []
        self.cpu_s = 0.0

    def run(self) -> None:
        env = {**os.environ, "EDGE_T2T_THREADS": "1"}
        while not self.stop.is_set() and self.batches:
            batch = self.batches.pop(0)
            t0 = time.perf_counter()
            proc = subprocess.Popen(["nice", "-n", str(self.nice), *index_argv(self.index_dir, batch)], cwd=ROOT,
                                    env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)  # fmt: skip
            _, status, usage = os.wait4(proc.pid, 0)
            err = proc.stderr.read()
            proc.stderr.close()
            self.cpu_s += usage.ru_utime + usage.ru_stime
            if os.waitstatus_to_exitcode(status) != 0:
                self.failures.append(err[-500:])
            self.runs.append({"batch": batch.name, "seconds": time.perf_counter() - t0,
                              "generation": generation(self.index_dir)})  # fmt: skip
        if not self.batches and not self.stop.is_set():
            self.failures.append("the writer ran out of batches before the window ended: raise --batches")


# -- the server --------------------------------------------------------------------------------------
def start_server(index_dir: Path, audit: Path, processes: int) -> tuple[subprocess.Popen, int, list[str]]:
    """The server process, its port, and its standard error as it comes (read by a thread to the
    end: a pipe left unread fills, and waitress's event loop then blocks in its own warnings)."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "edge_t2t", "serve", "--index", str(index_dir), "--port", str(port),
                             "--audit-log", str(audit), "--processes", str(processes)], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)  # fmt: skip
    lines: list[str] = []
    listening = threading.Event()

    def drain() -> None:
        for line in proc.stderr:
            lines.append(line.rstrip("\n"))
            if "serving" in line:  # serve prints this line once it listens
                listening.set()
        listening.set()

    threading.Thread(target=drain, daemon=True).start()
    listening.wait()
    if proc.poll() is not None:
        raise SystemExit(f"serve exited {proc.returncode} before listening: {lines[-5:]}")
    return proc, port, lines


# -- the clients -------------------------------------------------------------------------------------
class Client(threading.Thread):
    def __init__(self, n: int, port: int, deadline: float, budget: list[int], lock: threading.Lock, ids: dict):
        super().__init__(daemon=True)
        self.port, self.deadline, self.budget, self.lock, self.ids = port, deadline, budget, lock, ids
        self.rng = random.Random(n)
        self.seconds: dict[str, list[float]] = {kind: [] for kind, _ in KIND_WEIGHTS}
        self.errors: list[str] = []
        self.generations: list[int] = []
        self.hits: set[tuple[int, int, str]] = set()
        self.sent = self.ok = 0

    def take(self) -> bool:
        with self.lock:
            if self.budget[0] <= 0:
                return False
            self.budget[0] -= 1
            return True

    def path(self, kind: str) -> str:
        i = self.rng.randrange(10**6)
        if kind == "search":
            return "/api/search?" + urlencode({"q": f"{WORDS[i % len(WORDS)]} {i}", "k": K})
        if kind == "similar":
            return f"/api/similar?id={self.rng.randint(1, self.ids['seeded'])}&k={K}"
        if kind == "image":
            return f"/api/image?id={self.rng.randint(1, self.ids['seeded'])}"
        return f"/thumb/{self.rng.choice(self.ids['pictured'])}"

    def check(self, kind: str, status: int, body: bytes) -> str | None:
        if status != 200:
            return f"{kind}: HTTP {status} {body[:200]!r}"
        if kind == "thumb":
            return None if body[:2] == b"\xff\xd8" else "thumb: not a JPEG"
        data = json.loads(body)
        if kind == "image":
            return None if len(data["variants"]) == TEXTS_PER_IMAGE else f"image: {len(data['variants'])} variants"
        g, hits = data["generation"], data["hits"]
        if not (isinstance(g, int) and g >= self.ids["generation"]):
            return f"{kind}: generation {g!r} older than the window's first ({self.ids['generation']})"
        self.generations.append(g)
        scores = [h["score"] for h in hits]
        if [h["rank"] for h in hits] != list(range(1, K + 1)) or scores != sorted(scores, reverse=True):
            return f"{kind}: hits not ranked 1..{K} by score"
        if len(self.hits) < 200_000:
            self.hits.update((h["id"], h["variant"], h["text"]) for h in hits)
        return None

    def run(self) -> None:
        kinds, weights = zip(*KIND_WEIGHTS, strict=True)
        conn = None
        while time.perf_counter() < self.deadline and self.take():
            kind = self.rng.choices(kinds, weights)[0]
            path = self.path(kind)
            t0 = time.perf_counter()
            try:
                if conn is None:
                    conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
                conn.request("GET", path)
                resp = conn.getresponse()
                body = resp.read()
                self.sent += 1
                self.seconds[kind].append(time.perf_counter() - t0)
                problem = self.check(kind, resp.status, body)
            except (OSError, http.client.HTTPException, ValueError, KeyError) as exc:
                self.sent += 1
                problem = f"{kind}: {type(exc).__name__}: {exc}"
                if conn is not None:
                    conn.close()
                conn = None
            if problem:
                self.errors.append(problem)
            else:
                self.ok += 1
        if conn is not None:
            conn.close()


def window(port: int, server: subprocess.Popen, n_clients: int, seconds: float, max_requests: int, ids: dict,
           index_dir: Path, writer: Writer) -> dict:  # fmt: skip
    load_before = os.getloadavg()[0]
    before = process_tree(server.pid)
    cpu0 = time.process_time()
    lock, budget = threading.Lock(), [max_requests]
    t0 = time.perf_counter()
    clients = [Client(1000 * n_clients + c, port, t0 + seconds, budget, lock, ids) for c in range(n_clients)]
    for c in clients:
        c.start()
    for c in clients:
        c.join(seconds + 120)
    wall = time.perf_counter() - t0
    after = process_tree(server.pid)
    every = [s for c in clients for v in c.seconds.values() for s in v]
    errors = [e for c in clients for e in c.errors]
    ok = sum(c.ok for c in clients)
    gens = sorted({g for c in clients for g in c.generations})
    last = generation(index_dir)
    errors += [f"generation {g} newer than the last saved ({last})" for g in gens if g > last]
    per_kind = {k: {"n": len(v), "p50_ms": percentile_ms(v, 50), "p99_ms": percentile_ms(v, 99)}
                for k in dict(KIND_WEIGHTS) if (v := [s for c in clients for s in c.seconds[k]])}  # fmt: skip
    return {
        "clients": n_clients, "seconds": wall, "requests": sum(c.sent for c in clients), "ok": ok,
        "throughput_rps": ok / wall, "p50_ms": percentile_ms(every, 50),
        "p99_ms": percentile_ms(every, 99), "per_kind": per_kind, "errors": len(errors), "error_samples": errors[:10],
        "generations_seen": gens, "writer_runs_so_far": len(writer.runs),
        "server_cpu_s": after["cpu_s"] - before["cpu_s"], "server_pss_mib": after["pss_mib"],
        "server_anon_mib": after["anon_mib"], "server_processes": after["processes"],
        "client_cpu_s": time.process_time() - cpu0,
        "load_before": load_before, "load_after": os.getloadavg()[0],
        "_hits": set().union(*(c.hits for c in clients)),
    }


def check_hits(index_dir: Path, hits: set[tuple[int, int, str]]) -> list[str]:
    """Every hit's text is one of the store's texts of that image's variant (schema v7: texts -> variants)."""
    conn = sqlite3.connect(f"file:{index_dir / 'store.sqlite'}?mode=ro", uri=True)
    try:
        bad = []
        for image_id, ordinal, text in hits:
            held = [r[0] for r in conn.execute("SELECT t.text FROM texts t JOIN variants v ON v.id = t.variant_id "
                                                "WHERE v.image_id = ? AND v.ordinal = ?", (image_id, ordinal))]
            if text not in held:
                bad.append(f"image {image_id} variant {ordinal}: the store holds {held!r}")
        return bad
    finally:
        conn.close()


def run_server(index_dir: Path, work: Path, processes: int, counts: list[int], args, batches: list[Path],
               ids: dict) -> dict:  # fmt: skip
    """One server configuration through every client count; the writer runs in each window."""
    audit = work / f"audit-{processes}.log"
    server, port, server_err = start_server(index_dir, audit, processes)
    windows, hits, writer_runs, writer_failures, writer_cpu = [], set(), [], [], 0.0
    try:
        for n in counts:
            ids["generation"] = generation(index_dir)
            writer = Writer(index_dir, batches, args.writer_nice)
            if not args.no_writer:
                writer.start()
            w = window(port, server, n, args.seconds, args.max_requests, ids, index_dir, writer)
            writer.stop.set()
            if not args.no_writer:
                writer.join()
            hits |= w.pop("_hits")
            w["writer_runs"] = len(writer.runs)
            w["writer_cpu_s"] = writer.cpu_s
            writer_runs += writer.runs
            writer_failures += writer.failures
            writer_cpu += writer.cpu_s
            windows.append(w)
            print(f"processes {processes}, {n:>2} clients: {w['throughput_rps']:.1f} req/s, p50 {w['p50_ms']:.1f} ms, "
                  f"p99 {w['p99_ms']:.1f} ms, {w['errors']} errors, server {w['server_cpu_s'] / w['seconds']:.2f} "
                  f"cores, generations {w['generations_seen'][:1]}..{w['generations_seen'][-1:]}, "
                  f"{w['writer_runs']} index runs, load {w['load_before']:.2f}", flush=True)  # fmt: skip
        final = process_tree(server.pid)
    finally:
        server.terminate()
        server.wait(timeout=60)
    audit_lines = len(audit.read_text().splitlines())
    sent = sum(w["requests"] for w in windows)
    bad_hits = check_hits(index_dir, hits)
    by_n = {w["clients"]: w for w in windows}
    ratio = by_n[4]["throughput_rps"] / by_n[1]["throughput_rps"] if 1 in by_n and 4 in by_n else float("nan")
    p99_4 = by_n[4]["p99_ms"] if 4 in by_n else float("nan")
    errors = sum(w["errors"] for w in windows) + len(bad_hits) + len(writer_failures) + (audit_lines != sent)
    return {"processes": processes, "windows": windows, "ratio_4_over_1": ratio, "p99_at_4_ms": p99_4,
            "goals": {"throughput_4_over_1 >= 1.6": ratio >= 1.6, "p99_at_4 <= 100 ms": p99_4 <= 100,
                      "errors == 0": errors == 0},
            "errors_total": errors, "distinct_hits": len(hits), "bad_hits": bad_hits[:20],
            "writer_failures": writer_failures[:5], "writer_runs": writer_runs, "writer_cpu_s": writer_cpu,
            "audit_lines": audit_lines, "requests_sent": sent,
            "waitress_queue_warnings": sum("Task queue depth" in line for line in server_err),
            "server_peak_rss_mib": final["peak_rss_mib"], "server_processes": final["processes"]}  # fmt: skip


def report(args, runs: list[dict], seconds: float) -> str:
    def met(ok: bool) -> str:
        return "met" if ok else "not met"

    rows, notes = [], []
    for r in runs:
        searching = f"{r['processes']} search processes" if r["processes"] else "threads (--processes 0)"
        rows += [f"| {searching} | {w['clients']} | {w['throughput_rps']:.1f} | {w['p50_ms']:.1f} | {w['p99_ms']:.1f} | "
                 f"{w['errors']} | {len(w['generations_seen'])} | {w['writer_runs']} | "
                 f"{w['server_cpu_s'] / w['seconds']:.2f} | {w['server_pss_mib']:.0f} | {w['load_before']:.2f} |"
                 for w in r["windows"]]  # fmt: skip
        g = r["goals"]
        notes.append(
            f"- **{searching}**: 4 clients ÷ 1 client **{r['ratio_4_over_1']:.2f}×** (goal ≥ 1.6: "
            f"**{met(g['throughput_4_over_1 >= 1.6'])}**); p99 at 4 clients **{r['p99_at_4_ms']:.1f} ms** (goal ≤ 100: "
            f"**{met(g['p99_at_4 <= 100 ms'])}**); errors **{r['errors_total']}** (goal 0: **{met(g['errors == 0'])}**): "
            f"{r['distinct_hits']:,} distinct hit texts all equal to the store's ({len(r['bad_hits'])} not), "
            f"{len(r['writer_runs'])} index runs ({len(r['writer_failures'])} failed, {r['writer_cpu_s']:.0f} CPU s), "
            f"audit log {r['audit_lines']:,} lines for {r['requests_sent']:,} requests; {r['server_processes']} "
            f"processes in all at the end.")  # fmt: skip
    if len(runs) > 1 and all(1 in {w["clients"] for w in r["windows"]} for r in runs):
        at = {r["processes"]: {w["clients"]: w["throughput_rps"] for w in r["windows"]} for r in runs}
        first, peer = runs[0]["processes"], runs[-1]["processes"]
        p99 = {r["processes"]: {w["clients"]: w["p99_ms"] for w in r["windows"]} for r in runs}
        notes.append(f"- Same run, {first} search processes ÷ {peer}, requests/s: " + ", ".join(
            f"{n} client{'s' * (n > 1)} {at[first][n] / at[peer][n]:.2f}×" for n in at[first] if n in at[peer])
            + "; p99: " + ", ".join(f"{n} client{'s' * (n > 1)} {p99[first][n]:.0f} against {p99[peer][n]:.0f} ms"
                                    for n in p99[first] if n in p99[peer]) + ".")
    return "\n".join([
        f"Index of {args.texts:,} texts (5 per image, joined, i8); `edge-t2t serve` on loopback, each configuration "
        f"in turn; each window {args.seconds:.0f} s "
        + ("with nothing else running (--no-writer). " if args.no_writer else
           f"while `edge-t2t index` (nice {args.writer_nice}, 1 thread) adds {args.batch} pictures per run, again and "
           "again. ") + "Mix: search 50%, similar 20%, image details 15%, "
        "thumbnail 15%; keep-alive connections. Server CPU and PSS: the server and its search processes together.",
        "",
        "| searching in | clients | requests/s | p50 ms | p99 ms | errors | snapshot generations answered from | "
        "index runs | server CPU (cores) | server PSS MiB | load average at start |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        *rows,
        "",
        *notes,
        "",
        f"Whole run {seconds:.0f} s.",
    ])


def main() -> int:
    from edge_t2t.serve_pool import default_processes

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--texts", type=int, default=100_000, help="seeded texts in the index (default 100,000)")
    ap.add_argument("--clients", default="1,4,16", help="client counts, one window each (default 1,4,16)")
    ap.add_argument("--processes", default=f"{default_processes()},0",
                    help="serve --processes values, one server each, in turn (default: serve's default here, "
                         f"{default_processes()}, then 0)")  # fmt: skip
    ap.add_argument("--seconds", type=float, default=60.0, help="length of each window (default 60)")
    ap.add_argument("--max-requests", type=int, default=200_000, help="requests at most per window")
    ap.add_argument("--batch", type=int, default=40, help="pictures each `index` run adds (default 40)")
    ap.add_argument("--batches", type=int, default=0, help="batches made in advance (default: enough for the run)")
    ap.add_argument("--writer-nice", type=int, default=10, help="nice level of the `index` runs (default 10)")
    ap.add_argument("--no-writer", action="store_true",
                    help="no `index` runs beside the clients: what the server does with the cores to itself")
    ap.add_argument("--name", default="serve_load")
    args = ap.parse_args()
    counts = [int(x) for x in args.clients.split(",")]
    configs = [int(x) for x in args.processes.split(",")]
    t_all = time.perf_counter()

    work = Path(tempfile.mkdtemp(prefix="serve-load-"))
    try:
        identity, manifest = real_identity()
        index_dir = work / "index"
        seed(index_dir, ClusteredVectors(identity, manifest), args.texts)
        windows = len(counts) * len(configs)
        n_batches = args.batches or (1 if args.no_writer else 1 + int(windows * args.seconds / 2) + 4)  # a run: > 2 s
        batches = write_batches(work / "pictures", n_batches, args.batch)
        first = subprocess.run(index_argv(index_dir, batches.pop(0)), cwd=ROOT, capture_output=True, text=True)
        assert first.returncode == 0, first.stderr[-2000:]
        conn = sqlite3.connect(f"file:{index_dir / 'store.sqlite'}?mode=ro", uri=True)
        pictured = [r[0] for r in conn.execute("SELECT id FROM images WHERE path LIKE '%.png' ORDER BY id")]
        conn.close()
        ids = {"seeded": args.texts // TEXTS_PER_IMAGE, "pictured": pictured}
        print(f"index: {args.texts:,} seeded texts + {len(pictured)} pictures; {len(batches)} batches of "
              f"{args.batch} ready for the writer ({time.perf_counter() - t_all:.0f} s)", flush=True)
        runs = [run_server(index_dir, work, processes, counts, args, batches, ids) for processes in configs]
    finally:
        shutil.rmtree(work, ignore_errors=True)

    table = report(args, runs, time.perf_counter() - t_all)
    write_results(args.name, {"texts": args.texts, "seconds_per_window": args.seconds, "batch": args.batch,
                              "writer": not args.no_writer, "writer_nice": args.writer_nice, "runs": runs},
                  table)  # fmt: skip
    print(table)
    return 0 if all(r["errors_total"] == 0 for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
