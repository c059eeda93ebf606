"""Procedural outlines for the miniature world: many distinct silhouettes, none near a held-out one.

The world draws 8 seen shapes; an encoder adapter trained on them alone acts as a classifier over
8 outlines and maps a held-out one to the nearest (docs/training.md, "The encoder adapter"). This
module gives a pure function of a seed, `outline(seed)`, drawing one silhouette from five families
(each equally likely):

    star      a star polygon: 3, 5, 6, 7 or 8 points, inner radius 0.35-0.75, radii jittered ±10 %
    convex    3-8 random points on the unit circle, their convex hull, stretched 0.6-1 on one axis
    concave   5-10 random angles, each vertex at a random radius 0.35-1
    blob      a closed curve r(θ) = 1 + Σ_k a_k cos(kθ + φ_k), k = 2..5, |a_k| ≤ 0.3/k·2
    bitten    a disk (0.9) or a regular 3-8-gon with 1-2 round bites (radius 0.25-0.5) from its edge

each turned by a uniform angle, centred on its bounding box and scaled so its farthest point is at
radius 1 (the seen shapes' circumscribed radius). Candidates are rejected, and the next seed of
the stream drawn, when

* the silhouette covers < 30 % of its circumscribed disk (thin shapes vanish at the world's small
  size, 5 px), or
* its IoU with a held-out silhouette (the sparkle's four-point star, the moon's crescent, the
  arrow), best over 72 turns (5°), a mirror and 3 scales (0.85, 1, 1.18) of the held-out one,
  both centred on their centroid, exceeds `EXCLUDE_IOU` = 0.7.

`nearest_seen(spec)` is the seen shape of highest IoU by the same rule (upright seen shapes turned
and mirrored as above): the geometric rule that names a procedural outline's category word.

A procedural outline enters a world.Scene as the shape name "outline-<seed>" (`name`); world.py's
renderer draws it through `draw`. The world's own streams never draw one.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw

PREFIX = "outline-"
FAMILIES = ("star", "convex", "concave", "blob", "bitten")
EXCLUDE_IOU = 0.7  # a candidate this close to a held-out silhouette is never drawn
MIN_FILL = 0.3  # of the circumscribed disk's area
_RES, _UNIT = 64, 22.0  # IoU raster: 64 px, radius 1 = 22 px (1.18 x 1 still inside)
_TURNS = np.arange(72) * np.pi / 36  # 5°: a narrow-pointed star loses 0.1 of IoU 7.5° off its pose
_SCALES = (0.85, 1.0, 1.18)
# held-out colour + accent pairs (world.NOVEL_OBJECTS): a procedural accent never repeats one
_HELD_OUT_PAIRS = {("yellow", "orange"), ("white", "blue"), ("red", "white")}


def name(seed: int) -> str:
    """Semantics: the world.Scene shape name of outline `seed`: "outline-<seed>"."""
    return f"{PREFIX}{int(seed)}"


def is_outline(shape: str) -> bool:
    """Semantics: True iff `shape` names a procedural outline ("outline-<int>")."""
    return isinstance(shape, str) and shape.startswith(PREFIX) and shape[len(PREFIX):].isdigit()


def seed_of(shape: str) -> int:
    if not is_outline(shape):
        raise ValueError(f"outlines: {shape!r} is not a procedural outline name ('{PREFIX}<seed>')")
    return int(shape[len(PREFIX):])


# --------------------------------------------------------------------------- the families
def _polar(angles, radii):
    return np.stack([radii * np.cos(angles), radii * np.sin(angles)], 1)


def _hull(p):
    """Convex hull (monotone chain) of points [N, 2], counter-clockwise."""
    p = p[np.lexsort((p[:, 1], p[:, 0]))]
    cross = lambda o, a, b: (a[0] - o[0]) * (b[1] - o[1]) - (a[1] - o[1]) * (b[0] - o[0])  # noqa: E731

    def half(pts):
        out = []
        for q in pts:
            while len(out) >= 2 and cross(out[-2], out[-1], q) <= 0:
                out.pop()
            out.append(q)
        return out[:-1]

    return np.array(half(p) + half(p[::-1]))


def candidate(seed: int) -> dict:
    """Semantics: the unfiltered candidate of `seed`: {"family", "polygon" [N, 2] (unit: farthest
    point of the polygon at radius 1, centred on its bounding box), "bites" [(x, y, r), ...] disks
    cut out of it}; a pure function of `seed` (module docstring for the families)."""
    rng = np.random.default_rng([int(seed), 17])
    family = FAMILIES[int(rng.integers(len(FAMILIES)))]
    bites = []
    if family == "star":
        n = int(rng.choice((3, 5, 6, 7, 8)))
        a = np.arange(2 * n) * np.pi / n
        r = np.where(np.arange(2 * n) % 2 == 0, 1.0, rng.uniform(0.35, 0.75)) * rng.uniform(0.9, 1.1, 2 * n)
        poly = _polar(a, r)
    elif family == "convex":
        k = int(rng.integers(3, 9))
        poly = _hull(_polar(np.sort(rng.uniform(0, 2 * np.pi, k)), np.ones(k)))
        if len(poly) < 3:
            poly = _polar(np.arange(3) * 2 * np.pi / 3, np.ones(3))
        poly = poly * np.array([1.0, rng.uniform(0.6, 1.0)])
    elif family == "concave":
        k = int(rng.integers(5, 11))
        poly = _polar(np.sort(rng.uniform(0, 2 * np.pi, k)), rng.uniform(0.35, 1.0, k))
    elif family == "blob":
        t = np.linspace(0, 2 * np.pi, 72, endpoint=False)
        r = np.ones_like(t)
        for k in range(2, 6):
            r = r + rng.uniform(-0.6, 0.6) / k * np.cos(k * t + rng.uniform(0, 2 * np.pi))
        poly = _polar(t, np.maximum(r, 0.15))
    else:  # bitten
        n = int(rng.choice((0, 3, 4, 5, 6, 7, 8)))
        poly = _polar(np.linspace(0, 2 * np.pi, 64, endpoint=False), np.full(64, 0.9)) if n == 0 else \
            _polar(np.arange(n) * 2 * np.pi / n, np.ones(n))
        for _ in range(int(rng.integers(1, 3))):
            phi, rb = rng.uniform(0, 2 * np.pi), rng.uniform(0.25, 0.5)
            d = rng.uniform(0.75, 1.05)
            bites.append((d * np.cos(phi), d * np.sin(phi), rb))
    turn = rng.uniform(0, 2 * np.pi)
    rot = np.array([[np.cos(turn), -np.sin(turn)], [np.sin(turn), np.cos(turn)]])
    poly = poly @ rot.T
    bites = [(*(np.array(b[:2]) @ rot.T), b[2]) for b in bites]
    centre = (poly.max(0) + poly.min(0)) / 2
    poly = poly - centre
    scale = 1.0 / np.linalg.norm(poly, axis=1).max()
    return {"family": family, "polygon": poly * scale,
            "bites": [((x - centre[0]) * scale, (y - centre[1]) * scale, r * scale) for x, y, r in bites]}


# --------------------------------------------------------------------------- silhouettes and IoU
def _raster(polygon, bites, *, scale=1.0, turn=0.0, mirror=False, offset=(0.0, 0.0)) -> np.ndarray:
    m = np.array([[np.cos(turn), -np.sin(turn)], [np.sin(turn), np.cos(turn)]]) * scale
    if mirror:
        m = m @ np.diag([-1.0, 1.0])
    c = np.array([_RES / 2, _RES / 2]) + np.asarray(offset)
    im = Image.new("L", (_RES, _RES), 0)
    d = ImageDraw.Draw(im)
    d.polygon([tuple(p) for p in (polygon @ m.T) * _UNIT + c], fill=1)
    for x, y, r in bites:
        bx, by = (np.array([x, y]) @ m.T) * _UNIT + c
        rr = r * scale * _UNIT
        d.ellipse([bx - rr, by - rr, bx + rr, by + rr], fill=0)
    return np.asarray(im, bool)


def silhouette(polygon, bites=(), **pose) -> np.ndarray:
    """Semantics: bool [64, 64]: the shape (polygon minus the bite disks; unit radius = 22 px) in
    `pose` (scale, turn in radians, mirror), moved so its centroid is the raster's centre."""
    first = _raster(polygon, bites, **pose)
    if not first.any():
        return first
    ys, xs = np.nonzero(first)
    return _raster(polygon, bites, offset=(_RES / 2 - xs.mean() - 0.5, _RES / 2 - ys.mean() - 0.5), **pose)


