"""Retrieval metrics on hand-made cases (answers worked out by hand in the comments), annotation
parsing, and the oracle protocol against an independent loop-based computation on real RSICD
captions with the real fp32 embedder."""

from __future__ import annotations

import json

import numpy as np
import pytest

from edge_t2t.errors import InputError
from edge_t2t.evaluation import evaluate as ev
from edge_t2t.evaluation.dataset import from_lists, load_annotations
from edge_t2t.evaluation.index_source import load_index_vectors
from edge_t2t.index import quantise


def fake_embedder(table: dict[str, tuple[float, ...]]):
    """An 'embedder' returning hand-chosen vectors, so every cosine below is known exactly."""

    def embed(texts: list[str]) -> np.ndarray:
        assert len(texts) == len(set(texts)), "each distinct text must be embedded once"
        return np.asarray([table[t] for t in texts], dtype=np.float32)

    return embed


# ---------------------------------------------------------------------------------------------
# Primitives


def test_tie_counts_against_the_query():
    # Target scores 0.8; one other candidate also scores 0.8 -> that tie counts: rank 1, not 0.
    assert ev.pessimistic_rank(0.8, np.array([0.8, 0.5])) == 1
    # Strictly best -> rank 0.
    assert ev.pessimistic_rank(0.8, np.array([0.79, 0.5])) == 0
    # 0.9 beats, two 0.8s tie: all three count.
    assert ev.pessimistic_rank(0.8, np.array([0.9, 0.8, 0.8, 0.1])) == 3
    # No other candidates at all: rank 0.
    assert ev.pessimistic_rank(0.3, np.array([])) == 0


def test_recall_at_k_by_hand():
    # ranks 0,1,4,9,10: <1 -> one of five (20 %); <5 -> 0,1,4 (60 %); <10 -> 0,1,4,9 (80 %).
    assert ev.recall_at(np.array([0, 1, 4, 9, 10])) == {"R@1": 20.0, "R@5": 60.0, "R@10": 80.0}
    # No queries: undefined, not zero.
    assert ev.recall_at(np.array([], dtype=int)) == {"R@1": None, "R@5": None, "R@10": None}
    assert ev.mean_or_none([10.0, 20.0, None]) is None
    assert ev.mean_or_none([10.0, 20.0, 60.0]) == 30.0


def test_distinct_texts_and_group_max():
    texts, ids = ev.distinct_texts(["b", "a", "b", "c", "a"])
    assert texts == ["b", "a", "c"]
    assert ids.tolist() == [0, 1, 0, 2, 1]
    scores = np.array([[1.0, 5.0, 2.0, 7.0], [3.0, 0.0, 4.0, -1.0]])
    # columns belong to groups 2,0,2,0 -> group 0 = max(col1, col3), group 1 empty, group 2 = max(col0, col2)
    out = ev.group_max(scores, np.array([2, 0, 2, 0]), 3)
    assert out[:, 0].tolist() == [7.0, 0.0]
    assert np.isneginf(out[:, 1]).all()
    assert out[:, 2].tolist() == [2.0, 4.0]


def test_exact_scores_use_the_index_exact_copy():
    v = np.array([[0.5, -0.5, 0.7071, 0.0]], dtype=np.float32)
    v /= np.linalg.norm(v)
    # an f16 or i8 index keeps a float16 copy for exact search; f32 keeps float32
    assert quantise.as_exact(v, "i8").tolist() == v.astype(np.float16).astype(np.float64).tolist()
    assert quantise.as_exact(v, "f16").tolist() == quantise.as_exact(v, "i8").tolist()
    assert quantise.as_exact(v, "f32").tolist() == v.astype(np.float64).tolist()
    q = np.array([[0.6, 0.8, 0.0, 0.0]], dtype=np.float32)
    assert ev.stored_scores(q, v, "i8")[0, 0] == pytest.approx(float(q[0] @ v[0].astype(np.float16).astype(np.float32)))
    with pytest.raises(ValueError):
        quantise.as_exact(v, "i4")


