"""What a query says about places, relations and sizes, and how well a description's structured
features satisfy it.

The descriptions already carry structure (records.Feature: name, position on a 3x3 compass grid,
size); the embedder cannot tell "east of" from "west of". This module reads the few query forms
below, turns them into constraints, and scores them against each variant's features. A query none
of the forms reads gives no constraints, and search ranks it exactly as before.

Grammar (after normalising: lower case, "northeast"/"north east" -> "north-east", "center" /
"middle" -> "centre", "left" -> "west", "right" -> "east", "top"/"upper" -> "north",
"bottom"/"lower" -> "south"). NP is [article] [SIZE] NOUN (one to four words), VERB an optional
"is|are|lies|lie|located|situated|sits|sit":

    NP VERB between NP and NP                        -> between(x, y, z)
    NP VERB in the REGION [part|of the image|scene] with NP to the DIR
                                                     -> at(x, REGION), rel(y, DIR, x)
    NP VERB [to the|just] DIR of NP                  -> rel(x, DIR, y)
    NP VERB (next to|near|beside|adjacent to|close to|alongside|by) NP
                                                     -> near(x, y)
    NP VERB in the REGION [part|of the image|scene]  -> at(x, REGION)
    NP                                               -> (only its size, if any)

Every NP with a SIZE word (small/little/tiny, medium/mid-sized, large/big/huge) adds size(np, S).
REGION is one of the nine cells (north-west ... centre ... south-east); DIR one of the eight
compass directions. Nouns are matched to feature names through SYNONYMS (airstrip = runway,
woodland = forest, ...), else by their head word.

Scoring (one variant, `score_features`): each constraint scores 0..1 and the variant scores their
mean; an image scores its best variant. at: 1 for the same cell, 0.5 when one shares a compass
part with the other ("north" against "north-west"). rel: the feature cells' compass relation
includes DIR. A river or road at a single compass word ("west") is a line along that column or
row (scenes.direction_of uses the same rule), other objects sit in that cell. near: cells at most
one step apart. between: on some axis x lies strictly between y and z. size: the same size word.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import lru_cache

REGIONS = (
    "north-west", "north", "north-east",
    "west", "centre", "east",
    "south-west", "south", "south-east",
)
SIZE_WORDS = {
    "small": "small", "little": "small", "tiny": "small",
    "medium": "medium", "mid-sized": "medium", "moderate": "medium",
    "large": "large", "big": "large", "huge": "large", "wide": "large",
}
# Canonical kinds and the names a description or a query may use for them (longest first wins).
SYNONYMS: dict[str, tuple[str, ...]] = {
    "runway": ("runway", "airstrip", "landing strip", "airfield", "airport"),
    "river": ("river", "stream", "creek", "waterway"),
    "road": ("road", "street", "highway", "motorway"),
    "lake": ("lake", "pond", "water body", "reservoir"),
    "buildings": ("building", "house", "cluster of buildings", "group of houses", "residential"),
    "fields": ("field", "farmland", "cropland", "cultivated"),
    "forest": ("forest", "woodland", "trees", "woods"),
    "storage tanks": ("storage tank", "oil tank", "cylindrical tank", "tank"),
}
LINEAR = frozenset({"river", "road"})  # a single compass word places these as a line, not a cell

_NORMALISE = (
    (r"\b(northern|upper|top)\b", "north"),
    (r"\b(southern|lower|bottom)\b", "south"),
    (r"\b(eastern|right)\b", "east"),
    (r"\b(western|left)\b", "west"),
    (r"\b(center|central|middle)\b", "centre"),
    (r"[^\w\s-]", " "),
    (r"\b(north|south)\s*-?\s*(east|west)\b", r"\1-\2"),
    (r"\s+", " "),
)
_DIR = r"(?:north|south)-(?:east|west)|north|south|east|west"
_REGION = _DIR + r"|centre"
_SIZE = "|".join(sorted(SIZE_WORDS, key=len, reverse=True))
_VERB = r"(?:(?:is|are|lies|lie|located|situated|sits|sit)\s+)*"
_PLACE_TAIL = r"(?:\s+(?:part|area|side|of the (?:image|scene|picture)))?"


def _np(g: str) -> str:
    # a noun of one to four words: a whole sentence is not a noun phrase
    return rf"(?:(?:a|an|the|some)\s+)?(?:(?P<{g}_size>{_SIZE})\s+)?(?P<{g}>[a-z][a-z0-9-]*(?:\s[a-z][a-z0-9-]*){{0,3}}?)"


_FORMS = (
    ("between", re.compile(rf"^{_np('x')}\s+{_VERB}between\s+{_np('y')}\s+and\s+{_np('z')}$")),
    ("at_with", re.compile(
        rf"^{_np('x')}\s+{_VERB}in the (?P<region>{_REGION}){_PLACE_TAIL}\s+with\s+{_np('y')}\s+"
        rf"(?:to|in) the (?P<dir>{_DIR})$")),
    ("rel", re.compile(rf"^{_np('x')}\s+{_VERB}(?:(?:to the|just|directly)\s+)?(?P<dir>{_DIR})\s+of\s+{_np('y')}$")),
    ("near", re.compile(
        rf"^{_np('x')}\s+{_VERB}(?:next to|near|beside|adjacent to|close to|alongside|by)\s+{_np('y')}$")),
    ("at", re.compile(rf"^{_np('x')}\s+{_VERB}in the (?P<region>{_REGION}){_PLACE_TAIL}$")),
    ("bare", re.compile(rf"^{_np('x')}$")),
)


@dataclass(frozen=True)
class Constraint:
    kind: str  # 'at', 'size', 'rel', 'near', 'between'
    subject: str  # the noun phrase it is about
    value: str = ""  # region, size word or direction
    others: tuple[str, ...] = ()  # the other noun phrase(s) of rel/near/between

    def describe(self) -> str:
        if self.kind == "at":
            return f"{self.subject} in the {self.value}"
        if self.kind == "size":
            return f"{self.value} {self.subject}"
        if self.kind == "rel":
            return f"{self.subject} {self.value} of {self.others[0]}"
        if self.kind == "near":
            return f"{self.subject} next to {self.others[0]}"
        return f"{self.subject} between {self.others[0]} and {self.others[1]}"


@dataclass(frozen=True)
class ParsedQuery:
    text: str
    constraints: tuple[Constraint, ...] = field(default_factory=tuple)
    form: str = ""  # which grammar rule read it ('' when none)

    def __bool__(self) -> bool:
        return bool(self.constraints)


def normalise(query: str) -> str:
    q = query.lower().strip()
    for pattern, repl in _NORMALISE:
        q = re.sub(pattern, repl, q)
    return q.strip()


def parse(query: str) -> ParsedQuery:
    """The constraints a query states (none when no rule reads it)."""
    q = normalise(query)
    for form, pattern in _FORMS:
        m = pattern.match(q)
        if not m:
            continue
        g = m.groupdict()
        nps = {k: g[k].strip() for k in ("x", "y", "z") if g.get(k)}
        out: list[Constraint] = []
        for k, noun in nps.items():
            if g.get(f"{k}_size"):
                out.append(Constraint("size", noun, SIZE_WORDS[g[f"{k}_size"]]))
        if form == "between":
            out.append(Constraint("between", nps["x"], "", (nps["y"], nps["z"])))
        elif form == "at_with":
            out += [Constraint("at", nps["x"], g["region"]), Constraint("rel", nps["y"], g["dir"], (nps["x"],))]
        elif form == "rel":
            out.append(Constraint("rel", nps["x"], g["dir"], (nps["y"],)))
        elif form == "near":
            out.append(Constraint("near", nps["x"], "", (nps["y"],)))
        elif form == "at":
            out.append(Constraint("at", nps["x"], g["region"]))
        return ParsedQuery(query, tuple(out), form if out else "")
    return ParsedQuery(query)


# ----------------------------------------------------------------------------------------------
# Matching nouns to feature names


def _singular(word: str) -> str:
    return word[:-1] if len(word) > 3 and word.endswith("s") and not word.endswith("ss") else word


_SYNONYM_FORMS = {kind: tuple(f" {' '.join(_singular(w) for w in n.split())} " for n in names)
                  for kind, names in SYNONYMS.items()}


@lru_cache(maxsize=8192)  # feature names repeat across variants and images: parse each once
def kinds_of(name: str) -> frozenset[str]:
    """Canonical kinds a noun phrase or feature name mentions (by SYNONYMS, singular or plural)."""
    words = " " + " ".join(_singular(w) for w in re.findall(r"[a-z0-9]+", name.lower())) + " "
    return frozenset(kind for kind, forms in _SYNONYM_FORMS.items() if any(f in words for f in forms))


@lru_cache(maxsize=8192)
def mentions(noun: str, feature_name: str) -> bool:
    """Whether a feature is the thing a query's noun phrase names."""
    a, b = kinds_of(noun), kinds_of(feature_name)
    if a:
        return bool(a & b)
    head = _singular(noun.split()[-1]) if noun.split() else ""
    return bool(head) and head in {_singular(w) for w in re.findall(r"[a-z0-9]+", feature_name.lower())}


