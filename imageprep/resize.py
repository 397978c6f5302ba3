"""The resize rule: how any RGB image becomes the model's (H, W), as training evaluated and as the service serves.

Scale so the image covers (H, W) / crop_fraction (the shorter side, for a square target), resample, cut the
centre (H, W). An image already at (H, W) keeps its pixels.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image

RESAMPLING = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
}
DEFAULT_CROP_FRACTION = 0.875  # the common ImageNet evaluation crop (224 out of 256)
DEFAULT_INTERPOLATION = "bicubic"

# Beyond this many times the target's pixels, the resize-then-crop intermediate is skipped (memory bound).
MAX_INTERMEDIATE_FACTOR = 64


@dataclass(frozen=True)
class ResizeSpec:
    """The model's input size (H, W) and how to reach it from an image of any size."""

    height: int
    width: int
    crop_fraction: float = DEFAULT_CROP_FRACTION
    interpolation: str = DEFAULT_INTERPOLATION

    def __post_init__(self) -> None:
        if self.height < 1 or self.width < 1:
            raise ValueError(f"ResizeSpec size must be positive, got {self.height}x{self.width}")
        if not 0.0 < self.crop_fraction <= 1.0:
            raise ValueError(f"ResizeSpec crop_fraction must be in (0, 1], got {self.crop_fraction}")
        if self.interpolation not in RESAMPLING:
            raise ValueError(f"ResizeSpec interpolation must be one of {sorted(RESAMPLING)}, got {self.interpolation!r}")

    @property
    def size(self) -> tuple[int, int]:
        return self.height, self.width

    def needed(self) -> tuple[int, int]:
        """(width, height) an image must at least have so that the resize only shrinks it."""
        return math.ceil(self.width / self.crop_fraction), math.ceil(self.height / self.crop_fraction)


def resize_for_model(image: Image.Image, spec: ResizeSpec) -> np.ndarray:
    """RGB image -> C-contiguous uint8 (H, W, 3)."""
    if image.mode != "RGB":
        image = image.convert("RGB")
    height, width = spec.height, spec.width
    if image.size != (width, height):
        scale = max(height / spec.crop_fraction / image.height, width / spec.crop_fraction / image.width)
        new_w, new_h = max(width, round(image.width * scale)), max(height, round(image.height * scale))
        left, top = (new_w - width) // 2, (new_h - height) // 2
        if new_w * new_h <= MAX_INTERMEDIATE_FACTOR * width * height:
            image = image.resize((new_w, new_h), RESAMPLING[spec.interpolation]).crop((left, top, left + width, top + height))
        else:
            # An extreme aspect ratio (say 1x20000) would need a huge intermediate image: resample only the
            # source region that the crop keeps, straight to (W, H). Slightly different pixels from the
            # intermediate route, but bounded memory, and the same rule for training evaluation and serving.
            box = (left / scale, top / scale, (left + width) / scale, (top + height) / scale)
            image = image.resize((width, height), RESAMPLING[spec.interpolation], box=box)
    return np.ascontiguousarray(np.asarray(image, dtype=np.uint8))
