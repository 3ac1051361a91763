"""`edge-t2t index`: describe images and add them to an index (incremental, resumable)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..modes import DTYPES, PRECISIONS, TEXT_MODES


def register(subparsers) -> None:
    from ..describe import cluster, gpu_offload

    p = subparsers.add_parser(
        "index",
        help="describe images and add them to a searchable index",
        description=(
            "Describe images with a GGUF vision-language model (--vlm/--mmproj, through the caption "
            "cache) or take descriptions from a captions file (--captions: our JSONL, RSRT JSONL, COCO "
            "or Karpathy JSON), embed every description variant, and add them to the index. Re-running "
            "is incremental: unchanged files are skipped, moved files keep their descriptions, deleted "
            "files are removed. Work is committed in batches; Ctrl-C keeps every finished batch."
        ),
    )
    p.add_argument("paths", nargs="*", metavar="PATH", help="image files or folders (optional with --captions)")
    p.add_argument("--vlm", metavar="GGUF", help="the VLM's text model (default: $EDGE_T2T_VLM or models/vlm/)")
    p.add_argument("--mmproj", metavar="GGUF", help="the VLM's vision projector (default: $EDGE_T2T_MMPROJ or models/vlm/)")
    p.add_argument("--captions", metavar="FILE", help="take descriptions from this file instead of a VLM")
    p.add_argument("--index", metavar="DIR", help="index directory (default: $EDGE_T2T_INDEX or ./.edge-t2t)")
    p.add_argument("--dtype", choices=DTYPES, default=None,
                   help="vector type of the HNSW index, fixed when the index is created (default: i8)")
    p.add_argument("--no-exact-copy", dest="exact_copy", action="store_false", default=None,
                   help="i8 indexes, fixed at creation: keep no float16 copy of the vectors beside the int8 graph. "
                        "About half the disk; rescore and exact searches then score the int8 codes: the same "
                        "figures on RSICD val, but near ties can order differently (docs/performance.md: Exact copy)")
    p.add_argument("--precision", choices=PRECISIONS, default="int8", help="ONNX embedder to use (default: int8)")
    p.add_argument("--text-mode", choices=TEXT_MODES, default=None,
                   help="what to embed per variant, fixed at creation: sentences (the default: one per "
                        "one-sentence summary, per feature and per caption sentence, ~57 vectors/image, 11x joined; "
                        "held-out MRR 0.29 -> 0.41 on synthetic scenes, bench/results/text_mode.md), joined (one "
                        "text, the paper's form) or fields (one per field, ~15 vectors/image)")
    p.add_argument("--variants", type=int, default=5, metavar="N", help="descriptions per image from the VLM (default: 5)")
    p.add_argument("--max-tokens", type=int, metavar="N", help="cap on generated tokens per image (default: what the schema needs)")
    p.add_argument("--prompt-file", metavar="FILE", help="your own VLM prompt (plain text, {n} = variant count)")
    p.add_argument("--max-megapixels", type=float, default=None, metavar="MP", help="downscale larger images for the VLM")
    p.add_argument("--image-max-tokens", type=int, metavar="N",
                   help="cap one image's tokens in the VLM (as caption's flag; default: the mmproj's own)")
    p.add_argument("--threads", type=int, metavar="N", help="CPU threads for llama.cpp (default: 1 for models under 64 MiB, else all available CPUs)")
    gpu_offload.add_arguments(p)
    p.add_argument("--cache-dir", metavar="DIR", help="caption cache directory (default: $EDGE_T2T_CACHE_DIR or ~/.cache/edge-t2t)")
    p.add_argument("--batch-size", type=int, default=32, metavar="N", help="images per commit (default: 32)")
    p.add_argument("--no-cache", action="store_true", help="do not read or write the caption cache")
    p.add_argument("--wait", action="store_true", help="wait for another index run on this index instead of refusing")
    p.add_argument("--json", action="store_true", help="print the summary as JSON on stdout")
    add_tiling_arguments(p)  # issue 13
    p.add_argument("--no-progress", action="store_true", help="no progress bars on stderr")
    cluster.add_arguments(p)
    p.set_defaults(func=run)


def add_tiling_arguments(p) -> None:
    """issue 13: how images larger than the tiling threshold are cut into chips (index, caption)."""
    from ..scene.tiling import DEFAULT_OVERLAP

    p.add_argument("--chip", type=int, metavar="PX",
                   help="chip size in pixels for large scenes (default: the VLM's input size, else 512)")
    p.add_argument("--overlap", type=float, default=DEFAULT_OVERLAP, metavar="F",
                   help=f"overlap of neighbouring chips, a fraction of the chip (default {DEFAULT_OVERLAP})")
    p.add_argument("--tile-above", type=float, metavar="MP",
                   help="cut images larger than this many megapixels into chips (default: the decompression-bomb "
                        "size, 4 x --max-megapixels' default = 16 MP)")


def tiling_options(args):
    from ..scene.scene_index import TilingOptions

    return TilingOptions(chip=args.chip, overlap=args.overlap, tile_above_mp=args.tile_above)


def _print_summary(s, console) -> None:
    from rich.markup import escape
    from rich.table import Table

    t = Table(title=f"Index {s.index_dir}", show_header=False)
    for k, v in s.counts().items():
        t.add_row(k.replace("_", " "), str(v))
    for k, v in s.stage_seconds.items():
        t.add_row(f"{k.replace('_', ' ')} time", f"{v:.2f} s")
    if s.scenes and s.scenes.scenes:  # issue 13
        c = s.scenes
        t.add_row("scenes tiled", f"{c.scenes} ({c.chips_added} chips added, {c.chips_skipped_nodata} skipped as no-data)")
    console.print(t)
    for path, why in s.failures[:20]:  # one line each, however long (a log file is not a terminal)
        console.print(f"[red]failed[/red] {escape(path)}: {escape(why)}", markup=True, highlight=False, soft_wrap=True)
    if len(s.failures) > 20:
        console.print(f"... and {len(s.failures) - 20} more failures (see --json)")


def run(args: argparse.Namespace) -> int:
    from contextlib import ExitStack

    from rich.console import Console

    from .. import config
    from ..describe.captioning import CaptionSettings
    from ..describe.cluster import session_from_args
    from ..errors import InputError, NoVLMError
    from ..index.indexer import Indexer

    index_dir = config.index_dir(args.index)
    if not args.paths and not args.captions:
        raise InputError("nothing to index: give image folders/files, or --captions FILE")
    vlm_cfg = None
    caption = CaptionSettings()
    closing = ExitStack()  # the caption cache, closed whatever happens
    if args.vlm or args.mmproj or not args.captions:
        from ..describe import gpu_offload
        from ..describe.vlm import VLMConfig, resolve_vlm_paths

        try:
            model, mmproj = resolve_vlm_paths(args.vlm, args.mmproj)
            vlm_cfg = VLMConfig(model=model, mmproj=mmproj, n_threads=args.threads,
                                image_max_tokens=args.image_max_tokens, **gpu_offload.config_kwargs(args))  # fmt: skip
        except NoVLMError:
            if args.vlm or args.mmproj:
                raise
            vlm_cfg = None  # no VLM configured: fine while every image is already described
        if vlm_cfg is not None and not args.no_cache:
            from ..describe.captions import CaptionCache

            cache_path = Path(args.cache_dir) / "captions.sqlite" if args.cache_dir else None
            caption.cache = closing.enter_context(CaptionCache(cache_path))
        caption.max_tokens, caption.prompt_file = args.max_tokens, args.prompt_file
        caption.max_megapixels = args.max_megapixels
    err = Console(stderr=True)
    with closing, session_from_args(args) as session:  # --cluster/--workers: images are described on Dask workers
        if session is not None and vlm_cfg is not None:
            from ..describe.captioning import Callbacks

            caption.executor = session
            caption.callbacks = Callbacks(on_notice=lambda msg: err.print(f"edge-t2t: {msg}", highlight=False))
        indexer = Indexer(
            index_dir, precision=args.precision, dtype=args.dtype, text_mode=args.text_mode,
            batch_size=args.batch_size, wait=args.wait, progress=not args.no_progress,
            vlm_cfg=vlm_cfg, n_variants=args.variants, caption=caption,
            tiling=tiling_options(args), exact_copy=args.exact_copy,
        )  # fmt: skip
        summary = indexer.run([Path(p) for p in args.paths], captions_file=args.captions)
    if args.json:
        json.dump(summary.to_dict(), sys.stdout)
        sys.stdout.write("\n")
    else:
        _print_summary(summary, err)
    if summary.interrupted:
        print(
            f"edge-t2t: interrupted; kept {summary.added} newly indexed image(s) "
            f"(every finished batch is committed in {index_dir}); run the same command again to resume",
            file=sys.stderr,
        )
        return 130
    return 1 if summary.failed else 0