def test_i8_graph_codes_are_rounded_per_vector():
    v = np.array([[0.5, -0.5, 0.7071, 0.0]], dtype=np.float32)
    # scaled so the largest component is 127, then ROUNDED: 0.5/0.7071*127 = 89.8 -> 90
    assert quantise.graph_codes(v, "i8").tolist() == [[90, -90, 127, 0]]
    assert quantise.graph_codes(v, "i8").dtype == np.int8
    assert quantise.as_graph(v, "f16").tolist() == v.astype(np.float16).astype(np.float64).tolist()


def test_usearch_stores_the_i8_codes_as_given():
    from edge_t2t.index.vindex import new_graph

    rng = np.random.default_rng(0)
    v = rng.standard_normal((5, 16)).astype(np.float32)
    graph = new_graph(16, "i8")
    graph.add(np.arange(5, dtype=np.uint64), quantise.graph_codes(v, "i8"))
    assert np.array_equal(np.asarray(graph.get(np.arange(5, dtype=np.uint64), dtype=np.int8)),
                          quantise.graph_codes(v, "i8"))


# ---------------------------------------------------------------------------------------------
# Oracle protocol, case 1: ties across images, k larger than the corpus.
#
# Images A: [a1, a2]   B: [b1, b2]   C: [a1 (verbatim the same as A's), c2]
# Vectors (3-D unit): a1=(1,0,0) a2=(.8,0,.6) b1=(0,1,0) b2=(0,.6,.8) c2=(0,0,1)
# Cosines: a1.a2=.8  a2.b2=.48  a2.c2=.6  b1.b2=.6  b2.c2=.8  every other pair 0 (exactly).

CASE1_VECTORS = {
    "a1": (1.0, 0.0, 0.0),
    "a2": (0.8, 0.0, 0.6),
    "b1": (0.0, 1.0, 0.0),
    "b2": (0.0, 0.6, 0.8),
    "c2": (0.0, 0.0, 1.0),
}


def case1():
    return from_lists(["A", "B", "C"], [(0, "a1"), (0, "a2"), (1, "b1"), (1, "b2"), (2, "a1"), (2, "c2")])


def test_oracle_case1_t2i_by_hand():
    result = ev.oracle_eval(case1(), fake_embedder(CASE1_VECTORS))
    # T2I, query caption -> own image represented by its OTHER captions, others by all captions:
    #  a1 of A: A={a2}: .8 ; B: 0 ; C={a1,c2}: 1.0 beats          -> rank 1
    #  a2 of A: A={a1}: .8 ; B: max(0,.48)=.48 ; C: max(.8,.6)=.8 TIES (same a1 vector) -> rank 1
    #  b1 of B: B={b2}: .6 ; A: 0 ; C: 0                          -> rank 0
    #  b2 of B: B={b1}: .6 ; A: max(0,.48)=.48 ; C: max(0,.8)=.8  -> rank 1
    #  a1 of C: C={c2}: 0  ; A: 1.0 beats ; B: 0 ties             -> rank 2
    #  c2 of C: C={a1}: 0  ; A: max(0,.6)=.6 ; B: max(0,.8)=.8    -> rank 2
    assert result.t2i.ranks.tolist() == [1, 1, 0, 1, 2, 2]
    assert not result.t2i.dup.any()
    out = result.to_json()
    # R@1: one query of six at rank 0. Only 3 images: every rank < 5, so R@5 = R@10 = 100 (k > corpus).
    assert out["t2i"] == {"R@1": pytest.approx(100 / 6), "R@5": 100.0, "R@10": 100.0}


