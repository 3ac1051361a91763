"""`edge-t2t caption PATH...`: describe images with a GGUF VLM, one JSON record per image."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HELP_EPILOG = """\
Each image gets N structured descriptions (one sentence, features with compass positions and
qualitative sizes, a detailed caption), written as one JSON line per image with --out/--json.
Captions are cached (by image bytes, model, mmproj, prompt and settings), so a second run over
the same images is instant and never loads the model; --no-cache turns that off.

The VLM is --vlm/--mmproj, else $EDGE_T2T_VLM/$EDGE_T2T_MMPROJ, else the one pair in models/vlm/.

Exit status: 0 when every image was captioned, 1 when some images failed (each is listed; the
others are still written), 2 on a usage or model error, 130 on Ctrl-C (finished captions kept).
Ctrl-C once finishes the current image and stops; twice stops at once.

--cluster ADDRESS or --workers N describe on Dask workers (docs/cluster.md):
only this process writes the cache and --out; cached images are never sent; lines come in the order
images finish.
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    from ..describe import cluster, gpu_offload
    from ..describe.prompts import DEFAULT_VARIANTS, MAX_VARIANTS
    from ..images import DEFAULT_MAX_MEGAPIXELS

    p = subparsers.add_parser(
        "caption",
        help="describe images with a GGUF vision-language model (JSON lines)",
        description="Describe remote-sensing images with a GGUF vision-language model, RSRT style.",
        epilog=HELP_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("paths", nargs="+", metavar="PATH", help="image files or directories (searched recursively)")
    p.add_argument("--vlm", metavar="GGUF", help="the text model GGUF (default: $EDGE_T2T_VLM or models/vlm/)")
    p.add_argument("--mmproj", metavar="GGUF", help="the vision projector GGUF (default: $EDGE_T2T_MMPROJ or models/vlm/)")
    p.add_argument("--family", metavar="NAME", help="chat format family, e.g. llava-1.5, qwen2.5-vl (default: detected)")
    p.add_argument("--out", metavar="FILE", help="write the records as JSON lines to FILE (kept on Ctrl-C)")
    p.add_argument("--json", action="store_true", help="print the records as JSON lines on stdout")
    p.add_argument("--variants", type=int, default=DEFAULT_VARIANTS, metavar="N",
                   help=f"descriptions per image, 1-{MAX_VARIANTS} (default {DEFAULT_VARIANTS})")  # fmt: skip
    p.add_argument("--prompt-file", metavar="FILE", help="your own prompt (plain text, {n} = variant count)")
    p.add_argument("--max-megapixels", type=float, default=DEFAULT_MAX_MEGAPIXELS, metavar="MP",
                   help=f"downscale larger images for the VLM; images over 4x this are refused (default {DEFAULT_MAX_MEGAPIXELS:g})")  # fmt: skip
    p.add_argument("--bands", metavar="R,G,B", help="1-based bands of multi-band images to show as RGB, e.g. 4,3,2")
    p.add_argument("--threads", type=int, metavar="N", help="CPU threads for llama.cpp (default: 1 for models under 64 MiB, else all available CPUs)")
    gpu_offload.add_arguments(p)
    p.add_argument("--max-tokens", type=int, metavar="N",
                   help="cap on generated tokens per image (default: what the schema's longest answer needs, "
                        "about 2000 for 5 variants)")  # fmt: skip
    p.add_argument("--ctx", type=int, metavar="N", help="llama.cpp context size (default: sized for the family)")
    p.add_argument("--seed", type=int, default=0, help="sampler seed (default 0)")
    p.add_argument("--variant-mode", choices=("parallel", "sequential"), default="parallel",
                   help="parallel: encode the image once and write the variants as sequences of one batch "
                        "(default); sequential: one call writes all variants. Records say which path wrote them")  # fmt: skip
    p.add_argument("--image-max-tokens", type=int, metavar="N",
                   help="cap one image's tokens in the VLM (tiling models upscale small images: SmolVLM turns a "
                        "224 px image into 17 tiles, 1088 tokens; 64 gives 1 tile + overview, 128). Default: the mmproj's own")  # fmt: skip
    p.add_argument("--cache-dir", metavar="DIR", help="caption cache directory (default: $EDGE_T2T_CACHE_DIR or ~/.cache/edge-t2t)")
    p.add_argument("--no-cache", action="store_true", help="neither read nor write the caption cache")
    from .index import add_tiling_arguments

    add_tiling_arguments(p)  # issue 13: scenes are cut into chips, one record per chip (SCENE#x,y,w,h)
    cluster.add_arguments(p)
    p.set_defaults(func=run)


def _parse_bands(text: str | None) -> tuple[int, int, int] | None:
    from ..errors import InputError

    if not text:
        return None
    try:
        parts = tuple(int(x) - 1 for x in text.split(","))
    except ValueError:
        parts = ()
    if len(parts) != 3 or min(parts) < 0:
        raise InputError(f"--bands {text!r}: give three 1-based band numbers, e.g. --bands 4,3,2")
    return parts  # type: ignore[return-value]


def run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        ProgressColumn,
        TextColumn,
        TimeRemainingColumn,
    )
    from rich.text import Text

    from ..describe import gpu_offload
    from ..describe.captioning import Callbacks, caption_images
    from ..describe.captions import CACHE_FILENAME, CaptionCache, JsonlWriter
    from ..describe.cluster import session_from_args
    from ..describe.vlm import VLMConfig, resolve_vlm_paths
    from ..errors import InputError, ModelError

    if args.image_max_tokens is not None and args.image_max_tokens < 1:
        raise InputError(f"--image-max-tokens {args.image_max_tokens}: give a positive number of tokens, e.g. 64")
    if args.max_tokens is not None and args.max_tokens < 16:
        raise InputError(f"--max-tokens {args.max_tokens} is too small to hold one description; use 256 or more")
    bands = _parse_bands(args.bands)
    model, mmproj = resolve_vlm_paths(args.vlm, args.mmproj)
    for kind, path in (("model", model), ("mmproj", mmproj)):
        if not path.is_file():
            raise ModelError(f"{path}: no such {kind} file; check --vlm/--mmproj (or $EDGE_T2T_VLM/$EDGE_T2T_MMPROJ)")
    cfg = VLMConfig(model=model, mmproj=mmproj, family=args.family, n_ctx=args.ctx, n_threads=args.threads,
                    seed=args.seed, variant_mode=args.variant_mode, image_max_tokens=args.image_max_tokens,
                    **gpu_offload.config_kwargs(args))  # fmt: skip

    err = Console(stderr=True, highlight=False, soft_wrap=True)
    cache = None
    if not args.no_cache:
        cache = CaptionCache(Path(args.cache_dir).expanduser() / CACHE_FILENAME if args.cache_dir else None)
    writer = JsonlWriter(args.out) if args.out else None
    records: list = []
    warned = {"test": False}

    def warn_test_model() -> None:
        if not warned["test"]:
            warned["test"] = True
            err.print(Text(
                "WARNING: this is the generated TEST model (random weights): its captions are placeholder "
                "gibberish, marked test_model=true. Use a real GGUF VLM for real captions.",
                style="bold yellow",
            ))  # fmt: skip

    class RateColumn(ProgressColumn):
        def render(self, task) -> Text:  # images per minute over the run so far
            speed = task.finished_speed or task.speed
            return Text(f"{speed * 60:.1f} img/min" if speed else "-- img/min", style="cyan")

    progress = Progress(
        TextColumn("captioning"), BarColumn(), MofNCompleteColumn(), RateColumn(), TimeRemainingColumn(),
        console=err, transient=False,
    )  # fmt: skip
    task = progress.add_task("caption", total=None)

    def on_record(record) -> None:
        if record.test_model:
            warn_test_model()
        if writer:
            writer.write(record)
        if args.json:
            sys.stdout.write(json.dumps(record.to_dict(), ensure_ascii=False) + "\n")
            sys.stdout.flush()
        else:
            records.append(record)
        progress.advance(task)

    def on_failure(failure) -> None:
        err.print(Text(f"edge-t2t: failed: {failure.path}: {failure.reason}", style="red"))
        if progress.tasks[0].total is not None:
            progress.advance(task)

    callbacks = Callbacks(
        on_total=lambda n: progress.update(task, total=n),
        on_record=on_record,
        on_failure=on_failure,
        on_model_loaded=lambda vlm: vlm.is_test_model and warn_test_model(),
        on_notice=lambda msg: err.print(Text(f"edge-t2t: {msg}", style="yellow")),
    )
    scenes, paths = _split_scenes(args.paths, args)  # issue 13
    scene_lines: list[str] = []
    try:
        with session_from_args(args) as session, progress:
            summary = caption_images(
                paths, cfg, n_variants=args.variants, prompt_file=args.prompt_file,
                max_megapixels=args.max_megapixels, bands=bands, cache=cache, max_tokens=args.max_tokens,
                callbacks=callbacks, executor=session,
            ) if paths else None  # fmt: skip
            if scenes:  # issue 13
                summary = _caption_scenes(scenes, args, cfg, cache, bands, on_record, on_failure, summary, scene_lines)
    finally:
        if writer:
            writer.close()  # moves the finished lines onto --out, on Ctrl-C too
        if cache:
            cache.close()

    if not args.json:
        _print_table(records)
    for line in scene_lines:
        err.print(Text(line))
    if summary.failures:
        err.print(Text(f"{summary.failed} image(s) failed:", style="bold red"))
        for f in summary.failures:
            err.print(Text(f"  {f.path}: {f.reason}"))
    kept = summary.done
    where = f" in {args.out}" if args.out else ""
    if summary.interrupted:
        err.print(Text(f"edge-t2t: interrupted; kept {kept} finished caption(s){where} and in the cache", style="yellow"))
        return 130
    if summary.total == 0 and not summary.failures:
        raise InputError(f"no images found in {' '.join(args.paths)} (looked for .jpg .jpeg .png .tif .tiff .webp)")
    rate = summary.captioned / summary.seconds * 60 if summary.seconds and summary.captioned else 0.0
    err.print(Text(
        f"{summary.captioned} captioned, {summary.cached} from cache, {summary.failed} failed"
        f"{f', {summary.with_problems} with quality notes' if summary.with_problems else ''}"
        f" in {summary.seconds:.1f} s" + (f" ({rate:.1f} images/min)" if rate else "") + where
    ))  # fmt: skip
    return 1 if summary.failed else 0


