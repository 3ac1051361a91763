"""`edge-t2t serve` (issue 15): the JSON API through Flask's test client, hostile requests included,
and the page itself in Debian's headless Chromium against the demo's index.

The demo index is the demo's first step: 40 synthetic scenes indexed from their ground-truth
descriptions with the real int8 embedder (no VLM run), so the right answer of each directional
query is known.
"""

from __future__ import annotations

import csv
import io
import json
import re
import shutil
import socket
import tempfile
import threading
import time
from pathlib import Path
from urllib.parse import quote
from urllib.request import urlopen

import helpers_media as hm
import pytest

from edge_t2t import config
from edge_t2t.cli import main
from edge_t2t.demo import scenes as S
from edge_t2t.errors import InputError, StoreError
from edge_t2t.serve_answers import THUMB_DIR

hm.require("flask", "the web extra is not installed: pip install -e '.[web]' (make test installs it)")

from edge_t2t import serve as web  # noqa: E402

SCHEMA_KEYS = {"rank", "score", "image", "variant", "text", "dense", "lexical", "structure"}
ADDED_KEYS = {"id", "outline"}  # what the API adds to search --json's fields


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """The demo's index, made by the demo's own code (its first steps: 40 scenes, their ground truth
    indexed through the captions path), and the first of its directional queries."""
    if not (config.embedder_dir() / "manifest.json").is_file():
        pytest.fail(f"no embedder built in {config.embedder_dir()}: run 'make models' first")
    from edge_t2t.demo.demo import _index
    from edge_t2t.embed.embedder import Embedder

    root = tmp_path_factory.mktemp("serve-demo")
    emb = Embedder(precision="int8")
    _, captions = S.write_scene_set(root / "scenes", n=40, seed=0)
    _index(root / "index-text", emb, False, [root / "scenes"], captions)
    query, expected = S.directional_queries(S.make_scenes(40, 0))[0]
    return {"index": root / "index-text", "images": root / "scenes", "query": query, "expected": f"{expected}.png",
            "embedder": emb}


@pytest.fixture(scope="module")
def app(demo):
    app = web.create_app(demo["index"], embedder=demo["embedder"])
    yield app
    web.close_app(app)


@pytest.fixture
def client(app):
    return app.test_client()


def _cli_json(capsys, *argv) -> list[dict]:
    capsys.readouterr()
    assert main([str(a) for a in argv]) == 0
    return [json.loads(line) for line in capsys.readouterr().out.splitlines()]


def _strip(hits: list[dict]) -> list[dict]:
    return [{k: v for k, v in h.items() if k not in ADDED_KEYS} for h in hits]


# -- the contract -----------------------------------------------------------------------------------
def test_api_search_gives_the_fields_of_search_json(client, demo, capsys):
    """The same function builds both: the API's hits are the CLI's JSON lines plus an id (the
    ranking itself is checked against one worked out independently in the next test)."""
    for extra in ([], ["--explain"], ["--mode", "hybrid"], ["--min-score", "0.5"]):
        args = {"--explain": "explain=1", "--mode": "mode=hybrid", "--min-score": "min_score=0.5"}
        qs = "&".join(args[a] for a in extra if a in args)
        r = client.get(f"/api/search?q={quote(demo['query'])}&k=7&{qs}")
        assert r.status_code == 200, r.get_json()
        body = r.get_json()
        cli = _cli_json(capsys, "search", demo["query"], "--index", demo["index"], "-k", "7", "--json", *extra)
        assert _strip(body["hits"]) == cli
        assert body["count"] == len(cli) > 0
        assert all(SCHEMA_KEYS <= set(h) and isinstance(h["id"], int) for h in body["hits"])
    first = client.get(f"/api/search?q={quote(demo['query'])}&k=5").get_json()["hits"][0]
    assert Path(first["image"]).name == demo["expected"]