def test_oracle_case1_i2t_by_hand():
    result = ev.oracle_eval(case1(), fake_embedder(CASE1_VECTORS))
    # I2T, (image, caption j): query set = the image's other captions; database = every caption
    # except those other captions; score = max cosine over the query set.
    #  A,a1: Q={a2}. a1(A)=.8 target; b1=0 b2=.48 a1(C)=.8 TIE c2=.6  -> rank 1
    #  A,a2: Q={a1}. a2=.8 target; b1=0 b2=0 a1(C)=1.0 c2=0           -> rank 1
    #  B,b1: Q={b2}. b1=.6 target; a1=0 a2=.48 a1(C)=0 c2=.8          -> rank 1
    #  B,b2: Q={b1}. b2=.6 target; a1=0 a2=0 a1(C)=0 c2=0             -> rank 0
    #  C,a1: Q={c2}. a1(C)=0 target; a1(A)=0 tie, a2=.6, b1=0 tie, b2=.8 -> rank 4
    #  C,c2: Q={a1}. c2=0 target; a1(A)=1, a2=.8, b1=0 tie, b2=0 tie     -> rank 4
    assert result.i2t.ranks.tolist() == [1, 1, 1, 0, 4, 4]
    out = result.to_json()
    assert out["i2t"] == {"R@1": pytest.approx(100 / 6), "R@5": 100.0, "R@10": 100.0}
    # mR = mean of the six: (100/6 + 100 + 100) * 2 / 6
    assert out["mR"] == pytest.approx((100 / 6 + 200) / 3)
    assert out["t2i_mean"] == pytest.approx((100 / 6 + 200) / 3)
    # no verbatim duplicate within an image: nodup equals the total
    assert out["t2i_nodup"] == out["t2i"] and out["i2t_nodup"] == out["i2t"]
    assert out["counts"]["t2i_queries"] == 6 and out["counts"]["i2t_queries"] == 6
    assert out["counts"]["t2i_queries_dup"] == 0 and out["counts"]["t2i_candidates"] == 3


# ---------------------------------------------------------------------------------------------
# Oracle protocol, case 2: a verbatim duplicate in one image, a single-caption image, and an
# image without captions.
#
# P: [p, p, q]   R: [r, s]   S: [t] (single caption)   T: [] (no caption)
# Vectors (4-D): p=e1 q=e2 r=e3 s=(.6,0,.8,0) t=e4.  Cosines: p.s=.6  r.s=.8, all others 0.

CASE2_VECTORS = {
    "p": (1.0, 0.0, 0.0, 0.0),
    "q": (0.0, 1.0, 0.0, 0.0),
    "r": (0.0, 0.0, 1.0, 0.0),
    "s": (0.6, 0.0, 0.8, 0.0),
    "t": (0.0, 0.0, 0.0, 1.0),
}


def case2():
    return from_lists(["P", "R", "S", "T"], [(0, "p"), (0, "p"), (0, "q"), (1, "r"), (1, "s"), (2, "t")])


