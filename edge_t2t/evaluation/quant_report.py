"""`edge-t2t bench-quant` as package functions: its options checked, the report run
(quantcost.run) and rendered as markdown and JSON files. The CLI (cli/bench_quant.py) parses the
flags, shows progress and prints."""

from __future__ import annotations

import json
import math
from pathlib import Path

from ..errors import InputError
from ..fileio import atomic_write_text
from .dataset import Annotations, load_annotations
from .quantcost import AGREE_K, Options, VLMSpec


def options_from_args(args) -> Options:
    """The report's Options from bench-quant's flags (an argparse namespace: the CLI's or
    bench/quant_cost.py's), checked; InputError names the flag to fix."""

    vlm = None
    if args.vlm is not None or args.vlm_variants:
        if args.vlm is None or args.mmproj is None or args.images is None:
            raise InputError("--vlm needs --mmproj MMPROJ.gguf and --images DIR (and --vlm-variants needs --vlm)")
        for path in (args.vlm, args.mmproj, *args.vlm_variants):
            if not path.is_file():
                raise InputError(f"{path}: no such GGUF file; check the path")
        if not args.images.is_dir():
            raise InputError(f"{args.images}: not a directory of images; pass --images DIR")
        vlm = VLMSpec(
            model=args.vlm, mmproj=args.mmproj, images=args.images,
            quantize_to=() if args.no_quantize else tuple(args.quantize),
            variants=tuple(args.vlm_variants), n_variants=args.variants, max_tokens=args.max_tokens,
        )  # fmt: skip
    if args.queries < 1 or (args.max_images is not None and args.max_images < 1):
        raise InputError("--queries and --max-images must be at least 1")
    return Options(
        embedder_dir=args.model_dir, embedders=tuple(args.embedders), dtypes=tuple(args.dtypes),
        modes=tuple(args.modes), latency_queries=args.queries, vlm_queries=args.queries,
        isolate=not args.no_isolate, work_dir=args.work_dir, vlm=vlm,
    )  # fmt: skip


def load_dataset(annotations: Path, split: str | None, max_images: int | None) -> Annotations:
    """The annotated images the report runs on (eval's reader and default split)."""
    ann = load_annotations(annotations, split=split)
    return ann.subset(max_images) if max_images is not None else ann


def _f(x, nd: int = 1) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{nd}f}"


def markdown_table(report: dict) -> str:
    cols = ("config (vlm/embedder/dtype/mode)", "T2I R@1", "R@5", "R@10", "I2T R@1", "R@5", "R@10", "mR", "ΔmR",
            "ΔmR (1e-3 ties)", "ref-recall@10", "Jaccard@10", "τ@10", "index MiB", "embedder MiB", "index s",
            "query p50 ms", "search RSS MiB")  # fmt: skip
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for c in report["configs"]:
        rec, ag, size, tm, se = c["recall"] or {}, c["agreement"] or {}, c["size"], c["time"], c["search"]
        t2i, i2t = rec.get("t2i") or {}, rec.get("i2t") or {}
        k = ag.get("k", AGREE_K)
        lines.append("| " + " | ".join([
            c["name"], _f(t2i.get("R@1")), _f(t2i.get("R@5")), _f(t2i.get("R@10")),
            _f(i2t.get("R@1")), _f(i2t.get("R@5")), _f(i2t.get("R@10")), _f(rec.get("mR")),
            _f(ag.get("delta_mR"), 2), _f(ag.get("delta_mR_coarse"), 2), _f(ag.get(f"ref_recall@{k}"), 3),
            _f(ag.get(f"jaccard@{k}"), 3), _f(ag.get(f"kendall_tau@{k}"), 3),
            _f(size["index_bytes_for_mode"] / 2**20, 2), _f(size["embedder_onnx_bytes"] / 2**20),
            _f(tm["index_seconds"], 2), _f(se["query_ms_p50"], 2), _f(se["peak_rss_mib"], 0),
        ]) + " |")  # fmt: skip
    scope = report["configs"][0]["search"].get("rss_scope", "") if report["configs"] else ""
    notes = [
        "",
        f"Reference: {', '.join(sorted({c['reference'] for c in report['configs']}))}. Recall in percent, ties "
        "count against the query (oracle rows: leave-one-out over the reference captions). ΔmR (1e-3 ties): "
        "the same with scores rounded to 3 decimals; where ΔmR > 0 and this is 0, the 'gain' is exact ties "
        "(verbatim-duplicate captions) broken by float16 rounding, not better retrieval.",
        f"Agreement over the T2I top-{AGREE_K} image lists (fewer when there are fewer images): ref-recall = share "
        "of the reference's list found, Jaccard = |∩|/|∪|, τ = Kendall tau-b over the union (missing = last).",
        "index MiB: files the mode reads (hnsw: graph + keys; exact: exact vectors + keys; rescore: all). "
        "index s: embedding the image-side texts + writing the vindex files. query p50: one query embedded on "
        f"1 thread + vector search + best per image (no SQLite). search RSS: {scope}.",
        report["b1"],
    ]
    if report.get("vlm", {}).get("note"):
        notes.append("**" + report["vlm"]["note"] + "**")
    if report.get("interrupted"):
        notes.append("**Interrupted: only the configurations above were finished.**")
    notes.append(f"Wall time {report['wall_seconds']:.1f} s; process peak RSS {report['process_peak_rss_mib']:.0f} MiB.")
    return "\n".join(lines + notes) + "\n"


def write_outputs(report: dict, out_dir: Path, name: str = "quant_cost") -> dict[str, str]:
    """<name>.json and <name>.md, each atomically (the PNG plot is bench/quant_cost.py's)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    for suffix, text in ((".json", json.dumps(report, indent=2, default=json_default) + "\n"),
                         (".md", f"# {name}\n\n" + markdown_table(report))):  # fmt: skip
        p = out_dir / f"{name}{suffix}"
        atomic_write_text(p, text)
        paths[suffix[1:]] = str(p)
    return paths


def json_default(obj):
    if hasattr(obj, "item") and callable(obj.item):  # numpy scalars
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, tuple):
        return list(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")
