"""docs/cli.md, generated from the command's own argparse parsers: every command, sub-command and
option with its default and help, so the reference cannot drift from `--help`.

    .venv/bin/python -m edge_t2t.manual.cli_reference          # write docs/cli.md (make cli-docs)
    .venv/bin/python -m edge_t2t.manual.cli_reference --check  # exit 1 when docs/cli.md is stale

tests/test_docs.py regenerates it in memory and fails when the file differs. The text does not
depend on the terminal: usage lines are wrapped at a fixed width.
"""

from __future__ import annotations

import argparse
import functools
import re
import sys
from pathlib import Path

from .. import config

OUTPUT = config.PACKAGE_DIR.parent / "docs" / "cli.md"
COMMAND = "make cli-docs"  # what a stale file's message tells the reader to run
WIDTH = 100

HEADER = f"""# Command-line reference

Every command of `edge-t2t`, with every option, its default and its help. The guides say which
command does what for which task; this page is for looking up one option.

This page is generated from the parsers themselves: after changing a command's options, run
`{COMMAND}` (`.venv/bin/python -m edge_t2t.manual.cli_reference`) and commit docs/cli.md;
`tests/test_docs.py` fails while it is stale.
"""


def _subcommands(parser: argparse.ArgumentParser) -> list[tuple[str, argparse.ArgumentParser, str]]:
    """(name, parser, one-line help) of each sub-command, in --help's order."""
    out = []
    for action in parser._actions:  # argparse keeps its actions only here
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help or "" for a in action._choices_actions}
            seen = set()
            for name, sub in action.choices.items():
                if id(sub) not in seen:  # an alias maps to the same parser
                    seen.add(id(sub))
                    out.append((name, sub, helps.get(name, "")))
    return out


def _paragraphs(text: str) -> list[str]:
    """A description or epilog as Markdown paragraphs (argparse's own line breaks dropped)."""
    out = []
    for para in re.split(r"\n\s*\n", text):
        if para.strip():
            out += [" ".join(para.split()), ""]
    return out


def _cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def _default(action: argparse.Action) -> str:
    if action.nargs == 0 or action.default in (None, argparse.SUPPRESS):  # a flag: its default is "off"
        return ""
    if isinstance(action.default, list | tuple):
        return ", ".join(map(str, action.default)) if action.default else ""
    return f"`{action.default}`"


def _option(action: argparse.Action) -> str:
    if not action.option_strings:
        return f"`{action.metavar or action.dest}`" + (" ..." if action.nargs in ("*", "+") else "")
    metavar = ""
    if action.nargs != 0:
        if action.choices is not None and action.metavar is None:
            metavar = " {" + ",".join(map(str, action.choices)) + "}"
        else:
            metavar = f" {action.metavar or action.dest.upper()}"
    return ", ".join(f"`{s}{metavar}`" for s in action.option_strings)


def _section(prog: str, parser: argparse.ArgumentParser, summary: str, level: int) -> list[str]:
    parser.formatter_class = functools.partial(argparse.HelpFormatter, width=WIDTH)
    lines = [f"{'#' * level} {prog}", ""]
    lines += _paragraphs(parser.description or summary)
    lines += ["```text", parser.format_usage().strip(), "```", ""]
    rows = [a for a in parser._actions if not isinstance(a, argparse._HelpAction | argparse._SubParsersAction)]
    if rows:
        lines += ["| argument | default | what it does |", "|---|---|---|"]
        for a in rows:
            help_text = (a.help or "") % {"default": a.default, "prog": prog} if a.help != argparse.SUPPRESS else ""
            lines.append(f"| {_option(a)} | {_cell(_default(a))} | {_cell(help_text)} |")
        lines.append("")
    lines += _paragraphs(parser.epilog or "")
    for name, sub, help_text in _subcommands(parser):
        lines += _section(f"{prog} {name}", sub, help_text, min(level + 1, 4))
    return lines


def generate() -> str:
    """The text of docs/cli.md."""
    from ..cli import build_parser

    parser = build_parser()
    commands = _subcommands(parser)
    lines = [HEADER, "| command | what it does |", "|---|---|"]
    lines += [f"| [`edge-t2t {name}`](#edge-t2t-{name}) | {_cell(h)} |" for name, _, h in commands]
    lines.append("")
    lines += ["Global options: `--help`, `--version`.", ""]
    for name, sub, help_text in commands:
        lines += _section(f"edge-t2t {name}", sub, help_text, 2)
    return "\n".join(lines).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m edge_t2t.manual.cli_reference", description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true", help="exit 1 if docs/cli.md is not what the parsers give")
    ap.add_argument("--out", type=Path, default=OUTPUT, help=f"where to write (default: {OUTPUT})")
    args = ap.parse_args(argv)
    text = generate()
    current = args.out.read_text(encoding="utf-8") if args.out.is_file() else ""
    if args.check:
        if current != text:
            print(f"{args.out} is stale: run `{COMMAND}` and commit it", file=sys.stderr)
            return 1
        return 0
    if current != text:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text, encoding="utf-8")
    print(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