def test_oracle_case2_duplicates_and_missing_captions():
    result = ev.oracle_eval(case2(), fake_embedder(CASE2_VECTORS))
    # T2I. Candidates: P, R, S (T has nothing to represent it).
    #  p #1 of P: dup (the other p stays): P=max(p.p, p.q)=1 ; R=max(0,.6)=.6 ; S=0 -> rank 0
    #  p #2: the same                                                            -> rank 0
    #  q of P: P={p,p}: 0 ; R: 0 ties ; S: 0 ties                                -> rank 2
    #  r of R: R={s}: .8 ; P: 0 ; S: 0                                           -> rank 0
    #  s of R: R={r}: .8 ; P: max(.6, 0)=.6 ; S: 0                               -> rank 0
    #  t of S: S has no other caption -> skipped (counted)
    assert result.t2i.ranks.tolist() == [0, 0, 2, 0, 0]
    assert result.t2i.dup.tolist() == [True, True, False, False, False]
    # I2T.
    #  P,p #1: Q={p,q}, dup. DB={p (this one), r, s, t}: p=1 target, r=0, s=.6, t=0 -> rank 0
    #  P,p #2: the same                                                             -> rank 0
    #  P,q: Q={p}. DB={q, r, s, t}: q=0 target, r=0 tie, s=.6, t=0 tie               -> rank 3
    #  R,r: Q={s}. DB={r, p, p, q, t}: r=.8 target, p=.6 (twice), q=0, t=0            -> rank 0
    #  R,s: Q={r}. DB={s, p, p, q, t}: s=.8 target, the rest 0                        -> rank 0
    #  S,t: empty query set -> skipped
    assert result.i2t.ranks.tolist() == [0, 0, 3, 0, 0]
    assert result.i2t.dup.tolist() == [True, True, False, False, False]
    out = result.to_json()
    # All five: four hits at rank 0 -> R@1 80; rank 3 < 5 -> R@5 = R@10 = 100.
    assert out["t2i"] == {"R@1": 80.0, "R@5": 100.0, "R@10": 100.0}
    assert out["i2t"] == {"R@1": 80.0, "R@5": 100.0, "R@10": 100.0}
    # Without the two dup queries: ranks [2,0,0] / [3,0,0] -> R@1 = 2/3.
    assert out["t2i_nodup"] == {"R@1": pytest.approx(200 / 3), "R@5": 100.0, "R@10": 100.0}
    assert out["i2t_nodup"] == {"R@1": pytest.approx(200 / 3), "R@5": 100.0, "R@10": 100.0}
    assert out["mR_nodup"] == pytest.approx((200 / 3 + 200) / 3)
    c = out["counts"]
    assert c["images"] == 4 and c["captions"] == 6 and c["distinct_captions"] == 5
    assert c["images_without_captions"] == 1
    assert c["images_with_one_caption"] == 1 and c["skipped_single_caption"] == 1
    assert c["duplicate_captions"] == 1
    assert c["t2i_queries"] == 5 and c["t2i_queries_dup"] == 2
    assert c["i2t_queries"] == 5 and c["i2t_queries_dup"] == 2
    assert c["t2i_candidates"] == 3


def test_oracle_i8_scores_the_stored_vectors():
    # i8 must be exactly "score the vectors an i8 index's exact search scores": the i8 result
    # equals the f32 result computed on pre-cast vectors.
    ann = case1()
    unit = {k: ev.unit(np.asarray([v], dtype=np.float32)) for k, v in CASE1_VECTORS.items()}
    quantised = {k: tuple(quantise.as_exact(v, "i8")[0]) for k, v in unit.items()}
    a = ev.oracle_eval(ann, fake_embedder(CASE1_VECTORS), dtype="i8").to_json()
    b = ev.oracle_eval(ann, fake_embedder(quantised), dtype="f32").to_json()
    assert a["t2i"] == b["t2i"] and a["i2t"] == b["i2t"]


# ---------------------------------------------------------------------------------------------
# Index protocol, by hand.
#
# Captions: X: [x1, x1, x2]   Y: [y1, x2 (verbatim the same as X's)]   Z: [z1]
# Caption vectors: x1=e1  x2=w=(0,.6,.8)  y1=e3  z1=e2
# Image vectors: X: [e1, e2]   Y: [w]   Z: not in the index.


