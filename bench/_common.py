"""Shared plumbing for bench scripts: machine facts, git commit, peak RSS, and result files.

Every bench writes bench/results/<name>.json and bench/results/<name>.md, stamped with the
machine and commit, so a figure in the docs (docs/performance.md) can always be traced to the run that made it.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
sys.path.insert(0, str(ROOT))  # run from a clone without installing


def git_commit() -> str:
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True).stdout
        return rev + ("-dirty" if dirty.strip() else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def machine() -> dict:
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError):
        mem_gib = 0.0
    return {
        "cpu": cpu,
        "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "memory_gib": round(mem_gib, 1),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def peak_rss_mib() -> float:
    """Peak resident set size of this process (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def percentile_ms(seconds: list[float], q: float) -> float:
    import numpy as np

    return float(np.percentile(np.asarray(seconds) * 1000.0, q))


def process_tree(pid: int) -> dict:
    """A process and its children together (a server and its search processes): PSS (each shared
    page counted once, split between the processes that map it; RSS would count the snapshot's
    file pages once per process) and the anonymous part, in MiB; CPU seconds so far; how many
    processes; and the parent's own peak RSS."""
    def kib(path: str) -> dict[str, int]:
        return {k: int(v.split()[0]) for k, v in (ln.split(":", 1) for ln in Path(path).read_text().splitlines()
                                                   if ln.endswith(" kB"))}  # fmt: skip

    ticks = os.sysconf("SC_CLK_TCK")
    out = {"pss_mib": 0.0, "anon_mib": 0.0, "cpu_s": 0.0, "processes": 0}
    for p in [pid, *(int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split())]:
        try:
            rollup = kib(f"/proc/{p}/smaps_rollup")
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except FileNotFoundError:  # ended between the listing and the read
            continue
        out["pss_mib"] += rollup["Pss"] / 1024
        out["anon_mib"] += rollup["Anonymous"] / 1024
        out["cpu_s"] += (int(fields[11]) + int(fields[12])) / ticks
        out["processes"] += 1
    out["peak_rss_mib"] = kib(f"/proc/{pid}/status")["VmHWM"] / 1024
    return out


def write_results(name: str, data: dict, table_md: str) -> Path:
    """Write <name>.json and <name>.md (table plus provenance) atomically; return the JSON path."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = {
        "bench": name,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "commit": git_commit(),
        "machine": machine(),
    }
    payload = {**stamp, **data}
    out = RESULTS / f"{name}.json"
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    os.replace(tmp, out)
    m = stamp["machine"]
    md = (
        f"# {name}\n\n{table_md.strip()}\n\n"
        f"Commit `{stamp['commit']}`, {stamp['date']}; {m['cpu']}, {m['cores']} cores, "
        f"{m['memory_gib']} GiB, Python {m['python']}.\n"
    )
    md_path = RESULTS / f"{name}.md"
    tmp = md_path.with_suffix(".md.tmp")
    tmp.write_text(md)
    os.replace(tmp, md_path)
    return out


def vlm_pair(vlm: str | None, mmproj: str | None) -> tuple[Path, Path]:
    """The VLM a bench runs: the files given with --vlm/--mmproj, else the generated test VLM (built if
    missing)."""
    if vlm:
        if not mmproj:
            raise SystemExit("--vlm needs --mmproj")
        return Path(vlm), Path(mmproj)
    from edge_t2t import config
    from edge_t2t.describe.testvlm import MMPROJ_FILE, MODEL_FILE, build_test_vlm

    build_test_vlm(config.test_vlm_dir())
    return config.test_vlm_dir() / MODEL_FILE, config.test_vlm_dir() / MMPROJ_FILE
