"""Encoded image (or one opened by `open_bytes`) -> the model's uint8 (H, W, 3) pixels: decode (target-aware), then resize."""
from __future__ import annotations

import numpy as np
from PIL import Image

from .decode import decode_bytes
from .limits import ImageLimits
from .resize import ResizeSpec, resize_for_model


def prepare(data: bytes | Image.Image, spec: ResizeSpec, limits: ImageLimits | None = None, *, index: int = 0,
            draft: bool = True) -> np.ndarray:
    """Bytes (or an image from `open_bytes`, its limits checked already) -> C-contiguous uint8 (H, W, 3).
    `draft=False` decodes a large JPEG at full scale first."""
    image = decode_bytes(data, limits, index=index, target=spec if draft else None)
    return resize_for_model(image, spec)
