"""Word–object correspondences in the LCA space (the context-free locals, ``Encoded.free``).

For one image–caption pair: the word–region pairs with the highest cosine, drawn as labelled boxes. On ``scenes``,
where every colour and shape word is annotated with the object it names, the *correspondence accuracy*: the
fraction of those words whose best region (argmax cosine over the image's valid regions, region 0 — the whole
image — excluded, since it contains every object) is the region of the object they describe.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np
import torch

from selfalign.analysis.common import (
    RunSplit, caption_locals, image_locals, load_rgb, new_figure, read_json, require_boxes, safe_name, save_figure,
)  # fmt: skip
from selfalign.data.precomp import read_meta
from selfalign.data.text import tokenize
from selfalign.errors import InputError

SCORED_KINDS = ("color", "shape")
_COLOURS = ("#e41a1c", "#377eb8", "#4daf4a", "#ff7f00", "#984ea3", "#a65628", "#f781bf", "#17becf")


def top_pairs(sim: torch.Tensor, word_mask: torch.Tensor, region_mask: torch.Tensor, words: list[str], k: int = 5,
              skip_whole_image: bool = True) -> list[dict]:
    """The ``k`` best (word, region) pairs of ``sim [L, R]`` (cosines), one per distinct word (its best region).

    Region 0 (the whole image) is left out when ``skip_whole_image`` and the image has other valid regions.
    Returns ``[{"word", "position", "region", "cosine"}]`` best first.
    """
    regions = region_mask.clone().bool()
    if skip_whole_image and int(regions[1:].sum()) > 0:
        regions[0] = False
    masked = sim.masked_fill(~regions.unsqueeze(0), float("-inf"))
    best_cos, best_region = masked.max(dim=1)
    order = torch.argsort(best_cos, descending=True).tolist()
    pairs, seen = [], set()
    for pos in order:
        if not bool(word_mask[pos]) or pos >= len(words) or words[pos] in seen:
            continue
        seen.add(words[pos])
        pairs.append({"word": words[pos], "position": pos, "region": int(best_region[pos]),
                      "cosine": round(float(best_cos[pos]), 4)})
        if len(pairs) == k:
            break
    return pairs


def pair_figure(rs: RunSplit, index: int, caption_k: int, k: int, out_path: Path) -> tuple[Path, dict]:
    """Draw the top-``k`` word–region pairs of image ``index`` and its caption ``caption_k`` (0..4)."""
    if not 0 <= index < rs.split.num_images:
        raise InputError(f"--index {index}: split '{rs.split_name}' has {rs.split.num_images} images (0..N-1)")
    if not 0 <= caption_k < 5:
        raise InputError(f"--caption {caption_k}: each image has captions 0..4")
    boxes = require_boxes(rs)[index]
    caption = rs.split.captions[5 * index + caption_k]
    img_free, img_mask = image_locals(rs.model, rs.split, np.array([index]))
    txt_free, txt_mask, words = caption_locals(rs.model, [caption])
    sim = txt_free[0] @ img_free[0].T  # [L, R]; both sides are unit-norm, so these are cosines
    pairs = top_pairs(sim, txt_mask[0], img_mask[0], words[0], k)
    image = load_rgb(rs.image_path(index))
    width, height = image.size

    import matplotlib.patches as patches

    n_words, n_regions = len(words[0]), int(img_mask[0].sum())
    fig, (ax_img, ax_sim) = new_figure(1, 2, figsize=(12, 5.5), gridspec_kw={"width_ratios": [1.1, 1]})
    ax_img.imshow(image)
    handles = []
    for rank, pair in enumerate(pairs):
        colour = _COLOURS[rank % len(_COLOURS)]
        # pairs sharing a region get nested frames (inset by rank) so every colour stays visible
        inset = 1.5 * sum(p["region"] == pair["region"] for p in pairs[:rank]) * max(width, height) / 100
        x1, y1, x2, y2 = boxes[pair["region"]] * np.array([width, height, width, height]) + [inset, inset, -inset,
                                                                                             -inset]
        ax_img.add_patch(patches.Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, lw=2.5, ec=colour))
        ax_img.text(x1 + 0.5, y1 + 0.5, f"r{pair['region']}", color="white", fontsize=7, va="top", ha="left",
                    bbox={"facecolor": colour, "alpha": 0.8, "pad": 1, "lw": 0})
        handles.append(patches.Patch(color=colour, label=f"{rank + 1}. {pair['word']} → r{pair['region']} "
                                                         f"(cos {pair['cosine']:.2f})"))
    if handles:
        ax_img.legend(handles=handles, loc="upper left", bbox_to_anchor=(0, -0.01), ncol=2, fontsize=8,
                      frameon=False)
    ax_img.set_axis_off()
    ax_img.set_title(f"{rs.split.image_ids[index]}: top-{len(pairs)} word–region pairs\n"
                     f"(cosine of context-free locals; region 0 = whole image excluded)", fontsize=10)
    shown = sim[:n_words, :n_regions].numpy()
    span = max(1e-6, float(np.abs(shown).max()))  # symmetric data range: untrained cosines are tiny
    im = ax_sim.imshow(shown, cmap="RdBu_r", aspect="auto", vmin=-span, vmax=span)
    if shown.size <= 400:
        for (row, col), value in np.ndenumerate(shown):
            ax_sim.text(col, row, f"{value:.2f}", ha="center", va="center", fontsize=6)
    ax_sim.set_yticks(range(n_words), words[0], fontsize=8)
    ax_sim.set_xticks(range(n_regions), ["0\n(whole)"] + [str(r) for r in range(1, n_regions)], fontsize=8)
    ax_sim.set_xlabel("region (index into the feature store)")
    ax_sim.set_ylabel("caption word")
    ax_sim.set_title("cosine(word, region), all pairs", fontsize=10)
    for rank, pair in enumerate(pairs):
        ax_sim.add_patch(patches.Rectangle((pair["region"] - 0.5, pair["position"] - 0.5), 1, 1, fill=False, lw=2,
                                           ec=_COLOURS[rank % len(_COLOURS)]))
    fig.colorbar(im, ax=ax_sim, label="cosine")
    fig.suptitle(textwrap.fill(f"“{caption}” — {rs.label}", 110), fontsize=11)
    save_figure(fig, out_path)
    return out_path, {"image_id": rs.split.image_ids[index], "index": index, "caption_k": caption_k,
                      "caption": caption, "pairs": pairs}


def mention_position(text: str, start: int, word: str, words: list[str]) -> int | None:
    """The position in the model's tokens ``words`` of the mention of ``word`` at character ``start`` of ``text``.

    The mention is the n-th ``word`` of the caption (n counted with ``selfalign.data.text.tokenize``); its position
    is that of the n-th equal token. None when the tokens lack it (truncated caption, sub-word pieces).
    """
    word = word.lower()
    nth = tokenize(text[:start]).count(word)
    positions = [i for i, w in enumerate(words) if w.lower() == word]
    return positions[nth] if nth < len(positions) else None


def _annotations(rs: RunSplit) -> dict:
    path = rs.root / "annotations.json"
    if not path.is_file():
        raise InputError(f"{path} not found: correspondence accuracy needs a scenes dataset (its annotations.json); "
                         f"pass --root when the run config's data.root ({rs.cfg.data.root}) is elsewhere")
    meta = read_meta(rs.features)
    if meta.get("regions", "boxes") != "boxes":
        raise InputError(f"{rs.features}/meta.json: regions={meta.get('regions')}; correspondence accuracy needs "
                         f"ground-truth box regions (extract with --regions boxes)")
    return read_json(path)


def _mentions(cap: dict, image_id: str, k: int) -> dict[int, tuple[str, str, set]]:
    """Scored mentions of one annotated caption by character offset: (word, kind, objects it names)."""
    out: dict[int, tuple[str, str, set]] = {}
    try:
        for m in cap.get("mentions", []):
            if m["kind"] in SCORED_KINDS:
                out.setdefault(int(m["start"]), (str(m["word"]), m["kind"], set()))[2].add(int(m["object"]))
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise InputError(f"annotations.json: image '{image_id}', caption {k}: malformed mention ({exc!r})") from None
    return out


def correspondence_accuracy(rs: RunSplit) -> dict:
    """Score every colour and shape word of the split; returns accuracy overall and per kind, chance and skips."""
    annotations = _annotations(rs)
    img_free, img_mask = image_locals(rs.model, rs.split)
    txt_free, txt_mask, words = caption_locals(rs.model, list(rs.split.captions))
    scores = score_mentions(img_free, img_mask, txt_free, txt_mask, words, list(rs.split.captions),
                            rs.split.image_ids, annotations)
    return {"run_dir": str(rs.run_dir), "label": rs.label, "split": rs.split_name,
            "selfalign": bool(rs.cfg.align.lca or rs.cfg.align.cra), **scores}


def score_mentions(img_free: torch.Tensor, img_mask: torch.Tensor, txt_free: torch.Tensor, txt_mask: torch.Tensor,
                   words: list[list[str]], captions: list[str], image_ids: list[str], annotations: dict) -> dict:
    """Correspondence accuracy from locals ``img_free [N, R, d]``, ``img_mask [N, R]``, ``txt_free [5N, L, d]``,
    ``txt_mask [5N, L]``, the model's tokens ``words`` (5N lists) and the scenes ``annotations`` by image id."""
    n_valid = img_mask.sum(1).tolist()
    correct = {k: 0 for k in SCORED_KINDS}
    total = {k: 0 for k in SCORED_KINDS}
    chance = 0.0
    skipped = {"unmapped_word": 0, "bad_object_index": 0, "caption_mismatch": 0, "image_not_annotated": 0,
               "objects_regions_mismatch": 0}
    for i, image_id in enumerate(image_ids):
        entry = annotations.get(image_id)
        if entry is None:
            skipped["image_not_annotated"] += 1
            continue
        if not isinstance(entry, dict):
            raise InputError(f"annotations.json: image '{image_id}': expected an object, got {type(entry).__name__}")
        n_obj = len(entry.get("objects", []))
        if n_obj != n_valid[i] - 1:
            skipped["objects_regions_mismatch"] += 1
            continue
        for k, cap in enumerate(entry.get("captions", [])[:5]):
            j = 5 * i + k
            if not isinstance(cap, dict) or tokenize(str(cap.get("text", ""))) != tokenize(captions[j]):
                skipped["caption_mismatch"] += 1
                continue
            mentions = _mentions(cap, image_id, k)
            for start, (word, kind, objects) in mentions.items():
                pos = mention_position(cap["text"], start, word, words[j])
                if pos is None or not bool(txt_mask[j, pos]):
                    skipped["unmapped_word"] += 1
                    continue
                if max(objects) >= n_obj:
                    skipped["bad_object_index"] += 1
                    continue
                cos = img_free[i, 1:n_obj + 1] @ txt_free[j, pos]  # regions 1..n are objects 0..n-1
                total[kind] += 1
                correct[kind] += int(int(cos.argmax()) in objects)
                chance += len(objects) / n_obj
    n = sum(total.values())
    return {
        "accuracy": _ratio(sum(correct.values()), n),
        **{f"accuracy_{k}": _ratio(correct[k], total[k]) for k in SCORED_KINDS},
        "chance": _ratio(chance, n),
        "scored": n, **{f"scored_{k}": total[k] for k in SCORED_KINDS}, "skipped": skipped,
        "note": "best region = argmax cosine over the image's valid regions, region 0 (whole image) excluded",
    }


