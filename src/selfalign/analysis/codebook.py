"""The LCA concept codebook: which words and regions each concept gathers, and how evenly the codes are used.

Every valid word and region of a split is assigned its concept ``argmax_k C_k . x`` (``LCA.assign``) on the
context-free locals. Usage is summarised per modality by the perplexity ``exp(H(p))`` of the usage distribution
``p`` (K for perfectly even use, 1 for a collapsed codebook) and the number of dead codes (used by nothing in this
split). Region 0 of every image (the whole image) is a valid region and is assigned like the others.

``target_entropy`` tells whether LCA has anything to teach: the mean entropy of the Sinkhorn codes the regions get
as training targets. At ``ln K`` (uniform codes) every word is asked to predict the same flat distribution, the
LCA loss sits at ``ln K`` and the words learn nothing about their regions.
"""

from __future__ import annotations

import math
import textwrap
from collections import Counter
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from selfalign.analysis.common import (
    RunSplit, caption_locals, crop, image_locals, load_rgb, new_figure, require_boxes, save_figure,
)  # fmt: skip
from selfalign.align.sinkhorn import sinkhorn
from selfalign.errors import InputError


def usage_stats(codes: np.ndarray, size: int) -> dict:
    """Usage of a codebook of ``size`` codes by the assignments ``codes [N]``: counts, perplexity, dead codes."""
    counts = np.bincount(np.asarray(codes, dtype=np.int64), minlength=size)[:size]
    total = int(counts.sum())
    p = counts[counts > 0] / max(total, 1)
    entropy = float(-(p * np.log(p)).sum()) if total else 0.0
    return {"assigned": total, "used": int((counts > 0).sum()), "dead": int((counts == 0).sum()),
            "perplexity": round(math.exp(entropy), 3), "counts": counts.tolist()}


