"""Large georeferenced scenes (issue 13): tiling, footprints, place search, GeoJSON, the `tiles`
command and the schema step. The data is made here: synthetic mosaics (edge_t2t/scene/mosaic.py) whose
scenes' ground-truth descriptions stand in for the VLM, so a query for an object must come back
with a footprint that contains the object's true location."""

from __future__ import annotations

import json
import sqlite3

import helpers_media as hm
import numpy as np
import pytest

from edge_t2t.cli import main
from edge_t2t.describe.captions import JsonlWriter
from edge_t2t.errors import ImageError
from edge_t2t.index import schema
from edge_t2t.index import store as store_mod
from edge_t2t.index.store import Store
from edge_t2t.scene import tiling
from edge_t2t.scene.geo import PlaceFilter, _inside, footprint
from edge_t2t.scene.mosaic import UTM_33N, WGS84, write_mosaic
from edge_t2t.scene.tiling import Window, open_scene, plan_chips, plan_windows

hm.require("rasterio", "the 'geo' extra is not installed: pip install -e '.[geo]' (make test installs it)")

GT_FLAGS = ["--tile-above", "0.1", "--chip", "256", "--overlap", "0", "--no-progress"]


def _cli(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _index_gt(tmp_path, capsys, mosaic, extra=()) -> str:
    """Index a mosaic with its ground-truth chip descriptions; return the index dir."""
    gt = tmp_path / f"{mosaic.path.stem}.gt.jsonl"
    with JsonlWriter(gt) as w:
        for rec in mosaic.records():
            w.write(rec)
    ix = tmp_path / f"{mosaic.path.stem}.ix"
    code, out, err = _cli(capsys, "index", mosaic.path, "--captions", gt, "--index", ix, "--json", *GT_FLAGS, *extra)
    assert code == 0, err
    summary = json.loads(out)
    assert summary["scenes"]["scenes"] == 1
    return str(ix)


def _unique_objects(mosaic):
    """(kind, window, object) for kinds that occur in exactly one scene of the mosaic."""
    seen: dict[str, list] = {}
    for scene, window in mosaic.placed:
        for obj in scene.objects:
            if not obj.linear:
                seen.setdefault(obj.kind, []).append((window, obj))
    return [(kind, *found[0]) for kind, found in seen.items() if len(found) == 1]


# -- windows -----------------------------------------------------------------------------------
def test_windows_overlap_cover_the_scene_and_clamp_the_last_row_and_column():
    wins = plan_windows(1000, 700, 256, 0.125)
    step = 224
    xs = sorted({w.x for w in wins})
    ys = sorted({w.y for w in wins})
    assert xs[:4] == [0, step, 2 * step, 3 * step] and xs[-1] == 1000 - 256  # clamped, not padded
    assert ys[-1] == 700 - 256
    assert all(w.w == 256 and w.h == 256 for w in wins)
    covered = np.zeros((700, 1000), bool)
    for w in wins:
        covered[w.y : w.y + w.h, w.x : w.x + w.w] = True
    assert covered.all()
    assert plan_windows(100, 80, 256, 0.125) == [Window(0, 0, 100, 80)]  # smaller than a chip: one window
    with pytest.raises(ImageError, match="--overlap"):
        plan_windows(100, 100, 32, 0.95)


def test_default_chip_follows_the_model_input_size():
    assert tiling.chip_for_model(336) == 336
    assert tiling.chip_for_model(None) == tiling.DEFAULT_CHIP
    assert tiling.chip_for_model(32) == tiling.MIN_CHIP


# -- ground truth through the CLI ---------------------------------------------------------------
@pytest.mark.parametrize(
    "crs, origin, pixel, rotation",
    [(UTM_33N, (500_000.0, 4_650_000.0), 1.0, 0.0), (WGS84, (15.0, 42.0), 1e-5, 0.0), (UTM_33N, (400_000.0, 5_000_000.0), 0.5, 30.0)],
    ids=["utm", "epsg4326", "utm-rotated"],
)
def test_a_query_for_an_object_returns_a_footprint_containing_it(tmp_path, capsys, crs, origin, pixel, rotation):
    mosaic = write_mosaic(tmp_path / "m.tif", crs=crs, origin=origin, pixel=pixel, rotation_deg=rotation)
    ix = _index_gt(tmp_path, capsys, mosaic)
    objects = _unique_objects(mosaic)
    assert objects, "the seeded mosaic should hold at least one object kind found in only one scene"
    for kind, window, obj in objects:
        out_geo = tmp_path / f"{kind}.geojson"
        code, out, err = _cli(capsys, "search", kind, "--index", ix, "-k", "3", "--json", "--geojson", out_geo)
        assert code == 0, err
        top = json.loads(out.splitlines()[0])
        assert top["window"] == [window.x, window.y, window.w, window.h], (kind, top)
        fc = json.loads(out_geo.read_text())
        first = min(fc["features"], key=lambda f: f["properties"]["rank"])
        lon, lat = mosaic.object_lonlat(window, obj)
        assert _inside(lon, lat, first["geometry"]["coordinates"][0]), (kind, lon, lat)


def test_geojson_is_rfc7946_wgs84_with_ccw_closed_rings(tmp_path, capsys):
    mosaic = write_mosaic(tmp_path / "m.tif")
    ix = _index_gt(tmp_path, capsys, mosaic)
    out_geo = tmp_path / "hits.geojson"
    page = tmp_path / "hits.html"
    assert _cli(capsys, "search", "a lake", "--index", ix, "-k", "9", "--geojson", out_geo, "--html", page)[0] == 0
    text = page.read_text()
    assert text.count("<img") == 18 and text.count("chip outlined") == 9  # each chip beside its scene's overview
    fc = json.loads(out_geo.read_text())
    assert fc["type"] == "FeatureCollection" and "crs" not in fc and len(fc["features"]) == 9
    for f in fc["features"]:
        ring = f["geometry"]["coordinates"][0]
        assert f["type"] == "Feature" and f["geometry"]["type"] == "Polygon"
        assert ring[0] == ring[-1] and len(ring) >= 4
        assert all(14 < lon < 16 and 41 < lat < 43 for lon, lat in ring)  # [lon, lat] order, UTM 33N near 15E 42N
        area2 = sum(ring[i][0] * ring[i + 1][1] - ring[i + 1][0] * ring[i][1] for i in range(len(ring) - 1))
        assert area2 > 0  # counter-clockwise exterior ring
        assert {"rank", "score", "text", "scene", "window"} <= set(f["properties"])


def test_overlapping_hits_in_one_scene_merge_into_one_feature(tmp_path):
    from edge_t2t.query.search import Hit
    from edge_t2t.scene.chipstore import ChipInfo
    from edge_t2t.scene.scene_report import hit_features

    mosaic = write_mosaic(tmp_path / "m.tif")
    t = mosaic.transform
    wins = [Window(0, 0, 256, 256), Window(224, 0, 256, 256), Window(512, 512, 256, 256)]
    chips, hits = {}, []
    for i, w in enumerate(wins):
        name = f"m.tif#{w.name()}"
        chips[name] = ChipInfo(i, "m.tif", w, 0.0, (0, 0, 0, 0), footprint(w, mosaic.crs, t).outline, mosaic.crs, list(t))
        hits.append(Hit(i + 1, 0.9 - i / 10, name, 0, f"text {i}"))
    features, left_out = hit_features(hits, chips)
    assert left_out == 0 and len(features) == 2
    merged = features[0]["properties"]
    assert merged["ranks"] == [1, 2] and merged["window"] == [0, 0, 480, 256] and merged["text"] == "text 0"
    assert features[1]["properties"]["ranks"] == [3]


# -- place filters --------------------------------------------------------------------------------
def test_within_and_near_filter_before_ranking(tmp_path, capsys):
    mosaic = write_mosaic(tmp_path / "m.tif")
    ix = _index_gt(tmp_path, capsys, mosaic)
    kind, window, obj = _unique_objects(mosaic)[0]
    # A box around two chips that do not hold the object: both still come back, however low they
    # rank for the query without the filter (k results whenever k exist).
    others = [w for _, w in mosaic.placed if w != window][:2]
    lonlat = [mosaic.object_lonlat(w, obj) for w in others]  # the same spot inside each of the two chips
    box = [min(p[0] for p in lonlat), min(p[1] for p in lonlat), max(p[0] for p in lonlat), max(p[1] for p in lonlat)]
    code, out, err = _cli(capsys, "search", kind, "--index", ix, "-k", "2", "--json", "--within", ",".join(map(str, box)))
    assert code == 0, err
    got = [json.loads(line) for line in out.splitlines()]
    assert len(got) >= 2
    assert all(PlaceFilter.within(",".join(map(str, box))).matches(_outline(ix, g["image"])) for g in got)
    # --near the object's true location finds its chip first.
    lon, lat = mosaic.object_lonlat(window, obj)
    code, out, _ = _cli(capsys, "search", kind, "--index", ix, "-k", "1", "--json", "--near", f"{lon},{lat},20")
    assert json.loads(out)["window"] == [window.x, window.y, window.w, window.h]
    # Far away: nothing, and not an error.
    code, out, _ = _cli(capsys, "search", kind, "--index", ix, "--json", "--near=-70,10,1000")
    assert code == 0 and out == ""
    code, _, err = _cli(capsys, "search", kind, "--index", ix, "--within", "1,2,3")
    assert code == 2 and "LON1,LAT1,LON2,LAT2" in err


def test_a_place_filter_ranks_and_explains_as_the_plain_search_does(tmp_path, capsys):
    """Under --within the hits are the plain search's hits that lie in the place, in its order, with
    the same parts and constraints met: --explain says why (it printed an empty "why" column, and
    the place's hits had no parts)."""
    mosaic = write_mosaic(tmp_path / "m.tif")
    ix = _index_gt(tmp_path, capsys, mosaic)
    query = "a lake in the north"
    code, out, err = _cli(capsys, "search", query, "--index", ix, "-k", "9", "--json", "--explain", "--vector-mode", "exact")
    everywhere = [json.loads(line) for line in out.splitlines()]
    assert code == 0 and len(everywhere) == len(mosaic.placed), err  # every chip, best first
    # A thin box from the centre of the top row's first chip to the centre of its second: it meets those two only.
    centres = []
    for _, w in mosaic.placed[:2]:
        ring = footprint(w, mosaic.crs, mosaic.transform).outline[:-1]
        centres.append((sum(p[0] for p in ring) / len(ring), sum(p[1] for p in ring) / len(ring)))
    box = ",".join(map(str, (min(c[0] for c in centres), min(c[1] for c in centres),
                             max(c[0] for c in centres), max(c[1] for c in centres))))  # fmt: skip
    names = {f"{mosaic.path}#{w.name()}" for _, w in mosaic.placed[:2]}
    want = [{**h, "rank": r + 1} for r, h in enumerate(h for h in everywhere if h["image"] in names)]
    assert len(want) == 2 and want[0]["matched"] and want[0]["structure"] > 0  # the query's place is read and met

    code, out, err = _cli(capsys, "search", query, "--index", ix, "-k", "2", "--json", "--explain", "--within", box)
    assert code == 0, err
    assert [json.loads(line) for line in out.splitlines()] == want
    code, out, err = _cli(capsys, "search", query, "--index", ix, "-k", "2", "--explain", "--within", box)
    assert code == 0 and out.count("dense 0.") == 2, out  # the table's "why" column, one per hit


def _outline(ix, image):
    with Store(ix) as st:
        row = st.conn.execute("SELECT c.outline FROM chips c JOIN images i ON i.id = c.image_id WHERE i.path = ?",
                              (image,)).fetchone()  # fmt: skip
    return json.loads(row[0])


# -- awkward inputs --------------------------------------------------------------------------------
def test_no_crs_scene_tiles_with_pixel_windows_and_a_note(tmp_path, capsys):
    mosaic = write_mosaic(tmp_path / "plain.tif", crs=None)
    code, out, err = _cli(capsys, "tiles", mosaic.path, "--chip", "256", "--geojson", tmp_path / "t.geojson")
    assert code == 0
    assert "no CRS: pixel windows only" in out and "no CRS" in err
    assert json.loads((tmp_path / "t.geojson").read_text())["features"] == []
    ix = _index_gt(tmp_path, capsys, mosaic)
    code, out, err = _cli(capsys, "search", "a lake", "--index", ix, "--json", "--geojson", tmp_path / "h.geojson")
    assert code == 0 and json.loads(out.splitlines()[0])["window"]
    assert "without a map position left out" in err
    assert _cli(capsys, "search", "a lake", "--index", ix, "--json", "--within=-180,-90,180,90")[1] == ""


def test_nodata_chips_are_skipped_and_counted(tmp_path, capsys):
    mosaic = write_mosaic(tmp_path / "m.tif", nodata_cols=1)
    with open_scene(mosaic.path) as scene:
        plans = plan_chips(scene, 256, 0.0)
    assert [p.skipped for p in plans].count(True) == 3 and all(p.nodata == 1.0 for p in plans if p.skipped)
    code, out, _ = _cli(capsys, "tiles", mosaic.path, "--chip", "256", "--overlap", "0", "--json")
    rows = [json.loads(line) for line in out.splitlines()]
    assert sum(r["skipped"] for r in rows) == 3 and len(rows) == 9
    ix = tmp_path / "ix"
    gt = tmp_path / "gt.jsonl"
    with JsonlWriter(gt) as w:
        for rec in mosaic.records():
            w.write(rec)
    code, out, _ = _cli(capsys, "index", mosaic.path, "--captions", gt, "--index", ix, "--json", *GT_FLAGS)
    assert code == 0 and json.loads(out)["scenes"] == {"scenes": 1, "chips_added": 6, "chips_skipped_nodata": 3}


def test_16bit_4band_scene_is_stretched_once_per_scene(tmp_path):
    m8 = write_mosaic(tmp_path / "m8.tif")
    m16 = write_mosaic(tmp_path / "m16.tif", dtype="uint16", bands=4)
    with open_scene(m16.path) as scene, open_scene(m8.path) as ref:
        assert scene.count == 4 and scene.stretch.lo_hi is not None and scene.stretch.source == "sample"
        assert any("first 3 of 4 bands" in n for n in scene.notes)
        mapping: dict[int, int] = {}
        for w in (Window(0, 0, 256, 256), Window(256, 256, 256, 256)):
            got = np.asarray(scene.read_chip(w), np.float64)
            want = np.asarray(ref.read_chip(w), np.float64)
            assert got.shape == (256, 256, 3) and 40 < got.std()
            for band in range(3):  # a linear stretch keeps each band's picture
                assert np.corrcoef(got[..., band].ravel(), want[..., band].ravel())[0, 1] > 0.95
            raw = scene._read(w)[0][0].ravel()
            for value, shown in zip(raw.tolist(), got[..., 0].ravel().astype(int).tolist(), strict=True):
                assert mapping.setdefault(value, shown) == shown  # same value, same grey, in every chip


def test_truncated_geotiff_fails_with_one_line(tmp_path, capsys):
    mosaic = write_mosaic(tmp_path / "m.tif", compress=None)
    data = mosaic.path.read_bytes()
    bad = tmp_path / "cut.tif"
    bad.write_bytes(data[: len(data) // 3])
    code, _, err = _cli(capsys, "tiles", bad)
    assert code == 1 and str(bad) in err and len(err.strip().splitlines()) == 1
    gt = tmp_path / "gt.jsonl"
    with JsonlWriter(gt) as w:
        for rec in mosaic.records(name=bad):
            w.write(rec)
    code, out, err = _cli(capsys, "index", bad, "--captions", gt, "--index", tmp_path / "ix", "--json", *GT_FLAGS)
    assert code == 1
    failures = json.loads(out)["failures"]
    assert len(failures) == 1 and failures[0]["image"] == str(bad.resolve()) and "\n" not in failures[0]["error"]


def test_geotiff_without_the_geo_extra_names_it_and_plain_images_still_tile(tmp_path, monkeypatch):
    from PIL import Image

    mosaic = write_mosaic(tmp_path / "m.tif")
    monkeypatch.setattr(tiling, "_rasterio", lambda: None)
    with pytest.raises(ImageError, match=r"edge-t2t\[geo\]") as info:
        open_scene(mosaic.path)
    assert "\n" not in str(info.value)
    png = tmp_path / "big.png"
    Image.new("RGB", (700, 300), (10, 120, 30)).save(png)
    with open_scene(png) as scene:
        assert not scene.georeferenced and len(plan_chips(scene, 256, 0.125)) == 6
        assert np.asarray(scene.read_chip(Window(444, 44, 256, 256))).mean(axis=(0, 1)).round().tolist() == [10, 120, 30]


def test_rotated_footprint_follows_the_rotation(tmp_path):
    mosaic = write_mosaic(tmp_path / "r.tif", rotation_deg=30.0)
    with open_scene(mosaic.path) as scene:
        assert scene.rotated and any("rotated" in n for n in scene.notes)
        fp = footprint(Window(0, 0, 256, 256), scene.crs, scene.transform)
        a_, _, _, d_, _, _ = scene.transform[:6]
    # The raster's x axis on the map, from the GeoTIFF's own affine (here -30 degrees: turned
    # clockwise); every edge piece of the outline runs along it or across it. The 0.1 degree left
    # over is UTM's meridian convergence; a rotation the wrong way round would give +30.
    axis = np.degrees(np.arctan2(d_, a_))
    assert axis == pytest.approx(-30.0)
    ring = np.array(fp.outline)
    for a, b in zip(ring, ring[1:], strict=False):
        edge = b - a
        angle = np.degrees(np.arctan2(edge[1], edge[0] * np.cos(np.radians(a[1]))))
        assert abs((angle - axis + 45) % 90 - 45) < 0.5, angle


# -- incremental runs ------------------------------------------------------------------------------
def test_reindex_skips_an_unchanged_scene_and_drops_a_deleted_one(tmp_path, capsys):
    (tmp_path / "data").mkdir()
    mosaic = write_mosaic(tmp_path / "data" / "m.tif")
    gt = tmp_path / "gt.jsonl"
    with JsonlWriter(gt) as w:
        for rec in mosaic.records():
            w.write(rec)
    ix = tmp_path / "ix"
    args = ["index", tmp_path / "data", "--captions", gt, "--index", ix, "--json", *GT_FLAGS]
    assert json.loads(_cli(capsys, *args)[1])["scenes"]["chips_added"] == 9
    again = json.loads(_cli(capsys, *args)[1])
    assert again["skipped"] == 1 and again["scenes"]["chips_added"] == 0
    mosaic.path.unlink()
    gone = json.loads(_cli(capsys, *args)[1])
    assert gone["removed"] == 1
    with Store(ix) as st:
        assert st.counts()["images_ok"] == 0
        assert st.conn.execute("SELECT COUNT(*) FROM chips_rtree").fetchone()[0] == 0


# -- schema --------------------------------------------------------------------------------------
def test_v2_store_migrates_to_the_scenes_schema_keeping_rows(tmp_path):
    ix = tmp_path / "ix"
    ix.mkdir()
    conn = sqlite3.connect(ix / store_mod.STORE_FILE, isolation_level=None)
    conn.execute("PRAGMA foreign_keys=ON")
    v2 = schema.MIGRATIONS.index(schema.SCENES_MIGRATION)
    assert schema.migrate(conn, schema.MIGRATIONS[:v2]) == v2
    conn.execute("INSERT INTO images(id, path, sha256, status, source, indexed_at) VALUES (3, '/x/a.jpg', 'aa', 'ok', 'vlm', 1.0)")
    conn.close()
    with Store(ix) as st:
        assert st.conn.execute("PRAGMA user_version").fetchone()[0] == schema.SCHEMA_VERSION
        tables = {r[0] for r in st.conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        assert {"scenes", "chips", "chips_rtree"} <= tables
        assert list(st.images()) == ["/x/a.jpg"]  # plain images are untouched and still listed
        with st.transaction():
            chip = st.put_image("/x/s.tif#0,0,8,8")
            st.conn.execute("INSERT INTO scenes(path, width, height, chip, overlap, indexed_at) VALUES ('/x/s.tif', 8, 8, 8, 0, 1)")
            st.conn.execute("INSERT INTO chips(image_id, scene_id, x, y, w, h) VALUES (?, 1, 0, 0, 8, 8)", (chip,))
        assert list(st.images()) == ["/x/a.jpg"]  # a chip is not a file of its own


# -- the VLM path (tiny test model: the machinery, not the meaning) ---------------------------------
def test_caption_and_index_describe_scene_chips_with_the_vlm(tmp_path, capsys, monkeypatch):
    import helpers_media as hm

    model, mmproj = hm.test_vlm_files()
    monkeypatch.setenv("EDGE_T2T_CACHE_DIR", str(tmp_path / "cache"))
    mosaic = write_mosaic(tmp_path / "m.tif", grid=(2, 2), tile=128)
    # One variant, room for the longest schema-valid answer: the seeded test model describes every chip
    flags = ["--tile-above", "0.01", "--chip", "128", "--overlap", "0", "--variants", "1", "--max-tokens", "1300",
             "--vlm", model, "--mmproj", mmproj]  # fmt: skip
    names = sorted(f"{mosaic.path}#{w.name()}" for _, w in mosaic.placed)
    ix = tmp_path / "ix"

    # First `index`, with the model failing on one chip (UnusableAnswer, as when its answer is unusable):
    # the other chips are kept and the scene stays 'partial', to be looked at again.
    from edge_t2t.describe import describer

    real_describe, broken = describer.describe_image, names[1]

    def fails_on_one_chip(vlm, image, *a, **k):
        if image.path == broken:
            raise describer.UnusableAnswer("the model gave no usable description (after one retry)")
        return real_describe(vlm, image, *a, **k)

    monkeypatch.setattr(describer, "describe_image", fails_on_one_chip)
    code, out, err = _cli(capsys, "index", mosaic.path, "--index", ix, "--json", "--no-progress", *flags)
    summary = json.loads(out)
    assert code == 1, err
    assert summary["scenes"]["chips_added"] == len(names) - 1 and [f["image"] for f in summary["failures"]] == [broken]
    with Store(ix) as st:
        assert st.conn.execute("SELECT status FROM scenes").fetchone()[0] == "partial"
    monkeypatch.setattr(describer, "describe_image", real_describe)

    # `caption` describes every chip (the failed one now; the others come from the cache)
    code, out, err = _cli(capsys, "caption", mosaic.path, "--json", *flags)
    recs = [json.loads(line) for line in out.splitlines()]
    assert code == 0, err
    assert sorted(r["image"] for r in recs) == names
    assert [r["cached"] for r in recs if r["image"] == broken] == [False] and sum(r["cached"] for r in recs) == 3
    assert all(r["test_model"] and r["scene"] == str(mosaic.path) and len(r["window"]) == 4 for r in recs)

    # index again: only the missing chip is added (through the caption cache), and the scene is whole
    code, out, err = _cli(capsys, "index", mosaic.path, "--index", ix, "--json", "--no-progress", *flags)
    summary = json.loads(out)
    assert code == 0, err
    assert summary["scenes"]["chips_added"] == 1 and summary["failed"] == 0 and summary["failures"] == []
    with Store(ix) as st:
        rows = st.conn.execute("SELECT i.source, c.outline FROM images i JOIN chips c ON c.image_id = i.id").fetchall()
        status = st.conn.execute("SELECT status FROM scenes").fetchone()[0]
    assert len(rows) == len(names) and all(src == "vlm" and outline for src, outline in rows)
    assert status == "ok"


def test_caption_of_a_scene_ends_with_the_summary_a_plain_run_gives(tmp_path, capsys, monkeypatch):
    """The closing line counts a scene's chips as it counts plain images: seconds, rate, cache hits and
    quality notes (the scene path left them at zero: "4 captioned, 0 from cache, 0 failed in 0.0 s")."""
    import re

    from edge_t2t.describe import describer

    model, mmproj = hm.test_vlm_files()
    monkeypatch.setenv("EDGE_T2T_CACHE_DIR", str(tmp_path / "cache"))
    mosaic = write_mosaic(tmp_path / "m.tif", grid=(2, 2), tile=128)
    noted = f"{mosaic.path}#0,0,128,128"
    real_describe = describer.describe_image

    def notes_one_chip(vlm, image, *a, **k):  # one chip's answer kept with a quality note
        record = real_describe(vlm, image, *a, **k)
        if image.path == noted:
            record.extra["problems"] = ["variant 0: one_sentence too short"]
        return record

    monkeypatch.setattr(describer, "describe_image", notes_one_chip)
    out = tmp_path / "chips.jsonl"
    flags = ["--tile-above", "0.01", "--chip", "128", "--overlap", "0", "--variants", "1", "--max-tokens", "1300",
             "--vlm", model, "--mmproj", mmproj, "--out", out]  # fmt: skip
    line = re.compile(r"(\d+) captioned, (\d+) from cache, (\d+) failed(?:, (\d+) with quality notes)?"
                      r" in ([\d.]+) s(?: \(([\d.]+) images/min\))? in (.+)")  # fmt: skip

    code, _, err = _cli(capsys, "caption", mosaic.path, *flags)
    assert code == 0, err
    recs = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(recs) == 4 and [r["image"] for r in recs if r.get("problems")] == [noted]
    got = line.fullmatch(err.strip().splitlines()[-1])
    assert got, err
    captioned, cached, failed, noted_count, seconds, rate, where = got.groups()
    assert (captioned, cached, failed, noted_count, where) == ("4", "0", "0", "1", str(out))
    # the chips are described one after another within the run: it took at least their seconds
    assert float(seconds) + 0.05 >= sum(r["seconds"] for r in recs) > 0
    assert float(rate) == pytest.approx(4 / float(seconds) * 60, rel=0.05)

    # the same again: every chip from the cache (its quality note with it), no rate without new captions
    code, _, err = _cli(capsys, "caption", mosaic.path, *flags)
    assert code == 0, err
    got = line.fullmatch(err.strip().splitlines()[-1])
    assert got, err
    assert got.group(1, 2, 3, 4, 6) == ("0", "4", "0", "1", None)


def test_a_scene_without_any_describer_is_one_failure_naming_the_fix(tmp_path):
    from fake_embedder import FakeEmbedder

    from edge_t2t.index.indexer import Indexer
    from edge_t2t.scene.scene_index import TilingOptions

    mosaic = write_mosaic(tmp_path / "m.tif")
    tiling_opts = TilingOptions(chip=256, overlap=0.0, tile_above_mp=0.1)
    summary = Indexer(tmp_path / "ix", embedder=FakeEmbedder(), tiling=tiling_opts).run([mosaic.path])
    assert summary.failed == 1 and len(summary.failures) == 1
    path, why = summary.failures[0]
    assert path == str(mosaic.path.resolve()) and "--vlm" in why and "--captions" in why and "#0,0,256,256" in why


def test_a_png_bomb_is_not_taken_for_a_scene(tmp_path):
    import helpers_media as hm
    from PIL import Image

    from edge_t2t.scene.scene_index import TilingOptions

    opts = TilingOptions(tile_above_mp=0.1)
    assert not opts.is_scene(hm.png_bomb(tmp_path / "bomb.png"))  # left to load_image, which refuses it by name
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (400, 500, 3), dtype=np.uint8)).save(tmp_path / "big.png")
    assert opts.is_scene(tmp_path / "big.png")