def _ratio(num: float, den: int) -> float | None:
    return num / den if den else None  # None (JSON null), not NaN: no word of that kind was scored


ROWS = (("accuracy", "accuracy (colour + shape)"), ("accuracy_color", "accuracy, colour words"),
        ("accuracy_shape", "accuracy, shape words"), ("chance", "chance (random region)"),
        ("scored", "words scored"), ("skipped_total", "mentions skipped"))


def table_rows(results: list[dict]) -> list[list]:
    """Rows (metric, value per run) for a side-by-side table."""
    rows = []
    for key, name in ROWS:
        values = [sum(r["skipped"].values()) if key == "skipped_total" else r[key] for r in results]
        rows.append([name] + values)
    return rows


def format_table(results: list[dict]) -> str:
    header = ["metric"] + [r["label"] for r in results]
    rows = [[name] + [f"{v:.3f}" if isinstance(v, float) else "n/a" if v is None else str(v) for v in vals]
            for name, *vals in table_rows(results)]
    widths = [max(len(str(row[c])) for row in [header] + rows) for c in range(len(header))]
    return "\n".join("  ".join(str(cell).ljust(w) if c == 0 else str(cell).rjust(w)
                               for c, (cell, w) in enumerate(zip(row, widths))) for row in [header] + rows)