# ----------------------------------------------------------------------------------------------
# Geometry on the 3x3 grid (row 0 = north, col 0 = west); None = the object spans that axis


@lru_cache(maxsize=8192)
def cell(name: str, position: str) -> tuple[int | None, int | None] | None:
    """(row, col) of a feature, or None when its position is not a compass word."""
    pos = normalise(position)
    if pos not in REGIONS:
        return None
    r, c = divmod(REGIONS.index(pos), 3)
    lowered = name.lower()
    linear = bool(kinds_of(name) & LINEAR) or "north-south" in lowered or "east-west" in lowered
    if linear and "-" not in pos and pos != "centre":
        return (None, c) if pos in ("east", "west") else (r, None)
    if linear and pos == "centre":
        if "east-west" in lowered:
            return (1, None)
        return (None, 1)  # a line through the middle: north-south unless it says otherwise
    return (r, c)


def direction_holds(a: tuple, b: tuple, direction: str) -> bool:
    """Whether cell `a` lies `direction` (e.g. 'east', 'north-west') of cell `b`."""
    for part in direction.split("-"):
        axis = 0 if part in ("north", "south") else 1
        x, y = a[axis], b[axis]
        if x is None or y is None:
            return False
        if not ((x < y) if part in ("north", "west") else (x > y)):
            return False
    return True


