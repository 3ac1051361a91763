"""`edge-t2t eval`: T2I / I2T Recall@1/5/10 and mR against reference captions."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from ..errors import InputError
from ..fileio import atomic_write_text
from ..modes import DTYPES, PRECISIONS, RETRIEVAL_MODES, VECTOR_MODES

# eval asks for exact scoring with --exact, not a vector mode
EVAL_VECTOR_MODES = tuple(m for m in VECTOR_MODES if m != "exact")

DESCRIPTION = """\
Retrieval evaluation against reference captions (COCO caption JSON or Karpathy-style
dataset_*.json). Reports text-to-image (T2I) and image-to-text (I2T) Recall@1/5/10 in percent,
their means, and mR (the mean of the six), each also without verbatim-duplicate queries (*_nodup).

Ties count against the query: a target's rank is the number of other candidates scoring >= it.

--source oracle (default): reference captions stand in for the VLM's descriptions, leave-one-out.
  T2I: a caption queries all images; its own image is represented by its OTHER captions, every
  other image by all of its captions. I2T: an image's other captions query every caption except
  those; the held-out caption is the target. Measures the text side without a VLM.
  Dup queries (left out of *_nodup): the held-out caption's exact text is also among its image's
  other captions. Images with one caption cannot be asked (no other captions): skipped, counted.
  Images without captions are no T2I candidates (nothing represents them): counted.
--source index: the descriptions a VLM wrote for the annotated images, read from --index
  (images matched by file name); the paper's protocol. *_nodup counts each distinct
  (image, caption text) once, as query and as I2T candidate.