def _disk(n=64, r=0.9):
    return _polar(np.linspace(0, 2 * np.pi, n, endpoint=False), np.full(n, r))


def _world_geometry(shape: str):
    """(polygon, bites) of a world geometry (world.POLYGONS name, "circle" or "crescent"), as world._draw draws it."""
    from . import world

    if shape == "circle":
        return _disk(), []
    if shape == "crescent":  # world._draw: a disk of 0.9 minus the ellipse [0.45 ± 0.75, -0.05 ± 0.75]
        return _disk(), [(0.45, -0.05, 0.75)]
    return world.POLYGONS[shape], []


def _bank(shapes) -> tuple[np.ndarray, np.ndarray]:
    """Every (turn, mirror, scale) silhouette of each shape: float 0/1 [K, 64·64], the shape index
    of each row, and each row's area."""
    rows, owner = [], []
    for i, s in enumerate(shapes):
        poly, bites = _world_geometry(s)
        for turn in _TURNS:
            for mirror in (False, True):
                for scale in _SCALES:
                    rows.append(silhouette(poly, bites, scale=scale, turn=turn, mirror=mirror).ravel())
                    owner.append(i)
    rows = np.stack(rows).astype(np.float32)
    return rows, np.array(owner), rows.sum(1)


@lru_cache(maxsize=1)
def _held_out_bank():
    return _bank(held_out_geometries())


