"""A searchable gallery: a trained run's embeddings of a set of images (and captions) in a vector index.

```
INDEX_DIR/gallery.json       manifest, written last: run_dir, model hash, backend, counts, region plan, sources
INDEX_DIR/images.jsonl       one line per image: {"id", "image_id", "path" (absolute), "boxes" (normalised)}
INDEX_DIR/regions.npy        [N, R, D] float16 region features, row i = line i of images.jsonl (for explain)
INDEX_DIR/vectors/           the image index (VectorIndex.save)
INDEX_DIR/captions.jsonl     optional: {"id", "image" (gallery image id), "text"}
INDEX_DIR/caption_vectors/   optional: the caption index
```
Gallery ids are opaque integers; the API exposes only those, never file paths. Build one with
:func:`selfalign.index.gallery_build.build_gallery`; open it with :meth:`Gallery.load`.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from selfalign.errors import InputError
from selfalign.index.base import read_json_manifest
from selfalign.index.gallery_regions import RegionExtractor, RegionPlan
from selfalign.model.checkpoint import model_hash

FORMAT, FORMAT_VERSION = "selfalign-gallery", 1
MANIFEST, IMAGES, CAPTIONS, REGIONS = "gallery.json", "images.jsonl", "captions.jsonl", "regions.npy"
IMAGE_VECTORS, CAPTION_VECTORS = "vectors", "caption_vectors"
MAX_K = 1000
MAX_QUERY_CHARS = 1000


def read_manifest(directory: str | os.PathLike) -> dict[str, Any]:
    """Read and validate ``INDEX_DIR/gallery.json``."""
    return read_json_manifest(directory, MANIFEST, FORMAT, FORMAT_VERSION,
                              (("run_dir", str), ("model_hash", str), ("backend", str), ("images", int),
                               ("captions", int), ("query_regions", dict)), "gallery",
                              "gallery folder")


def read_jsonl(path: Path, keys: tuple[str, ...]) -> list[dict[str, Any]]:
    """One JSON object per line, each with ``keys``; errors name the line."""
    if not path.is_file():
        raise InputError(f"{path}: missing")
    rows = []
    with open(path, encoding="utf-8") as fh:
        for number, line in enumerate(fh, start=1):
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise InputError(f"{path}, line {number}: not valid JSON ({exc.msg})") from None
            if not isinstance(row, dict) or any(k not in row for k in keys):
                raise InputError(f"{path}, line {number}: expected an object with fields {', '.join(keys)}")
            rows.append(row)
    return rows


def open_vectors(directory: Path) -> Any:
    from selfalign.index.base import open_index

    return open_index(directory)


class Gallery:
    """An opened gallery: the run's model, the image (and caption) index and the image records.

    Searches and explanations may run concurrently from many threads (inference only, under
    ``torch.inference_mode``); the region extractor for query images is built once, behind a lock.
    """

    def __init__(self, directory: Path, manifest: dict[str, Any], images: list[dict[str, Any]],
                 captions: list[dict[str, Any]], regions: np.ndarray, image_index: Any, caption_index: Any,
                 model: Any, device: torch.device) -> None:
        self.directory = directory
        self.manifest = manifest
        self.images = images
        self.captions = captions
        self.regions = regions
        self.image_index = image_index
        self.caption_index = caption_index
        self.model = model
        self.device = device
        self.plan = RegionPlan.from_dict(manifest["query_regions"], str(directory / MANIFEST))
        self._row = {int(rec["id"]): i for i, rec in enumerate(images)}
        self._caption_row = {int(rec["id"]): i for i, rec in enumerate(captions)}
        self._extractor: RegionExtractor | None = None
        self._lock = threading.Lock()
        # vectors that carry a query-bank discount as a last coordinate (gallery_build._discounted)
        self.querybank = manifest.get("querybank")
        self._discounted = {"images": bool(self.querybank) and self.querybank.get("beta_images") is not None,
                            "captions": bool(self.querybank) and self.querybank.get("beta_captions") is not None}

    @classmethod
    def load(cls, directory: str | os.PathLike, device: str | torch.device = "cpu", run_dir: str | None = None,
             load_extractor: bool = False) -> "Gallery":
        """Open ``INDEX_DIR``: its model (from the manifest's ``run_dir``, or ``run_dir``), indexes and records.

        The run's model must be the one the gallery was built with (same hash), else an InputError.
        ``load_extractor`` loads the image backbone now instead of at the first image query.
        """
        from selfalign.model.checkpoint import load_model

        directory = Path(directory).resolve()
        manifest = read_manifest(directory)
        where = directory / MANIFEST
        run = Path(run_dir or manifest["run_dir"])
        if not run.is_dir():
            raise InputError(f"{where}: the run folder {run} it was built from does not exist (pass run_dir=...)")
        if model_hash(run) != manifest["model_hash"]:
            raise InputError(f"{where}: the model in {run} is not the one this gallery was built with "
                             "(retrained or replaced?); rebuild the gallery with 'selfalign index'")
        model, _ = load_model(run, device)
        images = read_jsonl(directory / IMAGES, ("id", "image_id", "path", "boxes"))
        regions = np.load(directory / REGIONS, mmap_mode="r", allow_pickle=False)
        if len(images) != manifest["images"] or regions.shape[0] != len(images):
            raise InputError(f"{where}: counts disagree ({manifest['images']} in the manifest, {len(images)} in "
                             f"{IMAGES}, {regions.shape[0]} in {REGIONS})")
        captions: list[dict[str, Any]] = []
        caption_index = None
        if manifest["captions"]:
            captions = read_jsonl(directory / CAPTIONS, ("id", "image", "text"))
            known = {int(r["id"]) for r in images}
            stray = next((c for c in captions if int(c["image"]) not in known), None)
            if stray is not None:
                raise InputError(f"{directory / CAPTIONS}: caption {stray['id']} names image {stray['image']}, "
                                 f"which is not in {IMAGES}")
            caption_index = open_vectors(directory / CAPTION_VECTORS)
        gallery = cls(directory, manifest, images, captions, regions, open_vectors(directory / IMAGE_VECTORS),
                      caption_index, model, torch.device(device))
        if load_extractor:
            gallery.extractor()
        return gallery

    # ------------------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.images)

    @property
    def has_captions(self) -> bool:
        return self.caption_index is not None

    def record(self, image: int) -> dict[str, Any]:
        """The stored record of gallery image id ``image`` (InputError if unknown)."""
        row = self._row.get(int(image)) if isinstance(image, (int, np.integer)) else None
        if row is None:
            raise InputError(f"unknown image id {image!r}")
        return self.images[row]

    def image_path(self, image: int) -> Path:
        return Path(self.record(image)["path"])

    def extractor(self) -> RegionExtractor:
        with self._lock:
            if self._extractor is None:
                self._extractor = RegionExtractor(self.plan, self.device)
            return self._extractor

    # ------------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def encode_text(self, queries: list[str]) -> np.ndarray:
        """Query strings -> ``[Q, E]`` float32."""
        tokens = self.model.tokenize(queries).to(self.device)
        return self.model.encode_text(tokens).embedding.float().cpu().numpy()

    @torch.inference_mode()
    def encode_regions(self, feats: np.ndarray, n_regions: np.ndarray) -> np.ndarray:
        """Region features ``[B, R, D]`` + valid counts ``[B]`` -> image embeddings ``[B, E]`` float32."""
        from selfalign.data.batches import RegionStore
        from selfalign.evaluate.runner import encode_images

        return encode_images(self.model, RegionStore.from_counts(np.asarray(feats), n_regions)).numpy()

    def encode_image(self, image: str | os.PathLike | Image.Image) -> np.ndarray:
        """One image (path or PIL) -> ``[1, E]``, its regions made by the gallery's region plan (and averaged with
        its mirrored copy's embedding when the plan says so, as the gallery's images were)."""
        from selfalign.evaluate.runner import average_views
        from selfalign.vision.backbone import to_rgb
        from selfalign.vision.extract import load_image

        pil = to_rgb(image) if isinstance(image, Image.Image) else load_image(image)
        feats, n_regions, _ = self.extractor().extract([pil])
        vector = self.encode_regions(feats, n_regions)
        if self.plan.mirror:
            feats, n_regions, _ = self.extractor().extract([pil], mirrored=True)
            vector = average_views(torch.from_numpy(vector), torch.from_numpy(self.encode_regions(feats, n_regions)),
                                   self.model.embedding_parts)
            vector = vector.numpy()
        return vector

    # ------------------------------------------------------------------------------------------------
    def _query(self, vectors: np.ndarray, target: str, cross_modal: bool) -> np.ndarray:
        """Query embeddings ``[Q, E]`` as the ``target`` index ("images" / "captions") expects them: where its
        vectors carry a query-bank discount, ``[Q, E + 1]`` with a last coordinate of 1 to apply it (text <-> image)
        or 0 to score plainly (image -> image)."""
        if not self._discounted[target]:
            return vectors
        column = np.full((len(vectors), 1), 1.0 if cross_modal else 0.0, dtype=np.float32)
        return np.concatenate([vectors, column], axis=1)

    def search_text(self, query: str, k: int = 10) -> list[dict[str, Any]]:
        """Text -> the ``k`` best images: ``[{"id", "image_id", "score"}]``, best first (scores query-bank
        normalised when the gallery was built with a bank)."""
        query = _check_query(query)
        return self._image_hits(self.image_index.search(self._query(self.encode_text([query]), "images", True),
                                                        _check_k(k)))

    def search_image(self, image: str | os.PathLike | Image.Image, k: int = 10,
                     target: str = "images") -> list[dict[str, Any]]:
        """Image -> the ``k`` best images (``target="images"``) or captions (``"captions"``, ``{"id", "text",
        "image", "image_id", "score"}``)."""
        k = _check_k(k)
        if target not in ("images", "captions"):
            raise InputError(f"target must be 'images' or 'captions', got {target!r}")
        if target == "captions" and not self.has_captions:
            raise InputError("this gallery has no captions (it was built from a plain image folder): image -> text "
                             "search needs a gallery built from a captioned dataset split (--dataset/--root/--split)")
        vector = self.encode_image(image)
        if target == "images":
            return self._image_hits(self.image_index.search(self._query(vector, "images", False), k))
        scores, ids = self.caption_index.search(self._query(vector, "captions", True), k)
        hits = []
        for score, cid in zip(scores[0].tolist(), ids[0].tolist()):
            row = self._caption_row.get(cid)
            if row is None:
                continue
            cap = self.captions[row]
            image = int(cap["image"])
            hits.append({"id": cid, "text": cap["text"], "image": image,
                         "image_id": self.images[self._row[image]]["image_id"], "score": round(score, 6)})
        return hits

    def _image_hits(self, found: tuple[np.ndarray, np.ndarray]) -> list[dict[str, Any]]:
        scores, ids = found
        hits = []
        for score, gid in zip(scores[0].tolist(), ids[0].tolist()):
            row = self._row.get(gid)  # ids the records do not know (an interrupted --add) are not shown
            if row is not None:
                hits.append({"id": gid, "image_id": self.images[row]["image_id"], "score": round(score, 6)})
        return hits

    # ------------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def explain(self, query: str, image: int) -> dict[str, Any]:
        """For each word of ``query``, the region of gallery image ``image`` it aligns with best.

        Cosine of the text's context-free word locals (``Encoded.free [1, L, d]``) with the image's region locals
        (``Encoded.free [1, R, d]``). The whole-image region (0) is left out when the image has other regions.
        Returns ``{"id", "image_id", "query", "score", "words": [{"word", "known", "box", "region", "score"}]}``,
        boxes as normalised ``[x1, y1, x2, y2]``.
        """
        query = _check_query(query)
        record = self.record(image)
        row = self._row[int(record["id"])]
        n = len(record["boxes"])
        feats = np.asarray(self.regions[row : row + 1, :n], dtype=np.float32)
        regions = torch.from_numpy(feats).to(self.device)
        img = self.model.encode_image(regions, torch.ones(1, n, dtype=torch.bool, device=self.device))
        boxes = self.model.region_boxes(np.asarray(record["boxes"], dtype=np.float32))
        n = len(boxes)
        tokens = self.model.tokenize([query]).to(self.device)
        txt = self.model.encode_text(tokens)
        sims = (txt.free[0].float() @ img.free[0].float().T).cpu().numpy()  # [L, R]
        first = 1 if n > 1 else 0
        vocab = getattr(self.model, "vocab", None)
        words = []
        valid = txt.mask[0].cpu().numpy()
        for j, word in enumerate(tokens.words[0]):
            if j >= len(valid) or not valid[j] or (word.startswith("[") and word.endswith("]")):
                continue  # transformer specials ([CLS], [SEP]) are no words of the query
            r = first + int(np.argmax(sims[j, first:n]))
            words.append({"word": word, "known": vocab is None or word in vocab.stoi,
                          "box": [round(float(v), 4) for v in boxes[r]], "region": r,
                          "score": round(float(sims[j, r]), 4)})
        score = float((txt.embedding.float() @ img.embedding.float().T).item())
        return {"id": int(record["id"]), "image_id": record["image_id"], "query": query, "score": round(score, 6),
                "words": words}


def _check_query(query: Any) -> str:
    if not isinstance(query, str) or not query.strip():
        raise InputError("the query is empty")
    if len(query) > MAX_QUERY_CHARS:
        raise InputError(f"the query is {len(query)} characters long (at most {MAX_QUERY_CHARS})")
    return query.strip()


def _check_k(k: Any) -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= MAX_K:
        raise InputError(f"k must be an integer from 1 to {MAX_K}, got {k!r}")
    return int(k)


__all__ = ["Gallery", "model_hash", "read_manifest"]
