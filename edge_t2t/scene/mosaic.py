"""Synthetic georeferenced mosaics with ground truth, for tests and benches of scene tiling.

A mosaic is a grid of synthetic scenes (scenes.py) written as one GeoTIFF, tile by tile (windowed
writes, so a 20,000-pixel mosaic never sits in memory). Every placed object keeps its pixel box,
so its true position in the mosaic's CRS and in lon/lat is known; each scene's ground-truth
descriptions, named as the chip that covers exactly that scene (SCENE#x,y,w,h), stand in for the
VLM. Needs the `geo` extra (rasterio).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..demo.scenes import PlacedObject, Scene, describe, make_scenes
from ..records import CaptionRecord
from .tiling import Window, chip_name

UTM_33N = "EPSG:32633"
WGS84 = "EPSG:4326"


@dataclass
class Mosaic:
    path: Path
    tile: int
    grid: tuple[int, int]  # columns, rows of scenes
    crs: str | None
    transform: tuple[float, ...] | None  # a, b, c, d, e, f
    placed: list[tuple[Scene, Window]] = field(default_factory=list)

    def object_lonlat(self, window: Window, obj: PlacedObject) -> tuple[float, float]:
        """The true lon/lat of the centre of an object of the scene at `window`."""
        from rasterio.crs import CRS
        from rasterio.warp import transform as warp

        x0, y0, x1, y1 = obj.bbox
        col, row = window.x + (x0 + x1) / 2, window.y + (y0 + y1) / 2
        a, b, c, d, e, f = self.transform
        x, y = a * col + b * row + c, d * col + e * row + f
        lons, lats = warp(CRS.from_user_input(self.crs), CRS.from_epsg(4326), [x], [y])
        return lons[0], lats[0]

    def records(self, name: str | None = None) -> list[CaptionRecord]:
        """Ground-truth records, one per scene, named as the chip that covers it exactly."""
        out = []
        for scene, window in self.placed:
            rec = describe(scene)
            rec.image = chip_name(name or self.path, window)
            out.append(rec)
        return out


def write_mosaic(
    path: str | os.PathLike,
    *,
    grid: tuple[int, int] = (3, 3),
    tile: int = 256,
    seed: int = 0,
    crs: str | None = UTM_33N,
    origin: tuple[float, float] = (500_000.0, 4_650_000.0),
    pixel: float = 1.0,
    rotation_deg: float = 0.0,
    dtype: str = "uint8",
    bands: int = 3,
    nodata_cols: int = 0,
    distinct_scenes: int | None = None,
    compress: str | None = "deflate",
) -> Mosaic:
    """Write a grid of synthetic scenes as a tiled GeoTIFF; return what was placed where.

    `pixel` is the ground size of a pixel in CRS units (metres for UTM, degrees for EPSG:4326);
    `rotation_deg` rotates the geotransform; `crs=None` writes no georeferencing at all.
    `dtype='uint16'` scales to 12-bit values; `bands=4` adds a near-infrared-like band.
    The last `nodata_cols` columns of scenes are written as no-data (value 0, declared).
    `distinct_scenes` cycles that many rendered scenes (big bench mosaics render 40, not 6,000).
    """
    import rasterio
    from rasterio.transform import Affine

    cols, rows = grid
    width, height = cols * tile, rows * tile
    affine = None
    if crs is not None:
        affine = Affine.translation(*origin) @ Affine.rotation(-rotation_deg) @ Affine.scale(pixel, -pixel)
    profile = {
        "driver": "GTiff", "width": width, "height": height, "count": bands, "dtype": dtype,
        "tiled": True, "blockxsize": min(256, tile), "blockysize": min(256, tile), "nodata": 0,
        **({"crs": crs, "transform": affine} if crs is not None else {}),
        **({"compress": compress} if compress else {}),
    }  # fmt: skip
    pool = make_scenes(distinct_scenes or cols * rows, seed=seed, size=tile)
    mosaic = Mosaic(Path(path), tile, grid, crs, tuple(affine)[:6] if affine is not None else None)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # NotGeoreferencedWarning for crs=None, on purpose
        with rasterio.open(path, "w", **profile) as dst:
            for r in range(rows):
                for c in range(cols):
                    window = Window(c * tile, r * tile, tile, tile)
                    if c >= cols - nodata_cols:
                        continue  # never written: the declared no-data value (0) everywhere
                    scene = pool[(r * cols + c) % len(pool)]
                    rgb = np.asarray(scene.image, dtype=np.uint8)
                    data = _bands(rgb, dtype, bands)
                    data = np.where(data == 0, 1, data)  # real pixels never equal the no-data value
                    from rasterio.windows import Window as RioWindow

                    dst.write(data, window=RioWindow(window.x, window.y, tile, tile))
                    mosaic.placed.append((scene, window))
    return mosaic


def _bands(rgb: np.ndarray, dtype: str, bands: int) -> np.ndarray:
    chans = [rgb[..., i] for i in range(3)]
    if bands >= 4:
        chans.append(rgb[..., 1])  # vegetation is green: a fake NIR that follows it
    data = np.stack(chans[:bands])
    if dtype == "uint16":
        return (data.astype(np.uint32) * 4095 // 255 + 100).astype(np.uint16)  # 12-bit sensor range
    return data.astype(dtype)
