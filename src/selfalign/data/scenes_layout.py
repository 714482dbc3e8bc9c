"""Scene sampling for the scenes dataset: objects, placements, backgrounds and hard-negative groups.

A group shares one multiset of (shape, colour, size) and one background; its members differ only in attribute
binding (colours permuted among the shapes) or in layout (two objects swap places, or the scene is mirrored), so
a bag-of-words model cannot tell them apart.
"""

from __future__ import annotations

import colorsys
import random
from dataclasses import dataclass, replace

from selfalign.data.scenes_render import BACKGROUND_KINDS, COLORS, PALETTE, SHAPES, SceneObject

SMALL_R, LARGE_R = 0.075, 0.15  # bounding radii (fractions of the side): large is twice small
_GAP = 0.03  # minimum empty space between two objects' bounding circles
_MAX_ANGLE = {"square": 12, "triangle": 15, "star": 15, "diamond": 8, "cross": 12, "hexagon": 30}
_BG_MIN_DIST = 110.0  # RGB distance between any background colour and any object colour of the image


@dataclass
class Scene:
    objects: list[SceneObject]
    background: dict
    group: str | None = None
    variant: str = "single"  # single, base, binding, spatial


def _jitter_rgb(rng: random.Random, color: str) -> tuple[int, int, int]:
    return tuple(min(255, max(0, c + rng.randint(-12, 12))) for c in PALETTE[color])  # type: ignore[return-value]


def _place(rng: random.Random, radii: list[float]) -> list[tuple[float, float]] | None:
    """Non-overlapping centres for the given bounding radii (largest first), or None if it did not fit."""
    placed: list[tuple[float, float, float]] = []
    for r in radii:
        for _ in range(200):
            lo, hi = r + 0.02, 1 - r - 0.02
            cx, cy = rng.uniform(lo, hi), rng.uniform(lo, hi)
            if all((cx - x) ** 2 + (cy - y) ** 2 >= (r + pr + _GAP) ** 2 for x, y, pr in placed):
                placed.append((cx, cy, r))
                break
        else:
            return None
    return [(x, y) for x, y, _ in placed]


def _pick(rng: random.Random, used: list[str], pool: tuple[str, ...], reuse: float) -> str:
    if used and rng.random() < reuse:
        return rng.choice(used)
    return rng.choice(pool)


def sample_objects(rng: random.Random, n: int) -> list[SceneObject]:
    """``n`` objects with some repeated colours and shapes (so counts like 'two red circles' occur)."""
    while True:
        colors: list[str] = []
        shapes: list[str] = []
        for _ in range(n):
            colors.append(_pick(rng, colors, COLORS, 0.3))
            shapes.append(_pick(rng, shapes, SHAPES, 0.3))
        sizes = [rng.choice(("small", "large")) for _ in range(n)]
        while sizes.count("large") > 3:
            sizes[sizes.index("large")] = "small"
        radii = [(LARGE_R if s == "large" else SMALL_R) * rng.uniform(0.92, 1.08) for s in sizes]
        order = sorted(range(n), key=lambda i: -radii[i])  # big ones first: they are the hard ones to fit
        centres = _place(rng, [radii[i] for i in order])
        if centres is None:
            continue
        pos = {i: c for i, c in zip(order, centres)}
        return [
            SceneObject(shape=shapes[i], color=colors[i], size=sizes[i], cx=round(pos[i][0], 4),
                        cy=round(pos[i][1], 4), r=round(radii[i], 4),
                        angle=round(rng.uniform(-1, 1) * _MAX_ANGLE.get(shapes[i], 0), 2),
                        rgb=_jitter_rgb(rng, colors[i]))
            for i in range(n)
        ]


def _bg_color(rng: random.Random, near: tuple[float, float, float] | None = None) -> tuple[float, float, float]:
    if near is None:
        h, s, v = rng.random(), rng.uniform(0.0, 0.22), rng.uniform(0.3, 0.97)
    else:
        h = (near[0] + rng.uniform(-0.08, 0.08)) % 1.0
        s = min(0.25, max(0.0, near[1] + rng.uniform(-0.05, 0.05)))
        v = min(0.98, max(0.25, near[2] + rng.choice((-1, 1)) * rng.uniform(0.06, 0.2)))
    return h, s, v


def _rgb(hsv: tuple[float, float, float]) -> list[int]:
    return [round(c * 255) for c in colorsys.hsv_to_rgb(*hsv)]


def _min_dist(colors: list[list[int]], objects: list[SceneObject]) -> float:
    return min(sum((a - b) ** 2 for a, b in zip(c, o.rgb)) ** 0.5 for c in colors for o in objects)


