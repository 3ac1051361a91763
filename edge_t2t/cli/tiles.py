"""`edge-t2t tiles SCENE...`: how scenes would be cut into chips, without describing anything."""

from __future__ import annotations

import argparse
import json
import sys


def register(subparsers) -> None:
    from ..scene.tiling import DEFAULT_CHIP, DEFAULT_OVERLAP, MAX_NODATA_SHARE

    p = subparsers.add_parser(
        "tiles",
        help="show how large scenes would be cut into chips (check it in QGIS before describing)",
        description=(
            "Plan the chips of each scene as `index` and `caption` would, and print one line per chip: "
            "its pixel window, its share of no-data pixels, and whether it would be skipped as mostly "
            "no-data. --geojson writes the chips' outlines (WGS84) for a GIS. Nothing is described."
        ),
    )
    p.add_argument("scenes", nargs="+", metavar="SCENE", help="scene files (GeoTIFF, or any large JPEG/PNG/TIFF)")
    p.add_argument("--chip", type=int, default=None, metavar="PX",
                   help=f"chip size in pixels (default: the VLM's input size if one is configured, else {DEFAULT_CHIP})")
    p.add_argument("--overlap", type=float, default=DEFAULT_OVERLAP, metavar="F",
                   help=f"overlap of neighbouring chips, a fraction of the chip (default {DEFAULT_OVERLAP})")
    p.add_argument("--max-nodata", type=float, default=MAX_NODATA_SHARE, metavar="F",
                   help=f"skip chips with a larger share of no-data pixels (default {MAX_NODATA_SHARE})")
    p.add_argument("--geojson", metavar="FILE", help="write the chips as an RFC 7946 FeatureCollection (WGS84)")
    p.add_argument("--json", action="store_true", help="one JSON object per chip on stdout")
    p.set_defaults(func=run)


def _default_chip() -> int | None:
    """The configured VLM's input size, when one is configured; `tiles` never needs the VLM itself."""
    from ..describe.vlm import VLMConfig, resolve_vlm_paths
    from ..errors import ModelError
    from ..scene.scene_index import TilingOptions

    try:
        return TilingOptions().chip_size(VLMConfig(*resolve_vlm_paths(None, None)))
    except ModelError:  # none, or several to choose from: the default chip size then
        return None


def run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.markup import escape

    from ..errors import ImageError
    from ..scene.geo import feature, footprint, write_geojson
    from ..scene.tiling import DEFAULT_CHIP, open_scene, plan_chips

    chip = args.chip or _default_chip() or DEFAULT_CHIP
    out = Console(highlight=False, soft_wrap=True)
    err = Console(stderr=True, highlight=False, soft_wrap=True)
    features, failed = [], 0
    for path in args.scenes:
        try:
            scene = open_scene(path)
        except ImageError as exc:
            err.print(f"edge-t2t: {escape(str(exc))}")
            failed += 1
            continue
        with scene:
            try:
                plans = plan_chips(scene, chip, args.overlap, args.max_nodata)
            except ImageError as exc:  # e.g. a truncated file fails on its first windows
                err.print(f"edge-t2t: {escape(str(exc))}")
                failed += 1
                continue
            skipped = sum(p.skipped for p in plans)
            if not args.json:
                out.print(f"[bold]{escape(str(scene.path))}[/bold]: {scene.width}x{scene.height} px, {scene.count} band(s) "
                          f"{scene.dtype}, chip {chip} px, overlap {args.overlap:g}: {len(plans)} chips, "
                          f"{skipped} skipped as mostly no-data")  # fmt: skip
                for note in scene.notes:
                    out.print(f"  note: {escape(note)}")
            for i, p in enumerate(plans):
                fp = footprint(p.window, scene.crs, scene.transform)
                row = {"scene": str(scene.path), "chip": i, "window": [p.window.x, p.window.y, p.window.w, p.window.h],
                       "nodata": round(p.nodata, 4), "skipped": p.skipped}  # fmt: skip
                if args.json:
                    sys.stdout.write(json.dumps({**row, "bounds": list(fp.bounds), "outline": fp.outline}) + "\n")
                else:
                    out.print(f"  {i:5d}  {p.window.name():<24} nodata {p.nodata:6.1%}{'  skipped' if p.skipped else ''}")
                if fp.outline:
                    features.append(feature(fp.outline, row))
            if args.geojson and not scene.georeferenced:
                err.print(f"edge-t2t: {escape(str(scene.path))} has no CRS: its chips are left out of the GeoJSON")
    if args.geojson:
        write_geojson(args.geojson, features)
        err.print(f"edge-t2t: wrote {escape(args.geojson)}: {len(features)} chip outline(s)")
    return 1 if failed else 0
