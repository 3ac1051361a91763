"""`edge-t2t serve`'s /docs: the user documentation in the browser, for a machine with no web.

GET /docs/ is the README, /docs/NAME a page (pages.doc_pages: /docs/search, /docs/results/quant_cost),
/docs/style.css their stylesheet. A page is looked up by name in the set found on disk, never read
from a path in the request. Pages are rendered to HTML with markdown-it-py; without it they are
sent as Markdown, as text/plain. Links stay inside /docs, so the page's Content-Security-Policy
(default-src 'self') holds.
"""

from __future__ import annotations

from importlib import resources

from .. import config
from .pages import STYLE, doc_pages, page_name, render

PREFIX = "/docs/"


def page_url(relpath: str) -> str | None:
    """The URL of the page at a doc-root-relative path, None when it is not a page."""
    name = page_name(relpath)
    return None if name is None else PREFIX + name


def add_docs_routes(app) -> None:
    """Add /docs, /docs/ and /docs/<name> to a Flask app."""
    import flask

    def missing():
        flask.abort(404, "the documentation is not installed here: it comes with the source (README.md, "
                         "docs/) and the bundle (TARGET/share/doc/edge-t2t); or set EDGE_T2T_DOCS=DIR")

    @app.get("/docs")
    def docs_home():
        return flask.redirect(PREFIX)

    @app.get(PREFIX, defaults={"name": ""})
    @app.get(PREFIX + "<path:name>")
    def docs_page(name: str):
        if name == STYLE:
            css = resources.files("edge_t2t.web").joinpath("docs.css").read_bytes()
            return flask.Response(css, mimetype="text/css")
        root = config.docs_dir()
        path = doc_pages(root).get(name) if root else None
        if path is None:
            if root is None:
                missing()
            flask.abort(404, f"no documentation page {name!r}: start at {PREFIX}")
        text = path.read_text(encoding="utf-8")
        try:
            body = render(text, path.relative_to(root).as_posix(), page_url, PREFIX + STYLE, PREFIX)
        except ImportError:  # no markdown-it-py: the Markdown itself, readable as it is
            return flask.Response(text, mimetype="text/plain")
        return flask.Response(body, mimetype="text/html")
