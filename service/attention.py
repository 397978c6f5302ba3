"""Attention heat maps drawn over the upload (/classify?attention_png=true), in NumPy and Pillow."""
from __future__ import annotations

import math

import numpy as np
from PIL import Image

from .reconstruction import MASKED_GREY, OUTSIDE_FADE, capped

# Colour ramp from cold to hot (dark blue, purple, orange, pale yellow), sampled at evenly spaced heat levels.
HEAT_COLOURS = np.array([[20, 20, 90], [120, 30, 140], [230, 90, 40], [255, 230, 120]], dtype=np.float32)
HEAT_OPACITY = 0.6  # how much of the map covers the photo at the hottest patch; cold patches cover less


def heat_colours(heat: np.ndarray) -> np.ndarray:
    """(..., ) values in [0, 1] -> (..., 3) float RGB along HEAT_COLOURS."""
    position = np.clip(heat, 0.0, 1.0) * (len(HEAT_COLOURS) - 1)
    low = np.minimum(position.astype(int), len(HEAT_COLOURS) - 2)
    fraction = (position - low)[..., None]
    return HEAT_COLOURS[low] * (1 - fraction) + HEAT_COLOURS[low + 1] * fraction


def stretched(attention: np.ndarray) -> np.ndarray:
    """The map from 0 at its coldest patch to 1 at its hottest (all 0 when it is flat), float32."""
    low, span = float(attention.min()), float(np.ptp(attention))
    return ((attention - low) / span if span > 0 else np.zeros_like(attention)).astype(np.float32)


def attention_overlay(image: Image.Image, box: tuple[float, float, float, float], attention: np.ndarray) -> np.ndarray:
    """The heat map (rows, cols), stretched from its coldest to its hottest patch, smoothly upscaled over the region of the upload the
    model saw (`box`) and blended with it; outside that region the upload is faded, as the model never saw it.
    Longer side at most MAX_PICTURE_SIDE. Returns (H, W, 3) uint8."""
    image, box = capped(image if image.mode == "RGB" else image.convert("RGB"), box)
    base = np.asarray(image, dtype=np.float32)
    left, top = min(int(box[0]), image.width - 1), min(int(box[1]), image.height - 1)
    right, bottom = max(left + 1, min(image.width, math.ceil(box[2]))), max(top + 1, min(image.height, math.ceil(box[3])))
    heat = stretched(attention)
    heat = np.asarray(Image.fromarray(heat, mode="F").resize((right - left, bottom - top), Image.Resampling.BILINEAR))
    opacity = (HEAT_OPACITY * (0.35 + 0.65 * np.clip(heat, 0.0, 1.0)))[..., None]
    picture = base * (1 - OUTSIDE_FADE) + MASKED_GREY * OUTSIDE_FADE
    seen = base[top:bottom, left:right]
    picture[top:bottom, left:right] = seen * (1 - opacity) + heat_colours(heat) * opacity
    return np.clip(np.rint(picture), 0, 255).astype(np.uint8)