def _max_cosine_ranking(index: Path, query: str, embedder) -> list[tuple[str, float]]:
    """Every image of the index with its best cosine to `query`, best first, worked out here: the
    stored texts (SQLite, the store of record) embedded afresh and scored in numpy."""
    import sqlite3

    import numpy as np

    with sqlite3.connect(index / "store.sqlite") as conn:
        rows = conn.execute("SELECT i.path, t.text FROM texts t JOIN variants v ON v.id = t.variant_id "
                            "JOIN images i ON i.id = v.image_id WHERE i.status = 'ok'").fetchall()  # fmt: skip
    vecs = embedder.embed([t for _, t in rows] + [query]).astype(np.float64)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    best: dict[str, float] = {}
    for (path, _), cos in zip(rows, vecs[:-1] @ vecs[-1], strict=True):
        best[path] = max(best.get(path, -1.0), float(cos))
    return sorted(best.items(), key=lambda item: -item[1])


def test_api_ranks_as_the_max_cosine_worked_out_here(client, demo):
    """A query without places or sizes (nothing for the structure score): the API's order is the
    images' best cosines, and each hit's dense score is its image's (the index scores a float16 copy
    of each vector: 2e-3)."""
    from edge_t2t.query.query_parse import parse

    query = "a runway"  # the synthetic scenes' texts are templated: this query's top 6 are 3e-3 apart or more
    assert parse(query).constraints == ()
    ranking = _max_cosine_ranking(demo["index"], query, demo["embedder"])
    # no near-tie that the float16 copy could flip
    assert min(a[1] - b[1] for a, b in zip(ranking[:5], ranking[1:6], strict=True)) > 2e-3
    want = ranking[:5]
    hits = client.get(f"/api/search?q={quote(query)}&k=5").get_json()["hits"]
    assert [h["image"] for h in hits] == [path for path, _ in want]
    assert [h["dense"] for h in hits] == pytest.approx([cos for _, cos in want], abs=2e-3)
    assert [h["score"] for h in hits] == [h["dense"] for h in hits]


def test_every_response_forbids_other_hosts(client, demo):
    for url in ("/", "/app.js", "/app.css", f"/api/search?q={quote(demo['query'])}", "/api/info", "/thumb/1", "/nope"):
        r = client.get(url)
        assert "default-src 'self'" in r.headers["Content-Security-Policy"], url
        assert r.headers["X-Content-Type-Options"] == "nosniff"
    page = client.get("/").get_data(as_text=True) + client.get("/app.js").get_data(as_text=True)
    assert "http://" not in page.replace("http://www.w3.org/2000/svg", "") and "https://" not in page


def test_info_is_the_same_data_as_info_command(client, demo):
    from edge_t2t.cli.info import gather

    body = client.get("/api/info").get_json()
    want = json.loads(json.dumps(gather(demo["index"])))
    assert body["counts"] == want["counts"] and body["counts"]["images_ok"] == 40
    assert body["embedder"] == want["embedder"] and body["last_run"] == want["last_run"]


def test_more_like_this_uses_the_stored_descriptions_and_excludes_itself(client, demo):
    from helpers_search import variant_search

    from edge_t2t.index.store import Store

    hit = client.get(f"/api/search?q={quote(demo['query'])}&k=1").get_json()["hits"][0]
    body = client.get(f"/api/similar?id={hit['id']}&k=5").get_json()
    assert body["count"] == 5 and hit["id"] not in [h["id"] for h in body["hits"]]
    with Store(demo["index"]) as st:
        variants = st.variants_of(hit["id"])
    want = variant_search(demo["index"], variants, k=5, exclude_path=hit["image"])
    assert [h["image"] for h in body["hits"]] == [h.image for h in want]


def test_image_details_and_pictures_by_id(client, demo):
    from PIL import Image

    hit = client.get(f"/api/search?q={quote(demo['query'])}&k=1").get_json()["hits"][0]
    d = client.get(f"/api/image?id={hit['id']}").get_json()
    assert d["image"] == hit["image"] and len(d["variants"]) == 5 and d["chip"] is None
    full = Image.open(io.BytesIO(client.get(f"/image/{hit['id']}").data))
    assert full.size == Image.open(hit["image"]).size
    assert client.get(f"/image/{hit['id']}/scene").status_code == 404  # not a chip of a scene