# -- issue 13: scenes ---------------------------------------------------------------------------
def _split_scenes(paths: list[str], args) -> tuple[list[Path], list[str]]:
    """(scenes to tile, what caption_images should get): images above the tiling threshold are scenes."""
    from ..images import find_images
    from .index import tiling_options

    opts = tiling_options(args)
    found = list(find_images(paths, on_error=lambda p, why: None))
    scenes = [f for f in found if opts.is_scene(f)]
    if not scenes:
        return [], list(paths)
    missing = [p for p in paths if not Path(p).exists()]  # caption_images reports these
    return scenes, [str(f) for f in found if f not in scenes] + missing


def _caption_scenes(scenes, args, cfg, cache, bands, on_record, on_failure, summary, lines):
    """Caption each scene's chips; their counts join `summary` (the plain images', or None) so the
    run ends with one summary line whatever it held."""
    from ..describe.captioning import CaptionSettings, CaptionSummary, Failure
    from ..errors import ImageError
    from ..scene.scene_index import chip_records_for
    from .index import tiling_options

    summary = summary or CaptionSummary()
    opts = tiling_options(args)
    opts.bands = bands
    caption = CaptionSettings(cache=cache, max_tokens=args.max_tokens, prompt_file=args.prompt_file)
    for scene in scenes:
        try:
            part, skipped = chip_records_for(scene, opts, cfg, args.variants, caption, on_record)
        except ImageError as exc:
            part, skipped = CaptionSummary(total=1, failed=1), 0
            part.failures.append(Failure(str(scene), str(exc).removeprefix(f"{scene}: ")))
        for failure in part.failures:
            on_failure(failure)
        summary.merge(part)
        lines.append(f"scene {scene}: {part.done} chip(s) described, {skipped} skipped as mostly no-data")
        if part.interrupted:
            break
    return summary


def _print_table(records: list, limit: int = 20) -> None:
    from rich.console import Console
    from rich.table import Table

    if not records:
        return
    table = Table(show_lines=False)
    # The description is cut here, not by rich: rich squeezes the short columns to nothing when a
    # no-wrap column is wider than the terminal, and a table that hides which file it describes is
    # useless. --json / --out carry the full text.
    table.add_column("image", overflow="fold")
    table.add_column("cached", no_wrap=True)
    table.add_column("s", justify="right", no_wrap=True)
    table.add_column("first description", no_wrap=True)
    for r in records[:limit]:
        first = r.variants[0].one_sentence if r.variants else ""
        first = first if len(first) <= 30 else first[:29] + "…"
        table.add_row(Path(r.image).name, "yes" if r.cached else "", f"{r.seconds:.1f}", first)
    if len(records) > limit:
        table.add_row(f"... {len(records) - limit} more", "", "", "")
    Console().print(table)
