"""Lexical search (FTS5, schema v4) kept in step with the store, verify's check of it, and the
retrieval modes (dense / lexical / hybrid, query constraints, --explain, --min-score) on an index
built with the deterministic fake embedder."""

from __future__ import annotations

import json
import sqlite3

import numpy as np
import pytest
from fake_embedder import FakeEmbedder
from helpers_search import text_search

from edge_t2t.index import schema
from edge_t2t.index import store as store_mod
from edge_t2t.index.indexer import Indexer
from edge_t2t.index.store import NewText, Store
from edge_t2t.index.verify import verify_index
from edge_t2t.query import lexical, query_parse, retrieval
from edge_t2t.query import search as S
from edge_t2t.query.searcher import Searcher
from edge_t2t.records import Feature, Variant

SCENES = {
    # name -> variants (one_sentence, features)
    "port.jpg": [("boats moored in a harbour", [("storage tanks", "north", "large"), ("harbour", "south", "large")])],
    "airfield_a.jpg": [("an airfield with a runway and trees", [("runway", "west", "large"), ("forest", "east", "small")])],
    "airfield_b.jpg": [("an airfield with a runway and trees", [("runway", "east", "large"), ("forest", "west", "small")])],
    "town.jpg": [("houses and roads of a small town", [("buildings", "centre", "medium")])],
    "depot.jpg": [("fuel depot with tank 42 beside a road", [("storage tanks", "centre", "small")])],
}


def write_captions(path):
    with open(path, "w") as fh:
        for name, variants in SCENES.items():
            vs = [{"one_sentence": s, "features": [{"name": n, "position": p, "size": z} for n, p, z in f]}
                  for s, f in variants]
            fh.write(json.dumps({"image": name, "variants": vs}) + "\n")
    return path


@pytest.fixture
def emb():
    return FakeEmbedder()


@pytest.fixture
def index(tmp_path, emb):
    ix = tmp_path / "ix"
    Indexer(ix, embedder=emb, dtype="f32").run([], captions_file=write_captions(tmp_path / "c.jsonl"))
    return ix


def fts_rows(ix) -> set[int]:
    with Store(ix) as st:
        return {r[0] for r in st.conn.execute("SELECT rowid FROM texts_fts WHERE texts_fts MATCH 'tank OR runway OR harbour OR house OR boat'")}


# -- store ------------------------------------------------------------------------------------


def test_v2_store_migrates_and_its_texts_become_searchable(tmp_path):
    ix = tmp_path / "ix"
    ix.mkdir()
    conn = sqlite3.connect(ix / store_mod.STORE_FILE, isolation_level=None)
    assert schema.migrate(conn, schema.MIGRATIONS[:2]) == 2
    conn.execute("INSERT INTO images(id, path, status, indexed_at) VALUES (1, '/x/a.jpg', 'ok', 1.0)")
    conn.execute("INSERT INTO variants(image_id, ordinal, field, one_sentence, features, caption, text, vector) "
                 "VALUES (1, 0, 'sentence', 's', '[]', '', 'large storage tanks by the quay', x'00')")
    conn.close()
    with Store(ix) as st:
        assert st.conn.execute("PRAGMA user_version").fetchone()[0] == schema.SCHEMA_VERSION
        keys, scores = lexical.search_texts(st.conn, "a tank", 5)  # porter stemming: tank ~ tanks
        assert keys.tolist() == [1] and scores[0] > 0


def test_fts_follows_inserts_deletes_and_cascades(index):
    with Store(index) as st:
        n_texts = st.counts()["texts"]
        assert st.conn.execute("SELECT COUNT(*) FROM texts_fts WHERE texts_fts MATCH 'tank'").fetchone()[0] >= 2
        with st.transaction():
            image_id = st.put_image("/x/new.jpg")
            [key] = st.add_texts(image_id, [NewText(0, "one_sentence", Variant("a tiny heliport"), "a tiny heliport",
                                                    np.ones(64, np.float32) / 8)])
        assert lexical.search_texts(st.conn, "heliport", 5)[0].tolist() == [key]
        with st.transaction():
            st.put_image("/x/new.jpg")  # replacing the image cascades to its texts
        assert lexical.search_texts(st.conn, "heliport", 5)[0].tolist() == []
        assert st.counts()["texts"] == n_texts
    assert verify_index(index, check_models=False).checks["fts"]["ok"] is True


