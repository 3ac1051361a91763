"""Synthetic aerial scenes with exact ground truth, for measuring retrieval without external data.

A scene is a 3x3 grid of named regions (top = north, left = west). A river or a road may cross the
scene along one column (north-south) or one row (east-west); the other objects (lakes, runways,
buildings, fields, forest, storage tanks) each fill part of one free cell, so nothing overlaps and
every statement made about a scene can be checked against what the code placed.

`describe` writes RSRT-form ground truth (5 variants of one_sentence / features / caption) from the
placed objects, and `directional_queries` picks queries that exactly one scene satisfies.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..fileio import atomic_write_text
from ..hashing import sha256_bytes, sha256_file
from ..images import to_png_bytes
from ..records import CaptionRecord, Feature, Variant

ROWS = ("north", "centre", "south")
COLS = ("west", "centre", "east")
REGIONS = (
    "north-west", "north", "north-east",
    "west", "centre", "east",
    "south-west", "south", "south-east",
)
# Positions a feature may carry (records.Feature): the nine regions plus "across".
POSITIONS = frozenset(REGIONS) | {"across"}
SIZES = ("small", "medium", "large")
LINEAR_KINDS = ("river", "road")
AREA_KINDS = ("lake", "runway", "buildings", "fields", "forest", "storage tanks")
KINDS = LINEAR_KINDS + AREA_KINDS

# Names each kind may be called by. The sets are disjoint, so a test can check that a description
# only names objects that were placed.
SYNONYMS: dict[str, tuple[str, ...]] = {
    "river": ("river", "meandering river", "winding river"),
    "road": ("road", "paved road", "straight road"),
    "lake": ("lake", "pond", "water body"),
    "runway": ("runway", "airstrip", "landing strip"),
    "buildings": ("buildings", "cluster of buildings", "group of houses"),
    "fields": ("fields", "farmland", "patchwork of cultivated fields"),
    "forest": ("forest", "woodland", "patch of dense trees"),
    "storage tanks": ("storage tanks", "oil tanks", "cylindrical tanks"),
}
PLURAL = {"buildings", "fields", "storage tanks"}
# Words for the test's "only placed objects are mentioned" check.
VOCABULARY: dict[str, tuple[str, ...]] = {
    "river": ("river",),
    "road": ("road",),
    "lake": ("lake", "pond", "water body"),
    "runway": ("runway", "airstrip", "landing strip", "airfield"),
    "buildings": ("building", "houses"),
    "fields": ("field", "farmland"),
    "forest": ("forest", "woodland", "trees"),
    "storage tanks": ("tank",),
}


def region_name(row: int, col: int) -> str:
    return REGIONS[row * 3 + col]


@dataclass(frozen=True)
class PlacedObject:
    kind: str
    region: str  # for a linear object: the column (west/centre/east) or row (north/centre/south)
    size: str
    row: int | None = None  # None for a north-south linear object
    col: int | None = None  # None for an east-west linear object
    orientation: str = ""  # "north-south" or "east-west" for rivers and roads
    bbox: tuple[int, int, int, int] = (0, 0, 0, 0)  # pixels, x0 y0 x1 y1

    @property
    def linear(self) -> bool:
        return self.kind in LINEAR_KINDS


@dataclass
class Scene:
    id: str
    file_name: str
    objects: list[PlacedObject]
    image: Any = field(repr=False)  # PIL.Image.Image
    seed: int = 0

    def kinds(self) -> set[str]:
        return {o.kind for o in self.objects}

    def find(self, kind: str) -> list[PlacedObject]:
        return [o for o in self.objects if o.kind == kind]


# ---------------------------------------------------------------------------------------------
# Layout and drawing


def _layout(rng: random.Random, size: int) -> list[PlacedObject]:
    cell = size / 3
    objects: list[PlacedObject] = []
    blocked: set[tuple[int, int]] = set()
    # Up to one river and one road; when both, they cross at right angles (a bridge).
    linear = rng.choice([[], ["river"], ["road"], ["river"], ["river", "road"], ["road", "river"]])
    first_axis = rng.choice(["north-south", "east-west"])
    for i, kind in enumerate(linear):
        axis = first_axis if i == 0 else ("east-west" if first_axis == "north-south" else "north-south")
        line = rng.randrange(3)
        lsize = rng.choice(("medium", "large")) if kind == "river" else rng.choice(("small", "medium"))
        if axis == "north-south":
            blocked |= {(r, line) for r in range(3)}
            box = (int(line * cell), 0, int((line + 1) * cell), size)
            objects.append(PlacedObject(kind, COLS[line], lsize, None, line, axis, box))
        else:
            blocked |= {(line, c) for c in range(3)}
            box = (0, int(line * cell), size, int((line + 1) * cell))
            objects.append(PlacedObject(kind, ROWS[line], lsize, line, None, axis, box))
    free = [(r, c) for r in range(3) for c in range(3) if (r, c) not in blocked]
    n_area = min(len(free), rng.randint(2, 4))
    kinds = rng.sample(AREA_KINDS, n_area)
    cells = rng.sample(free, n_area)
    for kind, (r, c) in zip(kinds, cells, strict=True):
        osize = rng.choice(SIZES)
        frac = {"small": 0.5, "medium": 0.72, "large": 0.92}[osize]
        w = h = frac * cell
        # Where the size leaves room, nudge the object inside its cell so scenes are not grids.
        x0 = c * cell + (cell - w) / 2 + rng.uniform(-1, 1) * (cell - w) / 3
        y0 = r * cell + (cell - h) / 2 + rng.uniform(-1, 1) * (cell - h) / 3
        box = (int(x0), int(y0), int(x0 + w), int(y0 + h))
        orient = rng.choice(("north-south", "east-west")) if kind == "runway" else ""
        objects.append(PlacedObject(kind, region_name(r, c), osize, r, c, orient, box))
    return objects


def _background(rng: random.Random, size: int):
    import numpy as np
    from PIL import Image

    nrng = np.random.default_rng(rng.randrange(2**32))
    base = np.array(rng.choice([(168, 160, 118), (150, 158, 110), (176, 164, 132), (140, 150, 104)]), float)
    coarse = nrng.normal(0, 14, (size // 16 + 1, size // 16 + 1, 1))
    coarse_img = Image.fromarray(np.clip(coarse[..., 0] + 128, 0, 255).astype("uint8")).resize(
        (size, size), Image.BILINEAR
    )
    smooth = np.asarray(coarse_img, float)[..., None] - 128
    fine = nrng.normal(0, 5, (size, size, 1))
    pixels = np.clip(base + smooth + fine, 0, 255).astype("uint8")
    return Image.fromarray(pixels, "RGB")


def _jitter(rng: random.Random, colour: tuple[int, int, int], amount: int = 12) -> tuple[int, int, int]:
    return tuple(max(0, min(255, v + rng.randint(-amount, amount))) for v in colour)  # type: ignore[return-value]


def _draw_river(draw, rng, obj: PlacedObject, size: int) -> None:
    import math

    cell = size / 3
    width = {"medium": 11, "large": 17}.get(obj.size, 11)
    amp, period, phase = rng.uniform(4, cell / 5), rng.uniform(size / 2, size), rng.uniform(0, 6.3)
    centre = ((obj.col if obj.col is not None else obj.row) + 0.5) * cell
    pts = []
    for t in range(-8, size + 9, 4):
        off = centre + amp * math.sin(2 * math.pi * t / period + phase)
        pts.append((off, t) if obj.orientation == "north-south" else (t, off))
    bank = _jitter(rng, (96, 120, 80), 8)
    water = _jitter(rng, (52, 92, 132), 8)
    draw.line(pts, fill=bank, width=width + 6, joint="curve")
    draw.line(pts, fill=water, width=width, joint="curve")


def _draw_road(draw, rng, obj: PlacedObject, size: int) -> None:
    cell = size / 3
    width = {"small": 6, "medium": 9}.get(obj.size, 7)
    centre = ((obj.col if obj.col is not None else obj.row) + 0.5) * cell + rng.uniform(-cell / 6, cell / 6)
    line = [(centre, 0), (centre, size)] if obj.orientation == "north-south" else [(0, centre), (size, centre)]
    draw.line(line, fill=_jitter(rng, (112, 112, 108), 6), width=width)
    for t in range(0, size, 14):  # dashed centre line
        seg = [(centre, t), (centre, t + 6)] if obj.orientation == "north-south" else [(t, centre), (t + 6, centre)]
        draw.line(seg, fill=(225, 215, 150), width=1)


def _draw_lake(draw, rng, box) -> None:
    import math

    x0, y0, x1, y1 = box
    cx, cy, rx, ry = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2, (y1 - y0) / 2
    pts = []
    for i in range(18):
        a = 2 * math.pi * i / 18
        k = rng.uniform(0.72, 1.0)
        pts.append((cx + k * rx * math.cos(a), cy + k * ry * math.sin(a)))
    draw.polygon(pts, fill=_jitter(rng, (86, 118, 86), 8))
    inner = [(cx + 0.88 * (x - cx), cy + 0.88 * (y - cy)) for x, y in pts]
    draw.polygon(inner, fill=_jitter(rng, (38, 78, 128), 10))


def _draw_runway(draw, rng, obj: PlacedObject) -> None:
    x0, y0, x1, y1 = obj.bbox
    half_w = max(4, (x1 - x0) * 0.09)
    ew = obj.orientation == "east-west"
    mid = (y0 + y1) / 2 if ew else (x0 + x1) / 2
    lo, hi = (x0, x1) if ew else (y0, y1)

    def pt(along: float, across: float) -> tuple[float, float]:  # runway axes -> pixels
        return (along, mid + across) if ew else (mid + across, along)

    def rect(a0, a1, c0, c1) -> tuple[float, float, float, float]:
        (ax, ay), (bx, by) = pt(a0, c0), pt(a1, c1)
        return (min(ax, bx), min(ay, by), max(ax, bx), max(ay, by))

    draw.rectangle(rect(lo, hi, -half_w - 3, half_w + 3), fill=_jitter(rng, (150, 150, 130), 6))  # shoulders
    draw.rectangle(rect(lo, hi, -half_w, half_w), fill=_jitter(rng, (78, 78, 82), 5))
    for a in range(int(lo) + 10, int(hi) - 10, 9):  # centre-line dashes
        draw.line([pt(a, 0), pt(a + 4, 0)], fill=(240, 240, 240), width=1)
    for end in (lo + 2, hi - 6):  # threshold bars at both ends
        for k in range(-2, 3):
            draw.line([pt(end, k * half_w / 3), pt(end + 4, k * half_w / 3)], fill=(245, 245, 245), width=1)


def _draw_buildings(draw, rng, obj: PlacedObject) -> None:
    x0, y0, x1, y1 = obj.bbox
    count = {"small": 4, "medium": 8, "large": 13}[obj.size]
    roofs = [(168, 74, 60), (190, 188, 182), (120, 120, 128), (150, 96, 70), (210, 200, 170)]
    for _ in range(count):
        w, h = rng.randint(7, 13), rng.randint(6, 11)
        bx = rng.uniform(x0, max(x0, x1 - w))
        by = rng.uniform(y0, max(y0, y1 - h))
        draw.rectangle((bx + 2, by + 2, bx + w + 2, by + h + 2), fill=(60, 60, 55))  # shadow to the south-east
        draw.rectangle((bx, by, bx + w, by + h), fill=_jitter(rng, rng.choice(roofs), 10), outline=(70, 70, 70))


def _draw_fields(draw, rng, obj: PlacedObject) -> None:
    x0, y0, x1, y1 = obj.bbox
    n = {"small": 2, "medium": 3, "large": 4}[obj.size]
    palette = [(96, 150, 64), (176, 170, 84), (140, 112, 72), (120, 168, 80), (196, 180, 110)]
    xs = sorted([x0, x1] + [rng.uniform(x0, x1) for _ in range(n - 1)])
    ys = sorted([y0, y1] + [rng.uniform(y0, y1) for _ in range(n - 1)])
    for i in range(len(xs) - 1):
        for j in range(len(ys) - 1):
            colour = _jitter(rng, rng.choice(palette), 10)
            draw.rectangle((xs[i], ys[j], xs[i + 1], ys[j + 1]), fill=colour, outline=(110, 100, 70))
            darker = tuple(max(0, v - 18) for v in colour)
            if rng.random() < 0.5:  # furrows
                for x in range(int(xs[i]) + 2, int(xs[i + 1]) - 1, 3):
                    draw.line([(x, ys[j] + 1), (x, ys[j + 1] - 1)], fill=darker)
            else:
                for y in range(int(ys[j]) + 2, int(ys[j + 1]) - 1, 3):
                    draw.line([(xs[i] + 1, y), (xs[i + 1] - 1, y)], fill=darker)


def _draw_forest(draw, rng, obj: PlacedObject) -> None:
    x0, y0, x1, y1 = obj.bbox
    cx, cy, rx, ry = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2, (y1 - y0) / 2
    for _ in range(int(rx * ry / 6)):
        # Crowns spread over an ellipse: a blob, not a square.
        while True:
            u, v = rng.uniform(-1, 1), rng.uniform(-1, 1)
            if u * u + v * v <= 1:
                break
        r = rng.uniform(3, 6)
        x, y = cx + u * (rx - r), cy + v * (ry - r)
        draw.ellipse((x - r, y - r, x + r, y + r), fill=_jitter(rng, (34, 74, 34), 14))


def _draw_tanks(draw, rng, obj: PlacedObject) -> None:
    x0, y0, x1, y1 = obj.bbox
    per_side = {"small": 2, "medium": 3, "large": 4}[obj.size]
    step = (x1 - x0) / per_side
    r = step * 0.36
    for i in range(per_side):
        for j in range(per_side):
            if per_side > 2 and rng.random() < 0.15:
                continue  # a gap now and then, as in real tank farms
            cx, cy = x0 + (i + 0.5) * step, y0 + (j + 0.5) * step
            draw.ellipse((cx - r + 2, cy - r + 2, cx + r + 2, cy + r + 2), fill=(70, 70, 66))
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=_jitter(rng, (222, 222, 216), 10),
                         outline=(120, 120, 120))
            draw.ellipse((cx - r / 3, cy - r / 3, cx + r / 3, cy + r / 3), outline=(180, 180, 175))


def _render(rng: random.Random, objects: list[PlacedObject], size: int):
    from PIL import ImageDraw

    image = _background(rng, size)
    draw = ImageDraw.Draw(image)
    # Area objects first, then rivers and roads on top of the ground (a road bridges the river).
    for obj in sorted(objects, key=lambda o: (o.linear, o.kind == "road")):
        if obj.kind == "river":
            _draw_river(draw, rng, obj, size)
        elif obj.kind == "road":
            _draw_road(draw, rng, obj, size)
        elif obj.kind == "lake":
            _draw_lake(draw, rng, obj.bbox)
        elif obj.kind == "runway":
            _draw_runway(draw, rng, obj)
        elif obj.kind == "buildings":
            _draw_buildings(draw, rng, obj)
        elif obj.kind == "fields":
            _draw_fields(draw, rng, obj)
        elif obj.kind == "forest":
            _draw_forest(draw, rng, obj)
        elif obj.kind == "storage tanks":
            _draw_tanks(draw, rng, obj)
    return image


def make_scenes(n: int = 40, seed: int = 0, size: int = 256) -> list[Scene]:
    """`n` scenes, the same pixels and objects for the same (n-independent) seed and size."""
    scenes = []
    for i in range(n):
        # One RNG per scene, so scene i does not depend on n.
        rng = random.Random(f"scenes-1/{seed}/{i}")
        objects = _layout(rng, size)
        image = _render(rng, objects, size)
        sid = f"scene-{seed}-{i:03d}"
        scenes.append(Scene(sid, f"{sid}.png", objects, image, seed))
    return scenes


# ---------------------------------------------------------------------------------------------
# Relations between placed objects: the one source of truth for descriptions and queries.


def direction_of(a: PlacedObject, b: PlacedObject) -> str:
    """Compass direction in which `a` lies as seen from `b` ("" when it does not apply)."""
    if a.linear and b.linear:
        return ""
    if b.linear:
        if b.orientation == "north-south":
            return "east" if a.col > b.col else "west" if a.col < b.col else ""
        return "south" if a.row > b.row else "north" if a.row < b.row else ""
    if a.linear:
        opposite = {"east": "west", "west": "east", "north": "south", "south": "north", "": ""}
        return opposite[direction_of(b, a)]
    ns = "north" if a.row < b.row else "south" if a.row > b.row else ""
    ew = "west" if a.col < b.col else "east" if a.col > b.col else ""
    return "-".join(p for p in (ns, ew) if p)


def is_direction(a: PlacedObject, b: PlacedObject, cardinal: str) -> bool:
    """True when `a` lies (at least partly) `cardinal` of `b`: "east" includes north-east and south-east."""
    return cardinal in direction_of(a, b).split("-")


# ---------------------------------------------------------------------------------------------
# Ground-truth descriptions


def _noun(rng: random.Random, kind: str) -> str:
    return rng.choice(SYNONYMS[kind])


def _is_plural(noun: str) -> bool:
    head = noun.split(" of ")[0]
    return head.endswith("s")


def _article(noun: str, kind: str = "") -> str:
    """'a lake', 'an airstrip', 'storage tanks', 'farmland' (plural and mass nouns go bare)."""
    if _is_plural(noun) or noun.endswith("farmland"):
        return noun
    return ("an " if noun[0] in "aeiou" else "a ") + noun


def _where(rng: random.Random, obj: PlacedObject) -> str:
    if obj.linear:
        axis = "from north to south" if obj.orientation == "north-south" else "from west to east"
        part = "the middle" if obj.region == "centre" else f"the {obj.region}"
        return rng.choice([f"runs {axis} through {part} of the scene", f"crosses the scene {axis} through {part}"])
    if obj.region == "centre":
        return rng.choice(["in the centre", "in the middle of the scene"])
    return rng.choice([f"in the {obj.region}", f"in the {obj.region} of the image", f"in the {obj.region} part"])


def _phrase(rng: random.Random, obj: PlacedObject, with_size: bool = True) -> str:
    noun = _noun(rng, obj.kind)
    if with_size and not obj.linear and not noun.startswith(("cluster", "group", "patch", "patchwork")):
        noun = f"{obj.size} {noun}" if rng.random() < 0.7 else noun
    return _article(noun, obj.kind)


def _object_sentence(rng: random.Random, obj: PlacedObject) -> str:
    p = _phrase(rng, obj)
    verb = "are" if _is_plural(p) else "is"
    if obj.linear:
        return f"{p[0].upper()}{p[1:]} {_where(rng, obj)}."
    if rng.random() < 0.5:
        return f"{p[0].upper()}{p[1:]} {verb} {_where(rng, obj)}."
    where = _where(rng, obj)
    return f"{where[0].upper()}{where[1:]} there {verb} {p}."


def _relation_sentence(rng: random.Random, a: PlacedObject, b: PlacedObject) -> str | None:
    """A true sentence placing `a` relative to `b`, or None when no direction applies."""
    if a.linear and b.linear:
        return f"The {_noun(rng, 'road')} crosses the {_noun(rng, 'river')}."
    d = direction_of(a, b)
    if not d:
        return None
    pa, pb = _phrase(rng, a, with_size=False), _phrase(rng, b, with_size=False)
    pb_the = "the " + pb.split(" ", 1)[1] if pb.startswith(("a ", "an ")) else "the " + pb
    verb = "lie" if _is_plural(pa) else "lies"
    form = rng.randrange(3)
    if form == 0:
        return f"{pa[0].upper()}{pa[1:]} {verb} to the {d} of {pb_the}."
    if form == 1:
        return f"To the {d} of {pb_the} there {'are' if verb == 'lie' else 'is'} {pa}."
    return f"{pb_the[0].upper()}{pb_the[1:]} has {pa} to its {d}."


def _feature(rng: random.Random, obj: PlacedObject) -> Feature:
    name = _noun(rng, obj.kind)
    if obj.linear:
        name = f"{name} running {obj.orientation}"
    return Feature(name=name, position=obj.region, size=obj.size)


def _one_sentence(rng: random.Random, objs: list[PlacedObject]) -> str:
    shown = objs[: rng.randint(2, 3)] if len(objs) > 2 else objs
    parts = [f"{_phrase(rng, o)} {_where(rng, o)}" if not o.linear else
             f"{_phrase(rng, o, False)} that {_where(rng, o)}" for o in shown]
    listed = ", ".join(parts[:-1]) + (" and " if len(parts) > 1 else "") + parts[-1]
    lead = rng.choice(["An aerial view with", "Aerial image showing", "Overhead view of", "A remote-sensing scene with"])
    return f"{lead} {listed}."


def describe(scene: Scene, n_variants: int = 5, seed: int = 0) -> CaptionRecord:
    """Ground truth in RSRT form: `n_variants` distinct, true descriptions of what was placed."""
    variants: list[Variant] = []
    seen: set[str] = set()
    attempt = 0
    while len(variants) < n_variants:
        rng = random.Random(f"describe/{seed}/{scene.id}/{attempt}")
        attempt += 1
        objs = list(scene.objects)
        rng.shuffle(objs)
        # Each variant leads with a different object, so the variants differ in focus.
        focus = scene.objects[(len(variants)) % len(scene.objects)]
        objs.remove(focus)
        objs.insert(0, focus)
        sentences = [_object_sentence(rng, o) for o in objs]
        others = [o for o in objs[1:]]
        rng.shuffle(others)
        for other in others[:2]:
            rel = _relation_sentence(rng, other, focus) if rng.random() < 0.5 else _relation_sentence(
                rng, focus, other)
            if rel:
                sentences.insert(rng.randint(1, len(sentences)), rel)
        features = [_feature(rng, o) for o in sorted(objs, key=lambda _: rng.random())]
        v = Variant(one_sentence=_one_sentence(rng, objs), features=tuple(features), caption=" ".join(sentences))
        if v.joined_text() in seen and attempt < 50:
            continue
        seen.add(v.joined_text())
        variants.append(v)
    return CaptionRecord(
        image=scene.file_name,
        sha256=sha256_bytes(scene.image.tobytes()),
        model="ground-truth:scenes",
        mmproj="",
        family="ground-truth",
        prompt_version="scenes-1",
        variants=variants,
        test_model=False,
    )


class GroundTruthDescriber:
    """The scenes' ground truth as a describer.Describer: the record scenes.describe writes for the
    scene an image was drawn from (looked up by the image's sha256), so the caption pipeline can
    run with exact, known descriptions in tests."""

    def __init__(self, scenes: list[Scene], seed: int = 0):
        self.seed = seed
        self._by_sha = {sha256_bytes(to_png_bytes(s.image)): s for s in scenes}

    def describe(self, image, options) -> CaptionRecord:
        from ..describe.describer import UnusableAnswer

        scene = self._by_sha.get(sha256_bytes(image.png))
        if scene is None:
            raise UnusableAnswer(f"{image.path}: not one of the synthetic scenes")
        record = describe(scene, n_variants=options.prompt.n_variants, seed=self.seed)
        record.image, record.sha256 = image.path, image.sha256
        return record


def write_scene_set(out_dir: str | os.PathLike, n: int = 40, seed: int = 0,
                    size: int = 256) -> tuple[list[Path], Path]:
    """PNGs plus captions.jsonl (one CaptionRecord per line, `image` relative to out_dir)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    lines: list[str] = []
    for scene in make_scenes(n, seed, size):
        path = out / scene.file_name
        tmp = path.with_name(path.name + ".tmp")
        scene.image.save(tmp, format="PNG")
        os.replace(tmp, path)
        paths.append(path)
        record = describe(scene, seed=seed)
        # sha256 of the file as written, which is what an indexer hashing the image sees.
        record.sha256 = sha256_file(path)
        lines.append(json.dumps(record.to_dict()))
    captions = out / "captions.jsonl"
    atomic_write_text(captions, "\n".join(lines) + "\n")
    return paths, captions


# ---------------------------------------------------------------------------------------------
# Queries that exactly one scene satisfies


@dataclass(frozen=True)
class QuerySpec:
    """A query and the predicate over placed objects that defines which scenes satisfy it."""

    text: str
    template: str
    test: Callable[[Scene], bool] = field(compare=False, repr=False)

    def matches(self, scene: Scene) -> bool:
        return self.test(scene)


def _np(kind: str) -> str:
    """The query's noun phrase for a kind: 'a runway', 'storage tanks'."""
    return kind if kind in PLURAL else ("an " if kind[0] in "aeiou" else "a ") + kind


def _rel_test(a: str, d: str, b: str) -> Callable[[Scene], bool]:
    return lambda s: any(is_direction(x, y, d) for x in s.find(a) for y in s.find(b))


def _at_test(a: str, region: str, size: str | None = None) -> Callable[[Scene], bool]:
    return lambda s: any(x.region == region and (size is None or x.size == size) for x in s.find(a))


def _at_rel_test(a: str, region: str, b: str, d: str) -> Callable[[Scene], bool]:
    return lambda s: any(x.region == region and is_direction(y, x, d) for x in s.find(a) for y in s.find(b))


def all_query_specs() -> list[QuerySpec]:
    """Every query the templates can form, in a fixed order."""
    specs: list[QuerySpec] = []
    cardinals = ("north", "south", "east", "west")
    for a in AREA_KINDS:
        for b in KINDS:
            if a == b:
                continue
            for d in cardinals:
                specs.append(QuerySpec(f"{_np(a)} {d} of {_np(b)}", "relation", _rel_test(a, d, b)))
    for a in AREA_KINDS:
        for region in REGIONS:
            specs.append(QuerySpec(f"{_np(a)} in the {region}", "position", _at_test(a, region)))
            for size in SIZES:
                text = f"{'a ' if a not in PLURAL else ''}{size} {a} in the {region}"
                specs.append(QuerySpec(text, "size-position", _at_test(a, region, size)))
    for a in AREA_KINDS:
        for region in REGIONS:
            for b in AREA_KINDS + LINEAR_KINDS:
                if b == a:
                    continue
                for d in cardinals:
                    text = f"{_np(a)} in the {region} with {_np(b)} to the {d}"
                    specs.append(QuerySpec(text, "position-relation", _at_rel_test(a, region, b, d)))
    return specs


def unique_queries(scenes: list[Scene], templates: tuple[str, ...] | None = None) -> list[tuple[QuerySpec, str]]:
    """All template queries that exactly one of `scenes` satisfies, with that scene's id."""
    out = []
    for spec in all_query_specs():
        if templates and spec.template not in templates:
            continue
        hits = [s.id for s in scenes if spec.matches(s)]
        if len(hits) == 1:
            out.append((spec, hits[0]))
    return out


# How many queries of each template the fixed list takes (18 in all).
_FIXED_MIX = (("relation", 6), ("position", 3), ("size-position", 3), ("position-relation", 6))


def directional_query_specs(scenes: list[Scene]) -> list[tuple[QuerySpec, str]]:
    """The fixed list: a seeded pick of uniquely-satisfied queries, spread over the templates."""
    pool = unique_queries(scenes)
    rng = random.Random("directional-queries-1")
    chosen: list[tuple[QuerySpec, str]] = []
    for template, count in _FIXED_MIX:
        candidates = [p for p in pool if p[0].template == template]
        rng.shuffle(candidates)
        taken = 0
        # Two passes: first only queries about scenes not yet used (so one scene cannot carry the
        # score), then any remaining candidate.
        for fresh_only in (True, False):
            for spec, sid in candidates:
                if taken == count:
                    break
                if (spec, sid) in chosen or (fresh_only and sid in {s for _, s in chosen}):
                    continue
                chosen.append((spec, sid))
                taken += 1
    return chosen


def directional_queries(scenes: list[Scene]) -> list[tuple[str, str]]:
    """(query, expected_scene_id) pairs, each satisfied by exactly one scene of `scenes`."""
    return [(spec.text, sid) for spec, sid in directional_query_specs(scenes)]
