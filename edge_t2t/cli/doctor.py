"""`edge-t2t doctor`: check the installation (Python, packages, CPU and llama.cpp build, GPU devices,
onnxruntime, models and their checksums, the index) and say how to fix each problem."""

from __future__ import annotations

import argparse
import json

from .. import config


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "doctor",
        help="check the installation and say how to fix each problem",
        description=(
            "Check Python and package versions, the CPU's flags against the installed llama.cpp build "
            "(and llama.cpp's own system info and backends), the Vulkan devices (name, type, memory, "
            "driver) and the GPUs llama.cpp offloads to, onnxruntime's providers, the models found with "
            "their checksums, and the index directory. One line per finding; each problem names its fix. "
            "Exit status: 0 all is well, 1 problems found."
        ),
    )
    p.add_argument("--index", metavar="DIR", help="index directory to check (default: $EDGE_T2T_INDEX or ./.edge-t2t)")
    p.add_argument("--json", action="store_true", help="print one JSON object {ok, problems, lines, facts}")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..doctor import run_doctor

    rep = run_doctor(config.index_dir(args.index))
    if args.json:
        print(json.dumps(rep.to_dict(), indent=2))
        return 0 if rep.ok else 1
    width = max(len(x.check) for x in rep.lines)
    for x in rep.lines:
        tag = {"ok": "ok     ", "note": "note   ", "problem": "PROBLEM"}[x.status]
        fix = f" -> {x.fix}" if x.fix else ""
        print(f"{tag} {x.check:<{width}}  {x.detail}{fix}")
    n = len(rep.problems)
    print("all is well" if rep.ok else f"{n} problem{'s' if n != 1 else ''} found")
    return 0 if rep.ok else 1