def sample_background(rng: random.Random, objects: list[SceneObject]) -> dict:
    """A low-saturation background (solid, gradient, stripes, noise or clouds) far from every object colour."""
    kind = rng.choices(BACKGROUND_KINDS, weights=(0.25, 0.25, 0.2, 0.15, 0.15))[0]
    best: tuple[float, list[list[int]]] | None = None
    for _ in range(100):
        h0 = _bg_color(rng)
        colors = [_rgb(h0), _rgb(_bg_color(rng, h0))]
        d = _min_dist(colors, objects)
        if best is None or d > best[0]:
            best = (d, colors)
        if d >= _BG_MIN_DIST:
            break
    colors = best[1]
    if kind == "solid":
        colors = [colors[0], colors[0]]
    angle = rng.uniform(0, 360) if kind == "gradient" else rng.choice((0, 45, 90, 135)) + rng.uniform(-5, 5)
    mean = [sum(c) / 2 for c in zip(*colors)]
    return {
        "kind": kind, "colors": colors, "angle": round(angle, 2), "period": round(rng.uniform(0.04, 0.12), 4),
        "amp": round(rng.uniform(6, 14), 2), "seed": rng.getrandbits(31),
        "luminance": round(0.299 * mean[0] + 0.587 * mean[1] + 0.114 * mean[2], 1),
    }


def _signature(objects: list[SceneObject]) -> tuple:
    return tuple(sorted((o.shape, o.color, o.size, round(o.cx, 3), round(o.cy, 3)) for o in objects))


def _fits(objects: list[SceneObject]) -> bool:
    return all(
        (a.cx - b.cx) ** 2 + (a.cy - b.cy) ** 2 >= (a.r + b.r + _GAP) ** 2
        for i, a in enumerate(objects) for b in objects[i + 1:]
    ) and all(o.r + 0.02 <= o.cx <= 1 - o.r - 0.02 and o.r + 0.02 <= o.cy <= 1 - o.r - 0.02 for o in objects)


def binding_variant(rng: random.Random, objects: list[SceneObject]) -> list[SceneObject] | None:
    """Permute colours among the objects so that some shape gets another colour (same colour multiset)."""
    pairs = sorted((o.color, o.shape, o.size) for o in objects)
    for _ in range(20):
        perm = list(range(len(objects)))
        rng.shuffle(perm)
        new = [replace(o, color=objects[p].color, rgb=objects[p].rgb) for o, p in zip(objects, perm)]
        if sorted((o.color, o.shape, o.size) for o in new) != pairs:
            return new
    return None


def spatial_variant(rng: random.Random, objects: list[SceneObject]) -> list[SceneObject] | None:
    """Swap the places of two different-looking objects, or mirror the layout left-right or top-bottom."""
    if rng.random() < 0.5:
        for _ in range(20):
            a, b = rng.sample(range(len(objects)), 2)
            oa, ob = objects[a], objects[b]
            if (oa.color, oa.shape) == (ob.color, ob.shape):
                continue
            new = list(objects)
            new[a], new[b] = replace(oa, cx=ob.cx, cy=ob.cy), replace(ob, cx=oa.cx, cy=oa.cy)
            if _fits(new):
                return new
    if rng.random() < 0.6:  # shapes keep their orientation: only centres move
        return [replace(o, cx=round(1 - o.cx, 4)) for o in objects]
    return [replace(o, cy=round(1 - o.cy, 4)) for o in objects]


def sample_group(rng: random.Random, size: int, name: str) -> list[Scene]:
    """``size`` confusable scenes: the base and variants of one kind (binding or spatial)."""
    while True:
        objects = sample_objects(rng, rng.randint(2, 5))
        if len({o.color for o in objects}) < 2 or len({o.shape for o in objects}) < 2:
            continue
        kind = rng.choice(("binding", "spatial"))
        make = binding_variant if kind == "binding" else spatial_variant
        members = [objects]
        for _ in range(10 * size):
            if len(members) == size:
                break
            new = make(rng, objects)
            if new is not None and _signature(new) not in {_signature(m) for m in members}:
                members.append(new)
        if len(members) == size:
            bg = sample_background(rng, objects)
            return [Scene(m, bg, name, "base" if j == 0 else kind) for j, m in enumerate(members)]


def plan_split(rng: random.Random, n: int, split: str, group_prob: float = 0.26) -> list[Scene]:
    """``n`` scenes; with ``group_prob`` = 0.26 about 45 % of the images belong to hard-negative groups."""
    scenes: list[Scene] = []
    while len(scenes) < n:
        left = n - len(scenes)
        if left >= 2 and rng.random() < group_prob:
            size = min(left, rng.choice((2, 2, 3)))
            scenes += sample_group(rng, size, f"{split}-g{len(scenes):05d}")
        else:
            objects = sample_objects(rng, rng.randint(2, 6))
            scenes.append(Scene(objects, sample_background(rng, objects)))
    return scenes
