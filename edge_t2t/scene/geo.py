"""Where chips are on Earth: footprints in the scene's CRS and in WGS84, place filters, GeoJSON.

A chip's footprint is its pixel window's four corners put through the scene's affine geotransform
(so a rotated geotransform gives a rotated footprint, handled rather than refused), then
reprojected to WGS84 longitude/latitude with rasterio (the `geo` extra). Each edge is densified
with a few points, so a UTM chip's outline stays true in lon/lat.

GeoJSON follows RFC 7946: a FeatureCollection in WGS84 (no `crs` member), [lon, lat] order,
closed rings wound counter-clockwise. QGIS opens such a file as it is.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ..errors import InputError
from ..fileio import atomic_write_text
from .tiling import Window

_DENSIFY = 4  # points per edge of a WGS84 outline
EARTH_RADIUS_M = 6_371_008.8


@dataclass
class Footprint:
    bounds: tuple[float, float, float, float]  # minx, miny, maxx, maxy in the scene CRS (pixels without one)
    outline: list[list[float]] | None  # closed CCW ring of [lon, lat], None without a CRS

    def lonlat_bounds(self) -> tuple[float, float, float, float] | None:
        if not self.outline:
            return None
        lons = [p[0] for p in self.outline]
        lats = [p[1] for p in self.outline]
        return min(lons), min(lats), max(lons), max(lats)


def _ring_pixels(w: Window) -> list[tuple[float, float]]:
    """The window's edge, (col, row) points, _DENSIFY per side, clockwise on screen."""
    x0, y0, x1, y1 = w.x, w.y, w.x + w.w, w.y + w.h
    pts = []
    for (ax, ay), (bx, by) in (((x0, y0), (x1, y0)), ((x1, y0), (x1, y1)), ((x1, y1), (x0, y1)), ((x0, y1), (x0, y0))):
        for i in range(_DENSIFY):
            f = i / _DENSIFY
            pts.append((ax + (bx - ax) * f, ay + (by - ay) * f))
    return pts


def _apply(transform: Sequence[float], col: float, row: float) -> tuple[float, float]:
    a, b, c, d, e, f = transform
    return a * col + b * row + c, d * col + e * row + f


def _ccw_closed(ring: list[list[float]]) -> list[list[float]]:
    area = sum(ring[i][0] * ring[(i + 1) % len(ring)][1] - ring[(i + 1) % len(ring)][0] * ring[i][1] for i in range(len(ring)))
    if area < 0:
        ring = ring[::-1]
    return ring + [ring[0]]


def footprint(window: Window, crs: str | None, transform: Sequence[float] | None) -> Footprint:
    if not transform:
        return Footprint((window.x, window.y, window.x + window.w, window.y + window.h), None)
    corners = [_apply(transform, *p) for p in _ring_pixels(window)]
    xs, ys = [p[0] for p in corners], [p[1] for p in corners]
    bounds = (min(xs), min(ys), max(xs), max(ys))
    if not crs:
        return Footprint(bounds, None)
    from rasterio.crs import CRS
    from rasterio.warp import transform as warp

    lons, lats = warp(CRS.from_user_input(crs), CRS.from_epsg(4326), xs, ys)
    ring = [[round(lo, 9), round(la, 9)] for lo, la in zip(lons, lats, strict=True)]
    return Footprint(bounds, _ccw_closed(ring))


# ---------------------------------------------------------------------------------------------
# Place filters


