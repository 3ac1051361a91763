"""`edge-t2t eval` as a package function: read the annotations, embed the captions, score them
against the oracle or an index (evaluate.py), and render the result as JSON or a markdown table.
The CLI (cli/eval.py) only parses flags into an EvalRequest and prints."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from ..errors import InputError
from ..fileio import atomic_write_text


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


@dataclass
class EvalRequest:
    """What `edge-t2t eval` was asked (its flags, see cli/eval.py)."""

    annotations: Path
    source: str = "oracle"  # "oracle" or "index"
    index: str | None = None
    precision: str = "int8"
    dtype: str | None = None
    exact: bool = False
    mode: str = "dense"
    vector_mode: str = "rescore"
    split: str | None = None
    half: str | None = None  # "tune" or "report": one fixed half of the images (Annotations.half)
    max_images: int | None = None
    threads: int | None = None
    structure: bool = True  # score the places/relations/sizes a caption states (--source index)


def run_eval(args: EvalRequest) -> dict:
    """Load, embed, score; return the JSON-ready result."""
    from .. import config
    from ..embed.embedder import Embedder
    from . import evaluate as ev
    from .dataset import load_annotations
    from .index_source import load_index_vectors

    if args.max_images is not None and args.max_images < 1:
        raise InputError("--max-images must be at least 1")
    if args.mode in ("hnsw", "rescore"):
        args.mode, args.vector_mode = "dense", args.mode
    if args.source == "oracle" and args.index:
        raise InputError("--index is only used with --source index; drop it or add --source index")
    started = time.perf_counter()
    ann = load_annotations(args.annotations, split=args.split)
    if args.half is not None:
        ann = ann.half(args.half)
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
            "scoring": "exact numpy" + ("" if dtype == "f32" else f", as exact search of a {dtype} index scores (its float16 values)")
            + ("" if args.mode == "dense" else f", {args.mode} (FTS5 BM25)"),
        })
        index_facts: dict = {}
    else:
        index_dir = config.index_dir(args.index)
        stored = load_index_vectors(index_dir, ann, identity=embedder.identity, with_texts=args.mode != "dense",
                                       with_features=args.structure)
        index_facts = stored.facts
        dtype = args.dtype or index_facts.get("index_dtype") or "f32"
        t2i_search = None
        if not args.exact and args.mode == "dense" and dtype == index_facts.get("index_dtype"):
            # T2I through the index's own vector snapshot (plus any texts committed after it)
            from ..query.searcher import Searcher

            with Searcher(index_dir) as searcher:
                vectors = searcher.vectors  # they stay readable once the store is closed
            foreign = index_facts["index_vectors"] - sum(len(v) for v in stored.vectors if v is not None)

            def search(queries, k):
                return vectors.search(queries, k, mode=args.vector_mode)

            t2i_search = (search, stored.keys, foreign)
        # The index's own exact values score as they are; another --dtype is modelled with its copy.
        exact_copy = index_facts["index_exact_copy"] if dtype == index_facts.get("index_dtype") else True
        result = ev.index_eval(ann, stored.vectors, embed, dtype=dtype, exact=args.exact, exact_copy=exact_copy,
                               threads=args.threads or 0, t2i_search=t2i_search, mode=args.mode,
                               image_texts=stored.texts, image_features=stored.features)
        if t2i_search is not None:
            result.config["vector_mode"] = args.vector_mode
        index_facts = {"index": str(index_dir), **index_facts}
    out = result.to_json()
    out["counts"].update({k: v for k, v in index_facts.items() if k.startswith("index_images")})
    out["config"].update({
        "annotations": str(args.annotations),
        "format": ann.format,
        "split": ann.split,
        "half": args.half,
        "max_images": args.max_images,
        "precision": args.precision,
        "embedder": embedder.name,
        "ties": "count against the query (rank = other candidates scoring >= the target)",
        "seconds": round(time.perf_counter() - started, 3),
        **{k: v for k, v in index_facts.items() if not k.startswith("index_images")},
    })
    return out


def fmt_percent(value) -> str:
    return "-" if value is None else f"{value:.2f}"


def markdown_table(result: dict) -> str:
    lines = ["| | R@1 | R@5 | R@10 | mean |", "|---|---:|---:|---:|---:|"]
    for suffix, label in (("", ""), ("_nodup", " (no dup)")):
        for d in ("t2i", "i2t"):
            r = result[d + suffix]
            lines.append(
                f"| {d.upper()}{label} | {fmt_percent(r['R@1'])} | {fmt_percent(r['R@5'])} | {fmt_percent(r['R@10'])} "
                f"| {fmt_percent(result[f'{d}_mean{suffix}'])} |"
            )
    c, cfg = result["counts"], result["config"]
    lines += [
        "",
        f"mR {fmt_percent(result['mR'])}, mR without duplicates {fmt_percent(result['mR_nodup'])}.",
        "",
        f"{cfg['source']} source, {cfg['precision']} embedder, {cfg['scoring']}; {c['images']} images, "
        f"{c['captions']} captions ({c['distinct_captions']} distinct); T2I queries {c['t2i_queries']} "
        f"({c['t2i_queries_dup']} dup), I2T queries {c['i2t_queries']} ({c['i2t_queries_dup']} dup); "
        f"images without captions {c['images_without_captions']}; {cfg['annotations']}"
        + (f" split {cfg['split']}" if cfg.get("split") else "") + (f", {cfg['half']} half" if cfg.get("half") else "") + ".",
    ]
    return "\n".join(lines) + "\n"


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