def test_thumbnails_are_made_once_and_cached_beside_the_index(client, demo):
    hit = client.get(f"/api/search?q={quote(demo['query'])}&k=1").get_json()["hits"][0]
    cache = demo["index"] / THUMB_DIR
    r = client.get(f"/thumb/{hit['id']}")
    assert r.status_code == 200 and r.mimetype == "image/jpeg"
    files = list(cache.glob(f"{hit['id']}-*.jpg"))
    assert len(files) == 1 and files[0].read_bytes() == r.data
    files[0].write_bytes(b"\xff\xd8cached")  # a second request must come from the cache, not the image
    assert client.get(f"/thumb/{hit['id']}").data == b"\xff\xd8cached"
    files[0].unlink()
    assert client.get(f"/thumb/{hit['id']}").data == r.data


def test_bookmarkable_page_and_static_files(client):
    page = client.get("/?q=a%20lake&k=3")
    assert page.status_code == 200 and b'<script src="/app.js"' in page.data
    assert client.get("/app.js").mimetype == "text/javascript"
    assert client.get("/app.css").mimetype == "text/css"


# -- the documentation at /docs (issue 27) ---------------------------------------------------------
def _hrefs(html: str) -> list[str]:
    return re.findall(r'href="([^"]*)"', html)


def test_docs_are_served_as_html_and_every_link_stays_inside(client):
    """Crawl from /docs/: every page renders, every link is a /docs/ page that answers, or an
    anchor on the page (or an example of serve's own loopback address); none points at a .md file
    or another host. Every guide is reached."""
    from html import unescape

    home = client.get("/docs/")
    assert home.status_code == 200 and home.mimetype == "text/html"
    assert "default-src 'self'" in home.headers["Content-Security-Policy"]
    assert client.get("/docs").status_code in (301, 302, 308)
    seen, todo = set(), ["/docs/"]
    while todo:
        url = todo.pop()
        page = client.get(url)
        assert page.status_code == 200 and page.mimetype == "text/html", url
        body = page.get_data(as_text=True)
        for href in map(unescape, _hrefs(body)):
            target, _, anchor = href.partition("#")
            if target.startswith("http://127.0.0.1:"):  # the docs' examples of serve's own address
                continue
            assert target == "" or target.startswith("/docs/"), (url, href)
            assert not target.endswith(".md"), (url, href)
            if target and target not in seen and not target.endswith(".css"):
                seen.add(target)
                todo.append(target)
            if anchor and target:
                assert f'id="{anchor}"' in client.get(target).get_data(as_text=True), (url, href)
    guides = {f"/docs/{p.stem}" for p in (Path(__file__).resolve().parent.parent / "docs").glob("*.md")}
    assert guides <= seen, guides - seen
    css = client.get("/docs/style.css")
    assert css.status_code == 200 and css.mimetype == "text/css"


def test_docs_pages_are_found_by_name_only(client):
    assert "Searching" in client.get("/docs/search").get_data(as_text=True)
    assert client.get("/docs/results/quant_cost").status_code == 200  # a bench record
    for url in ("/docs/docs/search.md", "/docs/search.md", "/docs/../pyproject.toml", "/docs/%2e%2e/README.md",
                "/docs/results/../../README", "/docs/nope", "/docs//etc/passwd"):
        r = client.get(url, follow_redirects=True)  # werkzeug redirects "//" to "/" first
        assert r.status_code == 404 and "error" in r.get_json(), url


def test_docs_without_a_renderer_come_as_markdown_text(client, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "markdown_it", None)  # `import markdown_it` now raises ImportError
    r = client.get("/docs/search")
    assert r.status_code == 200 and r.mimetype == "text/plain"
    text = r.get_data(as_text=True)
    assert text == (Path(__file__).resolve().parent.parent / "docs" / "search.md").read_text(encoding="utf-8")


def test_docs_not_installed_say_where_they_come_from(client, monkeypatch):
    monkeypatch.setattr(config, "docs_dir", lambda: None)
    r = client.get("/docs/")
    assert r.status_code == 404 and "EDGE_T2T_DOCS" in r.get_json()["error"]


