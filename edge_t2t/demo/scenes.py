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
from .scene_drawing import render

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


def make_scenes(n: int = 40, seed: int = 0, size: int = 256) -> list[Scene]:
    """`n` scenes, the same pixels and objects for the same (n-independent) seed and size."""
    scenes = []
    for i in range(n):
        # One RNG per scene, so scene i does not depend on n.
        rng = random.Random(f"scenes-1/{seed}/{i}")
        objects = _layout(rng, size)
        image = render(rng, objects, size)
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
