"""Image bytes in, model-ready uint8 pixels out (and reconstructions back out as PNG), for the service.

Decoding, the mode policy, the limits and the resize rule live on the ground floor (`imageprep`), shared with
training-time evaluation so that the same file gives the same pixels in both. This module adds what only the
service needs: base64 input, PNG output, the per-request image count, reading the resize from a model's
metadata, and the mapping of imageprep's errors to the service's (made in `_as_service_errors` only):

    imageprep.ImageTooLarge -> PayloadTooLarge (413)    any other imageprep.ImageError -> InvalidImage (400)

Every error carries `index`, the image's position in its request.
"""
from __future__ import annotations

import base64
import binascii
import io
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
from PIL import Image

import imageprep
from imageprep import ResizeSpec, resize_for_model
from service.errors import InvalidImage, PayloadTooLarge

__all__ = [
    "ImageLimits", "ResizeSpec", "decode_base64_image", "decode_image", "encode_png", "open_image",
    "prepare_image", "resize_for_model",
]


@dataclass(frozen=True)
class ImageLimits(imageprep.ImageLimits):
    """The ground floor's per-image limits, plus how many images one request may carry."""

    max_images: int = 32  # per request (the API checks this one)


@contextmanager
def _as_service_errors() -> Iterator[None]:
    """The one place where the ground floor's image errors become the service's HTTP errors."""
    try:
        yield
    except imageprep.ImageTooLarge as exc:
        raise PayloadTooLarge(exc.message, index=exc.index) from exc
    except imageprep.ImageError as exc:
        raise InvalidImage(exc.message, index=exc.index) from exc


def decode_image(data: bytes, limits: imageprep.ImageLimits, *, index: int = 0,
                 target: ResizeSpec | None = None) -> Image.Image:
    """Bytes -> RGB PIL image, upright. `target` allows JPEG draft decoding at a reduced scale."""
    with _as_service_errors():
        return imageprep.decode_bytes(data, limits, index=index, target=target)


def open_image(data: bytes, limits: imageprep.ImageLimits, *, index: int = 0) -> Image.Image:
    """Bytes -> an image with its header read and checked, nothing decoded yet (its size says what decoding costs)."""
    with _as_service_errors():
        return imageprep.open_bytes(data, limits, index=index)


def prepare_image(data: bytes | Image.Image, spec: ResizeSpec, limits: imageprep.ImageLimits, *, index: int = 0,
                  draft: bool = True) -> np.ndarray:
    """Bytes (or an `open_image` image) -> uint8 (H, W, 3) ready for the graph. Draft decoding is what
    training-time evaluation does too (model/data.py), so `draft=False` is only for measuring its effect."""
    with _as_service_errors():
        return imageprep.prepare(data, spec, limits, index=index, draft=draft)


@dataclass(frozen=True)
class SourceImage:
    """The upload as decoded (upright RGB, full scale) and the region of it the model saw, for pictures drawn at
    the upload's own size."""
    image: Image.Image
    box: tuple[float, float, float, float]  # (left, top, right, bottom) in the image's pixels


def prepare_image_with_source(data: bytes | Image.Image, spec: ResizeSpec, limits: imageprep.ImageLimits, *,
                              index: int = 0) -> tuple[np.ndarray, SourceImage]:
    """As prepare_image, keeping the decoded upload too. Decoded at full scale (no JPEG draft), since the
    pictures are drawn at the upload's size; the model's pixels then follow the same resize rule from it."""
    with _as_service_errors():
        image = imageprep.decode_bytes(data, limits, index=index)
        return imageprep.resize_for_model(image, spec), SourceImage(image, imageprep.source_box(image.width, image.height, spec))


def encode_png(pixels: np.ndarray) -> bytes:
    """uint8 (H, W, 3) -> PNG bytes; fast compression, since these go straight back to the client."""
    pixels = np.asarray(pixels)
    if pixels.dtype != np.uint8 or pixels.ndim != 3 or pixels.shape[2] != 3:
        raise ValueError(f"expected uint8 (H, W, 3) pixels, got {pixels.dtype} {pixels.shape}")
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(pixels), "RGB").save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


_DATA_URL = re.compile(r"^data:(?P<media>[^,;]*)(?P<params>(;[^,;]*)*),(?P<payload>.*)$", re.DOTALL | re.IGNORECASE)
_NOT_BASE64 = re.compile(r"[^A-Za-z0-9+/=]")
_WHITESPACE = re.compile(r"\s+")


def decode_base64_image(text: str, *, index: int) -> bytes:
    """Base64 (standard or URL-safe alphabet, padding optional, line breaks allowed) or a data: URL -> bytes."""
    if not isinstance(text, str):
        raise InvalidImage(f"image {index}: expected a base64 string, got {type(text).__name__}", index=index)
    payload = text.strip()
    if payload[:5].lower() == "data:":
        match = _DATA_URL.match(payload)
        if match is None:
            raise InvalidImage(f"image {index}: malformed data URL (expected data:<type>;base64,<data>)", index=index)
        if "base64" not in [p.strip().lower() for p in match["params"].split(";")]:
            raise InvalidImage(f"image {index}: data URL is not base64-encoded (expected data:<type>;base64,<data>)", index=index)
        payload = match["payload"]
    payload = _WHITESPACE.sub("", payload).replace("-", "+").replace("_", "/")
    bad = _NOT_BASE64.search(payload)
    if bad is not None:
        raise InvalidImage(f"image {index}: invalid base64 (character {bad.group()!r} at position {bad.start()})", index=index)
    payload = payload.rstrip("=")
    if not payload:
        raise InvalidImage(f"image {index}: empty base64 data", index=index)
    if len(payload) % 4 == 1:
        raise InvalidImage(f"image {index}: invalid base64 (truncated: {len(payload)} data characters)", index=index)
    try:
        return base64.b64decode(payload + "=" * (-len(payload) % 4), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InvalidImage(f"image {index}: invalid base64 ({exc})", index=index) from exc