def test_index_source_by_hand():
    ann = from_lists(["X", "Y", "Z"], [(0, "x1"), (0, "x1"), (0, "x2"), (1, "y1"), (1, "x2"), (2, "z1")])
    vecs = {"x1": (1.0, 0.0, 0.0), "x2": (0.0, 0.6, 0.8), "y1": (0.0, 0.0, 1.0), "z1": (0.0, 1.0, 0.0)}
    image_vectors = [np.array([[1.0, 0, 0], [0, 1.0, 0]]), np.array([[0.0, 0.6, 0.8]]), None]
    result = ev.index_eval(ann, image_vectors, fake_embedder(vecs))
    # Through a real usearch HNSW index: a corpus this small is searched exhaustively, so the
    # ranks must be the same.
    hnsw = ev.index_eval(ann, image_vectors, fake_embedder(vecs), exact=False)
    assert hnsw.t2i.ranks.tolist() == result.t2i.ranks.tolist()
    assert hnsw.i2t.ranks.tolist() == result.i2t.ranks.tolist()
    # T2I (candidates X, Y; Z's caption is not asked):
    #  x1 #1: X=max(1,0)=1 ; Y=0            -> 0
    #  x1 #2: the same (a verbatim repeat)  -> 0
    #  x2 of X: X=max(0,.6)=.6 ; Y=1        -> 1
    #  y1 of Y: Y=.8 ; X=0                  -> 0
    #  x2 of Y: Y=1 ; X=.6                  -> 0
    assert result.t2i.ranks.tolist() == [0, 0, 1, 0, 0]
    # I2T (candidates: the captions of X and Y):
    #  X: x1=1, x2=.6, y1=0. best target 1; others' captions y1=0, x2(Y)=.6       -> 0
    #  Y: x1=0, x2=1, y1=.8. best target x2(Y)=1; X's x2 also scores 1: a tie     -> 1
    assert result.i2t.ranks.tolist() == [0, 1]
    out = result.to_json()
    assert out["t2i"] == {"R@1": 80.0, "R@5": 100.0, "R@10": 100.0}
    assert out["i2t"] == {"R@1": 50.0, "R@5": 100.0, "R@10": 100.0}
    # nodup: the second x1 of X is left out -> T2I ranks [0,1,0,0]
    assert out["t2i_nodup"]["R@1"] == 75.0
    assert out["i2t_nodup"]["R@1"] == 50.0
    assert out["counts"]["images_not_in_index"] == 1
    assert out["counts"]["t2i_queries"] == 5 and out["counts"]["i2t_queries"] == 2


# ---------------------------------------------------------------------------------------------
# Annotation files


def test_load_coco_and_karpathy(tmp_path):
    coco = {
        "images": [{"id": 7, "file_name": "a.jpg"}, {"id": 9, "file_name": "b.jpg"}, {"id": 3, "file_name": "c.jpg"}],
        "annotations": [
            {"image_id": 9, "caption": " two planes . "},
            {"image_id": 7, "caption": "a river"},
            {"image_id": 9, "caption": "two planes ."},
        ],
    }
    (tmp_path / "coco.json").write_text(json.dumps(coco))
    ann = load_annotations(tmp_path / "coco.json")
    assert ann.images == ["a.jpg", "b.jpg", "c.jpg"]
    assert ann.captions == ["two planes .", "a river", "two planes ."]
    assert ann.caption_image.tolist() == [1, 0, 1]
    assert ann.captions_per_image().tolist() == [1, 2, 0]

    karpathy = {
        "dataset": "rsicd",
        "images": [
            {"filename": "x.jpg", "split": "train", "sentences": [{"raw": "x one"}]},
            {"filename": "y.jpg", "split": "test", "sentences": [{"raw": "y one"}, {"tokens": ["y", "two"]}]},
            {"filename": "z.jpg", "split": "val", "sentences": [{"raw": "z one"}]},
        ],
    }
    (tmp_path / "dataset_x.json").write_text(json.dumps(karpathy))
    test = load_annotations(tmp_path / "dataset_x.json")  # default: the test split
    assert test.images == ["y.jpg"] and test.captions == ["y one", "y two"] and test.split == "test"
    val = load_annotations(tmp_path / "dataset_x.json", split="val")
    assert val.images == ["z.jpg"] and val.caption_image.tolist() == [0]
    with pytest.raises(InputError, match="splits present: test, train, val"):
        load_annotations(tmp_path / "dataset_x.json", split="dev")


