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
        _, (new_w, new_h), (left, top) = _cover_and_crop(image.width, image.height, spec)
        if new_w * new_h <= MAX_INTERMEDIATE_FACTOR * width * height:
            image = image.resize((new_w, new_h), RESAMPLING[spec.interpolation]).crop((left, top, left + width, top + height))
        else:
            # An extreme aspect ratio (say 1x20000) would need a huge intermediate image: resample only the
            # source region that the crop keeps, straight to (W, H). Slightly different pixels from the
            # intermediate route, but bounded memory, and the same rule for training evaluation and serving.
            image = image.resize((width, height), RESAMPLING[spec.interpolation], box=source_box(image.width, image.height, spec))
    return np.ascontiguousarray(np.asarray(image, dtype=np.uint8))


def source_box(width: int, height: int, spec: ResizeSpec) -> tuple[float, float, float, float]:
    """(left, top, right, bottom): the region of a width x height image that the model sees, in its own pixels."""
    if (width, height) == (spec.width, spec.height):
        return 0.0, 0.0, float(width), float(height)
    scale, _, (left, top) = _cover_and_crop(width, height, spec)
    return left / scale, top / scale, (left + spec.width) / scale, (top + spec.height) / scale


def _cover_and_crop(width: int, height: int, spec: ResizeSpec) -> tuple[float, tuple[int, int], tuple[int, int]]:
    """The scale that makes the image cover (H, W) / crop_fraction, the scaled size, and the crop's top-left corner."""
    scale = max(spec.height / spec.crop_fraction / height, spec.width / spec.crop_fraction / width)
    new_w, new_h = max(spec.width, round(width * scale)), max(spec.height, round(height * scale))
    return scale, (new_w, new_h), ((new_w - spec.width) // 2, (new_h - spec.height) // 2)
