"""The store's scene and chip tables (schema step schema.SCENES_MIGRATION): a small API over them.

A chip is an `images` row named SCENE#x,y,w,h, so everything that ranks, prints or caches images
handles chips unchanged; its `chips` row says where it is, and `chips_rtree` finds chips by place.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

from ..index.store import Store
from .geo import Footprint, PlaceFilter
from .tiling import Window


@dataclass
class SceneRow:
    id: int
    path: str
    size: int | None
    mtime_ns: int | None
    sha256: str
    chip: int
    overlap: float
    status: str


@dataclass
class ChipInfo:
    image_id: int
    scene: str
    window: Window
    nodata: float
    bounds: tuple[float, float, float, float]
    outline: list[list[float]] | None
    crs: str | None
    transform: list[float] | None

    def to_dict(self) -> dict:
        out = {"scene": self.scene, "window": [self.window.x, self.window.y, self.window.w, self.window.h]}
        if self.outline:
            lons = [p[0] for p in self.outline[:-1]]
            lats = [p[1] for p in self.outline[:-1]]
            out["lon"] = round(sum(lons) / len(lons), 7)
            out["lat"] = round(sum(lats) / len(lats), 7)
        return out


def scene_rows(store: Store) -> dict[str, SceneRow]:
    rows = store.conn.execute("SELECT id, path, size, mtime_ns, sha256, chip, overlap, status FROM scenes")
    return {r[1]: SceneRow(*r) for r in rows}


def put_scene(store: Store, path: str, *, size, mtime_ns, sha256: str, scene, chip: int, overlap: float) -> int:
    """Insert (or replace the facts of) a scene; its chips stay (the caller removes stale ones)."""
    values = (
        size, mtime_ns, sha256, scene.width, scene.height, scene.crs,
        json.dumps(list(scene.transform)) if scene.transform else None, chip, overlap,
        json.dumps(scene.stretch.to_dict() if scene.stretch else {}), json.dumps(scene.notes), time.time(),
    )  # fmt: skip
    row = store.conn.execute("SELECT id FROM scenes WHERE path = ?", (path,)).fetchone()
    if row:
        store.conn.execute(
            "UPDATE scenes SET size=?, mtime_ns=?, sha256=?, width=?, height=?, crs=?, transform=?, chip=?, "
            "overlap=?, stretch=?, notes=?, indexed_at=?, status='partial' WHERE id=?",
            (*values, row[0]),
        )
        return int(row[0])
    cur = store.conn.execute(
        "INSERT INTO scenes(size, mtime_ns, sha256, width, height, crs, transform, chip, overlap, stretch, notes, "
        "indexed_at, path) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (*values, path),
    )
    return int(cur.lastrowid)


def finish_scene(store: Store, scene_id: int, *, total: int, skipped: int, complete: bool) -> None:
    store.conn.execute(
        "UPDATE scenes SET chips_total=?, chips_skipped=?, status=? WHERE id=?",
        (total, skipped, "ok" if complete else "partial", scene_id),
    )


def update_scene_file(store: Store, scene_id: int, *, path: str, size, mtime_ns) -> None:
    store.conn.execute("UPDATE scenes SET path=?, size=?, mtime_ns=? WHERE id=?", (path, size, mtime_ns, scene_id))


def chip_windows(store: Store, scene_id: int) -> dict[Window, int]:
    """The chips already stored for a scene: window -> image id."""
    rows = store.conn.execute("SELECT image_id, x, y, w, h FROM chips WHERE scene_id = ?", (scene_id,))
    return {Window(*r[1:]): int(r[0]) for r in rows}


def add_chip(store: Store, image_id: int, scene_id: int, window: Window, nodata: float, fp: Footprint) -> None:
    store.conn.execute(
        "INSERT INTO chips(image_id, scene_id, x, y, w, h, nodata, minx, miny, maxx, maxy, outline) "
        "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (image_id, scene_id, window.x, window.y, window.w, window.h, nodata, *fp.bounds,
         json.dumps(fp.outline) if fp.outline else None),
    )  # fmt: skip
    box = fp.lonlat_bounds()
    if box is not None:
        store.conn.execute(
            "INSERT INTO chips_rtree(image_id, min_lon, max_lon, min_lat, max_lat) VALUES (?, ?, ?, ?, ?)",
            (image_id, box[0], box[2], box[1], box[3]),
        )


def remove_chips(store: Store, image_ids: list[int]) -> list[int]:
    """Delete chips (their images, texts and R*Tree rows); return the removed vector keys."""
    for image_id in image_ids:
        store.conn.execute("DELETE FROM chips_rtree WHERE image_id = ?", (image_id,))
    return store.remove_images(image_ids)


def remove_scene(store: Store, scene_id: int) -> list[int]:
    keys = remove_chips(store, list(chip_windows(store, scene_id).values()))
    store.conn.execute("DELETE FROM scenes WHERE id = ?", (scene_id,))
    return keys


def images_in_place(store: Store, place: PlaceFilter) -> list[int]:
    """Ids of described chips whose WGS84 outline meets the place (R*Tree box, then the exact test)."""
    min_lon, min_lat, max_lon, max_lat = place.bbox
    rows = store.conn.execute(
        "SELECT r.image_id, c.outline FROM chips_rtree r JOIN chips c ON c.image_id = r.image_id "
        "JOIN images i ON i.id = r.image_id AND i.status = 'ok' "
        "WHERE r.max_lon >= ? AND r.min_lon <= ? AND r.max_lat >= ? AND r.min_lat <= ?",
        (min_lon, max_lon, min_lat, max_lat),
    )
    return sorted(int(r[0]) for r in rows if place.matches(json.loads(r[1])))


def chip_info(store: Store, image_paths: list[str]) -> dict[str, ChipInfo]:
    """Where each of these images is, for those that are chips of a scene (by image path)."""
    out: dict[str, ChipInfo] = {}
    for i in range(0, len(image_paths), 500):
        chunk = image_paths[i : i + 500]
        q = ",".join("?" * len(chunk))
        for r in store.conn.execute(
            "SELECT i.path, c.image_id, s.path, c.x, c.y, c.w, c.h, c.nodata, c.minx, c.miny, c.maxx, c.maxy, "
            "c.outline, s.crs, s.transform FROM images i JOIN chips c ON c.image_id = i.id "
            f"JOIN scenes s ON s.id = c.scene_id WHERE i.path IN ({q})",
            chunk,
        ):
            out[r[0]] = ChipInfo(
                r[1], r[2], Window(*r[3:7]), r[7], tuple(r[8:12]), json.loads(r[12]) if r[12] else None,
                r[13], json.loads(r[14]) if r[14] else None,
            )  # fmt: skip
    return out


def scene_geo(store: Store, scene_path: str) -> tuple[str | None, list[float] | None]:
    row = store.conn.execute("SELECT crs, transform FROM scenes WHERE path = ?", (scene_path,)).fetchone()
    if not row:
        return None, None
    return row[0], json.loads(row[1]) if row[1] else None