Scoring: oracle is always exact numpy; index is exact with --exact. Exact scores are those of
`search --vector-mode exact` on an index of --dtype: f16 and i8 indexes keep a float16 copy of each
vector beside the graph and exact search scores that, so f16 and i8 give the same exact figures.
Without --exact, T2I goes through the index's own usearch file and --mode when --dtype is the
index's dtype (the default), else through an HNSW graph of --dtype built the index's way (i8: the
index's own per-vector int8 codes); I2T always through such a graph over the captions.
"""


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "eval",
        help="retrieval metrics (R@1/5/10, mR) against reference captions",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--annotations", required=True, type=Path, metavar="FILE",
                   help="COCO caption JSON or Karpathy-style dataset_*.json")
    p.add_argument("--source", choices=["oracle", "index"], default="oracle",
                   help="image-side texts: reference captions, leave-one-out (default), or an index")
    p.add_argument("--index", metavar="PATH", default=None,
                   help="index directory for --source index (default: $EDGE_T2T_INDEX or ./.edge-t2t)")
    p.add_argument("--precision", choices=PRECISIONS, default="int8",
                   help="ONNX embedder for the captions (default: int8)")
    p.add_argument("--dtype", choices=DTYPES, default=None,
                   help="vector dtype to score with (default: f32 for oracle, the index's own for index)")
    p.add_argument("--exact", action="store_true",
                   help="brute-force numpy scoring (always so for oracle)")
    p.add_argument("--mode", choices=[*RETRIEVAL_MODES, *EVAL_VECTOR_MODES], default="dense",
                   help="retrieval mode, as in `search --mode`: dense (default), lexical (FTS5 BM25) or "
                        "hybrid (dense + lexical); lexical and hybrid are scored exactly. The old values "
                        "hnsw/rescore mean dense with that --vector-mode")
    p.add_argument("--vector-mode", choices=EVAL_VECTOR_MODES, default="rescore",
                   help="search mode of the index's own usearch file for --source index without "
                        "--exact, when --dtype is the index's (default: rescore)")
    p.add_argument("--split", metavar="NAME", default=None,
                   help="split of a Karpathy file (default: 'test' when present, else all images)")
    p.add_argument("--max-images", type=int, default=None, metavar="N",
                   help="only the first N images of the file (quick checks)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.add_argument("--out", type=Path, metavar="DIR", default=None,
                   help="also write eval-<source>-<precision>-<dtype>.json and .md there")
    p.add_argument("--threads", type=int, default=None, metavar="N", help="onnxruntime threads (default: all CPUs)")
    p.set_defaults(func=run)


def _embed_with_progress(embedder, texts: list[str], label: str):
    """Embed in chunks so a rich progress bar (stderr) can follow; same vectors as one call."""
    import numpy as np
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    chunks = []
    step = 256
    console = Console(stderr=True)
    with Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        console=console, transient=True, disable=not console.is_terminal,
    ) as progress:
        task = progress.add_task(label, total=len(texts))
        for start in range(0, len(texts), step):
            chunks.append(embedder.embed(texts[start : start + step]))
            progress.advance(task, min(step, len(texts) - start))
    return np.concatenate(chunks) if chunks else np.zeros((0, embedder.dim), np.float32)


def evaluate_from_args(args: argparse.Namespace) -> dict:
    """Load, embed, score; return the JSON-ready result."""
    from .. import config
    from .. import evaluate as ev
    from ..dataset import load_annotations
    from ..embedder import Embedder

    if args.max_images is not None and args.max_images < 1:
        raise InputError("--max-images must be at least 1")
    if args.mode in ("hnsw", "rescore"):
        args.mode, args.vector_mode = "dense", args.mode
    if args.source == "oracle" and args.index:
        raise InputError("--index is only used with --source index; drop it or add --source index")
    started = time.perf_counter()
    ann = load_annotations(args.annotations, split=args.split)
    if args.max_images is not None:
        ann = ann.subset(args.max_images)
    embedder = Embedder(precision=args.precision, threads=args.threads)

    def embed(texts: list[str]):
        return _embed_with_progress(embedder, texts, f"embedding {len(texts)} distinct captions")

    if args.source == "oracle":
        dtype = args.dtype or "f32"
        result = ev.oracle_eval(ann, embed, dtype=dtype, mode=args.mode)
        result.config.update({
            "exact": True,
            "scoring": "exact numpy" + ("" if dtype == "f32" else f", as exact search of a {dtype} index scores (its float16 copy)")
            + ("" if args.mode == "dense" else f", {args.mode} (FTS5 BM25)"),
        })
        index_facts: dict = {}
    else:
        index_dir = config.index_dir(args.index)
        stored = ev.load_index_vectors(index_dir, ann, identity=embedder.identity, with_texts=args.mode != "dense")
        index_facts = stored.facts
        dtype = args.dtype or index_facts.get("index_dtype") or "f32"
        t2i_search = None
        if not args.exact and args.mode == "dense" and dtype == index_facts.get("index_dtype"):
            # T2I through the index's own vector snapshot (plus any texts committed after it)
            from ..search import open_for_search

            store, vectors = open_for_search(index_dir)
            store.close()
            foreign = index_facts["index_vectors"] - sum(len(v) for v in stored.vectors if v is not None)

            def search(queries, k):
                return vectors.search(queries, k, mode=args.vector_mode)

            t2i_search = (search, stored.keys, foreign)
        result = ev.index_eval(ann, stored.vectors, embed, dtype=dtype, exact=args.exact,
                               threads=args.threads or 0, t2i_search=t2i_search, mode=args.mode,
                               image_texts=stored.texts)
        if t2i_search is not None:
            result.config["vector_mode"] = args.vector_mode
        index_facts = {"index": str(index_dir), **index_facts}
    out = result.to_json()
    out["counts"].update({k: v for k, v in index_facts.items() if k.startswith("index_images")})
    out["config"].update({
        "annotations": str(args.annotations),
        "format": ann.format,
        "split": ann.split,
        "max_images": args.max_images,
        "precision": args.precision,
        "embedder": embedder.name,
        "ties": "count against the query (rank = other candidates scoring >= the target)",
        "seconds": round(time.perf_counter() - started, 3),
        **{k: v for k, v in index_facts.items() if not k.startswith("index_images")},
    })
    return out


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.2f}"


def markdown_table(result: dict) -> str:
    lines = ["| | R@1 | R@5 | R@10 | mean |", "|---|---:|---:|---:|---:|"]
    for suffix, label in (("", ""), ("_nodup", " (no dup)")):
        for d in ("t2i", "i2t"):
            r = result[d + suffix]
            lines.append(
                f"| {d.upper()}{label} | {_fmt(r['R@1'])} | {_fmt(r['R@5'])} | {_fmt(r['R@10'])} "
                f"| {_fmt(result[f'{d}_mean{suffix}'])} |"
            )
    c, cfg = result["counts"], result["config"]
    lines += [
        "",
        f"mR {_fmt(result['mR'])}, mR without duplicates {_fmt(result['mR_nodup'])}.",
        "",
        f"{cfg['source']} source, {cfg['precision']} embedder, {cfg['scoring']}; {c['images']} images, "
        f"{c['captions']} captions ({c['distinct_captions']} distinct); T2I queries {c['t2i_queries']} "
        f"({c['t2i_queries_dup']} dup), I2T queries {c['i2t_queries']} ({c['i2t_queries_dup']} dup); "
        f"images without captions {c['images_without_captions']}; {cfg['annotations']}"
        + (f" split {cfg['split']}" if cfg.get("split") else "") + ".",
    ]
    return "\n".join(lines) + "\n"


def _print_table(result: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    cfg, c = result["config"], result["counts"]
    table = Table(title=f"Retrieval ({cfg['source']}, {cfg['precision']}, {cfg['scoring']})")
    for col in ("", "R@1", "R@5", "R@10", "mean"):
        table.add_column(col, justify="left" if not col else "right")
    for suffix, label in (("", ""), ("_nodup", " no dup")):
        for d in ("t2i", "i2t"):
            r = result[d + suffix]
            table.add_row(f"{d.upper()}{label}", _fmt(r["R@1"]), _fmt(r["R@5"]), _fmt(r["R@10"]),
                          _fmt(result[f"{d}_mean{suffix}"]))
    console = Console()
    console.print(table)
    console.print(f"mR [bold]{_fmt(result['mR'])}[/bold]   mR no dup [bold]{_fmt(result['mR_nodup'])}[/bold]")
    console.print(", ".join(f"{k} {v}" for k, v in c.items()), style="dim")
    console.print(f"{cfg['seconds']} s", style="dim")




def write_outputs(result: dict, out_dir: Path) -> tuple[Path, Path]:
    cfg = result["config"]
    stem = f"eval-{cfg['source']}-{cfg['precision']}-{cfg['dtype']}"
    if not cfg.get("exact"):
        stem += "-" + cfg.get("vector_mode", "hnsw")
    if cfg.get("mode", "dense") != "dense":
        stem += "-" + cfg["mode"]
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        json_path, md_path = out_dir / f"{stem}.json", out_dir / f"{stem}.md"
        atomic_write_text(json_path, json.dumps(result, indent=2) + "\n")
        atomic_write_text(md_path, f"# edge-t2t eval: {stem}\n\n" + markdown_table(result))
    except OSError as exc:
        raise InputError(f"cannot write results to {out_dir} ({exc.strerror}); choose a writable --out DIR") from exc
    return json_path, md_path


def run(args: argparse.Namespace) -> int:
    result = evaluate_from_args(args)
    if args.out is not None:
        paths = write_outputs(result, args.out)
        print(f"wrote {paths[0]} and {paths[1]}", file=sys.stderr)
    if args.json:
        print(json.dumps(result))
    else:
        _print_table(result)
    return 0
