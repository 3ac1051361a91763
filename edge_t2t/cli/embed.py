"""`edge-t2t embed`: embed texts with the ONNX embedder; JSON lines to stdout or an .npy file."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from ..errors import InputError
from ..modes import PRECISIONS


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "embed",
        help="embed texts with the ONNX text embedder",
        description=(
            "Embed texts with the built ONNX embedder (see `edge-t2t models build-embedder`). "
            "Without --out, prints one JSON line per text: {\"text\": ..., \"vector\": [...]}. "
            "With --out, writes an (n, dim) float32 .npy in input order and a summary to stderr."
        ),
    )
    p.add_argument("texts", nargs="*", metavar="TEXT", help="texts to embed (come before --input lines)")
    p.add_argument("--input", type=Path, metavar="FILE", help="UTF-8 file with one text per line")
    p.add_argument("--precision", choices=PRECISIONS, default="int8", help="ONNX model to use (default: int8)")
    p.add_argument("--out", type=Path, metavar="FILE.npy", help="write vectors to this .npy file")
    p.add_argument("--batch-size", type=int, default=32, metavar="N", help="texts per ONNX run (default: 32)")
    p.add_argument("--threads", type=int, default=None, metavar="N", help="onnxruntime threads (default: all CPUs)")
    p.add_argument("--model-dir", type=Path, default=None, metavar="DIR", help="built embedder folder (default: models/embedder)")
    p.set_defaults(func=run)


def read_lines(path: Path) -> list[str]:
    """One text per line, UTF-8; a bad byte is reported with its line number."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise InputError(f"cannot read {path}: {exc.strerror}; check the --input path") from exc
    lines = raw.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()  # a trailing newline ends the last line, it does not add an empty one
    texts = []
    for number, line in enumerate(lines, start=1):
        try:
            texts.append(line.decode("utf-8").removesuffix("\r"))
        except UnicodeDecodeError as exc:
            raise InputError(
                f"{path}, line {number}: not valid UTF-8 (byte {exc.start}); re-save the file as UTF-8"
            ) from exc
    if texts and texts[0].startswith("\ufeff"):
        texts[0] = texts[0][1:]  # a UTF-8 byte-order mark is not part of the first text
    return texts


def _embed_with_progress(embedder, texts: list[str], batch_size: int):
    """A rich progress bar on stderr for long inputs; short ones (one query) print nothing extra."""
    if len(texts) <= 4 * batch_size:
        return embedder.embed(texts, batch_size=batch_size)
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    columns = (TextColumn("embedding"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task("embed", total=len(texts))
        return embedder.embed(texts, batch_size=batch_size, progress=lambda n: bar.advance(task, n))


def run(args: argparse.Namespace) -> int:
    import numpy as np

    from ..embed.embedder import Embedder

    texts = list(args.texts)
    if args.input is not None:
        texts += read_lines(args.input)
    if not texts:
        raise InputError("nothing to embed: give TEXT arguments or --input FILE")
    if args.batch_size < 1:
        raise InputError("--batch-size must be at least 1")
    embedder = Embedder(args.model_dir, precision=args.precision, threads=args.threads)
    vectors = _embed_with_progress(embedder, texts, args.batch_size)
    if args.out is None:
        out = sys.stdout
        for text, vec in zip(texts, vectors, strict=True):
            out.write(json.dumps({"text": text, "vector": [round(float(x), 7) for x in vec]}, ensure_ascii=False))
            out.write("\n")
        out.flush()
        return 0
    target = args.out if args.out.suffix == ".npy" else args.out.with_name(args.out.name + ".npy")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + ".tmp")
    with open(tmp, "wb") as fh:  # np.save on a handle does not add another .npy suffix
        np.save(fh, vectors.astype(np.float32))
    os.replace(tmp, target)
    print(
        f"embedded {len(texts)} texts -> {target} ({vectors.shape[0]}x{vectors.shape[1]} float32, "
        f"{args.precision}, {embedder.truncated} truncated at {embedder.max_tokens} tokens)",
        file=sys.stderr,
    )
    return 0
