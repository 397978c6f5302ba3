"""RandAugment-style image operations with Pillow (Cubuk et al., "RandAugment: practical automated data augmentation").

Each image gets `num_ops` operations drawn at random from a fixed list, all at one magnitude (0-10); the
sign of a geometric or enhancement operation is random. Geometry fills the uncovered corners with the image's
mean colour rather than black, so a small image does not learn that black borders mean anything.
Randomness comes from torch's RNG (or an explicit generator), as in `model.transforms`.
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from PIL import Image, ImageEnhance, ImageOps

MAX_MAGNITUDE = 10

# At full magnitude: degrees of rotation, shear factor, share of the side translated, enhancement +-factor.
_MAX_ROTATE, _MAX_SHEAR, _MAX_TRANSLATE, _MAX_ENHANCE = 30.0, 0.3, 0.3, 0.9


def _fill(image: Image.Image) -> tuple[int, ...]:
    return tuple(int(v) for v in np.asarray(image).reshape(-1, 3).mean(axis=0))


def _affine(image: Image.Image, matrix: tuple[float, ...]) -> Image.Image:
    return image.transform(image.size, Image.AFFINE, matrix, resample=Image.BILINEAR, fillcolor=_fill(image))


def _enhance(kind: type) -> Callable[[Image.Image, float], Image.Image]:
    return lambda image, level: kind(image).enhance(1.0 + level * _MAX_ENHANCE)


# Each operation takes the image and a signed level in [-1, 1] (magnitude / 10 with a random sign).
OPERATIONS: dict[str, Callable[[Image.Image, float], Image.Image]] = {
    "identity": lambda image, level: image,
    "autocontrast": lambda image, level: ImageOps.autocontrast(image),
    "equalize": lambda image, level: ImageOps.equalize(image),
    "rotate": lambda image, level: image.rotate(level * _MAX_ROTATE, resample=Image.BILINEAR, fillcolor=_fill(image)),
    "solarize": lambda image, level: ImageOps.solarize(image, threshold=int(256 - abs(level) * 128)),
    "posterize": lambda image, level: ImageOps.posterize(image, bits=max(1, 8 - int(abs(level) * 4))),
    "color": _enhance(ImageEnhance.Color),
    "contrast": _enhance(ImageEnhance.Contrast),
    "brightness": _enhance(ImageEnhance.Brightness),
    "sharpness": _enhance(ImageEnhance.Sharpness),
    "shear_x": lambda image, level: _affine(image, (1, level * _MAX_SHEAR, -level * _MAX_SHEAR * image.height / 2, 0, 1, 0)),
    "shear_y": lambda image, level: _affine(image, (1, 0, 0, level * _MAX_SHEAR, 1, -level * _MAX_SHEAR * image.width / 2)),
    "translate_x": lambda image, level: _affine(image, (1, 0, level * _MAX_TRANSLATE * image.width, 0, 1, 0)),
    "translate_y": lambda image, level: _affine(image, (1, 0, 0, 0, 1, level * _MAX_TRANSLATE * image.height)),
}


class RandAugment:
    """`num_ops` random operations per image at `magnitude` (0-10)."""

    def __init__(self, num_ops: int = 2, magnitude: int = 9) -> None:
        if num_ops < 0 or not 0 <= magnitude <= MAX_MAGNITUDE:
            raise ValueError(f"RandAugment needs num_ops >= 0 and magnitude in [0, {MAX_MAGNITUDE}], got {num_ops}, {magnitude}")
        self.num_ops, self.magnitude = num_ops, magnitude
        self.names = list(OPERATIONS)

    def __call__(self, image: Image.Image, generator: torch.Generator | None = None) -> Image.Image:
        for _ in range(self.num_ops):
            name = self.names[int(torch.randint(len(self.names), (), generator=generator))]
            sign = 1.0 if torch.rand((), generator=generator).item() < 0.5 else -1.0
            image = OPERATIONS[name](image, sign * self.magnitude / MAX_MAGNITUDE)
        return image