def test_verify_finds_an_fts_out_of_step_and_repair_rebuilds_it(index):
    with Store(index) as st, st.transaction() as conn:
        conn.execute("DROP TRIGGER texts_fts_insert")
        image_id = st.put_image("/x/late.jpg")
        st.add_texts(image_id, [NewText(0, "one_sentence", Variant("a lone lighthouse"), "a lone lighthouse",
                                        np.ones(64, np.float32) / 8)])
        conn.execute(next(sql for sql in schema.LEAN_AFTER_VECTORS if "TRIGGER texts_fts_insert" in sql))
    rep = verify_index(index, check_models=False)
    assert not rep.ok and rep.checks["fts"]["ok"] is False
    assert any("full-text index" in p and "--repair" in p for p in rep.problems)
    fixed = verify_index(index, repair=True, check_models=False)
    assert fixed.repaired and fixed.checks["fts"]["ok"] is True
    with Store(index) as st:
        assert len(lexical.search_texts(st.conn, "lighthouse", 5)[0]) == 1


def test_lexical_arguments_and_edges(index):
    """The keyword arguments mean what the module constants mean, and one hit asked is one given."""
    with Store(index) as st:
        n = st.counts()["texts"]
        keys, scores = lexical.search_texts(st.conn, "tank 42", 1)
        assert len(keys) == len(scores) == 1
        assert lexical.select_terms(st.conn, "tank 42 zeppelin", max_df=2.5 / n) == ["42"]  # "tank": 3 texts
        assert lexical.select_terms(st.conn, "runway tank 42", max_df=1.0, budget=4) == ["tank", "42"]
        assert len(lexical.search_texts(st.conn, "tank 42", 5, max_df=2.5 / n)[0]) == 1  # the text with "42"


def test_bm25_matrix_term_rules_and_doc_count():
    texts = ["a tank farm", "a tank depot", "a tank yard", "a runway"]
    # "tank" is in 3 of 4 texts, more than MAX_DF (half): matched only when the rarest is kept
    assert (lexical.bm25_matrix(["tank"], texts)[0] > 0).tolist() == [True, True, True, False]
    assert not lexical.bm25_matrix(["tank"], texts, keep_one=False).any()
    assert (lexical.bm25_matrix(["tank"], texts, keep_one=False, max_df=1.0)[0] > 0).sum() == 3
    # exactly half is not more than half: matched (BM25's idf is 0 there, which FTS5 floors above 0)
    half = lexical.bm25_matrix(["tank"], ["a tank farm", "a tank depot", "a runway", "a road"], keep_one=False)
    assert (half[0] > 0).tolist() == [True, True, False, False]
    # a query with no content word scores nothing, and the queries after it are still scored
    m = lexical.bm25_matrix(["the of", "runway"], texts)
    assert not m[0].any() and (m[1] > 0).tolist() == [False, False, False, True]
    # FTS5 keeps its row count as a varint: 300 takes two bytes
    conn = sqlite3.connect(":memory:", isolation_level=None)
    conn.execute(f"CREATE VIRTUAL TABLE t USING fts5(text, tokenize='{lexical.TOKENIZER}')")
    conn.executemany("INSERT INTO t(rowid, text) VALUES (?, ?)", ((i, "a word") for i in range(300)))
    assert lexical.doc_count(conn, "t") == 300


def test_normalise_rows_divides_by_the_best_left_in():
    s = np.array([[2.0, 4.0, 1.0], [0.0, 0.0, 0.0], [0.5, 0.25, 0.0], [0.0, 3.0, 0.0]])
    assert lexical.normalise_rows(s).tolist() == [[0.5, 1.0, 0.25], [0, 0, 0], [1.0, 0.5, 0.0], [0, 1.0, 0]]
    # the excluded column (a query's own text) is left out of the maximum, not out of the row; a
    # row with nothing else above 0 is left as it is
    ex = np.array([[False, True, False]] * 4)
    assert lexical.normalise_rows(s, ex).tolist() == [[1.0, 2.0, 0.5], [0, 0, 0], [1.0, 0.5, 0.0], [0, 3.0, 0]]
    assert lexical.normalise_rows(np.zeros((2, 0))).shape == (2, 0)