def test_a_score_above_one_comes_with_its_parts(client, demo):
    """1.74 alone says nothing: the hit carries text_score, and score = text_score + structure. In
    dense mode the text part is the best cosine (dense), so the split is checked against that."""
    hits = client.get(f"/api/search?q={quote(demo['query'])}&k=5").get_json()["hits"]
    top = hits[0]
    assert top["score"] > 1 and top["structure"] == 1.0
    for h in hits:
        assert h["text_score"] == pytest.approx(h["dense"], abs=1e-6)
        assert h["score"] == pytest.approx(h["text_score"] + h["structure"], abs=2e-6)
    rows = list(csv.DictReader(io.StringIO(client.get(f"/api/export.csv?q={quote(demo['query'])}&k=5")
                                            .get_data(as_text=True))))  # fmt: skip
    assert float(rows[0]["text_score"]) == pytest.approx(top["text_score"], abs=1e-6)


# -- hostile requests --------------------------------------------------------------------------------
@pytest.mark.parametrize("query", ["k=abc", "k=0", "k=-1", "k=100000", "k=1e3", "k=%20", "mode=evil", "mode=../x",
                                   "min_score=abc", "min_score=nan%20x", "q=", "q=%20%20"])
def test_bad_search_parameters_get_400_with_one_line(client, query):
    qs = query if query.startswith("q=") else f"q=a+lake&{query}"
    r = client.get(f"/api/search?{qs}")
    assert r.status_code == 400 and len(r.get_json()["error"].splitlines()) == 1, r.data


@pytest.mark.parametrize("url", [
    "/thumb/999999", "/image/999999", "/image/0", "/image/-1", "/image/1.5", "/thumb/abc",
    "/image/..%2f..%2fetc%2fpasswd", "/thumb/../../etc/passwd", "/image/%2e%2e/%2e%2e/etc/passwd",
    "/image/1/../../../etc/passwd", "/app.js/../../serve.py", "/..%2fserve.py", "/web/index.html",
    "/edge_t2t/serve.py", "/static/app.js", "/image//etc/passwd", "/thumb/1%00.jpg",
])
def test_pictures_and_files_only_by_id_else_404(client, url):
    r = client.get(url)
    assert r.status_code == 404, (url, r.status_code)
    assert b"root:" not in r.data


@pytest.mark.parametrize("url,status", [
    ("/api/image?id=../../etc/passwd", 400), ("/api/image?id=999999", 404), ("/api/image?id=", 400),
    ("/api/similar?id=abc", 400), ("/api/similar?id=999999", 404), ("/api/similar?id=/etc/passwd", 400),
    ("/api/export.csv?like=../../etc/passwd", 400), ("/api/export.geojson?like=999999", 404),
    ("/api/export.csv?q=", 400),
])
def test_ids_that_are_not_images_of_the_index(client, url, status):
    r = client.get(url)
    assert r.status_code == status, (url, r.data)
    assert b"root:" not in r.data


def test_a_path_as_query_is_only_words(client):
    r = client.get("/api/search?q=../../../../etc/passwd&k=3")
    assert r.status_code == 200 and b"root:" not in r.data
    assert all("/etc/passwd" != h["image"] for h in r.get_json()["hits"])


def _png(size=(64, 64), color=(10, 120, 30)) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def _bomb_png() -> bytes:
    """A PNG whose header claims 30000 x 30000 pixels (900 MP) in a few hundred bytes."""
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    rows = zlib.compress(b"\x00" * 1024)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 30000, 30000, 8, 2, 0, 0, 0)) + \
        chunk(b"IDAT", rows) + chunk(b"IEND", b"")


def _upload(client, data: bytes, name: str = "q.png", k: int = 5):
    return client.post("/api/search-by-image", data={"image": (io.BytesIO(data), name), "k": str(k)},
                       content_type="multipart/form-data")


def _leftover_uploads() -> set[str]:
    return {p.name for p in Path(tempfile.gettempdir()).glob("edge-t2t-upload-*")}


def test_search_by_example_with_an_indexed_image_needs_no_vlm(client, demo):
    before = _leftover_uploads()
    path = demo["images"] / demo["expected"]
    r = _upload(client, path.read_bytes(), name="../../../../tmp/evil.png")
    assert r.status_code == 200, r.get_json()
    hits = r.get_json()["hits"]
    assert Path(hits[0]["image"]).name == demo["expected"] and hits[0]["score"] > 0.99
    assert not Path("/tmp/evil.png").exists() and _leftover_uploads() == before


