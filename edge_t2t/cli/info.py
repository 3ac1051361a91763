"""`edge-t2t info`: what an index holds and how it was built."""

from __future__ import annotations

import argparse
import json
import sys
import time


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "info",
        help="show what an index holds: counts, models, embedder, sizes, last run",
        description="Counts, description models and prompt version, embedder, vector dtype, text mode, "
        "file sizes and the last indexing run of an index.",
    )
    p.add_argument("--index", metavar="DIR", help="index directory (default: $EDGE_T2T_INDEX or ./.edge-t2t)")
    p.add_argument("--json", action="store_true", help="print as JSON")
    p.set_defaults(func=run)


def gather(index_dir) -> dict:
    from ..index.indexdir import IndexDir
    from ..index.schema import dir_bytes

    with IndexDir.open_reader(index_dir) as ix:
        store = ix.store
        meta = store.meta()
        counts = store.counts()
        vectors = ix.vector_state()
        counts["vectors"] = vectors["vectors"]
        files = {}
        for f in sorted(index_dir.iterdir()):
            if f.is_file():
                files[f.name] = f.stat().st_size
        ident = meta.get("embedder_identity", {})
        images = max(1, counts["images_ok"])
        return {
            "index": str(index_dir),
            "counts": counts,
            "descriptions": store.provenance(),
            "test_model": any(d["test_model"] for d in store.provenance()),
            "embedder": ident,
            "dtype": meta.get("dtype"),
            "text_mode": meta.get("text_mode"),
            "created_at": meta.get("created_at"),
            "vectors_consistent": vectors["snapshot_matches_store"] and vectors["texts_not_in_snapshot"] == 0,
            "snapshot": vectors,
            "files": files,
            "bytes_per_image": round(dir_bytes(index_dir) / images) if counts["images_ok"] else None,
            "exact_copy": vectors["exact_copy"],
            "upgrade": _upgrade(meta.get("upgrade")),
            "last_run": store.last_run(),
        }


def _upgrade(up: dict | None) -> dict | None:
    """The in-place upgrade to the lean layout (schema v7), with bytes per image before and after."""
    if not up:
        return None
    images = max(1, int(up.get("images") or 0))
    out = dict(up)
    for key in ("bytes_before", "bytes_after"):
        if up.get(key) is not None:
            out[key.replace("bytes", "bytes_per_image")] = round(up[key] / images)
    return out


def _when(t) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)) if t else "-"


def run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    from .. import config

    info = gather(config.index_dir(args.index))
    if args.json:
        json.dump(info, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return 0
    c = info["counts"]
    t = Table(title=f"Index {escape(info['index'])}", show_header=False)
    t.add_row("images", f"{c['images_ok']} ok, {c['images_failed']} failed")
    t.add_row("variants", f"{c['variants']} ({c['texts']} embedded texts, {c['vectors']} vectors)")
    emb = info["embedder"]
    t.add_row("embedder", f"{emb.get('name', '?')} dim {emb.get('dim', '?')}, {emb.get('pooling', '?')} pooling, "
              f"weights {str(emb.get('weights_sha256', ''))[:12]}")
    copy = {True: ", float16 exact copy", False: ", no exact copy"}.get(info["exact_copy"], "")
    t.add_row("vectors", f"{info['dtype']}{copy}, text mode {info['text_mode']}"
              + ("" if info["vectors_consistent"] else
                 f" ({info['snapshot']['texts_not_in_snapshot']} texts not in the vector snapshot yet: saved by the "
                 "next index run; searches already see them)"))
    for d in info["descriptions"]:
        flag = " [TEST MODEL]" if d["test_model"] else ""
        where = f", on {'the CPU' if d['backend'] == 'CPU' else d['device']}" if d["backend"] else ""
        t.add_row("descriptions", escape(f"{d['images']} images by {d['model']} ({d['family'] or '-'}), "
                                         f"prompt {d['prompt_version']}{where}{flag}"))
    for name, size in info["files"].items():
        t.add_row(f"file {escape(name)}", f"{size / 1024:.1f} KiB")
    if info["bytes_per_image"]:
        t.add_row("disk per image", f"{info['bytes_per_image'] / 1024:.1f} KiB")
    up = info["upgrade"]
    if up and up.get("bytes_per_image_after") is not None:
        t.add_row("upgraded", f"to schema v{up['schema']} on {_when(up['at'])}: disk per image "
                  f"{up['bytes_per_image_before'] / 1024:.1f} KiB before, {up['bytes_per_image_after'] / 1024:.1f} KiB after")
    r = info["last_run"]
    if r:
        counts = ", ".join(f"{k} {v}" for k, v in r["counts"].items())
        t.add_row("last run", f"{r['status']} {_when(r['started'])} -> {_when(r['finished'])}: {counts}")
    Console().print(t)
    return 0