def assign_split(rs: RunSplit) -> dict:
    """Concept of every valid word and region of the split, with its cosine to that concept's prototype.

    Returns ``word_codes [Nw]``, ``word_scores [Nw]``, ``words`` (strings), ``region_codes [Nr]``,
    ``region_scores [Nr]``, ``region_refs [Nr, 2]`` (image index, region index) and ``size`` (K).
    """
    align = rs.model.align
    if align is None or align.lca is None:
        raise InputError(f"{rs.run_dir}: this run has no LCA codebook (align.lca=false)")
    lca = align.lca
    protos = F.normalize(lca.codebook.detach().float().cpu(), dim=1)
    img_free, img_mask = image_locals(rs.model, rs.split)
    txt_free, txt_mask, words = caption_locals(rs.model, list(rs.split.captions))
    regions = img_free[img_mask]
    region_refs = img_mask.nonzero().numpy()
    flat_words = [w for ws, m in zip(words, txt_mask) for w, ok in zip(ws, m.tolist()) if ok]
    word_feats = txt_free[txt_mask]

    def codes_and_scores(feats: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        codes = lca.assign(feats.to(lca.codebook.device)).cpu()
        scores = (feats * protos[codes]).sum(1)
        return codes.numpy(), scores.numpy()

    word_codes, word_scores = codes_and_scores(word_feats)
    region_codes, region_scores = codes_and_scores(regions)
    targets = target_entropy(regions.float(), protos, lca.epsilon, lca.iterations)
    return {"size": int(protos.shape[0]), "word_codes": word_codes, "word_scores": word_scores, "words": flat_words,
            "region_codes": region_codes, "region_scores": region_scores, "region_refs": region_refs,
            "targets": targets}


def top_concepts(assigned: dict, top: int = 8, n_words: int = 6, n_crops: int = 6) -> list[dict]:
    """The ``top`` concepts with their commonest words and best-matching regions.

    Concepts used by both modalities come first, then by word share + region share (each modality's count over its
    total): words far outnumber regions, so raw counts would rank only word-heavy concepts.
    """
    size = assigned["size"]
    words = np.bincount(assigned["word_codes"], minlength=size)
    regions = np.bincount(assigned["region_codes"], minlength=size)
    share = words / max(1, words.sum()) + regions / max(1, regions.sum())
    both = (words > 0) & (regions > 0)
    out = []
    for concept in np.lexsort((-share, ~both))[:top]:
        if share[concept] == 0:
            break
        in_words = assigned["word_codes"] == concept
        counts = Counter(w for w, ok in zip(assigned["words"], in_words) if ok)
        in_regions = np.flatnonzero(assigned["region_codes"] == concept)
        best = in_regions[np.argsort(-assigned["region_scores"][in_regions], kind="stable")[:n_crops]]
        out.append({"concept": int(concept), "n_words": int(in_words.sum()), "n_regions": int(in_regions.size),
                    "words": counts.most_common(n_words),
                    "regions": [{"image": int(assigned["region_refs"][r][0]),
                                 "region": int(assigned["region_refs"][r][1]),
                                 "cosine": round(float(assigned["region_scores"][r]), 4)} for r in best]})
    return out


def usage_figure(word_usage: dict, region_usage: dict, size: int, title: str, out_path: Path) -> Path:
    """Rank-ordered usage of the K codes by words and by regions (log scale), with perplexity and dead codes."""
    fig, axes = new_figure(1, 2, figsize=(12, 4), sharey=False)
    for ax, usage, name, colour in ((axes[0], word_usage, "words", "#377eb8"),
                                    (axes[1], region_usage, "regions", "#e41a1c")):
        counts = np.sort(np.asarray(usage["counts"]))[::-1]
        ax.bar(np.arange(1, size + 1), np.maximum(counts, 0), width=1.0, color=colour)
        ax.set_yscale("symlog", linthresh=1)
        ax.set_xlim(0.5, size + 0.5)
        ax.set_xlabel("concept rank (most used first)")
        ax.set_ylabel(f"{name} assigned (count)")
        ax.set_title(f"{name}: {usage['assigned']} assigned, perplexity {usage['perplexity']:.1f} of K={size}, "
                     f"{usage['dead']} dead", fontsize=10)
    fig.suptitle(title, fontsize=11)
    return save_figure(fig, out_path)


def concepts_figure(rs: RunSplit, concepts: list[dict], n_crops: int, out_path: Path) -> Path:
    """One row per concept: its id, counts and commonest words, then crops of its best-matching regions."""
    boxes = require_boxes(rs)
    rows = max(1, len(concepts))
    fig, axes = new_figure(rows, n_crops + 1, figsize=(1.5 * (n_crops + 1) + 1.5, 1.6 * rows), squeeze=False,
                           gridspec_kw={"width_ratios": [2.2] + [1] * n_crops})
    images: dict[int, object] = {}
    for row, concept in enumerate(concepts):
        text_ax = axes[row][0]
        words = ", ".join(f"{w} ×{n}" for w, n in concept["words"]) or "(no word)"
        text_ax.text(0, 0.5, f"concept {concept['concept']}\n{concept['n_words']} words, {concept['n_regions']} "
                     f"regions\n" + textwrap.fill(words, 28), fontsize=8, va="center", ha="left")
        text_ax.set_axis_off()
        if not concept["regions"] and n_crops:
            axes[row][1].text(0, 0.5, "(no region of this split is assigned to this concept)", fontsize=8,
                              va="center", color="#666")
        for col in range(n_crops):
            ax = axes[row][col + 1]
            ax.set_axis_off()
            if col >= len(concept["regions"]):
                continue
            ref = concept["regions"][col]
            if ref["image"] not in images:
                images[ref["image"]] = load_rgb(rs.image_path(ref["image"]))
            ax.imshow(crop(images[ref["image"]], boxes[ref["image"], ref["region"]]))
            ax.set_title(f"r{ref['region']} cos {ref['cosine']:.2f}", fontsize=7)
    if not concepts:
        axes[0][0].text(0, 0.5, "no concept is used", fontsize=10)
    fig.suptitle(f"Top concepts of {rs.label} on the {rs.split_name} split: commonest words and best-matching "
                 f"region crops (r0 = whole image)", fontsize=10)
    return save_figure(fig, out_path)


def target_entropy(regions: torch.Tensor, protos: torch.Tensor, epsilon: float, iterations: int,
                   batch_rows: int = 1024) -> dict:
    """Sharpness of LCA's training targets for unit-norm ``regions [N, d]`` and prototypes ``protos [K, d]``.

    Sinkhorn codes are computed over consecutive blocks of ``batch_rows`` regions, as a training batch would; returns
    the mean code entropy (nats), ``uniform = ln K`` beside it, and the mean best prototype cosine of a region.
    """
    entropies = []
    for block in regions.split(batch_rows):
        codes = sinkhorn(block @ protos.t(), epsilon, iterations)
        entropies.append(-(codes * codes.clamp_min(1e-12).log()).sum(1))
    best = (regions @ protos.t()).max(dim=1).values
    return {"mean_entropy": round(float(torch.cat(entropies).mean()), 4), "uniform": round(math.log(protos.shape[0]), 4),
            "mean_best_cosine": round(float(best.mean()), 4)}


def analyse_codebook(rs: RunSplit, out_dir: Path, top: int = 8, n_words: int = 6, n_crops: int = 6) -> dict:
    """Assign, summarise and draw; returns the summary (also the JSON the CLI writes) with the figure paths."""
    from selfalign.analysis.common import safe_name

    assigned = assign_split(rs)
    size = assigned["size"]
    word_usage = usage_stats(assigned["word_codes"], size)
    region_usage = usage_stats(assigned["region_codes"], size)
    shared = int(((np.asarray(word_usage["counts"]) > 0) & (np.asarray(region_usage["counts"]) > 0)).sum())
    concepts = top_concepts(assigned, top, n_words, n_crops)
    for concept in concepts:
        for ref in concept["regions"]:
            ref["image_id"] = rs.split.image_ids[ref["image"]]
    stem = f"codebook_{safe_name(rs.run_dir.name)}_{rs.split_name}"
    usage_png = usage_figure(word_usage, region_usage, size, f"Codebook usage of {rs.label} on the {rs.split_name} "
                             f"split (dead = used by nothing in this split)", out_dir / f"{stem}_usage.png")
    concepts_png = concepts_figure(rs, concepts, n_crops, out_dir / f"{stem}_concepts.png")
    return {"run_dir": str(rs.run_dir), "label": rs.label, "split": rs.split_name, "codebook_size": size,
            "words": word_usage, "regions": region_usage, "codes_used_by_both": shared,
            "region_targets": assigned["targets"], "top_concepts": concepts,
            "figures": [str(usage_png), str(concepts_png)]}
