"""`edge-t2t serve`: a local web page for searching and browsing one index (edge_t2t/serve.py)."""

from __future__ import annotations

import argparse
import sys


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "serve",
        help="a local web page for searching and browsing an index (needs edge-t2t[web])",
        description=(
            "Serve a search page over one index at http://HOST:PORT/, offline: type a query, see "
            "thumbnails with scores, open an image and its descriptions, 'more like this', search by an "
            "uploaded image, map and export the hits of georeferenced scenes. The embedder and the index "
            "are loaded once. The JSON API: GET /api/search?q=TEXT&k=N (the fields of 'search --json'). "
            "It listens on 127.0.0.1 only, unless --host says otherwise."
        ),
    )
    p.add_argument("--index", metavar="DIR", help="index directory (default: $EDGE_T2T_INDEX or ./.edge-t2t)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default: 127.0.0.1, this machine only; anything else prints a warning)")
    p.add_argument("--port", type=int, default=8765, help="port (default: 8765)")
    p.add_argument("--precision", choices=["fp32", "int8"], default="int8", help="ONNX embedder to use (default: int8)")
    p.add_argument("--vlm", metavar="GGUF", help="VLM text model for search by an uploaded image (default: as 'index')")
    p.add_argument("--mmproj", metavar="GGUF", help="the VLM's vision projector")
    p.add_argument("--max-upload-mb", type=float, default=20.0, metavar="MB",
                   help="largest image upload accepted (default: 20)")
    p.set_defaults(func=run)


def _vlm_config(args):
    """The configured VLM, or None: search by example then works only for images already indexed."""
    from ..describe.vlm import VLMConfig, resolve_vlm_paths
    from ..errors import NoVLMError

    try:
        model, mmproj = resolve_vlm_paths(args.vlm, args.mmproj)
    except NoVLMError:  # none installed: serve without it. Several, or a broken one: say which, as index does
        if args.vlm or args.mmproj:
            raise
        return None
    return VLMConfig(model=model, mmproj=mmproj)


def run(args: argparse.Namespace) -> int:
    from .. import config
    from .. import serve as web
    from ..errors import InputError

    web.require_web()  # before loading anything: one line if the extra is missing
    if not 0 < args.port < 65536:
        raise InputError(f"--port must be between 1 and 65535, got {args.port}")
    if args.max_upload_mb <= 0:
        raise InputError(f"--max-upload-mb must be positive, got {args.max_upload_mb}")
    index_dir = config.index_dir(args.index)
    vlm_cfg = _vlm_config(args)
    app = web.create_app(index_dir, precision=args.precision, vlm_cfg=vlm_cfg, max_upload_mb=args.max_upload_mb)
    if not web.is_loopback(args.host):
        print(f"edge-t2t: WARNING: listening on {args.host}, not loopback: anyone who can reach this machine "
              "can search the index and see its images (there is no login)", file=sys.stderr)
    shown = f"[{args.host}]" if ":" in args.host else args.host
    print(f"edge-t2t: serving {index_dir} at http://{shown}:{args.port}/ "
          f"({'VLM ' + str(vlm_cfg.model) if vlm_cfg else 'no VLM: search by example takes indexed images only'}); "
          "Ctrl-C stops", file=sys.stderr)
    try:
        web.serve(app, args.host, args.port)
    except KeyboardInterrupt:
        print("edge-t2t: stopped", file=sys.stderr)
        return 130
    return 0
