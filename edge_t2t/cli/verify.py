"""`edge-t2t verify`: check an index (SQLite, schema, vectors, model files); optionally repair."""

from __future__ import annotations

import argparse
import json
import sys
from contextlib import contextmanager

from .. import config


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "verify",
        help="check that an index is sound; --repair rebuilds its vector files",
        description=(
            "Check an index directory: SQLite integrity and schema version, the pending vectors of texts "
            "newer than the vector snapshot, the snapshot against SQLite (count, keys, images, dimension, "
            "dtype, vectors), the full-text index, and the sha256 of the model files the index records. "
            "Prints one line per problem or warning. Exit status: 0 sound, 1 problems found, 2 no index / "
            "usage error. A snapshot that lags SQLite (left by a killed run; the next index run catches it "
            "up) is a warning."
        ),
    )
    p.add_argument("--index", metavar="PATH",
                   help="index directory (default: $EDGE_T2T_INDEX or ./.edge-t2t)")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object {ok, problems, warnings, checks, repaired}")
    p.add_argument("--repair", action="store_true",
                   help="rebuild the vector files (atomically) when they are stale or corrupt: each vector from "
                        "SQLite's pending copy or the sound part of the snapshot, the rest by embedding the stored "
                        "texts again with the recorded embedder (prints how many and how long)")
    p.add_argument("--skip-models", action="store_true",
                   help="do not hash the model files (faster on large models)")
    p.set_defaults(func=run)


@contextmanager
def _rebuild_progress(enabled: bool):
    """A progress callback for a repair's rebuild: a rich bar on stderr (None when not wanted)."""
    if not enabled:
        yield None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    with Progress(TextColumn("rebuilding vectors"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task("rebuild", total=None)
        yield lambda done, total: bar.update(task, completed=done, total=total)


def run(args: argparse.Namespace) -> int:
    from ..index.verify import verify_index

    index = config.index_dir(args.index)
    with _rebuild_progress(enabled=args.repair and not args.json) as progress:
        rep = verify_index(index, repair=args.repair, check_models=not args.skip_models, progress=progress)
    if args.json:
        print(json.dumps(rep.to_dict(), indent=2))
        return 0 if rep.ok else 1
    for line in rep.problems:
        print(f"problem: {line}")
    for line in rep.warnings:
        print(f"warning: {line}", file=sys.stderr)
    vlm = rep.checks.get("models", {}).get("vlm", {})
    if vlm.get("status") == "not_recorded" and vlm.get("missing"):  # a store older than schema v2
        print(f"note: the store records VLM file names only (no {', '.join(vlm['missing'])}); "
              "the VLM files behind the descriptions were not checked", file=sys.stderr)
    elif vlm.get("status") == "not_recorded" and vlm.get("descriptions"):
        print("note: the indexed descriptions record no VLM files (imported captions); no VLM file to check",
              file=sys.stderr)
    made_on = vlm.get("made_on") or []
    if any(m["backend"] for m in made_on):  # which descriptions the CPU made and which a GPU
        print("note: descriptions made on: " + "; ".join(made_on_text(m) for m in made_on), file=sys.stderr)
    counts = rep.checks.get("counts", {})
    texts = rep.checks.get("texts", {}).get("texts", 0)
    state = rep.checks.get("vectors", {}).get("state", "?")
    what = f"{counts.get('images_ok', 0)} images, {texts} texts, vector files {state}"
    if rep.repaired and rep.repair:
        r = rep.repair
        again = (f", {r['embedded_again']} texts embedded again ({r['precision']} embedder)" if r["embedded_again"]
                 else ", no text embedded again")
        print(f"repaired: rebuilt the vector files of {index}: {r['vectors']} vectors{again} in {r['seconds']:.1f} s")
    elif rep.repaired:
        print(f"repaired: rebuilt the full-text index of {index}")
    if rep.ok:
        print(f"ok: {index} is sound ({what})")
        return 0
    print(f"{len(rep.problems)} problem(s) in {index} ({what})")
    return 1


def made_on_text(m: dict) -> str:
    """One description set's device, as verify and info print it."""
    if m["backend"] is None:
        return f"{m['images']} image(s) with no device recorded (imported captions, or indexed before it was kept)"
    where = "the CPU" if m["backend"] == "CPU" else f"the GPU {m['device']} ({m['backend']})"
    return f"{m['images']} image(s) on {where}"
