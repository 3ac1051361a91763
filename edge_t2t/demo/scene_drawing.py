"""Drawing the synthetic scenes (scenes.py): a textured background and each placed object drawn
in its box. The objects are scenes.PlacedObject (kind, box, bbox, axis, ...); this module reads
their attributes only, so it does not import scenes.py, which calls render().
"""

from __future__ import annotations

import random


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


def _draw_river(draw, rng, obj, size: int) -> None:
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


def _draw_road(draw, rng, obj, size: int) -> None:
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


def _draw_runway(draw, rng, obj) -> None:
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


def _draw_buildings(draw, rng, obj) -> None:
    x0, y0, x1, y1 = obj.bbox
    count = {"small": 4, "medium": 8, "large": 13}[obj.size]
    roofs = [(168, 74, 60), (190, 188, 182), (120, 120, 128), (150, 96, 70), (210, 200, 170)]
    for _ in range(count):
        w, h = rng.randint(7, 13), rng.randint(6, 11)
        bx = rng.uniform(x0, max(x0, x1 - w))
        by = rng.uniform(y0, max(y0, y1 - h))
        draw.rectangle((bx + 2, by + 2, bx + w + 2, by + h + 2), fill=(60, 60, 55))  # shadow to the south-east
        draw.rectangle((bx, by, bx + w, by + h), fill=_jitter(rng, rng.choice(roofs), 10), outline=(70, 70, 70))


def _draw_fields(draw, rng, obj) -> None:
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


def _draw_forest(draw, rng, obj) -> None:
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


def _draw_tanks(draw, rng, obj) -> None:
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


def render(rng: random.Random, objects: list, size: int):
    """The scene image of its placed objects (scenes.PlacedObject), drawn with `rng`."""
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
