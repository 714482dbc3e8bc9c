"""Caption grammar for the scenes dataset: true statements about one scene, phrased with paraphrase variety.

A caption is built from parts (a relation, a position, a count, a list of objects), each a list of tokens that
remember which object every colour, size and shape word names. Each part comes from a fact checked against the
scene's geometry (``scenes_facts``), so captions only say true things; the facts are kept for later scoring.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from selfalign.data.scenes_facts import RELATIONS, caption_holds, matching, region, relation_holds
from selfalign.data.scenes_render import SceneObject

Tok = tuple[str, tuple[tuple[str, int], ...]]  # (word, ((kind, object index), ...))

SHAPE_NOUNS = {
    "circle": ("circle", "disc", "dot"), "square": ("square", "box", "block"), "triangle": ("triangle",),
    "star": ("star",), "diamond": ("diamond", "rhombus"), "cross": ("cross",), "ring": ("ring", "donut"),
    "hexagon": ("hexagon",),
}
PLURALS = {"box": "boxes", "cross": "crosses", "rhombus": "rhombuses"}
SIZE_WORDS = {"small": ("small", "little", "tiny"), "large": ("large", "big")}
GENERIC = ("object", "shape", "thing", "item")
NUMBERS = {1: "one", 2: "two", 3: "three", 4: "four", 5: "five", 6: "six", 7: "seven", 8: "eight"}
_REL = {
    "left": (("to", "the", "left", "of"), ("left", "of"), ("on", "the", "left", "of")),
    "right": (("to", "the", "right", "of"), ("right", "of"), ("on", "the", "right", "of")),
    "above": (("above",), ("over",), ("higher", "than")),
    "below": (("below",), ("under",), ("beneath",), ("underneath",)),
    "next": (("next", "to"), ("beside",), ("near",), ("close", "to")),
}
_REL_PRONOUN = {
    "left": (("to", "its", "left"), ("on", "its", "left")), "right": (("to", "its", "right"), ("on", "its", "right")),
    "above": (("above", "it"), ("over", "it")), "below": (("below", "it"), ("under", "it")),
    "next": (("next", "to", "it"), ("beside", "it")),
}
_VERBS = (("sits",), ("is", "placed"), ("is", "located"), ("appears",), ("is",))
_BG_WORDS = {
    "solid": ("plain", "uniform", "flat"), "gradient": ("gradient", "shaded"), "stripes": ("striped", "stripy"),
    "noise": ("grainy", "noisy", "speckled"), "clouds": ("mottled", "cloudy", "blotchy"),
}
_WRAP_SG = ((), ("there", "is"), ("an", "image", "with"), ("an", "image", "of"), ("a", "picture", "showing"),
            ("a", "picture", "of"), ("this", "image", "shows"), ("a", "scene", "with"), ("we", "can", "see"),
            ("the", "picture", "shows"), ("a", "drawing", "of"))


@dataclass
class Part:
    toks: list[Tok]
    form: str  # "sg" or "pl" (a noun phrase) or "clause" (a full statement)
    facts: list[dict] = field(default_factory=list)


def words(*ws: str) -> list[Tok]:
    return [(w, ()) for w in ws]


def plural(noun: str) -> str:
    return PLURALS.get(noun, noun + "s")


def article(next_word: str) -> str:
    return "an" if next_word[0] in "aeio" else "a"  # "a uniform": u is left out on purpose


def _attrs(o: SceneObject, keys: tuple[str, ...]) -> dict[str, str]:
    return {k: getattr(o, k) for k in keys}


def _describe(rng: random.Random, objects: list[SceneObject], i: int, unique: bool,
              rich: bool = False) -> tuple[str, ...] | None:
    """Which attributes to name for object i; with ``unique`` only a description no other object fits.

    ``rich`` names colour and shape whenever that is allowed: parts without a relation need it to be specific.
    """
    options = [("color", "shape")] * 6 + [("size", "color", "shape")] * 3
    if not rich:
        options += [("shape",)] * 2 + [("size", "shape")] * 2
    rng.shuffle(options)
    options += [("shape",), ("size", "shape")]
    options += [("color",), ("size", "color")]  # generic nouns ('a red object') only when nothing else is unique
    for keys in options:
        if not unique or len(matching(objects, _attrs(objects[i], keys))) == 1:
            return keys
    return None


def noun_phrase(rng: random.Random, objects: list[SceneObject], i: int, keys: tuple[str, ...], det: str) -> list[Tok]:
    """E.g. 'a small red circle', 'the box that is blue', 'an orange object'."""
    o = objects[i]
    size = [(rng.choice(SIZE_WORDS[o.size]), (("size", i),))] if "size" in keys else []
    color = [(o.color, (("color", i),))] if "color" in keys else []
    noun: Tok = (rng.choice(SHAPE_NOUNS[o.shape]), (("shape", i),)) if "shape" in keys else (rng.choice(GENERIC), ())
    if color and rng.random() < 0.2:
        toks = size + [noun] + words(*rng.choice((("that", "is"), ("in",), ("colored",)))) + color
    else:
        toks = size + color + [noun]
    if det == "a":
        det = article(toks[0][0])
    return words(det) + toks


def _fact_np(objects: list[SceneObject], i: int, keys: tuple[str, ...], unique: bool) -> dict:
    return {"type": "unique" if unique else "exists", "object": i, "attrs": _attrs(objects[i], keys)}


def relation_part(rng: random.Random, objects: list[SceneObject]) -> Part | None:
    cands = [(a, b, rel) for a in range(len(objects)) for b in range(len(objects)) if a != b for rel in RELATIONS
             if relation_holds(objects, a, b, rel)]
    rng.shuffle(cands)
    for a, b, rel in cands:
        ka, kb = _describe(rng, objects, a, True), _describe(rng, objects, b, True)
        if ka is None or kb is None:
            continue
        facts = [{"type": "relation", "rel": rel, "a": a, "b": b, "a_attrs": _attrs(objects[a], ka),
                  "b_attrs": _attrs(objects[b], kb)}, _fact_np(objects, a, ka, True),
                 _fact_np(objects, b, kb, True)]
        rel_words = words(*rng.choice(_REL[rel]))
        np_b = noun_phrase(rng, objects, b, kb, rng.choice(("a", "the")))
        form = rng.randrange(6)
        if form == 0:
            return Part(noun_phrase(rng, objects, a, ka, rng.choice(("a", "the"))) + rel_words + np_b, "sg", facts)
        if form == 1:
            verb = words(*rng.choice(_VERBS))
            return Part(noun_phrase(rng, objects, a, ka, "the") + verb + rel_words + np_b, "clause", facts)
        if form == 2:
            np_a = noun_phrase(rng, objects, a, ka, "a")
            return Part(rel_words + np_b + words("there", "is") + np_a, "clause", facts)
        if form == 3:
            return Part(rel_words + np_b + words("is") + noun_phrase(rng, objects, a, ka, "a"), "clause", facts)
        if form == 4:
            return Part(np_b + words("with") + noun_phrase(rng, objects, a, ka, "a")
                        + words(*rng.choice(_REL_PRONOUN[rel])), "sg", facts)
        return Part(noun_phrase(rng, objects, a, ka, "a") + words("is") + rel_words + np_b, "clause", facts)
    return None


def _where_words(rng: random.Random, h: str | None, v: str | None) -> list[Tok] | None:
    side = {"left": "left", "right": "right", "top": "top", "bottom": "bottom"}
    if h in side and v in side:
        upper = "upper" if v == "top" else "lower"
        return words(*rng.choice((("in", "the", v, h, "corner"), ("at", "the", v, h), ("in", "the", upper, h))))
    if h in side and v == "centre":
        return words(*rng.choice((("on", "the", h), ("on", "the", h, "side"), ("at", "the", h))))
    if v in side and h == "centre":
        return words(*rng.choice((("at", "the", v), ("near", "the", v), ("at", "the", v, "of", "the", "image"))))
    if h == v == "centre":
        return words(*rng.choice((("in", "the", "middle"), ("in", "the", "center"), ("near", "the", "center"))))
    return None


def position_part(rng: random.Random, objects: list[SceneObject]) -> Part | None:
    order = list(range(len(objects)))
    rng.shuffle(order)
    for i in order:
        h, v = region(objects[i])
        where = _where_words(rng, h, v)
        if where is None:
            continue
        keys = _describe(rng, objects, i, False, rich=True)
        unique = len(matching(objects, _attrs(objects[i], keys))) == 1
        facts = [{"type": "position", "object": i, "h": h, "v": v, "attrs": _attrs(objects[i], keys)},
                 _fact_np(objects, i, keys, unique)]
        det = rng.choice(("a", "the")) if unique else "a"
        form = rng.randrange(4)
        if form == 0:
            return Part(noun_phrase(rng, objects, i, keys, det) + where, "sg", facts)
        if form == 1:
            return Part(noun_phrase(rng, objects, i, keys, det) + words(*rng.choice(_VERBS)) + where, "clause", facts)
        if form == 2:
            return Part(where + words("there", "is") + noun_phrase(rng, objects, i, keys, "a"), "clause", facts)
        return Part(where + words("is") + noun_phrase(rng, objects, i, keys, "a"), "clause", facts)
    return None


def count_part(rng: random.Random, objects: list[SceneObject], total: bool = False) -> Part:
    """'four shapes', 'two red circles', 'a single big star': exact counts."""
    if total:
        n = len(objects)
        return Part(words(NUMBERS[n], plural(rng.choice(GENERIC))), "pl", [{"type": "count", "attrs": {}, "n": n}])
    options = [("color", "shape"), ("shape",), ("color",), ("size", "shape"), ("size", "color", "shape")]
    best: tuple[dict, list[int], tuple[str, ...]] | None = None
    for _ in range(8):
        o = objects[rng.randrange(len(objects))]
        keys = rng.choice(options)
        idx = matching(objects, _attrs(o, keys))
        best = (_attrs(o, keys), idx, keys)
        if len(idx) >= 2:
            break
    attrs, idx, keys = best
    o = objects[idx[0]]
    size_w = [(rng.choice(SIZE_WORDS[o.size]), tuple(("size", i) for i in idx))] if "size" in keys else []
    color_w = [(o.color, tuple(("color", i) for i in idx))] if "color" in keys else []
    shape_refs = tuple(("shape", i) for i in idx) if "shape" in keys else ()
    noun = rng.choice(SHAPE_NOUNS[o.shape]) if "shape" in keys else rng.choice(GENERIC)
    fact = [{"type": "count", "attrs": attrs, "n": len(idx)}]
    if len(idx) == 1:
        lead = words(*rng.choice((("a", "single"), ("only", "one"), ("exactly", "one"), ("just", "one"))))
        return Part(lead + size_w + color_w + [(noun, shape_refs)], "sg", fact)
    return Part(words(NUMBERS[len(idx)]) + size_w + color_w + [(plural(noun), shape_refs)], "pl", fact)


def list_part(rng: random.Random, objects: list[SceneObject]) -> Part:
    """'a red circle and a small blue box', 'a star with a ring and a green dot'."""
    k = min(len(objects), rng.choice((2, 2, 3)))
    chosen = rng.sample(range(len(objects)), k)
    toks: list[Tok] = []
    facts: list[dict] = []
    said: list[str] = []
    for j, i in enumerate(chosen):
        keys = _describe(rng, objects, i, False, rich=rng.random() < 0.85)
        if j == k - 1 and k > 1:
            toks += words("and") if k == 3 else words(*rng.choice((("and",), ("with",), ("along", "with"), ("plus",))))
        elif j > 0:
            toks += words(rng.choice(("with", "and")))
        np_toks = noun_phrase(rng, objects, i, keys, "a")
        if " ".join(w for w, _ in np_toks) in said:  # 'a cross and a cross' reads like a mistake
            keys = ("size", "color", "shape")
            np_toks = noun_phrase(rng, objects, i, keys, "a")
        said.append(" ".join(w for w, _ in np_toks))
        facts.append(_fact_np(objects, i, keys, False))
        toks += np_toks
    return Part(toks, "sg", facts)


def background_words(rng: random.Random, bg: dict) -> list[Tok]:
    adj = [rng.choice(_BG_WORDS[bg["kind"]])]
    lum = bg.get("luminance", 128)
    if rng.random() < 0.5 and (lum > 185 or lum < 105):
        adj.insert(0, rng.choice(("light", "pale")) if lum > 185 else "dark")
    lead, noun = rng.choice(
        ((("on",), "background"), (("against",), "background"), (("in", "front", "of"), "backdrop")))
    return words(*lead, article(adj[0]), *adj, noun)


def _indefinite(toks: list[Tok]) -> list[Tok]:
    """'there is the box' reads badly: after 'there is' a leading 'the' becomes 'a'/'an'."""
    if toks and toks[0][0] == "the":
        return words(article(toks[1][0])) + toks[1:]
    return toks


def _as_clause(rng: random.Random, p: Part) -> list[Tok]:
    if p.form == "clause":
        return p.toks
    return words("there", "are" if p.form == "pl" else "is") + _indefinite(p.toks)


def _wrap(rng: random.Random, p: Part) -> list[Tok]:
    if p.form == "clause":
        return p.toks
    lead = rng.choice(_WRAP_SG)
    if lead == ("there", "is"):
        return words("there", "are" if p.form == "pl" else "is") + _indefinite(p.toks)
    return words(*lead) + p.toks


def _join(rng: random.Random, part: Part, other: Part) -> tuple[list[Tok], list[dict]]:
    facts = part.facts + other.facts
    if other.form == "pl" and other.facts[0]["attrs"] == {} and part.form != "clause" and rng.random() < 0.6:
        # 'an image of four shapes including a red circle left of the box'
        return _wrap(rng, other) + words(*rng.choice((("including",), ("among", "them")))) + part.toks, facts
    first, second = _as_clause(rng, part), _as_clause(rng, other)
    if rng.random() < 0.3:
        first, second = second, first
    return first + words(*rng.choice((("and",), ("while",), ("and", "also")))) + second, facts


def make_caption(rng: random.Random, objects: list[SceneObject], bg: dict, kind: str) -> tuple[list[Tok], list[dict]]:
    """One caption of the given kind (relation, position, count, list, combo); falls back to a list if impossible."""
    part = {"relation": relation_part, "position": position_part, "count": count_part}.get(
        kind, lambda r, o: None)(rng, objects)
    if part is None:
        part = list_part(rng, objects)
    if kind == "count":
        fact = part.facts[0]
        if fact["n"] < 2 or not {"color", "shape"} <= set(fact["attrs"]):
            # 'just one star' or 'two red things' says little alone: it rides along with a more specific part
            main = relation_part(rng, objects) or position_part(rng, objects) or list_part(rng, objects)
            return _join(rng, main, part)
    roll = rng.random()
    if kind == "combo" or roll < 0.12:
        other = rng.choice((count_part(rng, objects, total=True), count_part(rng, objects), list_part(rng, objects),
                            position_part(rng, objects) or list_part(rng, objects)))
        return _join(rng, part, other)
    toks = _wrap(rng, part)
    facts = list(part.facts)
    if roll > 0.75:
        toks = toks + background_words(rng, bg)
        facts.append({"type": "background", "kind": bg["kind"]})
    return toks, facts


def scene_captions(rng: random.Random, objects: list[SceneObject], bg: dict, n: int = 5,
                   siblings: list[list[SceneObject]] = ()) -> list[dict]:
    """``n`` distinct captions: ``[{"text", "mentions": [{"word", "token", "start", "object", "kind"}], "facts"}]``.

    Captions that would also be true of a sibling (another member of the scene's hard-negative group) are avoided,
    so that every caption identifies its own image within the group; ``"shared": true`` marks the rare exception.
    """
    kinds = ["relation", "list", "count", "position", rng.choice(("relation", "combo", "list"))]
    rng.shuffle(kinds)
    out: list[dict] = []
    seen: set[str] = set()
    tries = 0
    while len(out) < n:
        kind = kinds[len(out) % len(kinds)] if tries < 40 else rng.choice(("relation", "position", "list", "combo"))
        toks, facts = make_caption(rng, objects, bg, kind)
        tries += 1
        text = " ".join(w for w, _ in toks)
        if text in seen:
            if tries > 400:
                raise RuntimeError("could not phrase enough distinct captions")  # unreachable with >= 2 objects
            continue
        shared = any(caption_holds(sib, facts) for sib in siblings)
        if shared and tries < 200:
            continue
        seen.add(text)
        mentions, start = [], 0
        for t, (w, refs) in enumerate(toks):
            for kind_, obj in refs:
                mentions.append({"word": w, "token": t, "start": start, "object": obj, "kind": kind_})
            start += len(w) + 1
        out.append({"text": text, "mentions": mentions, "facts": facts, **({"shared": True} if shared else {})})
    return out