@pytest.mark.parametrize(
    "payload, message",
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "expected a JSON object"),
        ('{"images": [{"id": 1, "file_name": "a.jpg"}], "annotations": [{"image_id": 2, "caption": "x"}]}',
         "image_id 2 is not in 'images'"),
        ('{"images": [{"id": 1, "file_name": "a.jpg"}], "annotations": [{"image_id": 1, "caption": 5}]}',
         "caption must be a string"),
        ('{"images": [{"id": 1, "file_name": "a.jpg"}, {"id": 2, "file_name": "a.jpg"}], "annotations": []}',
         "listed 2 times"),
        ('{"images": [{"filename": "a.jpg", "sentences": [{"raw": ""}]}]}', "empty caption"),
        ('{"images": [{"filename": "a.jpg", "sentences": [{"raw": "x"}]}]}', None),
    ],
)
def test_malformed_annotations_name_the_file(tmp_path, payload, message):
    path = tmp_path / "bad.json"
    path.write_text(payload)
    if message is None:  # the control case parses
        assert load_annotations(path).captions == ["x"]
        return
    with pytest.raises(InputError, match=message) as info:
        load_annotations(path)
    assert str(path) in str(info.value)


def test_missing_annotation_file(tmp_path):
    with pytest.raises(InputError, match="not found"):
        load_annotations(tmp_path / "nope.json")


# ---------------------------------------------------------------------------------------------
# Real captions, real fp32 embedder: the vectorised oracle equals a loop-based brute force.


@pytest.fixture(scope="module")
def fp32_embedder():
    from edge_t2t import config

    if not (config.embedder_dir() / "manifest.json").is_file():
        pytest.fail("embedder not built: run `make models` (edge-t2t models build-embedder)")
    from edge_t2t.embed.embedder import Embedder

    return Embedder(precision="fp32")


def brute_force_oracle(ann, vec_of_text):
    """The oracle protocol written plainly with loops, independent of edge_t2t.evaluation.evaluate."""
    n_img = len(ann.images)
    caps = [[] for _ in range(n_img)]  # caption entry indices per image
    for c, i in enumerate(ann.caption_image.tolist()):
        caps[i].append(c)
    unit = {t: np.asarray(v, dtype=np.float64) / np.linalg.norm(v) for t, v in vec_of_text.items()}
    cache: dict[tuple[str, str], float] = {}

    def cos(a: str, b: str) -> float:
        if a == b:
            return 1.0  # a text's cosine with itself, exactly (see evaluate.text_similarity)
        key = (a, b) if a <= b else (b, a)  # cosine is symmetric; one value per pair keeps ties exact
        if key not in cache:
            cache[key] = float(np.dot(unit[key[0]], unit[key[1]]))
        return cache[key]

    text = ann.captions
    t2i = []
    for i in range(n_img):
        for c in caps[i]:
            others = [o for o in caps[i] if o != c]
            if not others:
                continue
            own = max(cos(text[c], text[o]) for o in others)
            rank = 0
            for a in range(n_img):
                if a == i or not caps[a]:
                    continue
                if max(cos(text[c], text[x]) for x in caps[a]) >= own:
                    rank += 1
            t2i.append(rank)
    i2t = []
    for i in range(n_img):
        for j in caps[i]:
            query = [o for o in caps[i] if o != j]
            if not query:
                continue
            target = max(cos(text[q], text[j]) for q in query)
            rank = 0
            for a in range(n_img):
                if a == i:
                    continue
                for d in caps[a]:
                    if max(cos(text[q], text[d]) for q in query) >= target:
                        rank += 1
            i2t.append(rank)
    return t2i, i2t


def recall_by_hand(ranks, k):
    return 100.0 * sum(1 for r in ranks if r < k) / len(ranks)