def test_hostile_uploads(client, demo):
    before = _leftover_uploads()
    r = _upload(client, b"this is not an image at all")
    assert r.status_code == 400 and "not a readable image" in r.get_json()["error"]
    r = _upload(client, _bomb_png())
    assert r.status_code == 400 and "safety limit" in r.get_json()["error"]
    r = _upload(client, _png())  # an image the index does not hold, and no VLM configured
    assert r.status_code == 400 and "--vlm" in r.get_json()["error"]
    r = client.post("/api/search-by-image", data={"k": "3"}, content_type="multipart/form-data")
    assert r.status_code == 400 and "image" in r.get_json()["error"]
    r = _upload(client, _png(), k=0)
    assert r.status_code == 400
    assert client.get("/api/search-by-image").status_code == 405
    assert _leftover_uploads() == before


def test_search_by_example_of_a_new_image_is_described_by_the_vlm(demo, app, tmp_path, monkeypatch):
    """The tiny test VLM (random weights: its descriptions are placeholders) proves the path: upload,
    describe, embed the variants, rank. Nothing of the upload stays outside the temp dir."""
    hm.require("llama_cpp", "llama-cpp-python is a core dependency: run `make setup`")
    from edge_t2t.describe.testvlm import MMPROJ_FILE, MODEL_FILE, build_test_vlm
    from edge_t2t.describe.vlm import VLMConfig

    monkeypatch.setenv("EDGE_T2T_CACHE_DIR", str(tmp_path / "cache"))
    out = config.test_vlm_dir()
    build_test_vlm(out)
    cfg = VLMConfig(model=out / MODEL_FILE, mmproj=out / MMPROJ_FILE, n_threads=1)
    with_vlm = web.create_app(demo["index"], embedder=app.extensions["edge_t2t_index"].embedder, vlm_cfg=cfg)
    try:
        before = _leftover_uploads()
        r = _upload(with_vlm.test_client(), _png(color=(200, 30, 90)), k=3)
        assert r.status_code == 200, r.get_json()
        assert r.get_json()["count"] == 3 and _leftover_uploads() == before
    finally:
        web.close_app(with_vlm)


def test_oversized_upload_is_refused_before_it_is_read(demo, app):
    small = web.create_app(demo["index"], embedder=app.extensions["edge_t2t_index"].embedder, max_upload_mb=0.01)
    try:
        r = _upload(small.test_client(), _png((512, 512)) + b"\0" * 20_000)
        assert r.status_code == 413 and "larger than" in r.get_json()["error"]
    finally:
        web.close_app(small)


def test_missing_index_is_one_line_and_exit_2(tmp_path, capsys, monkeypatch):
    with pytest.raises(StoreError, match="no index at"):
        web.create_app(tmp_path / "nope")
    monkeypatch.setattr(web, "serve", lambda *a, **k: pytest.fail("must not serve"))
    assert main(["serve", "--index", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no index at" in err


def test_missing_web_extra_names_it(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "waitress", None)
    with pytest.raises(InputError, match=r"edge-t2t\[web\]"):
        web.require_web()


def test_non_loopback_host_warns(demo, capsys, monkeypatch):
    served = []

    def fake_serve(app, host, port, **_):
        served.append((host, port))
        web.close_app(app)

    monkeypatch.setattr(web, "serve", fake_serve)
    assert main(["serve", "--index", str(demo["index"]), "--host", "0.0.0.0", "--port", "9999"]) == 0
    assert "WARNING" in capsys.readouterr().err and served == [("0.0.0.0", 9999)]
    assert main(["serve", "--index", str(demo["index"])]) == 0
    assert "WARNING" not in capsys.readouterr().err and served[-1] == ("127.0.0.1", 8765)
    assert web.is_loopback("::1") and web.is_loopback("127.0.0.2") and not web.is_loopback("192.168.1.5")
    assert main(["serve", "--index", str(demo["index"]), "--port", "70000"]) == 2


def test_a_real_server_process_answers_then_stops_on_ctrl_c_with_130(demo):
    import os
    import signal
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "edge_t2t", "serve", "--index", str(demo["index"]), "--port",
                             str(port)], stderr=subprocess.PIPE, text=True, env=env)  # fmt: skip
    try:
        end = time.monotonic() + 120
        while True:
            assert proc.poll() is None and time.monotonic() < end, proc.stderr.read() if proc.poll() is not None else ""
            try:
                with urlopen(f"http://127.0.0.1:{port}/api/search?q={quote(demo['query'])}&k=1") as resp:
                    assert Path(json.loads(resp.read())["hits"][0]["image"]).name == demo["expected"]
                break
            except OSError:
                time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 130
        assert "stopped" in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()


