"""Drawing for the scenes dataset: backgrounds, shapes and their pixel boxes.

Geometry is kept in image fractions (centre ``cx, cy`` and bounding radius ``r`` in [0, 1]) so one scene renders at
any size. Shapes are drawn at twice the resolution and box-filtered down, which anti-aliases their edges cheaply.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "star", "diamond", "cross", "ring", "hexagon")

# Saturated or extreme colours only; backgrounds are drawn from low-saturation tints far from all of these.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "green": (35, 165, 55),
    "blue": (35, 80, 225),
    "yellow": (245, 215, 30),
    "orange": (250, 135, 15),
    "purple": (140, 55, 190),
    "white": (250, 250, 250),
    "black": (25, 25, 25),
}
COLORS = tuple(PALETTE)
BACKGROUND_KINDS = ("solid", "gradient", "stripes", "noise", "clouds")
_SUPERSAMPLE = 2


@dataclass
class SceneObject:
    shape: str
    color: str
    size: str  # "small" or "large"
    cx: float
    cy: float
    r: float  # bounding radius, fraction of the image side
    angle: float  # degrees; small, so a square never turns into a diamond
    rgb: tuple[int, int, int]  # the palette colour with a little jitter


def _rotate(points: list[tuple[float, float]], angle: float) -> list[tuple[float, float]]:
    c, s = math.cos(math.radians(angle)), math.sin(math.radians(angle))
    return [(x * c - y * s, x * s + y * c) for x, y in points]


def _unit_polygon(shape: str) -> list[tuple[float, float]] | None:
    """Vertices around the origin for a unit bounding radius (None: drawn as an ellipse)."""
    if shape in ("circle", "ring"):
        return None
    if shape == "square":
        h = 0.78
        return [(-h, -h), (h, -h), (h, h), (-h, h)]
    if shape == "triangle":
        return [(math.cos(math.radians(a)), math.sin(math.radians(a))) for a in (-90, 30, 150)]
    if shape == "star":
        pts = []
        for i in range(10):
            rad = 1.0 if i % 2 == 0 else 0.42
            a = math.radians(-90 + 36 * i)
            pts.append((rad * math.cos(a), rad * math.sin(a)))
        return pts
    if shape == "diamond":
        return [(0.0, -1.0), (0.62, 0.0), (0.0, 1.0), (-0.62, 0.0)]
    if shape == "cross":
        a, w = 0.95, 0.32
        return [(-w, -a), (w, -a), (w, -w), (a, -w), (a, w), (w, w),
                (w, a), (-w, a), (-w, w), (-a, w), (-a, -w), (-w, -w)]
    if shape == "hexagon":
        return [(math.cos(math.radians(60 * i)), math.sin(math.radians(60 * i))) for i in range(6)]
    raise ValueError(f"unknown shape {shape!r}")


def object_polygon(obj: SceneObject, side: float) -> list[tuple[float, float]] | None:
    """Pixel vertices of the object's outline in an image of ``side`` pixels (None for circle and ring)."""
    unit = _unit_polygon(obj.shape)
    if unit is None:
        return None
    scale = obj.r * side
    return [(obj.cx * side + x * scale, obj.cy * side + y * scale) for x, y in _rotate(unit, obj.angle)]


def object_box(obj: SceneObject, side: int) -> list[float]:
    """Tight pixel box ``[x1, y1, x2, y2]`` of the drawn object, clipped to the image."""
    poly = object_polygon(obj, side)
    if poly is None:
        rr = obj.r * side
        x1, y1, x2, y2 = obj.cx * side - rr, obj.cy * side - rr, obj.cx * side + rr, obj.cy * side + rr
    else:
        xs, ys = [p[0] for p in poly], [p[1] for p in poly]
        x1, y1, x2, y2 = min(xs), min(ys), max(xs), max(ys)
    clip = lambda v: round(min(max(v, 0.0), float(side)), 2)  # noqa: E731
    return [clip(x1), clip(y1), clip(x2), clip(y2)]


@functools.lru_cache(maxsize=4)
def _grid(side: int) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:side, 0:side].astype(np.float32) / max(side - 1, 1)
    return yy, xx


def render_background(bg: dict, side: int) -> np.ndarray:
    """``[side, side, 3]`` uint8 background from its description (kind, colours, angle, period, amp, seed)."""
    c0 = np.asarray(bg["colors"][0], dtype=np.float32)
    c1 = np.asarray(bg["colors"][1], dtype=np.float32)
    kind = bg["kind"]
    if kind in ("gradient", "stripes"):
        yy, xx = _grid(side)
        theta = math.radians(bg.get("angle", 0.0))
        proj = xx * math.cos(theta) + yy * math.sin(theta)
    if kind == "solid":
        img = np.broadcast_to(c0, (side, side, 3))
    elif kind == "gradient":
        t = (proj - proj.min()) / max(float(proj.max() - proj.min()), 1e-6)
        img = c0 + t[..., None] * (c1 - c0)
    elif kind == "stripes":
        band = np.floor(proj / bg["period"]).astype(np.int64) % 2
        img = np.where(band[..., None] == 0, c0, c1)
    elif kind == "noise":
        rng = np.random.default_rng(bg["seed"])
        img = c0 + bg["amp"] * rng.standard_normal((side, side, 1)).astype(np.float32)
    elif kind == "clouds":
        # smooth blobs: a coarse random grid upsampled bilinearly, mixing the two colours
        coarse = np.random.default_rng(bg["seed"]).standard_normal((6, 6)).astype(np.float32)
        field = np.asarray(Image.fromarray(coarse).resize((side, side), Image.BILINEAR))
        field = field / max(float(np.abs(field).max()), 1e-6) * 0.5 + 0.5
        img = c0 + field[..., None] * (c1 - c0)
    else:
        raise ValueError(f"unknown background kind {kind!r}")
    return np.clip(img, 0, 255).astype(np.uint8)


def render_scene(objects: list[SceneObject], bg: dict, side: int) -> Image.Image:
    """The scene as an RGB image of ``side`` x ``side`` pixels (objects drawn in list order)."""
    big = side * _SUPERSAMPLE
    canvas = Image.fromarray(render_background(bg, side)).resize((big, big), Image.NEAREST)
    draw = ImageDraw.Draw(canvas)
    for obj in objects:
        poly = object_polygon(obj, big)
        if poly is None:
            rr = obj.r * big
            box = (obj.cx * big - rr, obj.cy * big - rr, obj.cx * big + rr, obj.cy * big + rr)
            if obj.shape == "ring":
                draw.ellipse(box, outline=obj.rgb, width=max(2, round(rr * 0.42)))
            else:
                draw.ellipse(box, fill=obj.rgb)
        else:
            draw.polygon(poly, fill=obj.rgb)
    return canvas.reduce(_SUPERSAMPLE)


def render_to_file(args: tuple[list[SceneObject], dict, int, str]) -> None:
    """Worker entry point: render one scene and write it as PNG."""
    objects, bg, side, path = args
    render_scene(objects, bg, side).save(Path(path), format="PNG", compress_level=1)
