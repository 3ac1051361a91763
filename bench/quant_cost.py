"""Quantization cost on RSICD validation captions: `edge-t2t bench-quant` with the bench's defaults.

    .venv/bin/python bench/quant_cost.py            # embedder x dtype x mode, no VLM (oracle captions)
    .venv/bin/python bench/quant_cost.py --vlm models/test-vlm/tiny-llava.F16.gguf \
        --mmproj models/test-vlm/tiny-llava-mmproj.F16.gguf --images ../shared/data/rsicd/samples

Writes bench/results/quant_cost.{json,md} through bench/_common.write_results (machine + commit
stamp) and quant_cost.png when matplotlib is installed (the `bench` extra; never a runtime need).
Any `edge-t2t bench-quant` option can be given; --annotations defaults to the shared RSICD file.
`--replot` redraws the PNG from quant_cost.json, e.g. with a separate python that has matplotlib
and numpy: PYTHONPATH=. /tmp/benchvenv/bin/python bench/quant_cost.py --replot
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from _common import RESULTS, write_results

from edge_t2t import config
from edge_t2t.cli import build_parser
from edge_t2t.evaluation.quant_report import json_default, markdown_table, options_from_args


def plot(report: dict, path: Path) -> str | None:
    """Recall drop against the bytes a search reads; None, or why no plot was written."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install 'edge-t2t[bench]'): no plot written"
    rows = [c for c in report["configs"] if c["agreement"] and c["config"]["vlm"] == "captions"]
    if not rows:
        return "no oracle configuration in the report: no plot written"
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    markers = {"exact": "o", "hnsw": "^", "rescore": "s"}
    panels = (
        ("top-10 agreement drop: 1 - ref-recall@10", lambda c: 1.0 - c["agreement"]["ref_recall@10"]),
        ("ΔmR, scores rounded to 1e-3 (points)", lambda c: c["agreement"].get("delta_mR_coarse") or 0.0),
    )
    for ax, (label, y_of) in zip(axes, panels, strict=True):
        for c in rows:
            x, y, cfg = c["size"]["index_bytes_for_mode"] / 2**20, y_of(c), c["config"]
            ax.scatter(x, y, marker=markers.get(cfg["mode"], "x"),
                       color="tab:blue" if cfg["embedder"] == "fp32" else "tab:orange")  # fmt: skip
            ax.annotate(f"{cfg['dtype']}/{cfg['mode']}", (x, y), fontsize=6, xytext=(3, 3), textcoords="offset points")
        ax.axhline(0, color="gray", linewidth=0.5)
        ax.set_xlabel("index files the search mode reads (MiB)")
        ax.set_ylabel(label)
    emb = report.get("embedder", {})
    sizes = ", ".join(f"{p} {e['onnx_bytes'] / 2**20:.0f} MiB" for p, e in emb.items())
    fig.suptitle(f"Quantization cost vs fp32/f32/exact on {report['annotations']['images']} images "
                 f"(blue fp32, orange int8 embedder: {sizes}; o exact, ^ hnsw, s rescore)", fontsize=9)  # fmt: skip
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)
    return None


def replot() -> int:
    why = plot(json.loads((RESULTS / "quant_cost.json").read_text()), RESULTS / "quant_cost.png")
    print(why or f"wrote {RESULTS / 'quant_cost.png'}", file=sys.stderr)
    return 1 if why else 0


def main(argv: list[str]) -> int:
    from edge_t2t.evaluation import quantcost
    from edge_t2t.evaluation.dataset import load_annotations

    if "--annotations" not in argv:
        argv = ["--annotations", str(config.shared_data_dir() / "rsicd" / "captions_val.json"), *argv]
    args = build_parser().parse_args(["bench-quant", *argv])
    ann = load_annotations(args.annotations, split=args.split)
    if args.max_images is not None:
        ann = ann.subset(args.max_images)
    report = quantcost.run(ann, options_from_args(args), quantcost.Progress(
        on_step=lambda name: print(f"  {name}", file=sys.stderr, flush=True),
        on_notice=lambda msg: print(msg, file=sys.stderr, flush=True),
    ))  # fmt: skip
    report["command"] = "bench/quant_cost.py " + " ".join(argv)
    table = markdown_table(report)
    write_results("quant_cost", json.loads(json.dumps(report, default=json_default)), table)
    why = plot(report, RESULTS / "quant_cost.png")
    print(why or f"wrote {RESULTS / 'quant_cost.png'}", file=sys.stderr)
    print(table)
    return 130 if report["interrupted"] else 0


if __name__ == "__main__":
    sys.exit(replot() if sys.argv[1:] == ["--replot"] else main(sys.argv[1:]))
