"""`edge-t2t search`: rank indexed images for a text query (or for a query image)."""

from __future__ import annotations

import argparse
import sys

from ..modes import PRECISIONS, RETRIEVAL_MODES, VECTOR_MODES


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "search",
        help="find images whose descriptions match a text query",
        description=(
            "Embed the query, compare it with every description variant in the index, and rank "
            "images by their best-matching variant (max cosine). With --image, the query image is "
            "described (reused from the index when the same file is there, else by the VLM) and each "
            "of its variants is a query."
        ),
    )
    p.add_argument("query", nargs="?", default=None, metavar="QUERY", help="what to look for, in words")
    p.add_argument("--index", metavar="DIR", help="index directory (default: $EDGE_T2T_INDEX or ./.edge-t2t)")
    p.add_argument("-k", type=int, default=10, metavar="N", help="number of images to return (default: 10)")
    p.add_argument("--json", action="store_true", help="JSON lines: rank, score, image, variant, text, dense, lexical, structure")
    p.add_argument("--html", metavar="FILE", help="also write a self-contained HTML page with thumbnails")
    p.add_argument("--image", metavar="PATH", help="search with an image instead of text")
    p.add_argument("--exclude-self", action="store_true", help="with --image: leave the query image out")
    p.add_argument("--mode", choices=[*RETRIEVAL_MODES, *VECTOR_MODES], default=None,
                   help="dense: max cosine over an image's texts (the paper's rule); lexical: FTS5 BM25 over "
                        "the texts; hybrid: dense + lexical (default: dense). The old values "
                        "hnsw/rescore/exact still work and mean dense with that --vector-mode")
    p.add_argument("--vector-mode", choices=VECTOR_MODES, default="rescore",
                   help="how the vector index is searched: hnsw: graph scores; rescore: graph candidates "
                        "re-scored exactly (default); exact: brute force")
    p.add_argument("--no-structure", dest="structure", action="store_false",
                   help="ignore places, relations and sizes the query states (e.g. 'a forest east of a runway')")
    p.add_argument("--explain", action="store_true",
                   help="show, per hit, the score's parts and which of the query's constraints matched")
    p.add_argument("--min-score", type=float, default=None, metavar="S",
                   help="leave out hits scoring under S (the score shown: a text score up to 1 in every "
                        "mode, plus up to 1 when the query states places, relations or sizes)")
    p.add_argument("--precision", choices=PRECISIONS, default="int8", help="ONNX embedder to use (default: int8)")
    p.add_argument("--vlm", metavar="GGUF", help="with --image: the VLM's text model")
    p.add_argument("--mmproj", metavar="GGUF", help="with --image: the VLM's vision projector")
    # issue 13: scenes cut into chips can be searched by place and handed to a GIS
    p.add_argument("--within", metavar="LON1,LAT1,LON2,LAT2",
                   help="only chips of scenes whose outline meets this WGS84 box (filtered before ranking)")
    p.add_argument("--near", metavar="LON,LAT,METRES",
                   help="only chips of scenes within METRES of this WGS84 point (filtered before ranking)")
    p.add_argument("--geojson", metavar="FILE",
                   help="also write the hits as an RFC 7946 FeatureCollection (WGS84; overlapping chips merged)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from .. import config
    from ..errors import InputError, NoVLMError
    from ..query import report
    from ..query.searcher import Searcher

    index_dir = config.index_dir(args.index)
    mode, vector_mode = args.mode, args.vector_mode
    if mode in ("hnsw", "rescore", "exact"):
        mode, vector_mode = "dense", mode
    with Searcher(index_dir, precision=args.precision) as searcher:  # the index, opened once
        if args.image:
            if args.query:
                raise InputError("give either a QUERY or --image PATH, not both")
            if mode not in (None, "dense"):
                raise InputError(f"--image searches by dense vectors only; drop --mode {mode}")
            if args.within or args.near:  # issue 13
                raise InputError("--within/--near filter a text QUERY; they do not work with --image yet")
            vlm_cfg = None
            try:
                from ..describe.vlm import VLMConfig, resolve_vlm_paths

                model, mmproj = resolve_vlm_paths(args.vlm, args.mmproj)
                vlm_cfg = VLMConfig(model=model, mmproj=mmproj)
            except NoVLMError:  # none configured: fine when the query image is already indexed
                if args.vlm or args.mmproj:
                    raise
            hits = searcher.image(args.image, args.k, vlm_cfg=vlm_cfg, exclude_self=args.exclude_self,
                                  vector_mode=vector_mode, min_score=args.min_score)  # fmt: skip
            title = f"image {args.image}"
        else:
            if not args.query:
                raise InputError("give a QUERY (in quotes) or --image PATH")
            place = None
            if args.within or args.near:  # issue 13
                if mode not in (None, "dense"):
                    raise InputError(f"--within/--near rank by dense vectors only; drop --mode {mode}")
                place = _place(args)
            hits = searcher.text(args.query, args.k, mode=mode, vector_mode=vector_mode, structure=args.structure,
                                 explain=args.explain, min_score=args.min_score, place=place)  # fmt: skip
            title = args.query
        chips = searcher.chips(hits)  # issue 13: where each hit that is a chip of a scene lies
    if args.json:
        _write_json(hits, chips)
    else:
        report.print_table(hits, query=title, explain=args.explain)
    if args.html:
        from ..scene.scene_report import ChipPictures

        pictures = ChipPictures(chips)
        try:
            path = report.write_html(hits, args.html, title, str(index_dir), explain=args.explain,
                                     picture=pictures if chips else None)  # fmt: skip
        finally:
            pictures.close()
        print(f"edge-t2t: wrote {path}", file=sys.stderr)
    if args.geojson:
        _write_geojson(args.geojson, hits, chips)
    return 0


# -- issue 13: scenes ---------------------------------------------------------------------------
def _place(args):
    from ..errors import InputError
    from ..scene.geo import PlaceFilter

    if args.within and args.near:
        raise InputError("give --within or --near, not both")
    return PlaceFilter.within(args.within) if args.within else PlaceFilter.near_point(args.near)


def _write_json(hits, chips) -> None:
    import json

    from ..scene.scene_report import hit_dicts

    for d in hit_dicts(hits, chips):
        sys.stdout.write(json.dumps(d, ensure_ascii=False) + "\n")


def _write_geojson(path, hits, chips) -> None:
    from ..scene.geo import write_geojson
    from ..scene.scene_report import hit_features

    features, left_out = hit_features(hits, chips)
    write_geojson(path, features)
    note = f" ({left_out} hit(s) without a map position left out: plain images or scenes without a CRS)" if left_out else ""
    print(f"edge-t2t: wrote {path}: {len(features)} feature(s){note}", file=sys.stderr)
