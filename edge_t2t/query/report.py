"""Search results as a rich table, JSON lines, or a self-contained HTML page."""

from __future__ import annotations

import html
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TextIO

from ..errors import ImageError
from ..fileio import atomic_write_text
from .retrieval import LEXICAL_WEIGHT, STRUCTURE_WEIGHT
from .search import Hit

THUMB_SIZE = 160


TABLE_TEXT_CHARS = 160  # a joined variant runs to ~1,000 characters; --json/--html carry it whole


def _short_path(image: str) -> str:
    """Relative to the working directory when under it: the table is for reading."""
    try:
        return os.path.relpath(image) if os.path.isabs(image) and not os.path.relpath(image).startswith("..") else image
    except ValueError:  # another drive on Windows
        return image


def _shorten(text: str, limit: int = TABLE_TEXT_CHARS) -> str:
    return text if len(text) <= limit else text[: limit - 1].rstrip() + "…"


# What a score is made of, for the table's caption and the HTML page (docs/search.md "Scores").
SCORE_LEGEND = (
    "score = text + place. text, 0 to 1: how well the image's best description matches the words "
    "(dense: its cosine; lexical: its BM25 divided by the best hit's; hybrid: (dense + "
    f"{LEXICAL_WEIGHT:g} x lexical) / {1 + LEXICAL_WEIGHT:g}). place, 0 to {STRUCTURE_WEIGHT:g}: the share of "
    "the query's places, relations and sizes that description meets. So a score runs up to "
    f"{1 + STRUCTURE_WEIGHT:g} when the query names places."
)


def score_terms(h: Hit) -> tuple[float, float] | None:
    """(text, place) parts of a hit's score, or None where the search gives no parts (by image,
    within a place)."""
    text = (h.parts or {}).get("text_score")
    return None if text is None else (text, max(0.0, h.score - text))  # text_score is rounded to 1e-6


def shows_places(hits: Sequence[Hit]) -> bool:
    """Whether any hit's score has a place part, so the breakdown is worth a column."""
    return any((h.parts or {}).get("structure", 0) > 0 for h in hits)


def terms_text(h: Hit) -> str:
    t = score_terms(h)
    return "" if t is None else f"text {t[0]:.3f} + place {t[1]:.3f}"


def explain_text(h: Hit) -> str:
    """The score's parts and each query constraint with its score, in one line (--explain)."""
    parts = h.parts or {}
    shown = [f"{k} {v:.3f}" for k, v in parts.items() if v is not None and k != "text_score"]
    for m in h.matched:
        mark = "yes" if m["score"] >= 1 else "partly" if m["score"] > 0 else "no"
        shown.append(f"{m['constraint']}: {mark}")
    if parts and not h.matched:
        shown.append("no place/relation/size words read")
    return "; ".join(shown)


def print_table(hits: Sequence[Hit], query: str = "", console=None, explain: bool = False) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = console or Console()
    table = Table(title=f"Results for {query!r}" if query else None, show_lines=False)
    table.add_column("#", justify="right")
    table.add_column("score", justify="right")
    table.add_column("image", overflow="fold")
    places = shows_places(hits)
    if places:  # a score above 1: say what it is made of (SCORE_LEGEND, under the table)
        table.add_column("text + place", justify="right")
    table.add_column("best-matching description", overflow="fold")
    if explain:
        table.add_column("why", overflow="fold")
    for h in hits:
        # Texts come from files and models: keep rich from reading [brackets] as markup.
        row = [str(h.rank), f"{h.score:.4f}", escape(_short_path(h.image))]
        if places:
            text, place = score_terms(h) or (h.score, 0.0)
            row.append(f"{text:.3f} + {place:.3f}")
        row.append(escape(_shorten(h.text)))
        table.add_row(*row, *([escape(explain_text(h))] if explain else []))
    if not hits:
        console.print("no results")
        return
    console.print(table)
    if places:
        console.print(SCORE_LEGEND, highlight=False)


def write_jsonl(hits: Sequence[Hit], out: TextIO = sys.stdout) -> None:
    for h in hits:
        out.write(json.dumps(h.to_dict(), ensure_ascii=False) + "\n")


def _thumbnail(image: str) -> str:
    """A data URI, or '' when the file is not here (e.g. names imported from a captions file)."""
    path = Path(image)
    if not path.is_file():
        return ""
    try:
        from ..images import thumbnail_data_uri

        return thumbnail_data_uri(path, THUMB_SIZE)
    except (ImageError, OSError):  # an unreadable image (load_image names it) still gets its row, with a placeholder
        return ""


_CSS = """
body{font-family:system-ui,sans-serif;margin:2em;color:#222}
table{border-collapse:collapse}td,th{border-bottom:1px solid #ddd;padding:.5em;vertical-align:top;text-align:left}
.ph{width:THUMBpx;height:THUMBpx;background:#eee;color:#888;display:flex;align-items:center;justify-content:center;
font-size:12px;text-align:center}
.path{font-family:monospace;font-size:12px;word-break:break-all}
""".replace("THUMB", str(THUMB_SIZE))


def render_html(hits: Sequence[Hit], query: str, index_dir: str = "", explain: bool = False, picture=None) -> str:
    """`picture(hit)` may give a hit's picture cell as HTML (scene chips: chip + outlined overview)."""
    rows = []
    places = shows_places(hits)
    for h in hits:
        custom = picture(h) if picture else None
        uri = _thumbnail(h.image) if custom is None else ""
        thumb = custom or (
            f'<img src="{uri}" alt="{html.escape(h.image, quote=True)}" width="{THUMB_SIZE}">'
            if uri
            else '<div class="ph">image not<br>available here</div>'
        )
        rows.append(
            f"<tr><td>{h.rank}</td><td>{thumb}</td><td>{h.score:.4f}"
            + (f"<br><small>= {terms_text(h)}</small>" if places else "") + "</td>"
            f'<td><div class="path">{html.escape(h.image)}</div><p>{html.escape(h.text)}</p>'
            f"<small>variant {h.variant}, {html.escape(h.field)}</small>"
            + (f"<p><small>{html.escape(explain_text(h))}</small></p>" if explain else "")
            + "</td></tr>"
        )
    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<title>edge-t2t: {html.escape(query)}</title><style>{_CSS}</style></head><body>"
        f"<h1>{html.escape(query)}</h1><p>Index {html.escape(str(index_dir))}, {len(hits)} results, {stamp}.</p>"
        + (f"<p><small>{html.escape(SCORE_LEGEND)}</small></p>" if places else "")
        + "<table><tr><th>#</th><th>image</th><th>score</th><th>best-matching description</th></tr>"
        + "\n".join(rows)
        + "</table></body></html>\n"
    )


def write_html(hits: Sequence[Hit], path: str | os.PathLike, query: str, index_dir: str = "", explain: bool = False,
               picture=None) -> Path:
    """Write the page atomically (temp file + os.replace)."""
    return atomic_write_text(path, render_html(hits, query, index_dir, explain, picture))
