"""Facts about a scene that captions may state, and their checks against the scene's geometry.

Relations use margins wide enough to be unambiguous to the eye; a relation's dominant axis must be clear.
"""

from __future__ import annotations

from selfalign.data.scenes_render import SceneObject

RELATIONS = ("left", "right", "above", "below", "next")


def _matches(o: SceneObject, attrs: dict[str, str]) -> bool:
    return all(getattr(o, k) == v for k, v in attrs.items())


def matching(objects: list[SceneObject], attrs: dict[str, str]) -> list[int]:
    return [i for i, o in enumerate(objects) if _matches(o, attrs)]


def relation_holds(objects: list[SceneObject], a: int, b: int, rel: str) -> bool:
    """Whether object a is ``rel`` of object b, with margins wide enough to be unambiguous to the eye."""
    oa, ob = objects[a], objects[b]
    dx, dy = ob.cx - oa.cx, ob.cy - oa.cy  # image y grows downwards
    need = max(0.1, 0.5 * (oa.r + ob.r))
    if rel in ("left", "right"):
        d = dx if rel == "left" else -dx
        return d > need and d >= 0.9 * abs(dy)
    if rel in ("above", "below"):
        d = dy if rel == "above" else -dy
        return d > need and d >= 0.9 * abs(dx)
    if rel == "next":
        return ((dx * dx + dy * dy) ** 0.5 - oa.r - ob.r) < 0.07
    raise ValueError(f"unknown relation {rel!r}")


def region(o: SceneObject) -> tuple[str | None, str | None]:
    """(horizontal, vertical) region words of an object's centre: left/right/centre, top/bottom/centre or None."""
    h = "left" if o.cx < 0.36 else "right" if o.cx > 0.64 else "centre" if abs(o.cx - 0.5) < 0.12 else None
    v = "top" if o.cy < 0.36 else "bottom" if o.cy > 0.64 else "centre" if abs(o.cy - 0.5) < 0.12 else None
    return h, v


def check_fact(objects: list[SceneObject], fact: dict) -> bool:
    """Re-check one fact recorded with a caption against the scene."""
    kind = fact["type"]
    if kind == "exists":
        return _matches(objects[fact["object"]], fact["attrs"])
    if kind == "unique":
        return matching(objects, fact["attrs"]) == [fact["object"]]
    if kind == "count":
        return len(matching(objects, fact["attrs"])) == fact["n"]
    if kind == "relation":
        return relation_holds(objects, fact["a"], fact["b"], fact["rel"])
    if kind == "position":
        return region(objects[fact["object"]]) == (fact["h"], fact["v"])
    if kind == "background":
        return True
    raise ValueError(f"unknown fact type {kind!r}")


def caption_holds(objects: list[SceneObject], facts: list[dict]) -> bool:
    """Whether a caption's facts are true of a scene read plainly (any fitting objects, not the indexed ones)."""
    for f in facts:
        kind = f["type"]
        if kind in ("exists", "unique", "count"):
            n = len(matching(objects, f["attrs"]))
            ok = n >= 1 if kind == "exists" else n == 1 if kind == "unique" else n == f["n"]
        elif kind == "relation":
            ok = any(relation_holds(objects, a, b, f["rel"]) for a in matching(objects, f["a_attrs"])
                     for b in matching(objects, f["b_attrs"]) if a != b)
        elif kind == "position":
            ok = any(region(objects[i]) == (f["h"], f["v"]) for i in matching(objects, f["attrs"]))
        else:
            ok = True  # the background is shared within a group
        if not ok:
            return False
    return True
