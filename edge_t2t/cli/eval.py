"""`edge-t2t eval`: T2I / I2T Recall@1/5/10 and mR against reference captions."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..modes import DTYPES, EVAL_HALVES, PRECISIONS, RETRIEVAL_MODES, VECTOR_MODES

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
`search --vector-mode exact` on an index of --dtype: an f16 graph holds float16 values and an i8
index keeps a float16 copy beside its graph, which exact search scores, so f16 and i8 give the
same exact figures (an i8 --source index built with --no-exact-copy: its int8 codes).
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
                        "hybrid (dense + lexical), each image's parts mixed by the search's own rule; lexical, hybrid "
                        "and structure are scored exactly. The old values "
                        "hnsw/rescore mean dense with that --vector-mode")
    p.add_argument("--no-structure", action="store_true",
                   help="leave out the places/relations/sizes the captions state, scored on the index's "
                        "features (on by default, as in `search`; --source index only: references have no features)")
    p.add_argument("--vector-mode", choices=EVAL_VECTOR_MODES, default="rescore",
                   help="search mode of the index's own usearch file for --source index without "
                        "--exact, when --dtype is the index's (default: rescore)")
    p.add_argument("--split", metavar="NAME", default=None,
                   help="split to evaluate (default: 'test' when the file has one, else all images)")
    p.add_argument("--half", choices=EVAL_HALVES, default=None,
                   help="only one fixed half of the images, chosen by a hash of each file name: tune (the "
                        "half retrieval weights were calibrated on) or report (the other)")
    p.add_argument("--max-images", type=int, default=None, metavar="N",
                   help="only the first N images of the file (quick checks)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.add_argument("--out", type=Path, metavar="DIR", default=None,
                   help="also write eval-<source>-<precision>-<dtype>.json and .md there")
    p.add_argument("--threads", type=int, default=None, metavar="N", help="onnxruntime threads (default: all CPUs)")
    p.set_defaults(func=run)


def _print_table(result: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    from ..evaluation.eval_report import fmt_percent

    cfg, c = result["config"], result["counts"]
    table = Table(title=f"Retrieval ({cfg['source']}, {cfg['precision']}, {cfg['scoring']})")
    for col in ("", "R@1", "R@5", "R@10", "mean"):
        table.add_column(col, justify="left" if not col else "right")
    for suffix, label in (("", ""), ("_nodup", " no dup")):
        for d in ("t2i", "i2t"):
            r = result[d + suffix]
            table.add_row(f"{d.upper()}{label}", fmt_percent(r["R@1"]), fmt_percent(r["R@5"]), fmt_percent(r["R@10"]),
                          fmt_percent(result[f"{d}_mean{suffix}"]))
    console = Console()
    console.print(table)
    console.print(f"mR [bold]{fmt_percent(result['mR'])}[/bold]   mR no dup [bold]{fmt_percent(result['mR_nodup'])}[/bold]")
    console.print(", ".join(f"{k} {v}" for k, v in c.items()), style="dim")
    console.print(f"{cfg['seconds']} s", style="dim")




def run(args: argparse.Namespace) -> int:
    from ..evaluation.eval_report import EvalRequest, run_eval, write_outputs

    request = EvalRequest(
        annotations=args.annotations, source=args.source, index=args.index, precision=args.precision,
        dtype=args.dtype, exact=args.exact, mode=args.mode, vector_mode=args.vector_mode, split=args.split, half=args.half,
        max_images=args.max_images, threads=args.threads, structure=not args.no_structure,
    )  # fmt: skip
    result = run_eval(request)
    if args.out is not None:
        paths = write_outputs(result, args.out)
        print(f"wrote {paths[0]} and {paths[1]}", file=sys.stderr)
    if args.json:
        print(json.dumps(result))
    else:
        _print_table(result)
    return 0
