"""``selfalign index`` (build or extend a gallery) and ``selfalign search`` (query one from the shell)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from selfalign.errors import InputError

SKIPPED_SHOWN = 10


def _cmd_index(args) -> None:
    from selfalign.index.gallery_build import build_gallery

    if args.images is not None and args.dataset is not None:
        raise InputError("give either IMAGES (a folder) or --dataset/--root/--split, not both")
    report = build_gallery(
        args.run_dir, args.out, args.images, dataset=args.dataset, root=args.root, split=args.split, add=args.add,
        overwrite=args.overwrite, backend=args.backend, uri=args.uri, kind=args.kind, device=args.device,
        batch_size=args.batch_size, cache_dir=args.cache, progress=not args.quiet, querybank=args.querybank,
    )  # fmt: skip
    if report.skipped:
        print(f"skipped {len(report.skipped)} unreadable file(s):", file=sys.stderr)
        for path, reason in report.skipped[:SKIPPED_SHOWN]:
            print(f"  {path}: {reason}", file=sys.stderr)
        if len(report.skipped) > SKIPPED_SHOWN:
            print(f"  ... and {len(report.skipped) - SKIPPED_SHOWN} more", file=sys.stderr)
    already = f", {report.already_indexed} already indexed" if report.already_indexed else ""
    print(f"gallery {report.index_dir}: {report.added} image(s) added{already}, {report.total} in total, "
          f"{report.captions} caption(s), {len(report.skipped)} skipped ({report.seconds:.1f} s)")
    print(f"search it:  selfalign search {report.index_dir} \"a query\"    serve it:  selfalign serve "
          f"{report.index_dir}")


def _cmd_search(args) -> None:
    from selfalign.index.gallery import Gallery

    if (args.query is None) == (args.image is None):
        raise InputError("search needs a text QUERY or --image FILE (one of them)")
    gallery = Gallery.load(args.index_dir, device=_device(args.device))
    if args.query is not None:
        hits = gallery.search_text(args.query, args.k)
        target = "images"
    else:
        target = args.target
        hits = gallery.search_image(Path(args.image), args.k, target)
    if target == "images":
        for hit in hits:
            hit["path"] = str(gallery.image_path(hit["id"]))  # for the shell user only; the web API never shows paths
    if args.json:
        print(json.dumps({"query": args.query, "image": args.image, "target": target, "results": hits}, indent=2,
                         ensure_ascii=False))
        return
    if not hits:
        print("no results")
        return
    if target == "images":
        rows = [(str(i + 1), f"{h['score']:.4f}", str(h["id"]), h["image_id"], h["path"]) for i, h in enumerate(hits)]
        header = ("rank", "score", "id", "image", "path")
    else:
        rows = [(str(i + 1), f"{h['score']:.4f}", str(h["image"]), h["text"]) for i, h in enumerate(hits)]
        header = ("rank", "score", "image", "caption")
    widths = [max(len(header[c]), *(len(r[c]) for r in rows)) for c in range(len(header) - 1)]
    for row in [header, *rows]:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)) + "  " + row[-1])


def _device(name: str) -> str:
    from selfalign.train.trainer import resolve_device

    return str(resolve_device(name))


def register(subparsers) -> None:
    """Add the ``index`` and ``search`` sub-commands to the ``selfalign`` parser."""
    p = subparsers.add_parser("index", help="embed images with a trained run and build a searchable gallery",
                              description="Index a folder of images, or a prepared dataset split with its captions "
                                          "(--dataset scenes --root data/scenes --split test).")
    p.add_argument("run_dir", help="a trained run directory, or an ensemble folder (`selfalign ensemble`)")
    p.add_argument("images", nargs="?", help="a folder of images (omit with --dataset)")
    p.add_argument("--out", required=True, help="the gallery folder (INDEX_DIR)")
    p.add_argument("--add", action="store_true", help="add images to the existing gallery at --out")
    p.add_argument("--overwrite", action="store_true", help="replace the gallery at --out (refused without it)")
    p.add_argument("--dataset", choices=["scenes", "flickr", "karpathy", "folder"], help="index a dataset split")
    p.add_argument("--root", help="the dataset folder (with --dataset)")
    p.add_argument("--split", default="test", help="the dataset split (with --dataset; default test)")
    p.add_argument("--backend", default="faiss", choices=["faiss", "milvus"])
    p.add_argument("--uri", help="Milvus: a local ./gallery.db file (Milvus Lite) or http://host:19530")
    p.add_argument("--kind", default="auto", help="index structure: auto, flat, hnsw, ivfpq (faiss)")
    p.add_argument("--cache", help="extracted-feature cache (default: INDEX_DIR.cache beside the gallery)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--querybank", action=argparse.BooleanOptionalAction, default=None,
                   help="store the run's query-bank discount with every vector (`selfalign querybank RUN`); "
                        "default: when the run has a bank")
    p.add_argument("--device", default="auto")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=_cmd_index)

    p = subparsers.add_parser("search", help="query a gallery: text -> images, or --image -> images / captions")
    p.add_argument("index_dir", help="a gallery built by 'selfalign index'")
    p.add_argument("query", nargs="?", help="the text query")
    p.add_argument("--image", help="an image file as the query")
    p.add_argument("--target", default="images", choices=["images", "captions"],
                   help="with --image: find similar images, or captions (needs a gallery with captions)")
    p.add_argument("-k", type=int, default=10, help="number of results (default 10)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--device", default="auto")
    p.set_defaults(func=_cmd_search)