@lru_cache(maxsize=1)
def _seen_bank():
    from . import world

    return _bank(world.SHAPES)


def held_out_geometries() -> tuple:
    from . import world

    return tuple(o.shape for o in world.NOVEL_OBJECTS.values())  # sparkle, crescent, arrow


def _best_iou(mask: np.ndarray, bank) -> np.ndarray:
    rows, owner, sizes = bank
    m = mask.ravel().astype(np.float32)
    inter = rows @ m  # a matrix-vector product: the bank's 1,296-2,304 rows in ~1 ms
    iou = inter / np.maximum(sizes + m.sum() - inter, 1)
    return np.array([iou[owner == k].max() for k in range(owner.max() + 1)])


def held_out_iou(spec: dict) -> dict:
    """Semantics: {held-out geometry: IoU of `spec`'s upright silhouette with it, best over the
    held-out one's 72 turns x mirror x 3 scales, both centred on their centroid}."""
    iou = _best_iou(silhouette(spec["polygon"], spec["bites"]), _held_out_bank())
    return dict(zip(held_out_geometries(), iou.tolist()))


def nearest_seen(spec: dict) -> str:
    """Semantics: the world.SHAPES shape whose silhouette (best over turns, mirror, scales as in
    held_out_iou) has the highest IoU with `spec`'s: the rule naming an outline's category."""
    from . import world

    return world.SHAPES[int(np.argmax(_best_iou(silhouette(spec["polygon"], spec["bites"]), _seen_bank())))]


def fill_fraction(spec: dict) -> float:
    """Semantics: the silhouette's area / the area of its circumscribed (unit) disk."""
    return float(silhouette(spec["polygon"], spec["bites"]).sum() / (np.pi * _UNIT**2))


def accepted(spec: dict, threshold: float = EXCLUDE_IOU) -> bool:
    """Semantics: fill_fraction >= MIN_FILL and every held_out_iou <= threshold."""
    return fill_fraction(spec) >= MIN_FILL and max(held_out_iou(spec).values()) <= threshold


@lru_cache(maxsize=4096)
def outline(seed: int) -> dict:
    """Semantics: candidate(seed) with "nearest" (nearest_seen) added, if `accepted`; else ValueError."""
    spec = candidate(seed)
    if not accepted(spec):
        raise ValueError(f"outlines: candidate {seed} is excluded (near a held-out silhouette, or too thin)")
    return {**spec, "nearest": nearest_seen(spec)}


def draw_seed(rng: np.random.Generator) -> int:
    """Semantics: seeds drawn from `rng` (uniform in [0, 2^31)) until one is `accepted`; that seed."""
    while True:
        s = int(rng.integers(2**31))
        try:
            outline(s)
            return s
        except ValueError:
            continue


def draw(d: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, value: int) -> None:
    """Draw procedural outline `shape` (radius r, centre cx, cy) filled with `value`, as world._draw does."""
    spec = outline(seed_of(shape))
    pts = spec["polygon"] * r + np.array([cx, cy])
    d.polygon([tuple(p) for p in pts], fill=value)
    for x, y, rb in spec["bites"]:
        bx, by, rr = cx + x * r, cy + y * r, rb * r
        d.ellipse([bx - rr, by - rr, bx + rr, by + rr], fill=0)


def accent(shape: str, colour: str) -> str | None:
    """Semantics: the accent colour (a smaller inner copy, as the held-out objects have) of outline
    `shape` in `colour`: None for half the outlines (by seed), else a world colour other than
    `colour`, never a held-out object's (colour, accent) pair; a pure function of (shape, colour)."""
    from . import world

    rng = np.random.default_rng([seed_of(shape), 23])
    if rng.random() < 0.5:
        return None
    choices = [c for c in world.COLOUR_NAMES if c != colour and (colour, c) not in _HELD_OUT_PAIRS]
    return choices[int(rng.integers(len(choices)))]
