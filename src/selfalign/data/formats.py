"""Loaders for the captioned-image formats users bring; each returns a validated ``CaptionedSplit``.

* ``load_flickr``: a Flickr8k / Flickr30K folder (token file + official split lists)
* ``load_karpathy``: Karpathy's ``dataset_{flickr8k,flickr30k,coco}.json``
* ``load_caption_table``: an image folder plus a CSV (``image,caption``) or JSONL table
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

from selfalign.data.captions import (
    CAPTIONS_PER_IMAGE,
    CaptionedSplit,
    load_token_dataset,
    read_json,
    read_lines,
    read_split_file,
)
from selfalign.data.scenes import load_scenes
from selfalign.errors import ConfigError, InputError

_TOKEN_FILES = ("Flickr8k.token.txt", "results_20130124.token", "Flickr30k.token.txt")
_IMAGE_DIRS = ("images", "Flicker8k_Dataset", "Flickr8k_Dataset", "flickr30k-images", "flickr30k_images")
_SPLIT_ALIASES = {"val": "dev", "validation": "dev"}


def _split_name(split: str) -> str:
    return _SPLIT_ALIASES.get(split, split)


def load_flickr(root: Path, split: str) -> CaptionedSplit:
    """``root/images/`` + ``root/text/<token file>`` + ``root/text/Flickr_8k.{split}Images.txt``.

    The token file is ``Flickr8k.token.txt`` (Flickr8k) or ``results_20130124.token`` (Flickr30K), found in ``text/``
    or in ``root``. Split lists are ``Flickr_8k.{split}Images.txt``, ``Flickr_30k.{split}Images.txt`` or
    ``{split}.txt``; Flickr30K has no official lists, so pass Karpathy's JSON to ``load_karpathy`` instead.
    """
    root = Path(root)
    split = _split_name(split)
    if not root.is_dir():
        raise InputError(f"Flickr dataset folder not found: {root}")
    text_dirs = [root / "text", root]
    token = next((d / n for d in text_dirs for n in _TOKEN_FILES if (d / n).is_file()), None)
    if token is None:
        raise InputError(f"{root}: no caption token file (looked for {', '.join(_TOKEN_FILES)} in text/ and the root)")
    names = (f"Flickr_8k.{split}Images.txt", f"Flickr_30k.{split}Images.txt", f"{split}.txt")
    split_file = next((d / n for d in text_dirs + [root / "splits"] for n in names if (d / n).is_file()), None)
    if split_file is None:
        raise InputError(f"{root}: no list of the '{split}' split (looked for {', '.join(names)} in text/, the root "
                         f"and splits/); for Flickr30K use the karpathy format")
    image_dir = next((root / n for n in _IMAGE_DIRS if (root / n).is_dir()), None)
    if image_dir is None:
        raise InputError(f"{root}: no image folder (looked for {', '.join(_IMAGE_DIRS)})")
    return load_token_dataset(token, split_file, image_dir, name=split)


def load_karpathy(json_path: Path, image_dir: Path, split: str) -> CaptionedSplit:
    """Karpathy's split file: ``images[i]`` with ``split`` (train/val/test/restval), ``filename``, optional
    ``filepath`` (COCO) and ``sentences[j].raw``. ``dev`` reads ``val``; ``train`` includes ``restval``.

    Images with more than 5 sentences keep the first 5 (``stats['sentences_dropped']`` counts the rest).
    """
    json_path, image_dir = Path(json_path), Path(image_dir)
    split = _split_name(split)
    wanted = {"train": {"train", "restval"}, "dev": {"val"}, "test": {"test"}}.get(split)
    if wanted is None:
        raise InputError(f"karpathy: unknown split '{split}' (expected train, dev or test)")
    data = read_json(json_path, "Karpathy split file")
    images = data.get("images") if isinstance(data, dict) else None
    if not isinstance(images, list):
        raise InputError(f"{json_path}: expected a JSON object with an 'images' list")
    ids, paths, captions = [], [], []
    dropped = 0
    for i, entry in enumerate(images):
        where = f"{json_path}: images[{i}]"
        if not isinstance(entry, dict) or "split" not in entry or "filename" not in entry:
            raise InputError(f"{where}: needs 'split', 'filename' and 'sentences'")
        if entry["split"] not in wanted:
            continue
        sentences = entry.get("sentences")
        if not isinstance(sentences, list):
            raise InputError(f"{where} ('{entry['filename']}'): 'sentences' must be a list")
        raws = []
        for j, s in enumerate(sentences):
            raw = s.get("raw") if isinstance(s, dict) else None
            if not isinstance(raw, str) or not raw.strip():
                raise InputError(f"{where}.sentences[{j}] ('{entry['filename']}'): missing or empty 'raw'")
            raws.append(raw.strip())
        if len(raws) < CAPTIONS_PER_IMAGE:
            raise InputError(f"{where} ('{entry['filename']}'): {len(raws)} sentences, "
                             f"at least {CAPTIONS_PER_IMAGE} needed")
        dropped += len(raws) - CAPTIONS_PER_IMAGE
        sub = entry.get("filepath") or ""
        path = image_dir / sub / entry["filename"]
        if not path.is_file():
            raise InputError(f"{where}: image '{entry['filename']}' not found at {path}")
        ids.append(entry["filename"])
        paths.append(path)
        captions.append(raws[:CAPTIONS_PER_IMAGE])
    if not ids:
        raise InputError(f"{json_path}: no image has split {' or '.join(sorted(wanted))}")
    return CaptionedSplit(split, ids, paths, captions, stats={"sentences_dropped": dropped}).validate()


def _table_rows(table_path: Path) -> list[tuple[int, str, list[str]]]:
    """(line, image, captions) rows of a CSV (header with image and caption columns) or JSONL table."""
    rows: list[tuple[int, str, list[str]]] = []
    if table_path.suffix.lower() in (".jsonl", ".ndjson"):
        for lineno, line in enumerate(read_lines(table_path), start=1):
            if not line.strip():
                continue
            try:
                obj: Any = json.loads(line)
            except json.JSONDecodeError as e:
                raise InputError(f"{table_path}:{lineno}: invalid JSON ({e.msg})") from None
            if not isinstance(obj, dict) or not isinstance(obj.get("image"), str):
                raise InputError(f"{table_path}:{lineno}: expected an object with an 'image' string")
            caps = obj.get("captions", [obj["caption"]] if "caption" in obj else None)
            if not isinstance(caps, list) or not caps or not all(isinstance(c, str) for c in caps):
                raise InputError(f"{table_path}:{lineno}: needs 'caption' (a string) or 'captions' (a list of strings)")
            rows.append((lineno, obj["image"], caps))
        return rows
    if table_path.suffix.lower() != ".csv":
        raise InputError(f"{table_path}: unknown table format (use .csv with columns image,caption or .jsonl)")
    reader = csv.reader(io.StringIO("\n".join(read_lines(table_path))))
    header = next(reader, None)
    if header is None or "image" not in header or "caption" not in header:
        raise InputError(f"{table_path}:1: the header must name the columns 'image' and 'caption', found {header}")
    ci, cc = header.index("image"), header.index("caption")
    try:
        for rec in reader:
            lineno = reader.line_num
            if not any(x.strip() for x in rec):
                continue
            if len(rec) <= max(ci, cc):
                raise InputError(f"{table_path}:{lineno}: {len(rec)} columns, expected {len(header)}")
            rows.append((lineno, rec[ci], [rec[cc]]))
    except csv.Error as e:
        raise InputError(f"{table_path}:{reader.line_num}: malformed CSV ({e})") from None
    return rows


def load_caption_table(images_dir: Path, table_path: Path, split_file: Path | None = None,
                       name: str | None = None) -> CaptionedSplit:
    """Custom data: images in ``images_dir`` and a CSV/JSONL table of captions (one row per caption, or a JSONL
    ``captions`` list). Images keep their first 5 captions (``stats['captions_dropped']`` counts the rest); fewer
    is an error. With ``split_file`` only the listed images are loaded, in its order; otherwise all, in table order.
    """
    images_dir, table_path = Path(images_dir), Path(table_path)
    by_image: dict[str, list[str]] = {}
    first_line: dict[str, int] = {}
    for lineno, image, caps in _table_rows(table_path):
        image = image.strip()
        if not image:
            raise InputError(f"{table_path}:{lineno}: empty image name")
        for cap in caps:
            if not cap.strip():
                raise InputError(f"{table_path}:{lineno}: empty caption for image '{image}'")
            by_image.setdefault(image, []).append(cap.strip())
        first_line.setdefault(image, lineno)
    if split_file is not None:
        ids = read_split_file(Path(split_file))
        missing = [i for i in ids if i not in by_image]
        if missing:
            raise InputError(f"{split_file}: image '{missing[0]}' has no captions in {table_path}"
                             + (f" ({len(missing) - 1} more)" if len(missing) > 1 else ""))
    else:
        ids = list(by_image)
        if not ids:
            raise InputError(f"{table_path}: the table has no captions")
    dropped = 0
    captions = []
    for image in ids:
        caps = by_image[image]
        if len(caps) < CAPTIONS_PER_IMAGE:
            raise InputError(f"{table_path}:{first_line[image]}: image '{image}' has {len(caps)} captions, "
                             f"at least {CAPTIONS_PER_IMAGE} needed")
        dropped += len(caps) - CAPTIONS_PER_IMAGE
        captions.append(caps[:CAPTIONS_PER_IMAGE])
    paths = [images_dir / i for i in ids]
    for image, path in zip(ids, paths):
        if not path.is_file():
            raise InputError(f"{table_path}:{first_line[image]}: image '{image}' not found at {path}")
    split_name = name or (Path(split_file).stem if split_file is not None else table_path.stem)
    return CaptionedSplit(split_name, ids, paths, captions, stats={"captions_dropped": dropped}).validate()


def load_dataset(kind: str, root: Path, split: str, **opts: Any) -> CaptionedSplit:
    """Load ``split`` of a dataset of the given kind.

    * ``scenes``: ``root`` is a generated scenes dataset
    * ``flickr``: ``root`` is a Flickr8k-style folder
    * ``karpathy``: ``root`` is the image folder; ``opts['json_path']`` (or ``karpathy_json``) the split file
    * ``folder``: ``root/images/`` + ``root/captions.{csv,jsonl}`` (or ``opts['table']``) and optional
      ``root/splits/{split}.txt``; split ``all`` loads the whole table
    """
    root = Path(root)
    if kind == "scenes":
        return load_scenes(root, split)
    if kind == "flickr":
        return load_flickr(root, split)
    if kind == "karpathy":
        json_path = opts.get("json_path") or opts.get("karpathy_json")
        if not json_path:
            raise ConfigError("data.karpathy_json: the Karpathy split file is required for dataset=karpathy")
        return load_karpathy(Path(json_path), root, split)
    if kind == "folder":
        table = opts.get("table")
        if table is None:
            table = next((root / n for n in ("captions.csv", "captions.jsonl") if (root / n).is_file()), None)
            if table is None:
                raise InputError(f"{root}: no captions.csv or captions.jsonl (or pass table=...)")
        images_dir = Path(opts.get("images_dir") or root / "images")
        split_file = root / "splits" / f"{_split_name(split)}.txt"
        if split == "all":
            return load_caption_table(images_dir, Path(table), None, name="all")
        if not split_file.is_file():
            raise InputError(f"{root}: no split list {split_file} (use split 'all' to load the whole table)")
        return load_caption_table(images_dir, Path(table), split_file, name=_split_name(split))
    raise ConfigError(f"data.dataset: unknown dataset kind '{kind}' (expected scenes, flickr, karpathy or folder)")