def accuracy_figure(results: list[dict], out_path: Path) -> Path:
    """Grouped bars: accuracy (all / colour / shape) per run, with each run's chance level dashed."""
    keys = [("accuracy", "colour + shape"), ("accuracy_color", "colour words"), ("accuracy_shape", "shape words")]
    fig, ax = new_figure(figsize=(2.2 + 2.2 * len(results), 4.2))
    width = 0.8 / len(keys)
    for g, (key, name) in enumerate(keys):
        xs = np.arange(len(results)) + (g - (len(keys) - 1) / 2) * width
        values = [r[key] or 0.0 for r in results]
        bars = ax.bar(xs, values, width, label=name, color=_COLOURS[g])
        ax.bar_label(bars, labels=[f"{v:.2f}" for v in values], fontsize=8)
    for x, r in enumerate(results):
        ax.hlines(r["chance"] or 0.0, x - 0.45, x + 0.45, colors="k", linestyles="dashed",
                  label="chance" if x == 0 else None)
    ax.set_xticks(range(len(results)), [textwrap.fill(r["label"], 22) for r in results], fontsize=9)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("fraction of words whose best region is their object")
    ax.set_title(f"Word–object correspondence accuracy ({results[0]['split']} split; region 0 excluded)", fontsize=10)
    ax.legend(fontsize=8, loc="upper left")
    return save_figure(fig, out_path)


def figure_name(rs: RunSplit, index: int, caption_k: int) -> str:
    return f"correspondences_{safe_name(rs.run_dir.name)}_{rs.split_name}_{safe_name(rs.split.image_ids[index])}" \
           f"_c{caption_k}.png"