# -- a running index -------------------------------------------------------------------------------
def test_answers_from_the_last_whole_snapshot_while_index_runs(tmp_path):
    """Fake embedder, so two imports take a second: new commits appear without a restart; while the
    writer holds the lock the page still answers."""
    from fake_embedder import FakeEmbedder

    from edge_t2t.describe.captions import JsonlWriter
    from edge_t2t.index.indexdir import IndexDir
    from edge_t2t.index.indexer import Indexer

    emb = FakeEmbedder()
    recs = [S.describe(s, seed=0) for s in S.make_scenes(10, seed=3, size=32)]
    for i, rec in enumerate(recs):
        rec.image = f"scene{i}.png"
    ix = tmp_path / "ix"
    for part, chunk in (("a", recs[:5]), ("b", recs[5:])):
        with JsonlWriter(tmp_path / f"{part}.jsonl") as w:
            for rec in chunk:
                w.write(rec)
    Indexer(ix, embedder=emb).run([], captions_file=tmp_path / "a.jsonl")
    app = web.create_app(ix, embedder=emb)
    c = app.test_client()
    try:
        first = c.get("/api/search?q=a+river&k=10").get_json()
        assert first["count"] == 5
        with IndexDir.open_writer(ix):  # an `index` run holds the lock: reads go on
            assert c.get("/api/search?q=a+river&k=10").get_json()["count"] == 5
        Indexer(ix, embedder=emb).run([], captions_file=tmp_path / "b.jsonl")
        after = c.get("/api/search?q=a+river&k=10").get_json()
        assert after["count"] == 10 and after["generation"] != first["generation"]
    finally:
        web.close_app(app)


# -- scenes: chips, their place, GeoJSON ---------------------------------------------------------------
@pytest.fixture(scope="module")
def geo_app(tmp_path_factory, app):
    hm.require("rasterio", "the 'geo' extra is not installed: pip install -e '.[geo]' (make test installs it)")
    from edge_t2t.describe.captions import JsonlWriter
    from edge_t2t.scene.mosaic import write_mosaic

    root = tmp_path_factory.mktemp("serve-geo")
    mosaic = write_mosaic(root / "m.tif")
    with JsonlWriter(root / "gt.jsonl") as w:
        for rec in mosaic.records():
            w.write(rec)
    ix = root / "ix"
    assert main(["index", str(mosaic.path), "--captions", str(root / "gt.jsonl"), "--index", str(ix), "--json",
                 "--tile-above", "0.1", "--chip", "256", "--overlap", "0", "--no-progress"]) == 0  # fmt: skip
    geo = web.create_app(ix, embedder=app.extensions["edge_t2t_index"].embedder)
    yield geo, ix
    web.close_app(geo)


