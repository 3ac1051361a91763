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
            "It listens on 127.0.0.1 only, unless --host says otherwise. Off loopback every request needs an "
            "access token (--token-file, or one made at start and printed once with the URL that carries it): "
            "scripts send 'Authorization: Bearer TOKEN', the page signs in once. One audit line per request "
            "goes to standard error (or --audit-log)."
        ),
    )
    p.add_argument("--index", metavar="DIR", help="index directory (default: $EDGE_T2T_INDEX or ./.edge-t2t)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default: 127.0.0.1, this machine only; 0.0.0.0: every address, "
                        "for a team, with an access token)")
    p.add_argument("--port", type=int, default=8765, help="port (default: 8765)")
    p.add_argument("--precision", choices=["fp32", "int8"], default="int8", help="ONNX embedder to use (default: int8)")
    p.add_argument("--vlm", metavar="GGUF", help="VLM text model for search by an uploaded image (default: as 'index')")
    p.add_argument("--mmproj", metavar="GGUF", help="the VLM's vision projector")
    p.add_argument("--max-upload-mb", type=float, default=20.0, metavar="MB",
                   help="largest image upload accepted (default: 20)")
    p.add_argument("--token-file", metavar="FILE",
                   help="the access token every request must carry (one line, at least 16 characters; make one "
                        "with: openssl rand -base64 32 > FILE). Off loopback without it, a token is made and "
                        "printed once; on loopback it turns the check on")
    p.add_argument("--cert", metavar="PEM", help="serve HTTPS with this certificate (PEM; with --key)")
    p.add_argument("--key", metavar="PEM", help="the certificate's private key (PEM, unencrypted)")
    p.add_argument("--audit-log", metavar="FILE",
                   help="append one line per request (time, address, method, path, status, ms) to FILE "
                        "(default: standard error)")
    p.add_argument("--processes", type=int, metavar="N",
                   help="search processes: N searches run at once on N cores, each process with its own embedder "
                        "(more memory: docs/performance.md); 0 searches in the server's own threads, in one process "
                        "(default: one per core, up to 4)")
    p.add_argument("--threads", type=int, metavar="N",
                   help="requests the server takes at once (default: 4, or twice the search processes + 2 when that is more)")
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
    from urllib.parse import quote

    from .. import config
    from .. import serve as web
    from .. import serve_access as access
    from .. import serve_pool as pool
    from ..errors import InputError

    web.require_web()  # before loading anything: one line if the extra is missing
    if not 0 < args.port < 65536:
        raise InputError(f"--port must be between 1 and 65535, got {args.port}")
    if args.max_upload_mb <= 0:
        raise InputError(f"--max-upload-mb must be positive, got {args.max_upload_mb}")
    processes = pool.default_processes() if args.processes is None else args.processes
    if processes < 0:
        raise InputError(f"--processes must be 0 or more, got {args.processes}")
    # Each search process holds up to pool.DEPTH requests; two threads more for pages, uploads and the docs.
    threads = max(4, pool.DEPTH * processes + 2) if args.threads is None else args.threads
    if threads < 1:
        raise InputError(f"--threads must be at least 1, got {args.threads}")
    if bool(args.cert) != bool(args.key):
        raise InputError(f"--cert and --key go together: give both, or neither (make a pair with {web.MAKE_CERT})")
    loopback = web.is_loopback(args.host)
    # Off loopback the server never runs open: the token file's token, else a new one, shown once.
    if args.token_file:
        token = access.read_token_file(args.token_file)
    else:
        token = None if loopback else access.new_token()
    tls = web.tls_adapter(args.cert, args.key) if args.cert else None
    index_dir = config.index_dir(args.index)
    vlm_cfg = _vlm_config(args)
    audit = access.AuditLog(args.audit_log)
    try:
        app = web.create_app(index_dir, precision=args.precision, vlm_cfg=vlm_cfg, max_upload_mb=args.max_upload_mb,
                             gate=access.Gate(token) if token else None, audit=audit, processes=processes)  # fmt: skip
        shown = f"[{args.host}]" if ":" in args.host else args.host
        url = f"{'https' if tls else 'http'}://{shown}:{args.port}/"
        if not loopback and tls is None:
            print(f"edge-t2t: WARNING: plain HTTP on {args.host}: the token, the searches and the pictures cross "
                  "the network unencrypted; give --cert and --key for HTTPS (docs/web.md: Serving a team)", file=sys.stderr)

        def ready() -> None:  # listening now: the URL printed works
            searching = f"{processes} search processes" if processes else f"searching in {threads} threads"
            print(f"edge-t2t: serving {index_dir} at {url} ({searching}; "
                  f"{'VLM ' + str(vlm_cfg.model) if vlm_cfg else 'no VLM: search by example takes indexed images only'}); "
                  "Ctrl-C stops", file=sys.stderr, flush=True)
            if token and not args.token_file:
                # Shown this once, nowhere else: the URL that signs a browser in (the token is the part after #token=).
                print("edge-t2t: every request needs the access token made for this run: open the URL on standard "
                      "output; scripts send 'Authorization: Bearer' with the part after #token=", file=sys.stderr)
                print(f"{url}#token={quote(token, safe='')}", flush=True)
            elif token:
                print(f"edge-t2t: every request needs the access token in {args.token_file}", file=sys.stderr)

        web.serve(app, args.host, args.port, threads=threads, tls=tls, ready=ready)
    except KeyboardInterrupt:
        print("edge-t2t: stopped", file=sys.stderr)
        return 130
    finally:
        audit.close()
    return 0