def test_match_expression_quotes_words():
    assert lexical.match_expression('runway "09" OR NOT tanks*') == '"runway" OR "09" OR "not" OR "tanks"'
    assert lexical.match_expression("the of a") == ""


# -- retrieval --------------------------------------------------------------------------------


def names(hits):
    return [h.image.rsplit("/", 1)[-1] for h in hits]


def test_dense_without_place_words_ranks_as_rank_images(index, emb):
    hits = text_search(index, "boats in a harbour", k=5, embedder=emb, mode="dense")
    with Searcher(index) as searcher:
        plain = S.rank_images(searcher.store, searcher.vectors, emb.embed(["boats in a harbour"]), 5)
    assert [(h.image, h.score, h.text) for h in hits] == [(h.image, h.score, h.text) for h in plain]
    assert all(h.parts["structure"] == 0 and h.parts["lexical"] == 0 for h in hits)


def test_lexical_finds_exact_words(index, emb, monkeypatch):
    monkeypatch.setattr(lexical, "MAX_DF", 1.0)  # every word matched, however common
    hits = text_search(index, "tank 42", k=5, embedder=emb, mode="lexical")
    assert names(hits)[0] == "depot.jpg" and hits[0].score == pytest.approx(1.0)
    assert all(0 < h.score <= 1 for h in hits)
    # the port's feature text says "storage tanks" (one word shared); the town's texts share none
    assert names(hits) == ["depot.jpg", "port.jpg"] and hits[1].score < 1
    assert "tank 42" in hits[0].text  # a lexical-only hit shows its best text too
    # the best image scores 1 also when its BM25 is below 1 ("runway": in 4 texts, both airfields alike)
    hits = text_search(index, "runway", k=5, embedder=emb, mode="lexical")
    assert names(hits) == ["airfield_a.jpg", "airfield_b.jpg"] and [h.parts["lexical"] for h in hits] == [1.0, 1.0]


def test_common_words_are_not_matched_and_cost_nothing(index, emb, monkeypatch):
    with Store(index) as st:
        n = st.counts()["texts"]
        assert lexical.doc_count(st.conn) == n  # FTS5's own count, read in one lookup
        df = lexical.doc_frequencies(st.conn, lexical.stems(["tanks", "42", "zeppelin"]))
        assert df == {"tank": 3, "42": 1, "zeppelin": 0}
        monkeypatch.setattr(lexical, "MAX_DF", 2.5 / n)  # "tank" (3 texts) is now common, "42" (1) is not
        assert lexical.select_terms(st.conn, "tank 42 zeppelin") == ["42"]
        # only common words: lexical mode keeps the rarest, hybrid's lexical side matches nothing
        assert lexical.doc_frequencies(st.conn, ["runwai"])["runwai"] == 4  # porter's stem of "runway"
        assert lexical.select_terms(st.conn, "the runway tanks") == ["tanks"]
        assert lexical.select_terms(st.conn, "the runway tanks", keep_one=False) == []
        assert lexical.search_texts(st.conn, "zeppelin", 5)[0].tolist() == []
        # the postings budget: rarest first while the texts holding the words fit (tank 3, runway 4)
        monkeypatch.setattr(lexical, "MAX_DF", 1.0)
        assert lexical.select_terms(st.conn, "runway tank 42") == ["runway", "tank", "42"]
        monkeypatch.setattr(lexical, "POSTINGS_BUDGET", 4)
        assert lexical.select_terms(st.conn, "runway tank 42") == ["tank", "42"]
        monkeypatch.setattr(lexical, "POSTINGS_BUDGET", 0)
        assert lexical.select_terms(st.conn, "runway tank 42") == ["42"]  # keep_one: the rarest
        assert lexical.select_terms(st.conn, "runway tank 42", keep_one=False) == []
        monkeypatch.setattr(lexical, "MAX_DF", 2.5 / n)
        monkeypatch.setattr(lexical, "POSTINGS_BUDGET", 10**9)
    hits = text_search(index, "tank 42", k=5, embedder=emb, mode="lexical")
    assert names(hits) == ["depot.jpg"]  # "tank" no longer matched: only the text with "42"
    # only common words: lexical mode still matches the rarest, and its best image scores 1
    hits = text_search(index, "the runway tanks", k=5, embedder=emb, mode="lexical")
    assert sorted(names(hits)) == ["depot.jpg", "port.jpg"] and hits[0].parts["lexical"] == 1.0
    hybrid = text_search(index, "a runway with tanks", k=5, embedder=emb, mode="hybrid")
    assert all(h.parts["lexical"] == 0 for h in hybrid)  # nothing rare to match
    dense = text_search(index, "a runway with tanks", k=5, embedder=emb, mode="dense")
    # the dense order, each score the dense one over the mix's range (1 + w)
    assert [h.image for h in hybrid] == [h.image for h in dense]
    assert [h.score for h in hybrid] == pytest.approx([h.score / (1 + retrieval.LEXICAL_WEIGHT) for h in dense])


