"""Captioned image splits (images + exactly 5 captions each + optional boxes) and the Flickr token-file reader.

The token format is Flickr8k's: one line per caption, ``IMAGE#k<TAB>caption`` with k = 0..4.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from selfalign.errors import InputError

CAPTIONS_PER_IMAGE = 5


@dataclass
class CaptionedSplit:
    """A split of captioned images: ``captions[i]`` (5 strings) and ``boxes[i]`` (``[n_i, 4]`` float32 pixel
    x1, y1, x2, y2) belong to ``image_ids[i]`` / ``image_paths[i]``.

    ``stats`` counts what a loader skipped on purpose (e.g. caption lines of images outside the split).
    """

    name: str
    image_ids: list[str]
    image_paths: list[Path]
    captions: list[list[str]]
    boxes: list[np.ndarray] | None = None
    stats: dict[str, int] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.image_ids)

    def flat_captions(self) -> list[str]:
        """All 5N captions in order: caption j belongs to image j // 5."""
        return [c for caps in self.captions for c in caps]

    def validate(self) -> "CaptionedSplit":
        """Check the contract (5 non-empty captions per image, unique ids, files exist); return self."""
        n = len(self.image_ids)
        if len(self.image_paths) != n or len(self.captions) != n:
            raise InputError(
                f"split '{self.name}': {n} image ids but {len(self.image_paths)} paths and "
                f"{len(self.captions)} caption lists"
            )
        seen: dict[str, int] = {}
        for i, image_id in enumerate(self.image_ids):
            if image_id in seen:
                raise InputError(
                    f"split '{self.name}': image id '{image_id}' appears twice (entries {seen[image_id]} and {i})"
                )
            seen[image_id] = i
        for image_id, caps in zip(self.image_ids, self.captions):
            if len(caps) != CAPTIONS_PER_IMAGE:
                raise InputError(
                    f"split '{self.name}': image '{image_id}' has {len(caps)} captions, "
                    f"expected {CAPTIONS_PER_IMAGE}"
                )
            for k, cap in enumerate(caps):
                if not isinstance(cap, str) or not cap.strip():
                    raise InputError(f"split '{self.name}': caption {k} of image '{image_id}' is empty")
        for image_id, path in zip(self.image_ids, self.image_paths):
            if not Path(path).is_file():
                raise InputError(f"split '{self.name}': image file for '{image_id}' not found: {path}")
        if self.boxes is not None:
            if len(self.boxes) != n:
                raise InputError(f"split '{self.name}': {n} images but {len(self.boxes)} box arrays")
            for image_id, b in zip(self.image_ids, self.boxes):
                if b.ndim != 2 or b.shape[1] != 4:
                    raise InputError(
                        f"split '{self.name}': boxes of '{image_id}' have shape {tuple(b.shape)}, expected [n, 4]"
                    )
        return self


def read_lines(path: Path) -> list[str]:
    """The lines of a UTF-8 text file (BOM and CR tolerated); a clear error if unreadable."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise InputError(f"{path}: not valid UTF-8 text (byte {e.start})") from None
    # split on '\n' only: str.splitlines would also cut a caption at U+2028, U+0085, form feeds and the like
    lines = [line.rstrip("\r") for line in text.split("\n")]
    if lines and lines[-1] == "":
        lines.pop()
    return lines


def read_json(path: Path, what: str = "file") -> object:
    """A UTF-8 JSON file's value; errors name the file and, for bad JSON, the line. ``what`` names it when missing."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{what} not found: {path}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise InputError(f"{path}: not valid UTF-8 text (byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise InputError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None


def read_split_file(path: Path) -> list[str]:
    """Image ids of a split file, one per line (blank lines ignored); duplicates are an error naming the line."""
    ids: list[str] = []
    first_line: dict[str, int] = {}
    for lineno, line in enumerate(read_lines(path), start=1):
        image_id = line.strip()
        if not image_id:
            continue
        if image_id in first_line:
            raise InputError(
                f"{path}:{lineno}: image id '{image_id}' is listed twice (first on line {first_line[image_id]})"
            )
        first_line[image_id] = lineno
        ids.append(image_id)
    if not ids:
        raise InputError(f"{path}: the split file lists no image ids")
    return ids


