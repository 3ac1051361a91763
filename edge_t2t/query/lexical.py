"""Lexical search: SQLite FTS5 (BM25) over the stored texts, for exact words an embedding smooths
over (a place name, "tank", "runway 09").

The index is the store's `texts_fts` table (schema v7, kept in step with `texts` by
triggers). A query becomes an OR of its content words, so a text needs to share only some of them;
BM25 then weighs rare words above common ones. Scores are FTS5's bm25() negated: higher is better,
0 means no shared word.

Cost follows the query, not the archive. FTS5 scores every text holding a query word before it
cuts to the top N (and its bm25() counts each word's texts once more), so a word found in a third
of the texts ("east", "area", "green") costs a third of the archive per query, while BM25 gives
it little weight (idf = log((N - df) / df) is about 0.7 there, against 7 to 14 for a word in a
few texts). `select_terms` reads each word's document frequency from `fts5vocab` (a live view of
the FTS5 index: always current with the store, one B-tree lookup per word) and matches the
query's words rarest first while the texts holding them stay within POSTINGS_BUDGET; a word in
more than MAX_DF of the texts is never matched (BM25's idf is <= 0 there: FTS5 floors it at
1e-6, so it only adds work). So the work per query is bounded by the budget at any archive size.
In archives of a few thousand texts nothing is left out; in large ones the commonest words of a
query are. When no word fits, lexical mode keeps the rarest one (the user asked for words) and
hybrid's lexical side matches nothing.

`bm25_matrix` scores many queries against many texts with the same tokenizer, term selection and
ranking in a throw-away in-memory table: `eval` uses it, so evaluated and searched lexical scores agree.
"""

from __future__ import annotations

import re
import sqlite3
import threading
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
# See the docstring. MAX_DF: BM25's own cut-off (idf <= 0 above half the texts). POSTINGS_BUDGET:
# the texts a query's matched words may hold together; what leaving words out costs in accuracy
# was measured on the synthetic tuning seeds (bench/retrieval_modes.py --tune), not on RSICD.
MAX_DF = 0.5
POSTINGS_BUDGET = 5000
TOKENIZER = "porter unicode61"
FTS_TABLE = "texts_fts"
_VOCAB = "temp.edge_t2t_vocab"  # an fts5vocab view of a connection's FTS table (temp: no schema change)


def query_terms(query: str) -> list[str]:
    """The distinct lower-case content words of a query, in order."""
    seen: dict[str, None] = {}
    for w in _WORD.findall(query.lower()):
        if w not in STOPWORDS and w not in seen:
            seen[w] = None
    return list(seen)[:MAX_TERMS]


def _quote(words: Sequence[str]) -> str:
    """An FTS5 MATCH expression: each word quoted (so FTS5 operators and punctuation in the query
    are plain text), joined by OR. '' when no word is left."""
    return " OR ".join('"' + t.replace('"', '""') + '"' for t in words)


def match_expression(query: str) -> str:
    """Every content word of the query as an OR expression (no document-frequency selection)."""
    return _quote(query_terms(query))


_local = threading.local()


def stems(words: Sequence[str]) -> list[str]:
    """Each word as the FTS5 index stores it (the store's tokenizer: porter stemming), '' for a
    word the tokenizer keeps nothing of. A private in-memory FTS5 table does the tokenizing, so
    the stems are exactly the index's terms."""
    conn = getattr(_local, "conn", None)
    if conn is None:
        conn = _local.conn = sqlite3.connect(":memory:", isolation_level=None)
        conn.execute(f"CREATE VIRTUAL TABLE w USING fts5(t, tokenize='{TOKENIZER}')")
        conn.execute("CREATE VIRTUAL TABLE wv USING fts5vocab(w, 'instance')")
    conn.executemany("INSERT INTO w(rowid, t) VALUES (?, ?)", enumerate(words))
    out = [""] * len(words)
    for term, doc in conn.execute("SELECT term, doc FROM wv ORDER BY doc, offset"):
        if not out[doc]:
            out[doc] = term
    conn.execute("DELETE FROM w")
    return out