def test_structure_tells_east_from_west(index, emb):
    a = text_search(index, "a forest east of a runway", k=2, embedder=emb, mode="dense", explain=True)
    b = text_search(index, "a forest west of a runway", k=2, embedder=emb, mode="dense", explain=True)
    assert names(a)[0] == "airfield_a.jpg" and names(b)[0] == "airfield_b.jpg"
    assert a[0].matched == ({"constraint": "forest east of runway", "score": 1.0},)
    assert a[0].score == pytest.approx(a[0].parts["dense"] + retrieval.STRUCTURE_WEIGHT)
    every = text_search(index, "a forest west of a runway", k=5, embedder=emb, mode="dense", explain=True)
    reverse = every[names(every).index("airfield_a.jpg")]
    assert reverse.matched[0]["score"] == 0.0 and reverse.parts["structure"] == 0.0  # the reverse relation
    flat = text_search(index, "a forest west of a runway", k=2, embedder=emb, mode="dense", structure=False)
    assert all(h.parts["structure"] == 0 and not h.matched for h in flat)
    # the text score is the score without its structure part; --explain alone adds the constraints
    assert a[0].parts["text_score"] == pytest.approx(a[0].parts["dense"], abs=1e-6)
    assert not text_search(index, "a forest east of a runway", k=1, embedder=emb, mode="dense")[0].matched
    # half a region (the port's tanks are in the north, not the north-east)
    half = text_search(index, "storage tanks in the north-east", k=5, embedder=emb, mode="dense", explain=True)
    assert half[names(half).index("port.jpg")].parts["structure"] == 0.5


def test_hybrid_text_score_follows_the_weight(index, emb):
    """retrieval.rank with a non-default lexical weight: every candidate's text score is the mix
    (dense + w * lexical) / (1 + w) and its score adds the structure (weight 1)."""
    q = "a forest east of a runway"
    with Searcher(index) as searcher:
        cands = retrieval.rank(searcher.store, searcher.vectors, q, emb.embed([q]), 5, "hybrid", "exact",
                               lexical_weight=1.0)
    assert any(c.lexical > 0 for c in cands) and any(c.structure > 0 for c in cands)
    for c in cands:
        assert c.text_score == pytest.approx((c.dense + c.lexical) / 2) and c.score == pytest.approx(c.text_score + c.structure)


