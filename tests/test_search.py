"""Search over an index built with a deterministic fake embedder: max-over-variants scoring,
over-fetching to k distinct images, ties, modes, refusals, and image-to-image search."""

from __future__ import annotations

import json
import sqlite3

import pytest
from fake_embedder import FakeEmbedder
from helpers_search import text_search, variant_search

from edge_t2t.embed.texts import description_texts, variant_texts
from edge_t2t.errors import StoreError
from edge_t2t.index.indexer import Indexer
from edge_t2t.index.store import Store
from edge_t2t.modes import VECTOR_MODES
from edge_t2t.query import search as S
from edge_t2t.query.searcher import Searcher
from edge_t2t.records import Feature, Variant

SCENES = {
    "harbour.jpg": ["boats moored in a harbour", "a pier with ships and cranes", "container port by the sea"],
    "stadium.jpg": ["a stadium with a green field", "oval running track around grass", "sports ground seats"],
    "forest.jpg": ["dense green forest", "trees covering hills", "woodland with a small path"],
    "farm.jpg": ["farmland with green fields", "crop fields and a barn", "rectangular fields of crops"],
    "town.jpg": ["houses and roads", "a small town with a church", "residential streets with roofs"],
    "twin_a.jpg": ["identical twin scene text"],
    "twin_b.jpg": ["identical twin scene text"],
}


def write_jsonl(path, scenes):
    with open(path, "w") as fh:
        for name, texts in scenes.items():
            fh.write(json.dumps({"image": name, "variants": [{"one_sentence": t} for t in texts]}) + "\n")
    return path


@pytest.fixture
def emb():
    return FakeEmbedder()


@pytest.fixture
def index(tmp_path, emb):
    ix = tmp_path / "ix"  # joined: the tests below compare scores with Variant.joined_text()
    Indexer(ix, embedder=emb, dtype="f32", text_mode="joined").run([], captions_file=write_jsonl(tmp_path / "c.jsonl", SCENES))
    return ix


def test_image_score_is_max_cosine_over_its_variants(index, emb):
    hits = text_search(index, "green field", k=len(SCENES), embedder=emb, mode="exact")
    q = emb.embed(["green field"])[0]
    by_image = {h.image: h for h in hits}
    for name, raw in SCENES.items():
        texts = [Variant(t).joined_text() for t in raw]  # what the index embeds
        cos = emb.embed(texts) @ q
        assert by_image[name].score == pytest.approx(float(cos.max()), abs=1e-5)
        assert by_image[name].text == texts[int(cos.argmax())]
        assert by_image[name].variant == int(cos.argmax())
    assert [h.rank for h in hits] == list(range(1, len(SCENES) + 1))
    assert all(a.score >= b.score for a, b in zip(hits, hits[1:], strict=False))


def test_k_distinct_images_survive_many_variants_each(tmp_path, emb):
    # 30 images x 20 near-identical variants: the first fetch sees few images, so it must grow.
    scenes = {f"img{i:02d}.jpg": [f"red roof house number {j}" for j in range(20)] for i in range(30)}
    ix = tmp_path / "ix"
    Indexer(ix, embedder=emb, dtype="i8").run([], captions_file=write_jsonl(tmp_path / "c.jsonl", scenes))
    for mode in ("hnsw", "rescore", "exact"):
        hits = text_search(ix, "red roof", k=12, embedder=emb, mode=mode)
        assert len(hits) == 12 and len({h.image for h in hits}) == 12


def test_ties_are_broken_by_image_path(index, emb):
    hits = text_search(index, "identical twin scene text", k=2, embedder=emb, mode="exact")
    assert [h.image for h in hits] == ["twin_a.jpg", "twin_b.jpg"]
    assert hits[0].score == pytest.approx(hits[1].score)


def test_modes_agree_on_the_ranking(index, emb):
    ranks = {m: [h.image for h in text_search(index, "boats and ships in port", k=3, embedder=emb, mode=m)]
             for m in ("hnsw", "rescore", "exact")}  # fmt: skip
    assert ranks["exact"][0] == "harbour.jpg"
    assert ranks["rescore"] == ranks["exact"]
    assert ranks["hnsw"][0] == ranks["exact"][0]


def test_empty_index_gives_a_clear_error(tmp_path, emb):
    Store(tmp_path / "ix", create=True).close()
    with pytest.raises(StoreError, match="empty"):
        text_search(tmp_path / "ix", "anything", embedder=emb)


def test_missing_index_names_the_fix(tmp_path, emb):
    with pytest.raises(StoreError, match="edge-t2t index"):
        text_search(tmp_path / "none", "anything", embedder=emb)