def _parse_token_line(path: Path, lineno: int, line: str) -> tuple[str, int, str]:
    key, sep, caption = line.partition("\t")
    if not sep:
        raise InputError(f"{path}:{lineno}: expected 'IMAGE#k<TAB>caption', found no tab")
    image_id, hash_sep, k_text = key.strip().rpartition("#")
    if not hash_sep or not image_id:
        raise InputError(f"{path}:{lineno}: expected 'IMAGE#k' before the tab, found '{key.strip()}'")
    if not k_text.isdigit():
        raise InputError(f"{path}:{lineno}: caption index after '#' must be a number, found '{k_text}'")
    return image_id, int(k_text), caption.strip()


def load_boxes(boxes_file: Path, image_ids: list[str]) -> list[np.ndarray]:
    """Per-image ``[n_i, 4]`` float32 boxes from a ``{image_id: [[x1, y1, x2, y2], ...]}`` JSON file."""
    boxes_file = Path(boxes_file)
    table = read_json(boxes_file, "boxes file")
    if not isinstance(table, dict):
        raise InputError(f"{boxes_file}: expected a JSON object {{image_id: [[x1, y1, x2, y2], ...]}}")
    out = []
    for image_id in image_ids:
        if image_id not in table:
            raise InputError(f"{boxes_file}: no boxes for image '{image_id}'")
        try:
            arr = np.asarray(table[image_id], dtype=np.float32).reshape(-1, 4)
        except (TypeError, ValueError):
            raise InputError(f"{boxes_file}: boxes of '{image_id}' are not a list of [x1, y1, x2, y2]") from None
        out.append(arr)
    return out


def load_token_dataset(
    captions_file: Path,
    split_file: Path,
    image_dir: Path,
    boxes_file: Path | None = None,
    name: str | None = None,
) -> CaptionedSplit:
    """Load the images of ``split_file`` with their 5 captions from a Flickr-style token file.

    Caption lines of images outside the split are ignored and counted in ``stats['lines_outside_split']``.
    """
    captions_file, split_file, image_dir = Path(captions_file), Path(split_file), Path(image_dir)
    ids = read_split_file(split_file)
    wanted = set(ids)
    by_image: dict[str, dict[int, tuple[str, int]]] = {}
    outside = 0
    for lineno, line in enumerate(read_lines(captions_file), start=1):
        if not line.strip():
            continue
        image_id, k, caption = _parse_token_line(captions_file, lineno, line)
        if image_id not in wanted:
            outside += 1
            continue
        if not caption:
            raise InputError(f"{captions_file}:{lineno}: empty caption for image '{image_id}'")
        caps = by_image.setdefault(image_id, {})
        if k in caps:
            raise InputError(
                f"{captions_file}:{lineno}: caption #{k} of image '{image_id}' appears twice "
                f"(first on line {caps[k][1]})"
            )
        caps[k] = (caption, lineno)

    captions: list[list[str]] = []
    for image_id in ids:
        caps = by_image.get(image_id)
        if not caps:
            raise InputError(f"{split_file}: image '{image_id}' has no captions in {captions_file}")
        if sorted(caps) != list(range(CAPTIONS_PER_IMAGE)):
            first = min(line for _, line in caps.values())
            raise InputError(
                f"{captions_file}:{first}: image '{image_id}' has {len(caps)} captions "
                f"(indices {sorted(caps)}), expected #0..#{CAPTIONS_PER_IMAGE - 1}"
            )
        captions.append([caps[k][0] for k in range(CAPTIONS_PER_IMAGE)])

    paths = [image_dir / image_id for image_id in ids]
    for image_id, path in zip(ids, paths):
        if not path.is_file():
            raise InputError(f"{split_file}: image '{image_id}' not found at {path}")
    boxes = load_boxes(boxes_file, ids) if boxes_file is not None else None
    split = CaptionedSplit(
        name=name or split_file.stem,
        image_ids=ids,
        image_paths=paths,
        captions=captions,
        boxes=boxes,
        stats={"lines_outside_split": outside},
    )
    return split.validate()
