"""Search results that are chips of scenes: where they are (JSON), GeoJSON for a GIS, HTML pictures.

GeoJSON: overlapping hits in one scene (their pixel windows overlap: neighbouring chips share the
overlap margin) are merged into one feature, whose outline is the footprint of the smallest pixel
window holding them all; it keeps the best rank, score and text, and lists the merged chips.
Hits in scenes without a CRS cannot be placed on a map and are left out (counted).
"""

from __future__ import annotations

import html
from collections.abc import Sequence

from ..errors import ImageError
from ..query.search import Hit
from .chipstore import ChipInfo
from .geo import feature, footprint
from .tiling import Window, open_scene

OVERVIEW_SIDE = 200
CHIP_SIDE = 200


def hit_dicts(hits: Sequence[Hit], chips: dict[str, ChipInfo]) -> list[dict]:
    """The --json contract (rank, score, image, variant, text) plus scene, window, lon, lat for chips."""
    out = []
    for h in hits:
        d = h.to_dict()
        if h.image in chips:
            d.update(chips[h.image].to_dict())
        out.append(d)
    return out


def _groups(hits: list[tuple[Hit, ChipInfo]]) -> list[list[tuple[Hit, ChipInfo]]]:
    """Connected groups of hits whose windows overlap (transitively), per scene."""
    parent = list(range(len(hits)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i in range(len(hits)):
        for j in range(i):
            a, b = hits[i][1], hits[j][1]
            if a.scene == b.scene and a.window.overlaps(b.window):
                parent[root(i)] = root(j)
    groups: dict[int, list] = {}
    for i, item in enumerate(hits):
        groups.setdefault(root(i), []).append(item)
    return sorted(groups.values(), key=lambda g: min(h.rank for h, _ in g))


def hit_features(hits: Sequence[Hit], chips: dict[str, ChipInfo]) -> tuple[list[dict], int]:
    """(GeoJSON features, number of hits left out for want of a CRS)."""
    placed = [(h, chips[h.image]) for h in hits if h.image in chips and chips[h.image].outline]
    left_out = len(hits) - len(placed)
    features = []
    for group in _groups(placed):
        best_hit, best_chip = min(group, key=lambda hc: hc[0].rank)
        window = best_chip.window
        for _, c in group:
            window = window.union(c.window)
        outline = best_chip.outline if len(group) == 1 else footprint(window, best_chip.crs, best_chip.transform).outline
        features.append(feature(outline, {
            "rank": best_hit.rank,
            "score": round(best_hit.score, 6),
            "text": best_hit.text,
            "scene": best_chip.scene,
            "window": [window.x, window.y, window.w, window.h],
            "chips": len(group),
            "ranks": sorted(h.rank for h, _ in group),
            "images": [h.image for h, _ in sorted(group, key=lambda hc: hc[0].rank)],
        }))  # fmt: skip
    return features, left_out


class ChipPictures:
    """HTML picture cells for chip hits: the chip beside a small overview of its scene with the
    chip outlined. Each scene is opened once (windowed reads; the overview is read decimated)."""

    def __init__(self, chips: dict[str, ChipInfo]):
        self.chips = chips
        self._overviews: dict[str, tuple] = {}

    def _scene(self, path: str):
        if path not in self._overviews:
            scene = open_scene(path)
            try:
                self._overviews[path] = (scene, scene.overview(OVERVIEW_SIDE))
            except BaseException:
                scene.close()
                raise
        return self._overviews[path]

    def __call__(self, hit: Hit) -> str | None:
        info = self.chips.get(hit.image)
        if info is None:
            return None
        from ..images import thumbnail_data_uri

        try:
            chip, ov = self.chip_and_overview(info)
        except ImageError:  # the scene is not on this machine (or unreadable): say so, keep the row
            return '<div class="ph">scene not<br>available here</div>'
        w: Window = info.window
        alt = html.escape(hit.image, quote=True)
        return (
            f'<img src="{thumbnail_data_uri(chip, CHIP_SIDE)}" alt="{alt}" title="chip {w.name()}"> '
            f'<img src="{thumbnail_data_uri(ov, OVERVIEW_SIDE)}" alt="overview of {html.escape(info.scene, quote=True)}" '
            f'title="scene overview, chip outlined in red">'
        )

    def chip_and_overview(self, info: ChipInfo):
        """(the chip's picture, the scene's overview with the chip outlined in red), as Pillow images."""
        from PIL import ImageDraw

        scene, overview = self._scene(info.scene)
        chip = scene.read_chip(info.window)
        ov = overview.copy()
        sx, sy = ov.width / scene.width, ov.height / scene.height
        w: Window = info.window
        ImageDraw.Draw(ov).rectangle(
            (w.x * sx, w.y * sy, max(w.x * sx + 2, (w.x + w.w) * sx - 1), max(w.y * sy + 2, (w.y + w.h) * sy - 1)),
            outline=(255, 0, 0), width=2,
        )
        return chip, ov

    def close(self) -> None:
        for scene, _ in self._overviews.values():
            scene.close()
        self._overviews.clear()