def test_other_embedder_is_refused_naming_both(index):
    other = FakeEmbedder(name="another-model")
    with pytest.raises(StoreError) as err:
        text_search(index, "green field", embedder=other)
    assert "another-model" in str(err.value) and "fake-bow" in str(err.value)


def test_long_query_is_truncated_with_a_warning(index, emb):
    warnings = []
    query = "stadium " + " ".join(f"word{i}" for i in range(200))
    hits = text_search(index, query, k=3, embedder=emb, warn=warnings.append)
    assert len(hits) == 3
    assert warnings and "longer than" in warnings[0]
    short = text_search(index, "stadium", k=1, embedder=emb, warn=warnings.append)
    assert len(short) == 1 and len(warnings) == 1  # a short query finds a hit and adds no warning


def test_search_without_its_snapshot_says_how_to_repair_and_never_writes(index, emb):
    """The snapshot holds each vector once: without it a search refuses, naming the repair; the
    next writer embeds the stored texts again, and the same search works."""
    from edge_t2t.index import vindex
    from edge_t2t.index.indexdir import IndexDir

    (index / vindex.MANIFEST_FILE).unlink()
    before = sorted(p.name for p in index.iterdir())
    with pytest.raises(StoreError, match="verify --repair"):
        text_search(index, "dense forest trees", k=1, embedder=emb, mode="hnsw")
    assert sorted(p.name for p in index.iterdir()) == before  # a reader never writes
    with IndexDir.open_writer(index) as ix:  # the next writer rebuilds it
        ix.open_vectors(emb.dim, "f32", embed=emb.embed)
        assert ix.embedded_again == ix.store.text_count() > 0
    assert (index / vindex.MANIFEST_FILE).exists()
    assert text_search(index, "dense forest trees", k=1, embedder=emb, mode="hnsw")[0].image == "forest.jpg"


def test_search_by_variants_maxes_over_pairs_and_excludes_self(index, emb):
    with Store(index) as st:
        row = st.images()["stadium.jpg"]
        variants = st.variants_of(row.id)
    hits = variant_search(index, variants, k=3, embedder=emb, mode="exact")
    assert hits[0].image == "stadium.jpg" and hits[0].score == pytest.approx(1.0, abs=1e-5)
    hits = variant_search(index, variants, k=3, embedder=emb, mode="exact", exclude_path="stadium.jpg")
    assert "stadium.jpg" not in [h.image for h in hits] and [h.rank for h in hits] == [1, 2, 3]


def test_fields_mode_embeds_one_text_per_field(tmp_path, emb):
    v = Variant("an airport", (Feature("runway", "centre", "long"), Feature("terminal", "north")), "planes parked")
    path = tmp_path / "c.jsonl"
    path.write_text(json.dumps({"image": "a.jpg", "variants": [v.to_dict()]}) + "\n"
                    + json.dumps({"image": "b.jpg", "variants": [{"one_sentence": "a lake"}]}) + "\n")
    ix = tmp_path / "ix"
    Indexer(ix, embedder=emb, text_mode="fields").run([], captions_file=path)
    with sqlite3.connect(ix / "store.sqlite") as c:
        fields = [r[0] for r in c.execute("SELECT t.field FROM texts t JOIN variants v ON v.id = t.variant_id JOIN images i ON i.id = v.image_id "
                                          "WHERE i.path = 'a.jpg' ORDER BY t.id")]
    assert fields == ["one_sentence", "features", "caption"]
    hits = text_search(ix, "long runway in the centre", k=1, embedder=emb, mode="exact")
    assert hits[0].image == "a.jpg" and hits[0].field == "features"
    assert hits[0].text == "long runway in the centre; terminal in the north"  # the features field
    assert variant_texts(v, "joined") == [("joined", v.joined_text())]


def test_sentences_mode_embeds_each_short_statement_once(tmp_path, emb):
    v = Variant("An airport.", (Feature("runway", "centre", "long"), Feature("tanks", "south", "large"), Feature("")),
                "Planes are parked.  A runway is in the centre!  Is that a lake? Planes are parked.")
    pairs = variant_texts(v, "sentences")
    assert pairs == [("one_sentence", "An airport."), ("feature", "long runway in the centre"),
                     ("feature", "large tanks in the south"), ("sentence", "Planes are parked."),
                     ("sentence", "A runway is in the centre!"), ("sentence", "Is that a lake?")]
    assert variant_texts(Variant("a lake"), "sentences") == [("one_sentence", "a lake")]
    path = tmp_path / "c.jsonl"
    path.write_text(json.dumps({"image": "a.jpg", "variants": [v.to_dict()]}) + "\n"
                    + json.dumps({"image": "b.jpg", "variants": [{"one_sentence": "a lake"}]}) + "\n")
    ix = tmp_path / "ix"
    Indexer(ix, embedder=emb, text_mode="sentences").run([], captions_file=path)
    with sqlite3.connect(ix / "store.sqlite") as c:
        stored = [tuple(r) for r in c.execute("SELECT t.field, t.text FROM texts t JOIN variants v ON v.id = t.variant_id JOIN images i ON i.id = v.image_id "
                                               "WHERE i.path = 'a.jpg' ORDER BY t.id")]
    assert stored == pairs
    hits = text_search(ix, "large tanks in the south", k=1, embedder=emb, mode="exact")
    assert hits[0].image == "a.jpg" and hits[0].text == "large tanks in the south"