def test_oracle_equals_brute_force_on_rsicd(shared_data, fp32_embedder):
    ann = load_annotations(shared_data / "rsicd" / "captions_val.json").subset(150)
    texts = sorted(set(ann.captions))
    vectors = fp32_embedder.embed(texts)
    vec_of_text = dict(zip(texts, vectors, strict=True))

    result = ev.oracle_eval(ann, lambda ts: np.stack([vec_of_text[t] for t in ts]))
    t2i_loop, i2t_loop = brute_force_oracle(ann, vec_of_text)
    out = result.to_json()
    for k in ev.KS:
        assert abs(out["t2i"][f"R@{k}"] - recall_by_hand(t2i_loop, k)) < 1e-9
        assert abs(out["i2t"][f"R@{k}"] - recall_by_hand(i2t_loop, k)) < 1e-9
    # Stronger than the recalls: the same multiset of ranks (the loops visit queries in image order).
    assert sorted(result.t2i.ranks.tolist()) == sorted(t2i_loop)
    assert sorted(result.i2t.ranks.tolist()) == sorted(i2t_loop)
    # RSICD really has verbatim duplicates within images and ties: the case is not trivial.
    assert out["counts"]["t2i_queries_dup"] > 0
    assert 0 < out["t2i"]["R@1"] < 100


@pytest.mark.parametrize("seed", range(10))
def test_self_similarity_ties_are_exact(seed):
    # A: [x, x, y]   B: [y, z], with arbitrary (not exactly representable) random vectors.
    # I2T for A's caption x (a dup): Q = {x, y}; target x scores cos(x, x) = 1. B's caption y
    # scores max(cos(x, y), cos(y, y)) = 1 too -> a genuine tie -> rank 1; B's z scores < 1.
    # Float noise in cos(x, x) vs cos(y, y) must not break that tie either way.
    rng = np.random.default_rng(seed)
    vecs = {t: tuple(rng.normal(size=8)) for t in ("x", "y", "z")}
    ann = from_lists(["A", "B"], [(0, "x"), (0, "x"), (0, "y"), (1, "y"), (1, "z")])
    result = ev.oracle_eval(ann, fake_embedder(vecs))
    # The I2T queries of A come first: x (twice, dup), then y. y of A: Q = {x}; the database
    # is y (target) and B's y (the same text: a tie) and z -> rank >= 1.
    assert result.i2t.ranks[:2].tolist() == [1, 1]
    assert result.i2t.dup[:2].all()
    assert result.i2t.ranks[2] >= 1


def test_eval_i8_exact_scores_equal_an_i8_index_searched_exactly(tmp_path):
    """`eval --dtype i8 --exact` scores what an i8 index returns in `exact` vector mode: the same
    query against the same stored texts gives the same score for every text."""
    from fake_embedder import FakeEmbedder

    from edge_t2t.index.indexdir import IndexDir
    from edge_t2t.index.indexer import Indexer

    emb = FakeEmbedder(dim=48)
    records = [{"image": f"img{i}.jpg", "variants": [{"one_sentence": s} for s in texts]}
               for i, texts in enumerate([["a runway beside a terminal", "planes parked at gates"],
                                          ["a green park with a pond", "trees around a lake"],
                                          ["storage tanks near a port", "ships at a pier"]])]
    captions = tmp_path / "c.jsonl"
    captions.write_text("".join(json.dumps(r) + "\n" for r in records))
    ix = tmp_path / "ix"
    Indexer(ix, embedder=emb, dtype="i8", text_mode="joined").run([], captions_file=captions)
    ann = from_lists([r["image"] for r in records], [(0, "an airport runway"), (1, "a park"), (2, "a harbour")])
    stored = load_index_vectors(ix, ann, identity=emb.identity)
    assert stored.facts["index_dtype"] == "i8"
    stacked = np.concatenate(stored.vectors)
    keys = np.concatenate(stored.keys)
    queries = emb.embed(["an airport runway", "a harbour with ships"])

    eval_scores = ev.stored_scores(queries, stacked, "i8")  # what index_eval(dtype="i8", exact=True) ranks
    with IndexDir.open_reader(ix) as d:
        found = d.search_vectors().search(queries, len(keys), mode="exact")
    for q, cand in enumerate(found):
        assert sorted(cand.keys.tolist()) == sorted(keys.tolist())
        column = {int(k): n for n, k in enumerate(keys)}
        mine = eval_scores[q, [column[int(k)] for k in cand.keys]]
        np.testing.assert_allclose(mine, cand.scores, rtol=0, atol=1e-6)
    # and the i8 index's exact scores are not the f32 ones (its exact copy is float16)
    assert not np.array_equal(eval_scores, ev.stored_scores(queries, stacked, "f32"))


