"""`edge-t2t search`: rank indexed images for a text query (or for a query image)."""

from __future__ import annotations

import argparse
import sys


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
    p.add_argument("--mode", choices=["dense", "lexical", "hybrid", "hnsw", "rescore", "exact"], default=None,
                   help="dense: max cosine over an image's texts (the paper's rule); lexical: FTS5 BM25 over "
                        "the texts; hybrid: dense + lexical (default: dense). The old values "
                        "hnsw/rescore/exact still work and mean dense with that --vector-mode")
    p.add_argument("--vector-mode", choices=["hnsw", "rescore", "exact"], default="rescore",
                   help="how the vector index is searched: hnsw: graph scores; rescore: graph candidates "
                        "re-scored exactly (default); exact: brute force")
    p.add_argument("--no-structure", dest="structure", action="store_false",
                   help="ignore places, relations and sizes the query states (e.g. 'a forest east of a runway')")
    p.add_argument("--explain", action="store_true",
                   help="show, per hit, the score's parts and which of the query's constraints matched")
    p.add_argument("--min-score", type=float, default=None, metavar="S",
                   help="leave out hits scoring under S (the score shown; its scale depends on --mode)")
    p.add_argument("--precision", choices=["fp32", "int8"], default="int8", help="ONNX embedder to use (default: int8)")
    p.add_argument("--vlm", metavar="GGUF", help="with --image: the VLM's text model")
    p.add_argument("--mmproj", metavar="GGUF", help="with --image: the VLM's vision projector")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from .. import config, report
    from .. import search as searching
    from ..errors import InputError

    index_dir = config.index_dir(args.index)
    mode, vector_mode = args.mode, args.vector_mode
    if mode in ("hnsw", "rescore", "exact"):
        mode, vector_mode = "dense", mode
    if args.image:
        if args.query:
            raise InputError("give either a QUERY or --image PATH, not both")
        if mode not in (None, "dense"):
            raise InputError(f"--image searches by dense vectors only; drop --mode {mode}")
        vlm_cfg = None
        try:
            from ..vlm import VLMConfig, resolve_vlm_paths

            model, mmproj = resolve_vlm_paths(args.vlm, args.mmproj)
            vlm_cfg = VLMConfig(model=model, mmproj=mmproj)
        except Exception:
            if args.vlm or args.mmproj:
                raise
        from pathlib import Path

        variants, sha = searching.query_image_variants(index_dir, args.image, vlm_cfg)
        hits = searching.search_by_variants(
            index_dir, variants, k=args.k, mode=vector_mode, precision=args.precision,
            exclude_sha256=sha if args.exclude_self else "",
            exclude_path=str(Path(args.image).resolve()) if args.exclude_self else "",
        )  # fmt: skip
        title = f"image {args.image}"
    else:
        if not args.query:
            raise InputError("give a QUERY (in quotes) or --image PATH")
        hits = searching.search(
            index_dir, args.query, k=args.k, mode=mode, vector_mode=vector_mode, precision=args.precision,
            structure=args.structure, explain=args.explain, min_score=args.min_score,
        )  # fmt: skip
        title = args.query
    if args.min_score is not None and args.image:
        hits = [h for h in hits if h.score >= args.min_score]
    if args.json:
        report.write_jsonl(hits, sys.stdout)
    else:
        report.print_table(hits, query=title, explain=args.explain)
    if args.html:
        path = report.write_html(hits, args.html, title, str(index_dir), explain=args.explain)
        print(f"edge-t2t: wrote {path}", file=sys.stderr)
    return 0