def test_description_texts_follow_the_text_mode():
    """Search by image embeds the query's description in the index's own text mode: every
    variant's texts in order; a variant with nothing to say adds no (empty) text."""
    a = Variant("An airport", (Feature("runway", "centre", "long"),), "Planes are parked")
    b = Variant("a lake")
    assert description_texts([a, b], "joined") == ["An airport. long runway in the centre. Planes are parked.", "a lake."]
    assert description_texts([a, b], "fields") == ["An airport", "long runway in the centre", "Planes are parked", "a lake"]
    assert variant_texts(Variant(""), "joined") == []


def test_hit_json_contract():
    h = S.Hit(rank=1, score=0.123456789, image="a.jpg", variant=2, text="t")
    assert h.to_dict() == {"rank": 1, "score": 0.123457, "image": "a.jpg", "variant": 2, "text": "t"}  # 6 decimals
    m = {"constraint": "forest east of runway", "score": 1.0}  # --explain
    assert S.Hit(1, 0.5, "a.jpg", 0, "t", matched=(m,)).to_dict()["matched"] == [m]


def test_search_sees_commits_made_after_the_last_save(index, emb, tmp_path):
    """An index run saves its snapshot at most every 60 s: a search in between reads the newer
    texts by key and the deleted ones drop out at row lookup, with k results still."""
    from edge_t2t.index.lock import IndexLock
    from edge_t2t.index.store import NewText

    before = {p.name: p.stat().st_mtime_ns for p in index.iterdir() if p.name != "store.sqlite"}
    with IndexLock(index), Store(index) as st, st.transaction():  # committed, not yet saved
        st.remove_images([st.images()["forest.jpg"].id])
        new_id = st.put_image("lake.jpg", source="captions")
        st.add_texts(new_id, [NewText(0, "joined", Variant("a blue lake"), "a blue lake", emb.embed(["a blue lake"])[0])])
    for mode in VECTOR_MODES:
        hits = text_search(index, "dense green forest", k=3, embedder=emb, mode=mode)
        assert "forest.jpg" not in [h.image for h in hits] and len(hits) == 3
        assert text_search(index, "a blue lake", k=1, embedder=emb, mode=mode)[0].image == "lake.jpg"
    after = {p.name: p.stat().st_mtime_ns for p in index.iterdir() if p.name != "store.sqlite"}
    assert {k: v for k, v in after.items() if not k.startswith("store.sqlite")} == \
        {k: v for k, v in before.items() if not k.startswith("store.sqlite")}


def test_an_image_whose_best_text_was_deleted_falls_back_to_its_next_best(index, emb):
    """rank_images used to drop such an image and return fewer than k results. Two of its texts
    go, so the fallback takes two rounds (each round must keep the texts found gone before)."""
    with Store(index) as st:
        harbour = st.images()["harbour.jpg"].id
        keys = st.text_keys_of([harbour])[0].tolist()
    searcher = Searcher(index).open()  # the vectors as saved: all harbour texts present
    store, vectors = searcher.store, searcher.vectors
    try:
        q = emb.embed(["boats moored in a harbour"])
        first = S.rank_images(store, vectors, q, k=len(SCENES), mode="exact")
        assert first[0].image == "harbour.jpg" and first[0].text.startswith("boats moored in a harbour")
        rows = store.variant_rows(keys)  # its texts by cosine with the query, from the embedder itself
        by_cosine = sorted(keys, key=lambda key: -float(emb.embed([rows[key].text])[0] @ q[0]))
        with store.transaction():  # its two best texts go between the vector search and the row lookup
            store.conn.executemany("DELETE FROM texts WHERE id = ?", [(key,) for key in by_cosine[:2]])
        hits = S.rank_images(store, vectors, q, k=len(SCENES), mode="exact")
    finally:
        searcher.close()
    assert len(hits) == len(SCENES)
    harbour_hit = next(h for h in hits if h.image == "harbour.jpg")
    assert harbour_hit.text == rows[by_cosine[2]].text  # the one text left
    assert harbour_hit.score < first[0].score


