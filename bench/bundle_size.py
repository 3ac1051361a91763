"""What the air-gapped bundle is made of: every file of the main and the optional archive, its size
unpacked and what it costs inside the .tar.gz (the file alone through gzip level 6, the level
build_bundle.py writes with), grouped, against the 150 MB goal for the main archive.

    make bundle && .venv/bin/python bench/bundle_size.py [--xz]

--xz also measures the main archive recompressed with xz -6 (install.sh could unpack it with stock
tar -J), to say what a change of compressor would buy. Writes bench/results/bundle_size.{json,md}.
"""

from __future__ import annotations

import argparse
import io
import lzma
import sys
import tarfile
import time
import zlib
from pathlib import Path

from _common import ROOT, write_results

GOAL_BYTES = 150e6


def group_of(path: str) -> str:
    parts = path.split("/")
    if parts[0] == "wheels":
        return f"wheels/{parts[1]}"
    if parts[0] == "models":
        return "/".join(parts[:2])
    return "bundle files"


def members(archive: Path) -> list[dict]:
    rows = []
    with tarfile.open(archive) as tar:
        for m in tar.getmembers():
            if not m.isfile():
                continue
            data = tar.extractfile(m).read()
            rel = m.name.split("/", 1)[1]
            rows.append({"file": rel, "group": group_of(rel), "bytes": len(data),
                         "gz_bytes": len(zlib.compress(data, 6))})  # fmt: skip
    return sorted(rows, key=lambda r: -r["gz_bytes"])


def mib(n: float) -> str:
    return f"{n / 2**20:.1f}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dist", type=Path, default=ROOT / "dist")
    ap.add_argument("--xz", action="store_true", help="also time xz -6 over the whole main archive")
    args = ap.parse_args()
    main_archive = sorted(args.dist.glob("edge-t2t-*.tar.gz"))
    if len(main_archive) != 1:
        sys.exit(f"bundle_size: expected one {args.dist}/edge-t2t-*.tar.gz; run `make bundle` first")
    archives = {"main": main_archive[0]}
    optional = sorted((args.dist / "optional").glob("edge-t2t-*-optional.tar.gz"))
    if optional:
        archives["optional"] = optional[0]
    report: dict = {"archives": {}}
    lines = []
    for kind, path in archives.items():
        rows = members(path)
        groups: dict[str, dict] = {}
        for r in rows:
            g = groups.setdefault(r["group"], {"files": 0, "bytes": 0, "gz_bytes": 0})
            g["files"] += 1
            g["bytes"] += r["bytes"]
            g["gz_bytes"] += r["gz_bytes"]
        size = path.stat().st_size
        entry = {"archive": path.name, "archive_bytes": size, "under_150_MB": size < GOAL_BYTES,
                 "unpacked_bytes": sum(r["bytes"] for r in rows), "groups": groups, "files": rows}  # fmt: skip
        if args.xz and kind == "main":
            with tarfile.open(path) as tar_in:  # the same tar stream, uncompressed
                buf = io.BytesIO()
                with tarfile.open(fileobj=buf, mode="w") as tar_out:
                    for m in tar_in.getmembers():
                        tar_out.addfile(m, tar_in.extractfile(m) if m.isfile() else None)
                raw = buf.getvalue()
            t0 = time.perf_counter()
            entry["xz6_bytes"] = len(lzma.compress(raw, preset=6))
            entry["xz6_seconds"] = round(time.perf_counter() - t0, 1)
        report["archives"][kind] = entry
        verdict = "under" if size < GOAL_BYTES else "OVER"
        lines += [f"### {kind}: `{path.name}`: {mib(size)} MiB = {size / 1e6:.1f} MB ({verdict} the 150 MB goal"
                  f"{'' if kind == 'main' else '; optional, not part of the goal'}), "
                  f"{mib(entry['unpacked_bytes'])} MiB unpacked", ""]  # fmt: skip
        if "xz6_bytes" in entry:
            lines += [f"xz -6 over the same tar: {mib(entry['xz6_bytes'])} MiB ({entry['xz6_seconds']} s to compress).", ""]
        lines += ["| group | files | unpacked MiB | in .tar.gz MiB |", "|---|---:|---:|---:|"]
        for name, g in sorted(groups.items(), key=lambda kv: -kv[1]["gz_bytes"]):
            lines.append(f"| {name} | {g['files']} | {mib(g['bytes'])} | {mib(g['gz_bytes'])} |")
        lines += ["", "| file | unpacked MiB | in .tar.gz MiB |", "|---|---:|---:|"]
        for r in rows:
            if r["gz_bytes"] >= 0.5 * 2**20:
                lines.append(f"| {r['file']} | {mib(r['bytes'])} | {mib(r['gz_bytes'])} |")
        small = [r for r in rows if r["gz_bytes"] < 0.5 * 2**20]
        lines += [f"| {len(small)} smaller files | {mib(sum(r['bytes'] for r in small))} | "
                  f"{mib(sum(r['gz_bytes'] for r in small))} |", ""]  # fmt: skip
    table = "\n".join(lines)
    write_results("bundle_size", report, table)
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