def test_hybrid_scores_a_lexical_find_the_dense_pool_missed(index, emb):
    """With a dense pool of one image, the lexical side still finds the depot ("42"); its dense
    part is then the cosine of the query with its matched text (computed here from the text)."""
    q = "boats moored in a harbour 42"
    qv = emb.embed([q])
    with Searcher(index) as searcher:
        pool = retrieval.gather(searcher.store, searcher.vectors, q, qv, 1, vector_mode="exact", k=1)
        [depot_text] = [t for (t,) in searcher.store.conn.execute(
            "SELECT t.text FROM texts t JOIN variants v ON v.id = t.variant_id JOIN images i ON i.id = v.image_id "
            "WHERE i.path = 'depot.jpg' AND t.text LIKE '%42%'")]  # its one text holding a query word
    by_name = {c.image: c for c in pool.cands}
    assert pool.dense_order == ["port.jpg"] and "depot.jpg" in pool.lex_order
    assert by_name["depot.jpg"].dense == pytest.approx(float(emb.embed([depot_text])[0] @ qv[0]), abs=1e-6)


def test_k_above_the_image_count_returns_every_image_in_process(index, emb):
    hits = text_search(index, "a runway", k=50, embedder=emb, mode="dense", vector_mode="exact")
    assert sorted(names(hits)) == sorted(SCENES) and [h.rank for h in hits] == list(range(1, len(SCENES) + 1))


def test_structure_reranks_a_pool_larger_than_k(index, emb, monkeypatch):
    """Both airfields' best text is their one sentence, the same words, so the dense side ties
    them, broken by path: airfield_a first. With k=1 the structure (trees west of the runway)
    still lifts airfield_b from the pool (MIN_POOL), and the dense side searches with the vector
    mode asked for."""
    import inspect

    from edge_t2t.index.indexdir import SearchVectors

    modes = []

    def spy(real):
        def call(*args, **kwargs):
            modes.append(inspect.signature(real).bind(*args, **kwargs).arguments.get("mode"))
            return real(*args, **kwargs)
        return call

    monkeypatch.setattr(retrieval, "rank_images", spy(retrieval.rank_images))
    monkeypatch.setattr(SearchVectors, "search", spy(SearchVectors.search))
    q = "an airfield with trees west of a runway"
    assert names(text_search(index, q, k=1, embedder=emb, mode="dense", structure=False)) == ["airfield_a.jpg"]
    hits = text_search(index, q, k=1, embedder=emb, mode="dense", vector_mode="exact")
    assert names(hits) == ["airfield_b.jpg"] and modes[-2:] == ["exact", "exact"]  # rank_images, its search


def test_an_image_scores_its_best_variant_and_names_it():
    """The highest-scoring variant wins wherever it stands; of equal ones the first (whose
    constraints --explain shows)."""
    parsed = query_parse.parse("a forest east of a runway")
    good = (Feature("forest", "east"), Feature("runway", "west"))
    bad = (Feature("forest", "west"), Feature("runway", "east"))
    for variants, want in (([(0, bad), (1, good)], (1.0, 1)), ([(0, good), (1, bad)], (1.0, 0)),
                           ([(0, bad), (1, bad)], (0.0, 0))):
        score, results, ordinal = retrieval.best_variant_structure(parsed, variants)
        assert (score, ordinal) == want and [r.score for r in results] == [want[0]]


def test_hybrid_mixes_both_scores_and_min_score_cuts(index, emb):
    hits = text_search(index, "fuel tank", k=5, embedder=emb, mode="hybrid")
    top = hits[0]
    assert names(hits)[0] == "depot.jpg"
    cap = retrieval.LEXICAL_CAP  # when set, within the cap of the query's best BM25 counts as 1
    for h in hits:
        lex = h.parts["lexical"] if cap is None else min(1.0, h.parts["lexical"] / cap)
        w = retrieval.LEXICAL_WEIGHT  # the mix divided by its range, 1 + w (parts: 6 digits)
        assert h.score == pytest.approx((h.parts["dense"] + w * lex) / (1 + w), abs=1e-5)
    cut = text_search(index, "fuel tank", k=5, embedder=emb, mode="hybrid", min_score=top.score - 1e-9)
    assert names(cut) == ["depot.jpg"]
    assert text_search(index, "fuel tank", k=5, embedder=emb, mode="hybrid", min_score=9.0) == []
    d = top.to_dict()
    assert {"rank", "score", "image", "variant", "text", "dense", "lexical", "structure"} <= set(d)


