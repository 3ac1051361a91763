"""`edge-t2t bench-quant`: the accuracy cost of quantization, one configuration matrix on one data set."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..errors import InputError
from ..modes import DTYPES, PRECISIONS, VECTOR_MODES

# The matrix axes, as edge_t2t.evaluation.quantcost orders them (built here from modes.py so that
# `edge-t2t --help` does not import numpy; tests/test_quantcost.py checks they agree).
EMBEDDERS = PRECISIONS
MODES = ("exact", *(m for m in VECTOR_MODES if m != "exact"))

DESCRIPTION = """\
Measure what quantization costs. One matrix, same data and queries for every configuration:
embedder fp32/int8 x index dtype f32/f16/i8 x search exact/hnsw/rescore, and with --vlm the VLM
at several GGUF precisions (the F16 model is quantized with llama.cpp's quantizer to --quantize
types; --vlm-variants adds GGUFs of your own).

Without a VLM the image side is the reference captions (leave-one-out, as `edge-t2t eval`).
With a VLM, each precision captions the images in --images; annotated images give absolute
recall, and --queries annotation captions are the queries for agreement.

For every configuration: T2I/I2T R@1/5/10 and mR; agreement with fp32/f32/exact(/F16):
recall of the reference's top 1/5/10, Jaccard@10, Kendall tau-b@10 over the union of the two
lists, and the mR delta; index size, embedder size, indexing time, single-thread query p50
and the peak RSS of the search path (a fresh subprocess per configuration unless --no-isolate).
Writes quant_cost.json and quant_cost.md into --out (bench/quant_cost.py also draws a PNG).
"""


def _csv(allowed: tuple[str, ...]):
    def parse(text: str) -> tuple[str, ...]:
        items = tuple(x.strip() for x in text.split(",") if x.strip())
        bad = [x for x in items if x not in allowed]
        if bad or not items:
            raise argparse.ArgumentTypeError(f"{text!r}: use a comma-separated subset of {','.join(allowed)}")
        return items

    return parse


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "bench-quant",
        help="measure the accuracy cost of quantization (embedder, index, search, VLM)",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--annotations", required=True, type=Path, metavar="FILE",
                   help="COCO caption JSON or Karpathy-style dataset_*.json")
    p.add_argument("--split", metavar="NAME", default=None, help="split of a Karpathy file (default: test when present)")
    p.add_argument("--max-images", type=int, default=None, metavar="N", help="only the first N annotated images")
    p.add_argument("--embedders", type=_csv(EMBEDDERS), default=EMBEDDERS, metavar="LIST",
                   help=f"embedder precisions (default: {','.join(EMBEDDERS)})")
    p.add_argument("--dtypes", type=_csv(DTYPES), default=DTYPES, metavar="LIST",
                   help=f"index dtypes (default: {','.join(DTYPES)}; b1 is not offered, see the report)")
    p.add_argument("--modes", type=_csv(MODES), default=MODES, metavar="LIST",
                   help=f"search modes (default: {','.join(MODES)})")
    p.add_argument("--vlm", type=Path, metavar="F16.gguf", default=None,
                   help="reference GGUF text model (F16); quantized by the bench")
    p.add_argument("--mmproj", type=Path, metavar="MMPROJ.gguf", default=None, help="the VLM's vision projector")
    p.add_argument("--quantize", type=_csv(("Q8_0", "Q6_K", "Q5_K_M", "Q5_0", "Q4_K_M", "Q4_K_S", "Q4_0", "Q3_K_M", "Q2_K")),
                   default=("Q8_0", "Q4_K_M"), metavar="LIST", help="types to quantize --vlm to (default: Q8_0,Q4_K_M)")
    p.add_argument("--no-quantize", action="store_true", help="quantize nothing; compare --vlm with --vlm-variants only")
    p.add_argument("--vlm-variants", type=Path, nargs="+", default=[], metavar="GGUF",
                   help="more GGUF text models (same mmproj) to compare with --vlm")
    p.add_argument("--images", type=Path, metavar="DIR", default=None, help="images the VLMs caption (needed with --vlm)")
    p.add_argument("--variants", type=int, default=5, metavar="N", help="descriptions per image (default: 5)")
    p.add_argument("--max-tokens", type=int, default=1024, metavar="N", help="VLM answer limit (default: 1024)")
    p.add_argument("--queries", type=int, default=200, metavar="N",
                   help="queries timed per configuration, and annotation captions used as VLM-path queries (default: 200)")
    p.add_argument("--no-isolate", action="store_true",
                   help="time searches in this process (faster; RSS is then the process peak)")
    p.add_argument("--work-dir", type=Path, default=None, metavar="DIR",
                   help="keep index directories and quantized GGUFs here (default: a temporary folder, removed)")
    p.add_argument("--model-dir", type=Path, default=None, metavar="DIR", help="built embedder folder (default: models/embedder)")
    p.add_argument("--out", type=Path, default=Path("."), metavar="DIR",
                   help="where quant_cost.json and quant_cost.md go (default: the current directory)")
    p.add_argument("--json", action="store_true", help="print the report as JSON on stdout")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from ..evaluation import quantcost
    from ..evaluation.quant_report import (
        json_default,
        load_dataset,
        markdown_table,
        options_from_args,
        write_outputs,
    )

    opts = options_from_args(args)
    ann = load_dataset(args.annotations, args.split, args.max_images)
    console = Console(stderr=True)
    with Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        console=console, transient=True, disable=not console.is_terminal,
    ) as bar:
        task = bar.add_task("bench-quant", total=None)
        hooks = quantcost.Progress(
            on_total=lambda n: bar.update(task, total=n),
            on_step=lambda name: bar.update(task, advance=1, description=name),
            on_notice=lambda msg: console.print(f"edge-t2t: {msg}"),
        )
        report = quantcost.run(ann, opts, hooks)
    try:
        paths = write_outputs(report, args.out)
    except OSError as exc:
        raise InputError(f"cannot write results to {args.out} ({exc.strerror}); choose a writable --out DIR") from exc
    if args.json:
        print(json.dumps(report, indent=2, default=json_default))
    else:
        print(markdown_table(report))
    print("wrote " + ", ".join(paths.values()), file=sys.stderr)
    return 130 if report["interrupted"] else 0


