"""The query parser (edge_t2t.query.query_parse): its written grammar, synonyms, and the constraint
scores, checked against the synthetic scenes' own ground-truth predicates."""

from __future__ import annotations

import pytest

from edge_t2t.demo import scenes as S
from edge_t2t.query import query_parse as Q
from edge_t2t.records import Feature


def described(c):
    return [x.describe() for x in c.constraints]


@pytest.mark.parametrize(("query", "form", "expected"), [
    ("a forest east of a runway", "rel", ["forest east of runway"]),
    ("The runway lies to the north east of the forest.", "rel", ["runway north-east of forest"]),
    ("storage tanks in the south", "at", ["storage tanks in the south"]),
    ("tanks in the upper left part", "at", ["tanks in the north-west"]),
    ("a large lake in the north-west", "at", ["large lake", "lake in the north-west"]),
    ("a lake in the north-west with a runway to the east", "at_with",
     ["lake in the north-west", "runway east of lake"]),
    ("buildings next to a river", "near", ["buildings next to river"]),
    ("houses are near the road", "near", ["houses next to road"]),
    ("a bridge between a river and a road", "between", ["bridge between river and road"]),
    ("a big stadium", "bare", ["large stadium"]),
    ("a small pond in the center", "at", ["small pond", "pond in the centre"]),
])
def test_grammar_forms(query, form, expected):
    parsed = Q.parse(query)
    assert parsed.form == form and described(parsed) == expected


@pytest.mark.parametrize("query", ["storage tanks", "many planes parked near", "a stadium with a green field",
                                   "east", "", "runway 09"])
def test_queries_without_place_words_give_no_constraints(query):
    assert not Q.parse(query)


def test_synonyms_name_the_same_kind():
    assert Q.mentions("airstrip", "runway running north-south")
    assert Q.mentions("woodland", "patch of dense trees")
    assert Q.mentions("tanks", "cylindrical tanks")
    assert Q.mentions("storage tanks", "oil tanks")
    assert not Q.mentions("lake", "meandering river running north-south")
    assert Q.mentions("stadium", "large stadium")  # unknown nouns match by head word
    assert not Q.mentions("stadium", "parking lot")
    assert Q.mentions("cars", "car park")  # a four-letter plural is singular too


def test_relations_on_the_grid():
    lake = Feature("lake", "north-west", "small")
    runway = Feature("airstrip", "east", "large")
    river = Feature("river running north-south", "centre", "large")  # a line down the middle column
    parsed = Q.parse("a runway east of a lake")
    assert Q.score_features(parsed, [lake, runway])[0] == 1.0
    assert Q.score_features(Q.parse("a lake east of a runway"), [lake, runway])[0] == 0.0
    assert Q.score_features(Q.parse("a runway east of a river"), [river, runway])[0] == 1.0
    assert Q.score_features(Q.parse("a runway north of a river"), [river, runway])[0] == 0.0  # undefined: a line
    assert Q.score_features(Q.parse("a river between a lake and a runway"), [lake, runway, river])[0] == 1.0
    assert Q.score_features(Q.parse("a lake next to a runway"), [lake, runway])[0] == 0.0  # two columns apart
    # a region half right scores half; a missing object scores nothing
    score, results = Q.score_features(Q.parse("a lake in the north"), [lake])
    assert score == 0.5 and results[0].score == 0.5
    assert Q.score_features(Q.parse("a forest in the north"), [lake])[0] == 0.0
    score, results = Q.score_features(Q.parse("a large lake in the north-west"), [lake])
    assert score == 0.5 and [r.score for r in results] == [0.0, 1.0]


def test_full_score_exactly_when_the_scene_satisfies_the_query():
    """Every template query of the synthetic scenes (edge_t2t.demo.scenes) is read by the grammar, and
    a scene's best variant scores 1 exactly when the scene's placed objects satisfy the query."""
    specs = S.all_query_specs()
    assert all(Q.parse(s.text) for s in specs)
    scenes = S.make_scenes(12, seed=7)
    records = {s.id: S.describe(s, seed=7) for s in scenes}
    checked = satisfied = 0
    for spec in specs[::5]:
        parsed = Q.parse(spec.text)
        for scene in scenes:
            best = max(Q.score_features(parsed, v.features)[0] for v in records[scene.id].variants)
            assert (best == 1.0) == spec.matches(scene), (spec.text, scene.id, best)
            checked += 1
            satisfied += spec.matches(scene)
    assert checked > 3000 and satisfied > 50  # both outcomes were exercised


def test_parse_gives_every_field():
    """The whole parse, not only its description: each constraint's kind, value and other noun
    phrases, the query text and the form (expected values read off the grammar in the docstring)."""
    C, P = Q.Constraint, Q.ParsedQuery
    q = "a bridge between a river and a road"
    assert Q.parse(q) == P(q, (C("between", "bridge", "", ("river", "road")),), "between")
    q = "houses are near the road"
    assert Q.parse(q) == P(q, (C("near", "houses", "", ("road",)),), "near")
    q = "a large lake in the north-west with a small runway to the east"  # sizes of both noun phrases kept
    assert Q.parse(q) == P(q, (C("size", "lake", "large"), C("size", "runway", "small"), C("at", "lake", "north-west"),
                               C("rel", "runway", "east", ("lake",))), "at_with")
    for q in ("storage tanks", "runway 09"):  # a bare noun without a size word; no form at all
        assert Q.parse(q) == P(q)


def test_grid_rules_at_their_edges():
    """Each geometric rule at its boundary, worked out by hand on the 3x3 grid (row 0 north,
    column 0 west; a river at a single compass word is a line along that column)."""
    f = Feature

    def score(query, *features):
        return Q.score_features(Q.parse(query), list(features))[0]

    lake_nw = f("lake", "north-west")
    # rel: a two-part direction needs both parts (the runway is east of the lake, not north of it)
    assert score("a runway north-east of a lake", lake_nw, f("runway", "east")) == 0.0
    assert score("a runway north-east of a lake", f("lake", "west"), f("runway", "north-east")) == 1.0
    # at: one shared compass part scores half, both ways round; opposite cells, the centre and a
    # position that is not one of the nine cells score nothing
    assert score("a lake in the north-west", f("lake", "north")) == 0.5
    assert score("a lake in the north", f("lake", "south")) == 0.0
    assert score("a lake in the north", f("lake", "centre")) == 0.0
    assert score("a lake in the east", f("lake", "east-central")) == 0.0
    # near: at most one step on each axis; a line is near what lies beside it
    assert score("a lake next to a runway", lake_nw, f("runway", "north")) == 1.0
    assert score("a lake next to a runway", f("lake", "south-east"), f("runway", "south")) == 1.0
    assert score("a lake next to a river", lake_nw, f("river", "centre")) == 1.0
    assert score("a lake next to a river", lake_nw, f("river", "east")) == 0.0
    # between: strictly between on the rows or on the columns
    q = "a lake between a runway and a forest"
    assert score(q, f("lake", "centre"), f("runway", "north"), f("forest", "south")) == 1.0  # rows only
    assert score(q, lake_nw, f("runway", "south-west"), f("forest", "north-east")) == 0.0  # at an end, not between
    assert score(q, f("lake", "south-west"), f("runway", "north-west"), f("forest", "south-east")) == 0.0
    # a query without constraints scores nothing
    assert Q.score_features(Q.parse("storage tanks"), [lake_nw]) == (0.0, [])