def _ensure_vocab(conn: sqlite3.Connection, table: str) -> str:
    name = f"{_VOCAB}_{table}"
    conn.execute(f"CREATE VIRTUAL TABLE IF NOT EXISTS {name} USING fts5vocab(main, {table}, 'row')")
    return name


def doc_frequencies(conn: sqlite3.Connection, terms: Sequence[str], table: str = FTS_TABLE) -> dict[str, int]:
    """How many texts hold each (stemmed) term, from the FTS5 index itself (0 when none)."""
    vocab = _ensure_vocab(conn, table)
    out = dict.fromkeys(terms, 0)
    if terms:
        q = ",".join("?" * len(terms))
        out.update(dict(conn.execute(f"SELECT term, doc FROM {vocab} WHERE term IN ({q})", list(terms))))
    return out


def doc_count(conn: sqlite3.Connection, table: str = FTS_TABLE) -> int:
    """Texts in the FTS5 index. FTS5 keeps the count in its 'averages' record (row 1 of the
    %_data table: a varint), so this is one lookup, not a scan; a table without it is counted."""
    row = conn.execute(f"SELECT block FROM {table}_data WHERE id = 1").fetchone()
    if row and row[0]:
        n = 0
        for byte in row[0][:9]:  # SQLite varint: big-endian, 7 bits a byte, high bit = more
            n = (n << 7) | (byte & 0x7F)
            if not byte & 0x80:
                return n
    return int(conn.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0])


def select_terms(conn: sqlite3.Connection, query: str, keep_one: bool = True, table: str = FTS_TABLE,
                 max_df: float | None = None, budget: int | None = None) -> list[str]:
    """The query's content words to match (see the docstring): rarest first while the texts
    holding them stay within `budget` (POSTINGS_BUDGET), none held by more than `max_df` (MAX_DF)
    of the texts or by none. When no word fits, the rarest if `keep_one`, else none. Words, not
    stems (FTS5 stems them again when it reads the expression), in the query's order."""
    words = query_terms(query)
    if not words:
        return []
    stemmed = stems(words)
    df = doc_frequencies(conn, [s for s in set(stemmed) if s], table)
    present = sorted((df[s], i) for i, s in enumerate(stemmed) if s and df.get(s, 0) > 0)
    if not present:
        return []
    common = (MAX_DF if max_df is None else max_df) * doc_count(conn, table)
    left = POSTINGS_BUDGET if budget is None else budget
    kept = []
    for d, i in present:
        if d > common or d > left:
            break
        kept.append(i)
        left -= d
    if not kept and keep_one:
        kept = [present[0][1]]
    return [words[i] for i in sorted(kept)]


def search_texts(conn: sqlite3.Connection, query: str, limit: int, keep_one: bool = True,
                 max_df: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(variant keys, scores) of the `limit` best texts for `query`, best first."""
    expr = _quote(select_terms(conn, query, keep_one, max_df=max_df))
    if not expr or limit < 1:
        return np.zeros(0, np.int64), np.zeros(0, np.float64)
    rows = conn.execute(
        f"SELECT rowid, -bm25({FTS_TABLE}) FROM {FTS_TABLE} WHERE {FTS_TABLE} MATCH ? "
        f"ORDER BY bm25({FTS_TABLE}) LIMIT ?",
        (expr, int(limit)),
    ).fetchall()
    keys = np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))
    scores = np.fromiter((r[1] for r in rows), dtype=np.float64, count=len(rows))
    return keys, scores


def bm25_matrix(queries: Sequence[str], texts: Sequence[str], keep_one: bool = True,
                max_df: float | None = None) -> np.ndarray:
    """(len(queries), len(texts)) BM25 scores (higher is better, 0 = no shared word), computed by
    FTS5 with the store's tokenizer and term selection over `texts` as the collection."""
    conn = sqlite3.connect(":memory:")
    try:
        conn.execute(f"CREATE VIRTUAL TABLE t USING fts5(text, tokenize='{TOKENIZER}')")
        conn.executemany("INSERT INTO t(rowid, text) VALUES (?, ?)", ((i, s) for i, s in enumerate(texts)))
        out = np.zeros((len(queries), len(texts)), dtype=np.float64)
        for q, query in enumerate(queries):
            expr = _quote(select_terms(conn, query, keep_one, table="t", max_df=max_df))
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