def _floats(text: str, n: int, flag: str, form: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        values = []
    if len(values) != n or not all(math.isfinite(v) for v in values):
        raise InputError(f"{flag} {text!r}: expected {form} (decimal degrees, WGS84)")
    return values


@dataclass
class PlaceFilter:
    """A query box in lon/lat for the R*Tree, plus the exact test on a chip's outline."""

    bbox: tuple[float, float, float, float]  # min_lon, min_lat, max_lon, max_lat
    near: tuple[float, float, float] | None = None  # lon, lat, metres

    @classmethod
    def within(cls, text: str) -> PlaceFilter:
        lon1, lat1, lon2, lat2 = _floats(text, 4, "--within", "LON1,LAT1,LON2,LAT2")
        if not (-90 <= min(lat1, lat2) and max(lat1, lat2) <= 90):
            raise InputError(f"--within {text!r}: latitudes must lie in [-90, 90] (order is LON,LAT)")
        return cls((min(lon1, lon2), min(lat1, lat2), max(lon1, lon2), max(lat1, lat2)))

    @classmethod
    def near_point(cls, text: str) -> PlaceFilter:
        lon, lat, metres = _floats(text, 3, "--near", "LON,LAT,METRES")
        if not -90 <= lat <= 90 or metres < 0:
            raise InputError(f"--near {text!r}: need -90 <= LAT <= 90 and METRES >= 0 (order is LON,LAT,METRES)")
        dlat = math.degrees(metres / EARTH_RADIUS_M)
        dlon = dlat / max(1e-6, math.cos(math.radians(lat)))
        return cls((lon - dlon, max(-90.0, lat - dlat), lon + dlon, min(90.0, lat + dlat)), (lon, lat, metres))

    def matches(self, outline: list[list[float]]) -> bool:
        if self.near is not None:
            lon, lat, metres = self.near
            return distance_to_polygon_m(lon, lat, outline) <= metres
        return polygon_meets_box(outline, self.bbox)


def _inside(x: float, y: float, ring: list[list[float]]) -> bool:
    inside = False
    for (x1, y1), (x2, y2) in zip(ring, ring[1:], strict=False):
        if (y1 > y) != (y2 > y) and x < x1 + (y - y1) * (x2 - x1) / (y2 - y1):
            inside = not inside
    return inside


def _segments_cross(p, q, r, s) -> bool:
    def orient(a, b, c):
        v = (b[0] - a[0]) * (c[1] - a[1]) - (b[1] - a[1]) * (c[0] - a[0])
        return (v > 0) - (v < 0)

    return orient(p, q, r) != orient(p, q, s) and orient(r, s, p) != orient(r, s, q)


def polygon_meets_box(ring: list[list[float]], box: tuple[float, float, float, float]) -> bool:
    """True when a closed ring and an axis-aligned box share any point."""
    x0, y0, x1, y1 = box
    if any(x0 <= x <= x1 and y0 <= y <= y1 for x, y in ring):
        return True
    corners = [(x0, y0), (x1, y0), (x1, y1), (x0, y1)]
    if any(_inside(x, y, ring) for x, y in corners):
        return True
    box_edges = list(zip(corners, corners[1:] + corners[:1], strict=True))
    return any(_segments_cross(a, b, c, d) for a, b in zip(ring, ring[1:], strict=False) for c, d in box_edges)


def distance_to_polygon_m(lon: float, lat: float, ring: list[list[float]]) -> float:
    """Metres from a point to a closed lon/lat ring (0 inside), in a local equirectangular plane:
    exact enough for chips (kilometres across), not for continents."""
    if _inside(lon, lat, ring):
        return 0.0
    kx = math.radians(1) * EARTH_RADIUS_M * math.cos(math.radians(lat))
    ky = math.radians(1) * EARTH_RADIUS_M
    pts = [((x - lon) * kx, (y - lat) * ky) for x, y in ring]
    best = math.inf
    for (ax, ay), (bx, by) in zip(pts, pts[1:], strict=False):
        dx, dy = bx - ax, by - ay
        t = 0.0 if dx == dy == 0 else max(0.0, min(1.0, -(ax * dx + ay * dy) / (dx * dx + dy * dy)))
        best = min(best, math.hypot(ax + t * dx, ay + t * dy))
    return best


# ---------------------------------------------------------------------------------------------
# GeoJSON


def feature(outline: list[list[float]], properties: dict) -> dict:
    return {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [outline]}, "properties": properties}


def feature_collection(features: list[dict]) -> dict:
    return {"type": "FeatureCollection", "features": features}


def write_geojson(path: str | os.PathLike, features: list[dict]) -> Path:
    path = Path(path)
    atomic_write_text(path, json.dumps(feature_collection(features), ensure_ascii=False) + "\n")
    return path
