"""Untrusted image bytes -> a decoded PIL image, with size limits checked before decoding; gallery thumbnails."""

from __future__ import annotations

import io
import threading
import warnings
from collections import OrderedDict
from pathlib import Path

from PIL import Image, UnidentifiedImageError

MAX_UPLOAD_BYTES = 10 << 20
MAX_PIXELS = 40_000_000  # about 6300 x 6300; PIL's own bomb guard starts at ~89M pixels
THUMB_SIZE = 320


class BadImage(Exception):
    """An upload that is not a usable image; ``status`` is the HTTP status to answer with."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def decode_upload(data: bytes, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Bytes of an uploaded file -> a fully decoded PIL image (BadImage 415/413/400 otherwise)."""
    if not data:
        raise BadImage(400, "the uploaded file is empty")
    try:
        # a DecompressionBombWarning becomes an error here rather than a log line
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            width, height = image.size  # read from the header: nothing is decoded yet
            if width * height > max_pixels:
                raise BadImage(413, f"image too large: {width} x {height} pixels (at most {max_pixels} pixels)")
            image.load()
    except BadImage:
        raise
    except UnidentifiedImageError:
        raise BadImage(415, "the uploaded file is not an image in a supported format (JPEG, PNG, GIF, BMP, "
                            "WebP, TIFF)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise BadImage(413, f"image too large (at most {max_pixels} pixels)") from None
    except (OSError, SyntaxError, ValueError, EOFError):
        raise BadImage(400, "the image could not be decoded: it is truncated or corrupt") from None
    return image


class ThumbnailCache:
    """JPEG thumbnails of gallery images, made on first request and kept (least recently used dropped)."""

    def __init__(self, size: int = THUMB_SIZE, capacity: int = 2048) -> None:
        self.size = size
        self.capacity = capacity
        self._items: OrderedDict[int, bytes] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: int, path: Path) -> bytes:
        """Thumbnail bytes of image ``key`` stored at ``path`` (OSError if the file is gone or unreadable)."""
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
        from selfalign.vision.backbone import to_rgb

        with Image.open(path) as image:
            image.draft("RGB", (self.size, self.size))  # JPEG: decode at a reduced scale directly
            thumb = to_rgb(image)
            thumb.thumbnail((self.size, self.size), Image.Resampling.LANCZOS)
        buffer = io.BytesIO()
        thumb.save(buffer, "JPEG", quality=85)
        data = buffer.getvalue()
        with self._lock:
            self._items[key] = data
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)
        return data