def test_old_vector_modes_still_mean_dense(index, emb):
    a = text_search(index, "houses", k=3, embedder=emb, mode="exact")
    b = text_search(index, "houses", k=3, embedder=emb, mode="dense", vector_mode="exact")
    assert [(h.image, h.score) for h in a] == [(h.image, h.score) for h in b]
    with pytest.raises(Exception, match="unknown search mode"):
        text_search(index, "houses", k=3, embedder=emb, mode="fuzzy")


def test_help_names_the_default_mode():
    import argparse

    from edge_t2t.cli import search as cli_search

    parser = argparse.ArgumentParser()
    cli_search.register(parser.add_subparsers())
    sub = parser._subparsers._group_actions[0].choices["search"]
    assert f"(default: {retrieval.DEFAULT_MODE})" in sub.format_help().replace("\n", " ").replace("  ", " ")


# -- eval scores each mode with the search's own rule ------------------------------------------

CAPTIONS = {
    "airfield_a.jpg": ["a forest east of a runway", "an airfield with trees"],
    "airfield_b.jpg": ["a forest west of a runway", "a runway beside woodland"],
    "depot.jpg": ["fuel tank 42", "a depot by the road"],
    "port.jpg": ["large storage tanks in the north", "boats in a harbour"],
    "town.jpg": ["houses of a small town", "a town with roads"],
}


@pytest.mark.parametrize("max_df", [lexical.MAX_DF, 1.0])
@pytest.mark.parametrize("mode", ["dense", "lexical", "hybrid"])
def test_eval_ranks_each_caption_as_search_does(index, emb, tmp_path, mode, max_df, monkeypatch):
    """eval --source index --mode M: every caption's T2I rank is its target's place in
    `search --mode M` (structure on, exact vectors): one rule, not two implementations."""
    from edge_t2t.evaluation import evaluate as ev
    from edge_t2t.evaluation.dataset import load_annotations
    from edge_t2t.evaluation.index_source import load_index_vectors

    monkeypatch.setattr(lexical, "MAX_DF", max_df)

    names_ = list(CAPTIONS)
    coco = {"images": [{"id": i, "file_name": n} for i, n in enumerate(names_)],
            "annotations": [{"image_id": i, "caption": c} for i, n in enumerate(names_) for c in CAPTIONS[n]]}
    (tmp_path / "ann.json").write_text(json.dumps(coco))
    ann = load_annotations(tmp_path / "ann.json")
    stored = load_index_vectors(index, ann, with_texts=True, with_features=True)
    result = ev.index_eval(ann, stored.vectors, emb.embed, dtype="f32", mode=mode,
                           image_texts=stored.texts, image_features=stored.features)
    assert result.config["structure"] is True  # "east of", "in the north" are scored on the features
    expected = []
    for n in names_:
        for c in CAPTIONS[n]:
            hits = text_search(index, c, k=len(names_), embedder=emb, mode=mode, vector_mode="exact")
            scores = {h.image.rsplit("/", 1)[-1]: h.score for h in hits}
            # ties count against the query; a target search did not return ties with every image
            # it did not return either (lexical: all score 0), so it ranks behind all the others
            expected.append(sum(1 for img, s in scores.items() if img != n and s >= scores[n])
                            if n in scores else len(names_) - 1)
    assert result.t2i.ranks.tolist() == expected
    if mode != "lexical":
        assert expected[0] == 0 and expected[2] == 0  # east/west told apart by structure in eval too


@pytest.mark.parametrize("rule", [dict(fusion="rrf"), dict(fusion="rrf", rrf_k=5), dict(lexical_cap=0.5),
                                  dict(lexical_weight=1.0, lexical_cap=0.8)])
