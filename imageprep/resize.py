"""The resize rule: how any RGB image becomes the model's (H, W), as training evaluated and as the service serves.

Scale so the image covers (H, W) / crop_fraction (the shorter side, for a square target) and keep the centre
(H, W): the geometry of resize-then-crop. Only the source region that the crop keeps is resampled, straight to
(H, W): a 320x240 photo for a 224 model resamples 224x224 pixels instead of 341x256 (0.49 ms instead of 0.83 on
one core), and an extreme aspect ratio (say 1x20000) needs no huge intermediate image. On real photos the pixels
are resize-then-crop's but for at most 0.5% of them, by one or two levels (the rounding of its 8-bit
intermediate). An image already at (H, W) keeps its pixels.
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
    if image.size != (spec.width, spec.height):
        box = source_box(image.width, image.height, spec)
        image = image.resize((spec.width, spec.height), RESAMPLING[spec.interpolation], box=box)
    return np.ascontiguousarray(np.asarray(image, dtype=np.uint8))


def source_box(width: int, height: int, spec: ResizeSpec) -> tuple[float, float, float, float]:
    """(left, top, right, bottom): the region of a width x height image that the model sees, in its own pixels."""
    if (width, height) == (spec.width, spec.height):
        return 0.0, 0.0, float(width), float(height)
    (scaled_w, scaled_h), (left, top) = _cover_and_crop(width, height, spec)
    # per axis, the scale of the whole-pixel image that resize-then-crop would make
    across, down = width / scaled_w, height / scaled_h
    return left * across, top * down, (left + spec.width) * across, (top + spec.height) * down


def _cover_and_crop(width: int, height: int, spec: ResizeSpec) -> tuple[tuple[int, int], tuple[int, int]]:
    """The size (whole pixels) at which the image covers (H, W) / crop_fraction, and the crop's top-left corner there."""
    scale = max(spec.height / spec.crop_fraction / height, spec.width / spec.crop_fraction / width)
    scaled_w, scaled_h = max(spec.width, round(width * scale)), max(spec.height, round(height * scale))
    return (scaled_w, scaled_h), ((scaled_w - spec.width) // 2, (scaled_h - spec.height) // 2)
