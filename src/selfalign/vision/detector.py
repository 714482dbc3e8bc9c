"""Object boxes from YOLOX-Nano (COCO, ONNX) run with onnxruntime: "bottom-up-like" regions without Faster R-CNN.

The model file is the user's (config ``data.detector_path``); the project never ships it. Input: 1x3x416x416 BGR
0-255, the image resized to fit (aspect kept) in the top-left corner, padded with 114. Output 1x3549x85 per anchor
point of the 52x52, 26x26 and 13x13 grids (strides 8, 16, 32): box offsets (cx, cy, log w, log h) in grid units,
objectness and 80 class probabilities, both already passed through a sigmoid.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image

from selfalign.errors import ConfigError, InputError

INPUT_SIZE = 416
STRIDES = (8, 16, 32)
PAD_VALUE = 114

COCO_CLASSES = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone",
    "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors", "teddy bear",
    "hair drier", "toothbrush",
)  # fmt: skip


def _anchor_grid(size: int = INPUT_SIZE) -> tuple[np.ndarray, np.ndarray]:
    """Cell offsets ``[A, 2]`` (x, y) and strides ``[A, 1]`` for the A = 3549 output rows, in output order."""
    cells, strides = [], []
    for stride in STRIDES:
        n = size // stride
        ys, xs = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")  # row-major: x varies fastest
        cells.append(np.stack([xs.ravel(), ys.ravel()], axis=1))
        strides.append(np.full((n * n, 1), stride))
    return np.concatenate(cells).astype(np.float32), np.concatenate(strides).astype(np.float32)


def letterbox(image: Image.Image, size: int = INPUT_SIZE) -> tuple[np.ndarray, float]:
    """RGB PIL image -> (``[1, 3, size, size]`` float32 BGR 0-255 input, resize ratio from original to input)."""
    width, height = image.size
    ratio = min(size / width, size / height)
    new_w, new_h = max(1, int(width * ratio)), max(1, int(height * ratio))
    resized = np.asarray(image.convert("RGB").resize((new_w, new_h), Image.Resampling.BILINEAR), dtype=np.float32)
    canvas = np.full((size, size, 3), PAD_VALUE, dtype=np.float32)
    canvas[:new_h, :new_w] = resized[:, :, ::-1]  # RGB -> BGR
    return canvas.transpose(2, 0, 1)[None].copy(), ratio


def nms(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float) -> np.ndarray:
    """Greedy non-maximum suppression of ``[N, 4]`` x1,y1,x2,y2 boxes; indices kept, best score first."""
    order = np.argsort(-scores, kind="stable")
    areas = np.clip(boxes[:, 2] - boxes[:, 0], 0, None) * np.clip(boxes[:, 3] - boxes[:, 1], 0, None)
    keep = []
    while order.size:
        best, rest = order[0], order[1:]
        keep.append(best)
        ix1 = np.maximum(boxes[best, 0], boxes[rest, 0])
        iy1 = np.maximum(boxes[best, 1], boxes[rest, 1])
        ix2 = np.minimum(boxes[best, 2], boxes[rest, 2])
        iy2 = np.minimum(boxes[best, 3], boxes[rest, 3])
        inter = np.clip(ix2 - ix1, 0, None) * np.clip(iy2 - iy1, 0, None)
        iou = inter / np.maximum(areas[best] + areas[rest] - inter, 1e-9)
        order = rest[iou <= iou_threshold]
    return np.asarray(keep, dtype=np.int64)


def decode(
    output: np.ndarray, ratio: float, image_size: tuple[int, int], score_threshold: float, iou_threshold: float, top_k: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Raw ``[1, 3549, 85]`` output -> (boxes ``[k, 4]`` float32 original pixels, scores ``[k]``, classes ``[k]``)."""
    pred = output.reshape(-1, output.shape[-1]).astype(np.float32)
    cells, strides = _anchor_grid()
    if pred.shape[0] != cells.shape[0]:
        raise InputError(f"detector output has {pred.shape[0]} rows, expected {cells.shape[0]} for a 416x416 YOLOX")
    centre = (pred[:, :2] + cells) * strides
    size = np.exp(np.clip(pred[:, 2:4], -20, 20)) * strides
    class_prob = pred[:, 5:]
    classes = class_prob.argmax(axis=1)
    scores = pred[:, 4] * class_prob[np.arange(len(classes)), classes]
    chosen = scores >= score_threshold
    corners = np.concatenate([centre - size / 2, centre + size / 2], axis=1)[chosen] / ratio
    width, height = image_size
    corners = np.clip(corners, 0, [width, height, width, height]).astype(np.float32)
    scores, classes = scores[chosen], classes[chosen]
    visible = (corners[:, 2] - corners[:, 0] >= 1) & (corners[:, 3] - corners[:, 1] >= 1)
    corners, scores, classes = corners[visible], scores[visible], classes[visible]
    # class-agnostic: for region features, two labels on the same object are one region
    keep = nms(corners, scores, iou_threshold)[:top_k]
    return corners[keep], scores[keep].astype(np.float32), classes[keep].astype(np.int64)


class Detector:
    """YOLOX-Nano boxes for one image at a time (``detect``)."""

    def __init__(
        self,
        path: str | os.PathLike,
        score_threshold: float = 0.1,
        top_k: int = 20,
        threads: int = 0,
        iou_threshold: float = 0.45,
    ) -> None:
        self.path = Path(path)
        if not str(path) or not self.path.is_file():
            raise InputError(
                f"detector model file not found: '{path}' (config data.detector_path; "
                "download YOLOX-Nano ONNX, yolox_nano.onnx, from the YOLOX releases)"
            )
        try:
            import onnxruntime as ort
        except ImportError as exc:
            raise ConfigError(
                "regions=detector needs onnxruntime: pip install onnxruntime (or selfalign[real])"
            ) from exc
        options = ort.SessionOptions()
        if threads > 0:
            options.intra_op_num_threads = threads
        options.log_severity_level = 3  # errors only
        try:
            self.session = ort.InferenceSession(str(self.path), options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own exception types for unreadable models
            raise InputError(f"{self.path}: not a valid ONNX model ({exc})") from exc
        inputs = self.session.get_inputs()
        if len(inputs) != 1 or list(inputs[0].shape) != [1, 3, INPUT_SIZE, INPUT_SIZE]:
            raise InputError(f"{self.path}: expected one input of shape [1, 3, 416, 416] (YOLOX-Nano)")
        self.input_name = inputs[0].name
        self.score_threshold = score_threshold
        self.top_k = top_k
        self.iou_threshold = iou_threshold

    def describe(self) -> dict:
        """Settings that change the boxes (recorded with extracted features)."""
        return {
            "model": self.path.name,
            "score_threshold": self.score_threshold,
            "top_k": self.top_k,
            "iou_threshold": self.iou_threshold,
        }

    def detect(self, image: Image.Image) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """PIL image -> (boxes ``[k, 4]`` float32 x1,y1,x2,y2 original pixels, scores ``[k]``, COCO classes ``[k]``)."""
        blob, ratio = letterbox(image)
        (output,) = self.session.run(None, {self.input_name: blob})
        return decode(output, ratio, image.size, self.score_threshold, self.iou_threshold, self.top_k)
