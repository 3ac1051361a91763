"""`edge-t2t demo`: synthetic scenes with ground truth, text search, the VLM path, real data."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "demo",
        help="run the whole pipeline on synthetic aerial scenes (no external data needed)",
        description=(
            "Draw seeded synthetic aerial scenes, write their ground-truth descriptions, index them and "
            "run example searches whose right answer is known (demo.html shows thumbnails); caption a few "
            "scenes with the configured VLM (or the test VLM, whose captions are placeholders); index the "
            "RSICD captions from ../shared/data when present; and, with DEMO_IMAGES=DIR, caption, index "
            "and search your own images. Re-running reuses what is already indexed."
        ),
    )
    p.add_argument("--out", metavar="DIR", default="demo-out", help="demo folder (default: ./demo-out)")
    p.add_argument("--scenes", type=int, default=40, metavar="N", help="synthetic scenes to draw (default: 40)")
    p.add_argument("--seed", type=int, default=0, metavar="N", help="scene seed (default: 0)")
    p.add_argument("--vlm-images", type=int, default=6, metavar="N",
                   help="scenes to caption with the VLM (default: 6; a real VLM takes about a minute each)")
    p.add_argument("--no-rsicd", action="store_true", help="skip the real-data step")
    p.add_argument("--query", default=None, help="query for your DEMO_IMAGES (default: $DEMO_QUERY or a stock one)")
    p.add_argument("--json", action="store_true", help="print the step summary as JSON on stdout")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from rich.console import Console

    from ..demo.demo import USER_QUERY_DEFAULT, DemoOptions, run_demo, steps_to_dicts, summary_table
    from ..errors import InputError

    if args.scenes < 1 or args.vlm_images < 0:
        raise InputError("--scenes must be at least 1 and --vlm-images at least 0")
    user = os.environ.get("DEMO_IMAGES")
    opts = DemoOptions(
        out_dir=Path(args.out), n_scenes=args.scenes, seed=args.seed, vlm_images=args.vlm_images,
        rsicd=not args.no_rsicd, user_images=Path(user).expanduser() if user else None,
        user_query=args.query or os.environ.get("DEMO_QUERY") or USER_QUERY_DEFAULT,
        progress=not args.json,
    )  # fmt: skip
    # With --json the human output goes to stderr, so stdout stays machine-readable.
    console = Console(stderr=True) if args.json else Console()
    t0 = time.perf_counter()
    steps = run_demo(opts, console)
    console.print(summary_table(steps, time.perf_counter() - t0))
    if args.json:
        json.dump({"seconds": round(time.perf_counter() - t0, 2), "steps": steps_to_dicts(steps)}, sys.stdout)
        sys.stdout.write("\n")
    if any(s.status == "interrupted" for s in steps):
        return 130
    return 1 if any(s.status == "failed" for s in steps) else 0