def test_eval_fusion_rules_rank_as_search_does(index, emb, tmp_path, rule, monkeypatch):
    """Reciprocal-rank fusion and the lexical cap score the same in eval as in the search's ranking
    (retrieval.rank, exact vectors): each caption's T2I rank is its target's place there."""
    from edge_t2t.evaluation import evaluate as ev
    from edge_t2t.evaluation.dataset import load_annotations
    from edge_t2t.evaluation.index_source import load_index_vectors

    monkeypatch.setattr(lexical, "MAX_DF", 1.0)  # every word matched, so the lexical side has ranks to fuse
    names_ = list(CAPTIONS)
    coco = {"images": [{"id": i, "file_name": n} for i, n in enumerate(names_)],
            "annotations": [{"image_id": i, "caption": c} for i, n in enumerate(names_) for c in CAPTIONS[n]]}
    (tmp_path / "ann.json").write_text(json.dumps(coco))
    ann = load_annotations(tmp_path / "ann.json")
    stored = load_index_vectors(index, ann, with_texts=True)
    result = ev.index_eval(ann, stored.vectors, emb.embed, dtype="f32", mode="hybrid", image_texts=stored.texts,
                           **rule)
    searcher = Searcher(index).open()
    store, vectors = searcher.store, searcher.vectors
    expected, scores_seen = [], set()
    try:
        for n in names_:
            for c in CAPTIONS[n]:
                cands = retrieval.rank(store, vectors, c, emb.embed([c]), len(names_), "hybrid", "exact",
                                       structure=False, **rule)
                scores = {cd.image.rsplit("/", 1)[-1]: cd.score for cd in cands}
                scores_seen.update(round(s, 9) for s in scores.values())
                expected.append(sum(1 for img, s in scores.items() if img != n and s >= scores[n]))
    finally:
        searcher.close()
    assert result.t2i.ranks.tolist() == expected
    assert len(scores_seen) > 3  # the rule does rank: not every image tied


def test_rrf_ranks_ties_alike_and_caps_saturate():
    assert retrieval.side_ranks({"a": 0.9, "b": 0.5, "c": 0.9, "d": 0.1}) == {"a": 0, "c": 0, "b": 2, "d": 3}
    from edge_t2t.evaluation.evaluate import competition_ranks

    got = competition_ranks(np.array([[0.9, 0.5, 0.9, 0.1]]), np.array([[True, True, True, False]]))
    assert got.tolist() == [[0, 2, 0, np.inf]]
    s = retrieval.fused(np.array([0.9, 0.8]), np.array([0.85, 1.0]), None, "hybrid", lexical_weight=0.5,
                        lexical_cap=0.8)
    assert s.tolist() == pytest.approx([1.4 / 1.5, 1.3 / 1.5])  # both lexical parts within the cap: dense decides
    s = retrieval.fused(np.array([0.9, 0.8]), np.array([0.4, 1.0]), None, "hybrid", lexical_weight=0.5,
                        lexical_cap=0.8)
    assert s.tolist() == pytest.approx([(0.9 + 0.25) / 1.5, 1.3 / 1.5])


@pytest.mark.parametrize("cap", [None, 0.8])
def test_structure_weighs_the_same_whatever_the_lexical_weight(cap):
    """The linear hybrid's text score spans 0..1 for every lexical weight, so one structure point
    is worth the same against it: an image with the full text score and no structure ties one with
    no text score and full structure (structure weight 1), under every weight, capped or not."""
    dense, lex = np.array([1.0, 0.0, 0.6, 0.5]), np.array([1.0, 0.0, 0.0, 0.9])
    structure = np.array([0.0, 1.0, 0.0, 0.2])
    for w in (0.05, 0.3, 1.0, 3.0):
        text = retrieval.fused(dense, lex, None, "hybrid", lexical_weight=w, lexical_cap=cap)
        assert text[0] == pytest.approx(1.0) and text[1] == 0.0  # the range is 0..1, not 0..1 + w
        s = retrieval.fused(dense, lex, structure, "hybrid", lexical_weight=w, lexical_cap=cap, structure_weight=1.0)
        assert s[0] == pytest.approx(s[1])
        assert s.tolist() == pytest.approx((text + structure).tolist())
    # dense and lexical score exactly as before: the bare part, plus the structure
    assert retrieval.fused(dense, lex, structure, "dense").tolist() == pytest.approx((dense + structure).tolist())
    assert retrieval.fused(dense, lex, structure, "lexical").tolist() == pytest.approx((lex + structure).tolist())
