"""The documentation pages: where they are, their names, and Markdown rendered to HTML.

A doc root holds README.md, docs/*.md and bench/results/*.md in the repository's own layout, so the
relative links between them work as plain files, rendered (the bundle's .html copies) and served
(`edge-t2t serve` at /docs). Each page has a short name: "" for the README, "search" for
docs/search.md, "results/quant_cost" for bench/results/quant_cost.md.

Rendering uses markdown-it-py, which rich (a dependency) already requires; without it `serve`
shows the Markdown as text. Raw HTML in the Markdown is escaped, not passed through, and links to
files outside the page set (source files) become plain text. Headings get GitHub's anchor ids,
so `page.md#a-heading` links work the same on GitHub, in the bundle and at /docs.
"""

from __future__ import annotations

import html
import posixpath
import re
import shutil
from collections.abc import Callable
from importlib import resources
from pathlib import Path

# the page sets: (folder under the doc root, name prefix)
SECTIONS = (("docs", ""), ("bench/results", "results/"))
STYLE = "style.css"  # the pages' stylesheet, beside README.html in the bundle and at /docs/style.css


def doc_pages(root: Path) -> dict[str, Path]:
    """name -> file of every page under a doc root."""
    pages = {"": root / "README.md"} if (root / "README.md").is_file() else {}
    for folder, prefix in SECTIONS:
        for path in sorted((root / folder).glob("*.md")):
            pages[prefix + path.stem] = path
    return pages


def page_name(relpath: str) -> str | None:
    """The name of the page at a doc-root-relative posix path, None when it is not a page's path."""
    if relpath == "README.md":
        return ""
    folder, _, file = relpath.rpartition("/")
    for section, prefix in SECTIONS:
        if folder == section and file.endswith(".md"):
            return prefix + file[:-3]
    return None


def slugify(text: str, seen: dict[str, int] | None = None) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens; a repeat
    gets -1, -2, ... (pass one `seen` per page)."""
    slug = re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")
    if seen is None:
        return slug
    n = seen.get(slug, 0)
    seen[slug] = n + 1
    return slug if n == 0 else f"{slug}-{n}"


def markdown():
    """A CommonMark parser with tables and raw HTML escaped, or None without markdown-it-py."""
    try:
        from markdown_it import MarkdownIt
    except ImportError:
        return None
    return MarkdownIt("commonmark", {"html": False}).enable("table")


def _inline_text(token) -> str:
    return "".join(c.content for c in token.children or () if c.type in ("text", "code_inline"))


def heading_anchors(tokens) -> list[str]:
    """The anchor of every heading of a parsed page, in order."""
    seen: dict[str, int] = {}
    return [slugify(_inline_text(tokens[i + 1]), seen) for i, t in enumerate(tokens) if t.type == "heading_open"]


def links(tokens):
    """(href, line) of every link of a parsed page."""
    for t in tokens:
        if t.type == "inline":
            for c in t.children or ():
                if c.type == "link_open":
                    yield c.attrs.get("href", ""), (t.map[0] + 1 if t.map else 0)


def resolve(source: str, href: str) -> tuple[str, str] | None:
    """(doc-root-relative path, anchor) of a relative link in the page at `source`, None for an
    absolute URL or a link within the page (#anchor)."""
    if not href or href.startswith(("#", "/")) or re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", href):
        return None
    path, _, anchor = href.partition("#")
    return posixpath.normpath(posixpath.join(posixpath.dirname(source), path)), anchor


def render(text: str, source: str, link: Callable[[str], str | None], css: str, home: str) -> str:
    """A whole HTML page for the Markdown `text` of the page at `source` (doc-root-relative).
    `link(path)` gives the URL of the page at a doc-root-relative path, or None when it is not
    a page here: such links are shown as text. Raises ImportError without markdown-it-py."""
    md = markdown()
    if md is None:
        raise ImportError("markdown-it-py is not installed")
    # HTML comments (notes for editors, e.g. where a section goes) are not for readers; raw HTML
    # is escaped, so they would otherwise show as text
    tokens = md.parse(re.sub(r"<!--.*?-->", "", text, flags=re.S))
    headings = [i for i, t in enumerate(tokens) if t.type == "heading_open"]
    for i, anchor in zip(headings, heading_anchors(tokens), strict=True):
        tokens[i].attrSet("id", anchor)
    title = next((_inline_text(tokens[i + 1]) for i in headings if tokens[i].tag == "h1"), "edge-t2t")
    for tok in tokens:
        children = tok.children or []
        for n, child in enumerate(children):
            target = resolve(source, child.attrs.get("href", "")) if child.type == "link_open" else None
            if target is None:
                continue
            url = link(target[0])
            if url is None:  # a source file, not a page: keep the words, drop the link
                child.tag, child.attrs = "span", {"class": "file"}
                _closing(children, n).tag = "span"
            else:
                child.attrSet("href", url + (f"#{target[1]}" if target[1] else ""))
    body = md.renderer.render(tokens, md.options, {})
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{html.escape(title)} · edge-t2t documentation</title>"
        f'<link rel="stylesheet" href="{html.escape(css, quote=True)}"></head><body>'
        f'<nav><a href="{html.escape(home, quote=True)}">edge-t2t documentation</a></nav>'
        f"<main>{body}</main></body></html>\n"
    )


def _closing(children, start: int):
    """The link_close token that ends the link opened at children[start]."""
    depth = 0
    for c in children[start:]:
        depth += {"link_open": 1, "link_close": -1}.get(c.type, 0)
        if depth == 0:
            return c
    raise ValueError("an unclosed link")


def export(root: Path, dest: Path) -> list[str]:
    """Copy every page under `root` into `dest` in the same layout, each with an HTML rendering
    beside it (page.html, its links pointing at the other pages' .html), plus the stylesheet; the
    HTML is left out without markdown-it-py. Returns the files written, relative to `dest`."""
    found = {path.relative_to(root).as_posix(): path for path in doc_pages(root).values()}
    rendered = markdown() is not None
    written = []
    if rendered:
        dest.mkdir(parents=True, exist_ok=True)
        (dest / STYLE).write_bytes(resources.files("edge_t2t.web").joinpath("docs.css").read_bytes())
        written.append(STYLE)
    for rel, path in found.items():
        out = dest / rel
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, out)
        written.append(rel)
        if not rendered:
            continue
        here = posixpath.dirname(rel) or "."

        def link(target: str, here: str = here) -> str | None:
            return posixpath.relpath(target[:-3] + ".html", here) if target in found else None

        page = render(path.read_text(encoding="utf-8"), rel, link, posixpath.relpath(STYLE, here),
                      posixpath.relpath("README.html", here))
        out.with_suffix(".html").write_text(page, encoding="utf-8")
        written.append(rel[:-3] + ".html")
    return written