def test_halves_are_disjoint_cover_every_image_and_follow_the_file_name():
    import random

    from edge_t2t.evaluation.dataset import from_lists

    names = [f"img_{i}.jpg" for i in range(200)]
    ann = from_lists(names, [(i, f"caption {i} {j}") for i in range(200) for j in range(2)])
    tune, report = ann.half("tune"), ann.half("report")
    assert set(tune.images).isdisjoint(report.images) and set(tune.images) | set(report.images) == set(names)
    assert 60 < tune.n_images < 140  # a hash, not a cut at a position
    for part in (tune, report):  # each image keeps its own captions
        assert part.n_captions == 2 * part.n_images
        assert all(c.split()[1] == part.images[i].split("_")[1].split(".")[0]
                   for c, i in zip(part.captions, part.caption_image, strict=True))
    shuffled = names[:]
    random.Random(1).shuffle(shuffled)
    again = from_lists([f"/elsewhere/{n}" for n in shuffled], [(i, "x") for i in range(200)]).half("tune")
    assert {n.rsplit("/", 1)[1] for n in again.images} == set(tune.images)  # by name, not order or folder
    with pytest.raises(Exception, match="unknown half"):
        ann.half("test")


@pytest.mark.parametrize("rule", [dict(fusion="rrf", rrf_k=2), dict(lexical_cap=0.7, lexical_weight=0.5)])
def test_oracle_t2i_fusion_by_brute_force(rule):
    """The oracle's T2I rank under a fusion rule, recomputed caption by caption: the own image is
    represented by its other captions, every other image by all of them; each part is an image's
    best, the parts are ranked (competition ranks) or mixed as retrieval.fused does."""
    from edge_t2t.evaluation.dataset import from_lists
    from edge_t2t.query import retrieval

    caps = [(0, "storage tanks by a port"), (0, "white tanks near the water"), (1, "a port with ships"),
            (1, "ships moored at a pier"), (2, "a stadium with a green field"), (2, "a green field and tanks"),
            (3, "houses along a road"), (3, "a road with white houses")]
    ann = from_lists(["a", "b", "c", "d"], caps)
    rng = np.random.default_rng(3)
    table = {t: tuple(rng.normal(size=6)) for _, t in caps}
    result = ev.oracle_eval(ann, fake_embedder(table), mode="hybrid", **rule)
    texts = [t for _, t in caps]
    vec = ev.unit(np.asarray([table[t] for t in texts]))
    dense = vec.astype(np.float64) @ vec.T.astype(np.float64)
    lex = ev.lexical_similarity(texts, texts, exclude_self=True, keep_one=False)
    owner = np.asarray([i for i, _ in caps])
    expected = []
    for q, (i, _) in enumerate(caps):
        d, lx = np.zeros(4), np.zeros(4)
        for a in range(4):
            cols = [c for c in np.flatnonzero(owner == a) if c != q]
            d[a], lx[a] = dense[q, cols].max(), lex[q, cols].max()
        if rule.get("fusion") == "rrf":
            rd = np.array([(d > x).sum() for x in d], dtype=float)
            rl = np.array([(lx > x).sum() if x > 0 else np.inf for x in lx])
            score = 1 / (rule["rrf_k"] + 1 + rd) + 1 / (rule["rrf_k"] + 1 + rl)
        else:
            score = retrieval.fused(d, lx, None, "hybrid", **rule)
        expected.append(int(sum(score[a] >= score[i] for a in range(4) if a != i)))
    assert result.t2i.ranks.tolist() == expected
    assert any(lex[q, c] > 0 for q in range(8) for c in range(8) if q != c)  # the lexical part has a say
