"""The `edge-t2t` command line: argparse sub-commands, one module each in this package.

Each sub-command module defines `register(subparsers)`, which adds its parser and sets
`func=run(args) -> int`. The modules parse, call the library, and print; they hold no logic of
their own. Heavy libraries are imported inside `run`, so `edge-t2t --help` starts fast.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys

from .. import __version__
from ..errors import EdgeT2TError

# Order of sub-commands in --help; modules not listed here come after, alphabetically.
_ORDER = ["caption", "index", "search", "info", "embed", "eval", "bench_quant", "verify", "models"]


def _command_modules() -> list[str]:
    found = {m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_")}
    return [n for n in _ORDER if n in found] + sorted(found - set(_ORDER))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edge-t2t",
        description=(
            "Offline text-to-text retrieval of remote-sensing images. A GGUF vision-language model "
            "describes each image; an ONNX text embedder matches your query against those descriptions."
        ),
        epilog="Run 'edge-t2t COMMAND --help' for the options of one command.",
    )
    parser.add_argument("--version", action="version", version=f"edge-t2t {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in _command_modules():
        importlib.import_module(f"{__name__}.{name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except EdgeT2TError as exc:
        print(f"edge-t2t: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        # Commands that write data catch this themselves and say what they kept.
        print("edge-t2t: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `edge-t2t search ... | head`
        return 0


if __name__ == "__main__":
    sys.exit(main())