def _near(a: tuple, b: tuple) -> bool:
    return all(x is None or y is None or abs(x - y) <= 1 for x, y in zip(a, b, strict=True))


def _between(a: tuple, b: tuple, c: tuple) -> bool:
    for axis in (0, 1):
        x, y, z = a[axis], b[axis], c[axis]
        if None not in (x, y, z) and min(y, z) < x < max(y, z):
            return True
    return False


def _region_score(position: str, region: str) -> float:
    pos = normalise(position)
    if pos == region:
        return 1.0
    if pos in REGIONS and region != "centre" and pos != "centre" and set(pos.split("-")) & set(region.split("-")):
        return 0.5
    return 0.0


@dataclass(frozen=True)
class ConstraintResult:
    constraint: Constraint
    score: float

    def to_dict(self) -> dict:
        return {"constraint": self.constraint.describe(), "score": self.score}


def score_features(parsed: ParsedQuery, features) -> tuple[float, list[ConstraintResult]]:
    """Mean constraint score (0..1) of one variant's features (records.Feature-like: name,
    position, size), with each constraint's own score."""
    if not parsed.constraints:
        return 0.0, []

    def named(noun: str):
        return [f for f in features if f.name and mentions(noun, f.name)]

    def cells(noun: str):
        return [c for f in named(noun) if (c := cell(f.name, f.position)) is not None]

    results = []
    for con in parsed.constraints:
        if con.kind == "at":
            s = max((_region_score(f.position, con.value) for f in named(con.subject)), default=0.0)
        elif con.kind == "size":
            s = float(any(f.size.lower() == con.value for f in named(con.subject)))
        elif con.kind == "rel":
            s = float(any(direction_holds(a, b, con.value) for a in cells(con.subject) for b in cells(con.others[0])))
        elif con.kind == "near":
            s = float(any(_near(a, b) for a in cells(con.subject) for b in cells(con.others[0])))
        else:
            s = float(any(_between(a, b, c) for a in cells(con.subject) for b in cells(con.others[0])
                          for c in cells(con.others[1])))
        results.append(ConstraintResult(con, s))
    return sum(r.score for r in results) / len(results), results