def test_chips_show_their_place_and_export_geojson_like_the_cli(geo_app, tmp_path, capsys):
    from PIL import Image

    geo, ix = geo_app
    c = geo.test_client()
    body = c.get("/api/search?q=a+lake&k=4").get_json()
    assert body["count"] > 0
    hit = body["hits"][0]
    assert hit["scene"].endswith("m.tif") and len(hit["window"]) == 4 and len(hit["outline"]) >= 5
    assert hit["outline"][0] == hit["outline"][-1]  # a closed WGS84 ring, drawn on the page's map
    assert _strip(body["hits"]) == _cli_json(capsys, "search", "a lake", "--index", ix, "-k", "4", "--json")
    d = c.get(f"/api/image?id={hit['id']}").get_json()
    assert d["chip"]["window"] == hit["window"] and d["chip"]["outline"] == hit["outline"]
    chip = Image.open(io.BytesIO(c.get(f"/image/{hit['id']}").data))
    assert chip.size == tuple(hit["window"][2:])
    assert Image.open(io.BytesIO(c.get(f"/image/{hit['id']}/scene").data)).format == "JPEG"
    assert c.get(f"/thumb/{hit['id']}").status_code == 200
    got = json.loads(c.get("/api/export.geojson?q=a+lake&k=4").data)
    out = tmp_path / "cli.geojson"
    assert main(["search", "a lake", "--index", str(ix), "-k", "4", "--geojson", str(out)]) == 0
    want = json.loads(out.read_text())
    assert got["type"] == "FeatureCollection" and got["features"] == want["features"] and got["features"]
    rows = list(csv.DictReader(io.StringIO(c.get("/api/export.csv?q=a+lake&k=4").get_data(as_text=True))))
    assert [r["image"] for r in rows] == [h["image"] for h in body["hits"]]
    assert json.loads(rows[0]["window"]) == hit["window"] and float(rows[0]["lon"]) == hit["lon"]


# -- the page in a real browser ----------------------------------------------------------------------
CHROME_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-component-update", "--no-first-run", "--disable-dev-shm-usage")


def _live(app):
    """A real waitress server for the app on a free loopback port, in a thread: (url, server)."""
    from waitress import create_server

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = create_server(app, host="127.0.0.1", port=port, threads=4)
    threading.Thread(target=server.run, daemon=True).start()
    return f"http://127.0.0.1:{port}", server


@pytest.fixture(scope="module")
def live_server(app):
    url, server = _live(app)
    yield url
    server.close()


@pytest.fixture(scope="module")
def browser():
    chromium, driver_path = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and driver_path):
        pytest.fail("Debian's chromium and chromium-driver are needed: 'make test' installs them "
                    "(apt-get install chromium chromium-driver)")
    import os

    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    os.environ["SE_OFFLINE"] = "true"  # selenium-manager must never look anything up
    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for flag in CHROME_FLAGS:
        opts.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=driver_path), options=opts)
    driver.set_script_timeout(30)
    yield driver
    driver.quit()


def _wait(driver, predicate, timeout=60.0, what=""):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            value = predicate(driver)
            if value:
                return value
        except Exception:  # the element is not there yet
            pass
        time.sleep(0.1)
    message = driver.execute_script("return document.getElementById('message').textContent")
    raise AssertionError(f"timed out waiting for {what}; the page says: {message!r}")


def _cards(driver):
    from selenium.webdriver.common.by import By

    return driver.find_elements(By.CSS_SELECTOR, "#results .hit")


