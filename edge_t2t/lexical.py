"""Lexical search: SQLite FTS5 (BM25) over the stored texts, for exact words an embedding smooths
over (a place name, "tank", "runway 09").

The index is the store's `variants_fts` table (schema v4, kept in step with `variants` by
triggers). A query becomes an OR of its content words, so a text needs to share only some of them;
BM25 then weighs rare words above common ones. Scores are FTS5's bm25() negated: higher is better,
0 means no shared word.

`bm25_matrix` scores many queries against many texts with the same FTS5 tokenizer and ranking in a
throw-away in-memory table: `eval` uses it, so evaluated and searched lexical scores agree.
"""

from __future__ import annotations

import re
import sqlite3
from collections.abc import Sequence

import numpy as np

# Function words that carry no content in a search query (the structure parser reads the
# relation words; BM25 would only give them noise weight).
STOPWORDS = frozenset(
    "a an the of in on at to with and or is are there this that its it by for from as be near "
    "next into onto some many several".split()
)
_WORD = re.compile(r"[^\W_]+", re.UNICODE)
MAX_TERMS = 16  # a pasted paragraph is cut to its first content words: each term costs a posting scan


def query_terms(query: str) -> list[str]:
    """The distinct lower-case content words of a query, in order."""
    seen: dict[str, None] = {}
    for w in _WORD.findall(query.lower()):
        if w not in STOPWORDS and w not in seen:
            seen[w] = None
    return list(seen)[:MAX_TERMS]


def match_expression(query: str) -> str:
    """An FTS5 MATCH expression: the query's content words, each quoted (so FTS5 operators and
    punctuation in the query are plain text), joined by OR. '' when no word is left."""
    return " OR ".join('"' + t.replace('"', '""') + '"' for t in query_terms(query))


def search_texts(conn: sqlite3.Connection, query: str, limit: int) -> tuple[np.ndarray, np.ndarray]:
    """(variant keys, scores) of the `limit` best texts for `query`, best first."""
    expr = match_expression(query)
    if not expr or limit < 1:
        return np.zeros(0, np.int64), np.zeros(0, np.float64)
    rows = conn.execute(
        "SELECT rowid, -bm25(variants_fts) FROM variants_fts WHERE variants_fts MATCH ? "
        "ORDER BY bm25(variants_fts) LIMIT ?",
        (expr, int(limit)),
    ).fetchall()
    keys = np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))
    scores = np.fromiter((r[1] for r in rows), dtype=np.float64, count=len(rows))
    return keys, scores


def bm25_matrix(queries: Sequence[str], texts: Sequence[str]) -> np.ndarray:
    """(len(queries), len(texts)) BM25 scores (higher is better, 0 = no shared word), computed by
    FTS5 with the store's tokenizer over `texts` as the collection."""
    conn = sqlite3.connect(":memory:")
    try:
        conn.execute("CREATE VIRTUAL TABLE t USING fts5(text, tokenize='porter unicode61')")
        conn.executemany("INSERT INTO t(rowid, text) VALUES (?, ?)", ((i, s) for i, s in enumerate(texts)))
        out = np.zeros((len(queries), len(texts)), dtype=np.float64)
        for q, query in enumerate(queries):
            expr = match_expression(query)
            if not expr:
                continue
            for rowid, score in conn.execute("SELECT rowid, -bm25(t) FROM t WHERE t MATCH ?", (expr,)):
                out[q, rowid] = score
        return out
    finally:
        conn.close()


def normalise_rows(scores: np.ndarray, exclude: np.ndarray | None = None) -> np.ndarray:
    """Each row divided by its maximum (so the best lexical match of a query scores 1), leaving
    out the columns marked in `exclude` (e.g. a query's own text) when taking the maximum."""
    s = np.asarray(scores, dtype=np.float64)
    masked = s if exclude is None else np.where(exclude, -np.inf, s)
    top = masked.max(axis=1, keepdims=True) if s.shape[1] else np.ones((len(s), 1))
    return s / np.where(top > 0, top, 1.0)
