"""The mode policy: any decoded Pillow mode becomes RGB, the same way for training-time evaluation and serving.

- 16-bit, 32-bit integer and float greyscale (I;16*, I, F) are rescaled, not clipped: float images within
  [0, 1] are scaled by 255; otherwise values up to 255 are taken as 8-bit, up to 65535 as 16-bit (divided
  by 257), and anything larger is scaled by the image's own maximum. Negative values and NaN become 0.
- ALPHA: anything with transparency (LA, La, PA, RGBA, RGBa, P or L/RGB with a `transparency` entry) is
  composited over WHITE. Black content on a transparent background (logos, line art, screenshots) stays
  visible; dropping alpha would expose whatever colour the transparent pixels happen to store, often black.
- CMYK, YCbCr, 1, L, P, ... go through Pillow's `convert("RGB")`.
"""
from __future__ import annotations

import numpy as np
from PIL import Image

ALPHA_MODES = ("LA", "La", "PA", "RGBA", "RGBa")
WIDE_GREY_MODES = ("I", "I;16", "I;16L", "I;16B", "I;16N", "F")
WHITE = (255, 255, 255, 255)


def to_rgb(image: Image.Image) -> Image.Image:
    if image.mode in WIDE_GREY_MODES:
        image = rescale_to_8bit(image)
    if image.mode in ALPHA_MODES or "transparency" in image.info:
        rgba = image.convert("RGBA")  # applies palette / single-colour transparency as alpha
        return Image.alpha_composite(Image.new("RGBA", rgba.size, WHITE), rgba).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


def rescale_to_8bit(image: Image.Image) -> Image.Image:
    """16-bit / 32-bit / float greyscale -> L (or LA when a single value is transparent), scaled to its range."""
    info = image.info
    array = np.asarray(image, dtype=np.float64)
    finite = array[np.isfinite(array)]
    peak = float(finite.max(initial=0.0))
    if image.mode == "F" and 0.0 < peak <= 1.0:
        scale = 1.0
    elif peak <= 255.0:
        scale = 255.0
    elif peak <= 65535.0:
        scale = 65535.0
    else:
        scale = peak
    array = np.nan_to_num(array, nan=0.0, posinf=scale, neginf=0.0)
    grey = Image.fromarray(np.clip(array * (255.0 / scale) + 0.5, 0, 255).astype(np.uint8))
    if "transparency" in info and isinstance(info["transparency"], (int, float)):
        # single-value transparency in the original scale: keep it as an alpha channel
        alpha = np.where(np.asarray(image) == info["transparency"], 0, 255).astype(np.uint8)
        grey = Image.merge("LA", (grey, Image.fromarray(alpha)))
    return grey
