"""Image transforms with Pillow + NumPy: PIL image or uint8 (H, W, 3) array in, normalised float32 (3, H, W) tensor out.

Evaluation resizes with the ground floor's rule (`imageprep.resize_for_model`), the very code the service
runs, and tells the dataset what size it will shrink to (`decode_target`), so that a large JPEG is decoded at
the same reduced scale as the service decodes it: the same file gives the same pixels in both.

Randomness comes from torch's RNG (or an explicit `torch.Generator`), which DataLoader seeds
per worker and per epoch from the main process, so `torch.manual_seed` makes augmentation reproducible.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Union

import numpy as np
import torch
from PIL import Image

from imageprep import DEFAULT_CROP_FRACTION, ResizeSpec, resize_for_model
from model.presets import as_size
from model.randaugment import RandAugment

ImageLike = Union[Image.Image, np.ndarray]
Size = Union[int, tuple[int, int]]


def _to_pil(image: ImageLike) -> Image.Image:
    if isinstance(image, Image.Image):
        return image if image.mode == "RGB" else image.convert("RGB")
    return Image.fromarray(_to_array(image))


def _to_array(image: ImageLike) -> np.ndarray:
    """uint8 (H, W, 3)."""
    if isinstance(image, Image.Image):
        return np.asarray(_to_pil(image))
    array = np.asarray(image)
    if array.dtype != np.uint8 or array.ndim != 3 or array.shape[2] != 3:
        raise ValueError(f"expected a uint8 (H, W, 3) array, got {array.dtype} {array.shape}")
    return array


def normalise(image: ImageLike, mean: np.ndarray, std: np.ndarray) -> torch.Tensor:
    """uint8 HWC -> float32 (3, H, W), (x / 255 - mean) / std."""
    array = (_to_array(image).astype(np.float32) / 255.0 - mean) / std
    return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))


def decode_target(transform: Any) -> ResizeSpec | None:
    """The size a transform shrinks every image to, so the decoder may draft a large JPEG down to it (as the
    service does); None for a transform that wants the full image (augmentation crops anywhere)."""
    return getattr(transform, "decode_target", None)


def _uniform(low: float, high: float, generator: torch.Generator | None) -> float:
    return low + (high - low) * torch.rand((), generator=generator).item()


def _randint(low: int, high: int, generator: torch.Generator | None) -> int:
    """Uniform integer in [low, high] inclusive."""
    return int(torch.randint(low, high + 1, (), generator=generator).item())


def resize_and_centre_crop(image: ImageLike, size: tuple[int, int],
                           crop_fraction: float = DEFAULT_CROP_FRACTION) -> np.ndarray:
    """uint8 (H, W, 3): scale so the image covers size / crop_fraction, bicubic, cut the centre (imageprep's rule);
    an image already at the target size keeps its pixels."""
    return resize_for_model(_to_pil(image), ResizeSpec(*size, crop_fraction=crop_fraction))


class EvalTransform:
    """Resize the shorter side to size / crop_fraction, centre crop, normalise. Deterministic."""

    def __init__(self, image_size: Size, mean: Sequence[float], std: Sequence[float], *,
                 crop_fraction: float = DEFAULT_CROP_FRACTION):
        self.size = as_size(image_size)
        self.mean, self.std = np.asarray(mean, np.float32), np.asarray(std, np.float32)
        # The service's resize for this model (export writes the same crop fraction and interpolation); also the
        # size the decoder may draft a large JPEG down to.
        self.decode_target = ResizeSpec(*self.size, crop_fraction=crop_fraction)

    def pixels(self, image: ImageLike) -> np.ndarray:
        """uint8 (H, W, 3) before normalisation: what the service feeds the exported graph."""
        return resize_for_model(_to_pil(image), self.decode_target)

    def __call__(self, image: ImageLike, generator: torch.Generator | None = None) -> torch.Tensor:
        return normalise(self.pixels(image), self.mean, self.std)


class TrainTransform:
    """Random-resized crop (bicubic), optional horizontal flip, optional RandAugment, mild colour jitter, normalise."""

    def __init__(self, image_size: Size, mean: Sequence[float], std: Sequence[float], *, hflip: bool = True,
                 scale: tuple[float, float] = (0.35, 1.0), ratio: tuple[float, float] = (3 / 4, 4 / 3),
                 jitter: float = 0.2, randaugment: RandAugment | None = None):
        self.size = as_size(image_size)
        self.mean, self.std = np.asarray(mean, np.float32), np.asarray(std, np.float32)
        self.hflip, self.scale, self.ratio, self.jitter = hflip, scale, ratio, jitter
        self.randaugment = randaugment

    def __call__(self, image: ImageLike, generator: torch.Generator | None = None) -> torch.Tensor:
        pil = _to_pil(image)
        box = self.crop_box(pil.width, pil.height, generator)
        pil = pil.resize(self.size[::-1], Image.BICUBIC, box=box)
        if self.randaugment is not None:  # at the model's size: cheap, and the same strength for any source size
            pil = self.randaugment(pil, generator)
        array = np.asarray(pil)
        if self.hflip and _uniform(0, 1, generator) < 0.5:
            array = array[:, ::-1]
        if self.jitter > 0:
            array = self.colour_jitter(array, generator)
        return normalise(array, self.mean, self.std)

    def crop_box(self, width: int, height: int, generator: torch.Generator | None) -> tuple[int, int, int, int]:
        """A box covering `scale` of the area with aspect ratio in `ratio` (log-uniform)."""
        area = width * height
        log_ratio = (math.log(self.ratio[0]), math.log(self.ratio[1]))
        for _ in range(10):
            target = area * _uniform(*self.scale, generator)
            aspect = math.exp(_uniform(*log_ratio, generator))
            w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
            if 0 < w <= width and 0 < h <= height:
                left, top = _randint(0, width - w, generator), _randint(0, height - h, generator)
                return (left, top, left + w, top + h)
        # Rare fallback (extreme aspect ratios): the largest centred box within the ratio limits.
        aspect = min(max(width / height, self.ratio[0]), self.ratio[1])
        w, h = (width, round(width / aspect)) if width / height < aspect else (round(height * aspect), height)
        left, top = (width - w) // 2, (height - h) // 2
        return (left, top, left + w, top + h)

    def colour_jitter(self, array: np.ndarray, generator: torch.Generator | None) -> np.ndarray:
        """Brightness, contrast and saturation, each scaled by a factor in [1 - jitter, 1 + jitter]."""
        brightness, contrast, saturation = (_uniform(1 - self.jitter, 1 + self.jitter, generator) for _ in range(3))
        x = array.astype(np.float32) * brightness
        x = x.mean() + (x - x.mean()) * contrast
        grey = x @ np.array([0.299, 0.587, 0.114], np.float32)
        x = grey[..., None] + (x - grey[..., None]) * saturation
        return np.clip(x + 0.5, 0, 255).astype(np.uint8)


class ShiftTransform:
    """Label-preserving augmentation for the synthetic set: a small translation and a horizontal flip.

    Every synthetic class is left/right symmetric, so the flip is safe; a shift of at most
    1/16 of the side keeps a top bar in the top half. No crops, no vertical flips.
    """

    def __init__(self, image_size: Size, mean: Sequence[float], std: Sequence[float], *, hflip: bool = True,
                 max_shift: float = 1 / 16):
        self.size = as_size(image_size)
        self.mean, self.std = np.asarray(mean, np.float32), np.asarray(std, np.float32)
        self.hflip = hflip
        self.max_shift = (round(max_shift * self.size[0]), round(max_shift * self.size[1]))

    def __call__(self, image: ImageLike, generator: torch.Generator | None = None) -> torch.Tensor:
        array = _to_array(resize_and_centre_crop(image, self.size, 1.0))
        sy, sx = self.max_shift
        dy, dx = _randint(-sy, sy, generator), _randint(-sx, sx, generator)
        padded = np.pad(array, ((sy, sy), (sx, sx), (0, 0)), mode="edge")  # edge pixels: background, not black
        array = padded[sy + dy:sy + dy + self.size[0], sx + dx:sx + dx + self.size[1]]
        if self.hflip and _uniform(0, 1, generator) < 0.5:
            array = array[:, ::-1]
        return normalise(array, self.mean, self.std)


def train_transform(image_size: Size, mean: Sequence[float], std: Sequence[float], *, hflip: bool = True,
                    scale: tuple[float, float] = (0.35, 1.0), randaugment: RandAugment | None = None) -> TrainTransform:
    # RandAugment brings its own colour operations: no extra jitter on top.
    return TrainTransform(image_size, mean, std, hflip=hflip, scale=scale, randaugment=randaugment,
                          jitter=0.0 if randaugment else 0.2)


def eval_transform(image_size: Size, mean: Sequence[float], std: Sequence[float]) -> EvalTransform:
    return EvalTransform(image_size, mean, std)