def test_reports_table_jsonl_and_html(tmp_path, rsicd_samples):
    import io

    from rich.console import Console

    from edge_t2t.query import report

    real = str(rsicd_samples / "airport_17.jpg")
    hits = [S.Hit(1, 0.9, real, 0, "runway [bold]x[/bold] <script>"), S.Hit(2, 0.5, "gone.jpg", 3, "a & b")]
    buf = io.StringIO()
    report.write_jsonl(hits, buf)
    rows = [json.loads(line) for line in buf.getvalue().splitlines()]
    assert [r["image"] for r in rows] == [real, "gone.jpg"] and rows[1]["variant"] == 3
    console = Console(file=io.StringIO(), width=200)
    report.print_table(hits, query="q", console=console)
    assert "[bold]x[/bold]" in console.file.getvalue()  # shown literally, not read as markup
    page = report.write_html(hits, tmp_path / "r.html", "q <i>", "ix")
    html = page.read_text()
    assert html.count("data:image/jpeg;base64,") == 1 and 'class="ph"' in html
    assert "&lt;script&gt;" in html and "<script>" not in html and "q &lt;i&gt;" in html
    assert not list(tmp_path.glob("*.tmp"))


def test_query_image_goes_through_the_caption_stage_once_unless_already_indexed(index, emb, tmp_path, monkeypatch):
    """search's side of an image query with a stand-in caption stage: read and hashed once, the same
    bytes described, refused without --vlm. The VLM itself describes a new image in test_serve.py
    (test_search_by_example_of_a_new_image_is_described_by_the_vlm)."""
    from PIL import Image

    from edge_t2t.describe import captioning
    from edge_t2t.images import ImageBytes
    from edge_t2t.records import CaptionRecord

    calls, reads = [], []

    def fake_caption_sources(items, vlm_cfg, n_variants, settings, on_result, **kw):
        calls.append(items)
        tag, image = items[0]
        on_result(tag, CaptionRecord(image=str(image.path), sha256=image.sha256, model="m", mmproj="p", family="f",
                                     prompt_version="1", variants=[Variant("boats moored at a pier")]))  # fmt: skip
        return captioning.CaptionSummary()

    real_read = ImageBytes.read.__func__
    monkeypatch.setattr(captioning, "caption_sources", fake_caption_sources)
    monkeypatch.setattr(ImageBytes, "read", classmethod(lambda cls, p: reads.append(p) or real_read(cls, p)))
    monkeypatch.setenv("EDGE_T2T_CACHE_DIR", str(tmp_path / "cache"))
    img = tmp_path / "query.png"
    Image.new("RGB", (8, 8), (10, 20, 30)).save(img)
    with pytest.raises(StoreError, match="--vlm"), Searcher(index) as searcher:
        searcher.image_variants(img, vlm_cfg=None)
    reads.clear()
    with Searcher(index) as searcher:
        variants, sha = searcher.image_variants(img, vlm_cfg=object())
    assert calls and variants[0].one_sentence == "boats moored at a pier" and len(sha) == 64
    assert len(reads) == 1 and calls[0][0][1].sha256 == sha  # read once; the bytes hashed are the bytes described
    hits = variant_search(index, variants, k=1, embedder=emb, mode="exact")
    assert hits[0].image == "harbour.jpg"


@pytest.mark.parametrize("vector_mode", VECTOR_MODES)
def test_k_above_the_image_count_returns_every_image(shared_data, tmp_path, vector_mode):
    """100 RSICD images (their captions as descriptions), `search -k 1000`: every image comes back
    in every vector mode. The HNSW graph of this index leaves one text unreachable, so a graph walk
    alone once returned 99."""
    import helpers_media as hm

    coco = json.loads((shared_data / "rsicd" / "captions_val.json").read_text())
    names = {img["id"]: img["file_name"] for img in coco["images"]}
    caps: dict[str, list[str]] = {}
    for ann in coco["annotations"]:
        caps.setdefault(names[ann["image_id"]], []).append(ann["caption"])
    lines = [json.dumps({"image": n, "variants": caps[n]}) for n in sorted(caps)[:100]]
    (tmp_path / "caps.jsonl").write_text("\n".join(lines) + "\n")
    env = hm.child_env(tmp_path / "cache")
    index = str(tmp_path / "ix")
    res = hm.run_cli("index", "--captions", str(tmp_path / "caps.jsonl"), "--index", index, "--batch-size", "50",
                     "--json", "--no-progress", env=env)  # fmt: skip
    assert res.returncode == 0, res.stderr[-2000:]
    res = hm.run_cli("search", "many buildings and green trees", "--index", index, "--json", "-k", "1000",
                     "--vector-mode", vector_mode, env=env)  # fmt: skip
    assert res.returncode == 0, res.stderr[-2000:]
    hits = [json.loads(line) for line in res.stdout.splitlines()]
    assert len(hits) == 100 and len({h["image"] for h in hits}) == 100