def test_page_in_headless_chromium(browser, live_server, demo):
    from selenium.webdriver.common.by import By

    d = browser
    d.get(live_server + "/")
    box = d.find_element(By.ID, "q")
    box.send_keys(demo["query"])
    d.find_element(By.ID, "go").click()
    _wait(d, lambda d: _cards(d), what="results")
    images = [c.get_attribute("data-image") for c in _cards(d)]
    assert Path(images[0]).name == demo["expected"], images
    assert "?q=" in d.current_url  # the page's own URL carries the query
    _wait(d, lambda d: d.execute_script(
        "return [...document.querySelectorAll('#results img')].every(i => i.complete && i.naturalWidth > 0)"),
        what="thumbnails")  # fmt: skip

    expected_card = next(c for c in _cards(d) if Path(c.get_attribute("data-image")).name == demo["expected"])
    expected_id = expected_card.get_attribute("data-id")
    expected_card.click()
    _wait(d, lambda d: d.find_element(By.ID, "detail").is_displayed(), what="the image's panel")
    _wait(d, lambda d: d.execute_script("const i = document.getElementById('detail-image');"
                                        "return i && i.complete && i.naturalWidth > 0"), what="the full image")
    assert len(d.find_elements(By.CSS_SELECTOR, "#variants li")) == 5

    d.find_element(By.ID, "more-like").click()
    _wait(d, lambda d: d.find_element(By.ID, "results-title").text.startswith("More like"), what="more like this")
    _wait(d, lambda d: _cards(d), what="similar results")
    similar = [c.get_attribute("data-id") for c in _cards(d)]
    assert similar and expected_id not in similar

    href = d.find_element(By.ID, "export-csv").get_attribute("href")
    assert href.startswith(live_server + "/api/export.csv?")
    text = d.execute_async_script("const done = arguments[arguments.length - 1];"
                                  "fetch(arguments[0]).then(r => r.text()).then(done);", href)
    rows = list(csv.DictReader(io.StringIO(text)))
    assert [r["image"] for r in rows] == [c.get_attribute("data-image") for c in _cards(d)]

    # a score above 1 is shown as text + place, with a line saying what the parts are (issue 27)
    top = json.loads(urlopen(f"{live_server}/api/search?q={quote(demo['query'])}&k=10").read())["hits"][0]
    d.get(f"{live_server}/?q={quote(demo['query'])}&k=10")
    _wait(d, lambda d: _cards(d), what="results again")
    meta = _cards(d)[0].find_element(By.CSS_SELECTOR, ".meta").text
    score, text, place = map(float, re.fullmatch(r"#1\s+score ([\d.]+) = text ([\d.]+) \+ place ([\d.]+)", meta).groups())
    assert score == pytest.approx(top["score"], abs=1e-4) and text == pytest.approx(top["dense"], abs=1e-3)
    assert place == pytest.approx(top["structure"], abs=1e-3) and score == pytest.approx(text + place, abs=2e-3)
    assert d.find_element(By.ID, "score-legend").is_displayed()

    d.get(f"{live_server}/?q={quote(demo['query'])}&k=5")  # a bookmark
    _wait(d, lambda d: len(_cards(d)) == 5, what="bookmarked results")
    assert Path(_cards(d)[0].get_attribute("data-image")).name == demo["expected"]
    assert d.find_element(By.ID, "q").get_attribute("value") == demo["query"]
    _wait(d, lambda d: "images" in d.find_element(By.ID, "status-body").get_attribute("textContent"), what="status")

    hosts = d.execute_script("return performance.getEntriesByType('resource').map(e => e.name)"
                             ".concat([location.href])")
    assert hosts and all(h.startswith(live_server + "/") for h in hosts), hosts
    with urlopen(live_server + "/") as resp:
        assert "default-src 'self'" in resp.headers["Content-Security-Policy"]

    # the documentation, from the page's footer link, styled and with nothing fetched elsewhere
    d.find_element(By.LINK_TEXT, "Documentation").click()
    _wait(d, lambda d: d.current_url == live_server + "/docs/", what="the docs")
    d.find_element(By.PARTIAL_LINK_TEXT, "docs/search.md").click()
    _wait(d, lambda d: d.find_element(By.TAG_NAME, "h1").text == "Searching", what="the search guide")
    assert d.execute_script("return getComputedStyle(document.querySelector('nav')).backgroundColor") != "rgba(0, 0, 0, 0)"
    hosts = d.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
    assert all(h.startswith(live_server + "/") for h in hosts), hosts


def test_page_maps_the_outlines_of_chips(browser, geo_app):
    """A scene index: the hits' outlines drawn as inline SVG from the data, one polygon per chip."""
    from selenium.webdriver.common.by import By

    geo, _ = geo_app
    url, server = _live(geo)
    try:
        browser.get(f"{url}/?q=a+lake&k=4")
        _wait(browser, lambda d: len(_cards(d)) == 4, what="scene results")
        polygons = _wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#map-svg polygon"), what="the map")
        assert sorted(p.get_attribute("data-id") for p in polygons) == sorted(c.get_attribute("data-id") for c in _cards(browser))
        assert browser.find_element(By.ID, "export-geojson").is_displayed()
        _cards(browser)[0].click()
        _wait(browser, lambda d: d.execute_script("const i = document.getElementById('detail-scene');"
                                                  "return i && i.complete && i.naturalWidth > 0"), what="the chip's scene")
    finally:
        server.close()
