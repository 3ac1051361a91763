"""End to end on synthetic scenes: `edge-t2t index DIR --captions captions.jsonl`, then the search
API, for the fixed directional queries whose answer is known exactly (edge_t2t.demo.scenes).

The thresholds are set from measurement, not from hope: the embedder (all-MiniLM-L6-v2) is weak at
compositional spatial language ("a runway east of a river" vs "a river east of a runway"), and every
scene's ground truth mentions several objects and directions. Chance with 40 scenes is 1/40 at
rank 1 and 5/40 within the top 5. See bench/results/text_mode.md for the larger measurement.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from edge_t2t import config
from edge_t2t.demo import scenes as S


@pytest.fixture(scope="module")
def scene_index(tmp_path_factory):
    if not (config.embedder_dir() / "manifest.json").is_file():
        pytest.fail(f"no embedder built in {config.embedder_dir()}: run 'make models' first")
    from edge_t2t.cli import main

    root = tmp_path_factory.mktemp("scenes")
    paths, captions = S.write_scene_set(root / "images", n=40, seed=0)
    index = root / "index"
    rc = main(["index", str(root / "images"), "--captions", str(captions), "--index", str(index),
               "--no-progress", "--json"])
    assert rc == 0
    return index, S.make_scenes(40, 0)


def test_directional_queries_with_structure(scene_index):
    """The query's places and relations scored on the stored features (edge_t2t.query.query_parse): the
    demo's 18 queries are all in its grammar and the ground-truth features are exact, so the scene
    that satisfies a query should lead. bench/results/retrieval_modes.md has 18/18 on seed 0; the
    bound leaves room, not a target."""
    from helpers_search import text_search

    from edge_t2t.embed.embedder import Embedder

    index, scenes = scene_index
    emb = Embedder(precision="int8")
    ranks = []
    for query, expected in S.directional_queries(scenes):
        names = [Path(h.image).name for h in text_search(index, query, k=40, embedder=emb, explain=True)]
        ranks.append(names.index(f"{expected}.png") + 1)
    assert sum(r == 1 for r in ranks) >= 15, ranks
    assert sum(r <= 5 for r in ranks) == 18, ranks


def test_directional_queries_rank_the_right_scene(scene_index):
    from helpers_search import text_search

    from edge_t2t.embed.embedder import Embedder

    index, scenes = scene_index
    queries = S.directional_queries(scenes)
    emb = Embedder(precision="int8")
    ranks = []
    for query, expected in queries:
        hits = text_search(index, query, k=40, embedder=emb, mode="dense", structure=False)  # text alone
        assert len(hits) == 40, "every scene is in the index"
        names = [Path(h.image).name for h in hits]
        ranks.append(names.index(f"{expected}.png") + 1)
    first = sum(r == 1 for r in ranks)
    top5 = sum(r <= 5 for r in ranks)
    print(f"directional queries: {first}/{len(ranks)} first, {top5}/{len(ranks)} in the top 5; ranks {ranks}")
    # Measured 2026-11-27 (int8 embedder, i8 index with re-scoring, default 'sentences' text mode):
    # 9/18 first, 15/18 in the top 5 (ranks 5,1,20,4,21,4,1,1,1,1,1,1,4,4,15,1,2,1). The older
    # 'joined' mode gave 2/18 and 9/18. Chance: 0.45/18 and 2.25/18. The bounds leave a little room
    # for int8 kernels that round differently on other CPUs; "most first" is not reached: the
    # embedder is weak at "X east of Y" against "Y east of X".
    assert first >= 7, ranks
    assert top5 >= 13, ranks


def test_scores_are_max_over_variants(scene_index):
    """A scene's own one-sentence summary, used as the query, finds that scene first, through the
    variant the sentence came from."""
    from helpers_search import text_search

    from edge_t2t.embed.embedder import Embedder

    index, scenes = scene_index
    emb = Embedder(precision="int8")
    for scene in scenes[:5]:
        sentence = S.describe(scene, seed=0).variants[2].one_sentence
        hits = text_search(index, sentence, k=3, embedder=emb)
        assert Path(hits[0].image).name == scene.file_name, (sentence, hits[0])
        assert hits[0].variant == 2 and sentence in hits[0].text, hits[0]
