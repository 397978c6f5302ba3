"""Image bytes in, model-ready uint8 pixels out (and reconstructions back out as PNG).

    prepare_image(data, spec, limits)  = decode_image(...) then resize_for_model(...), what a worker thread runs

Decoding (`decode_image`):
- formats: JPEG (and MPO, the multi-picture JPEG many cameras write), PNG, WebP, BMP, GIF and TIFF; only
  those plugins are tried. Anything else is refused with InvalidImage (400), naming the format when the
  leading bytes identify one. Animated GIF / WebP / PNG and multi-page TIFF: the first frame.
- limits: the byte count, then the pixel count from the header, before a single pixel is decoded
  (`Image.open` is lazy), so a decompression bomb costs a header parse. Over the limit: PayloadTooLarge (413).
  Pillow's own DecompressionBombError (it fires only when our max_pixels is above twice Pillow's
  MAX_IMAGE_PIXELS) becomes PayloadTooLarge too. Pillow's DecompressionBombWarning is left alone: it fires
  only between Pillow's threshold and twice that, i.e. for images our own max_pixels has just allowed,
  and turning warnings into errors needs the process-wide, not thread-safe, warnings filters.
- EXIF orientation is applied (`ImageOps.exif_transpose`), as the training loader does.
- any mode becomes RGB:
  * 16-bit, 32-bit integer and float greyscale (I;16*, I, F) are rescaled, not clipped, with the training
    loader's rule: values up to 255 are taken as 8-bit, larger ones as 16-bit (divided by 257); two
    additions the training loader lacks: float images within [0, 1] are scaled by 255, and integer images
    above 65535 by their own maximum; negative values become 0.
  * ALPHA POLICY: anything with transparency (LA, La, PA, RGBA, RGBa, P or L/RGB with a `transparency`
    entry) is composited over WHITE. Black content on a transparent background (logos, line art,
    screenshots) stays visible; simply dropping alpha would expose whatever colour the transparent pixels
    happen to store, very often black. (The training loader drops alpha; only images with alpha differ.)
  * CMYK, YCbCr, 1, L, P, ... go through Pillow's `convert("RGB")`.
- JPEG draft mode: given the target ResizeSpec, a large JPEG is decoded by libjpeg at 1/2, 1/4 or 1/8
  scale, never below what the resize needs (both sides at least target / crop_fraction, so the resize
  still only shrinks). Much faster; the pixels differ slightly from a full decode, so prepare_image can
  switch it off (`draft=False`) when bit-exact agreement with training-time evaluation matters.

Every error carries `index`, the image's position in its request.
"""
from __future__ import annotations

import base64
import binascii
import io
import math
import re
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageOps

from service.errors import InvalidImage, PayloadTooLarge

# Pillow's format ids for what we accept. The JPEG opener also returns MPO images (the multi-picture JPEG
# many cameras write), decoded as their first picture.
SUPPORTED_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF")
SUPPORTED_NAMES = "JPEG, PNG, WebP, BMP, GIF, TIFF"
Image.init()  # register every plugin once, so `formats=` finds them and _sniff_format can name the others

RESAMPLING = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
}

_ALPHA_MODES = ("LA", "La", "PA", "RGBA", "RGBa")
_WIDE_GREY_MODES = ("I", "I;16", "I;16L", "I;16B", "I;16N", "F")
_EXIF_ORIENTATION = 0x0112
_WHITE = (255, 255, 255, 255)


@dataclass(frozen=True)
class ImageLimits:
    max_pixels: int = 40_000_000  # per image, checked from the header before decoding
    max_images: int = 32  # per request (the API checks this one)
    max_body_bytes: int = 16 * 1024 * 1024

    def __post_init__(self) -> None:
        for name in ("max_pixels", "max_images", "max_body_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"ImageLimits.{name} must be at least 1, got {getattr(self, name)}")


@dataclass(frozen=True)
class ResizeSpec:
    """The model's input size (H, W) and how training evaluation resized to it."""

    height: int
    width: int
    crop_fraction: float = 0.875
    interpolation: str = "bicubic"

    def __post_init__(self) -> None:
        if self.height < 1 or self.width < 1:
            raise ValueError(f"ResizeSpec size must be positive, got {self.height}x{self.width}")
        if not 0.0 < self.crop_fraction <= 1.0:
            raise ValueError(f"ResizeSpec crop_fraction must be in (0, 1], got {self.crop_fraction}")
        if self.interpolation not in RESAMPLING:
            raise ValueError(f"ResizeSpec interpolation must be one of {sorted(RESAMPLING)}, got {self.interpolation!r}")

    @classmethod
    def from_metadata(cls, meta: dict[str, Any]) -> ResizeSpec:
        """From a model's metadata: {"image": {"size": [H, W], "resize": {"interpolation": ..., "crop_fraction": ...}}}."""
        try:
            image = meta["image"]
            height, width = (int(v) for v in image["size"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"model metadata has no usable image.size [H, W]: {exc!r}") from exc
        resize = image.get("resize") or {}
        return cls(
            height=height,
            width=width,
            crop_fraction=float(resize.get("crop_fraction", cls.crop_fraction)),
            interpolation=str(resize.get("interpolation", cls.interpolation)),
        )

    @property
    def size(self) -> tuple[int, int]:
        return self.height, self.width

    def needed(self) -> tuple[int, int]:
        """(width, height) an image must at least have so that the resize only shrinks it."""
        return math.ceil(self.width / self.crop_fraction), math.ceil(self.height / self.crop_fraction)


# ---------------------------------------------------------------------------------------------- decoding

def decode_image(data: bytes, limits: ImageLimits, *, index: int = 0, target: ResizeSpec | None = None) -> Image.Image:
    """Bytes -> RGB PIL image, upright. `target` allows JPEG draft decoding at a reduced scale."""
    if not data:
        raise InvalidImage(f"image {index} is empty", index=index)
    if len(data) > limits.max_body_bytes:
        raise PayloadTooLarge(f"image {index} is {len(data):,} bytes, over the limit of {limits.max_body_bytes:,}", index=index)
    try:
        image = Image.open(io.BytesIO(data), formats=SUPPORTED_FORMATS)
    except Image.DecompressionBombError as exc:
        raise PayloadTooLarge(f"image {index} is too large to decode: {exc}", index=index) from exc
    except Image.UnidentifiedImageError as exc:
        raise InvalidImage(_unsupported_message(data, index), index=index) from exc
    except Exception as exc:  # a recognised format whose header is broken: OSError, SyntaxError, struct.error, ...
        raise InvalidImage(f"image {index} cannot be read: {_describe(exc)}", index=index) from exc

    # No `with image:` - closing would invalidate an image returned as is; the source is an in-memory buffer.
    width, height = image.size
    if width * height > limits.max_pixels:
        raise PayloadTooLarge(
            f"image {index} is {width}x{height} = {width * height:,} pixels, over the limit of {limits.max_pixels:,}",
            index=index,
        )
    if width < 1 or height < 1:
        raise InvalidImage(f"image {index} has no pixels ({width}x{height})", index=index)
    fmt = image.format or "unknown"
    try:
        if target is not None and fmt in ("JPEG", "MPO"):
            _draft(image, target)
        image.load()
        upright = ImageOps.exif_transpose(image)
        return _to_rgb(upright)
    except MemoryError:
        raise
    except Image.DecompressionBombError as exc:
        raise PayloadTooLarge(f"image {index} is too large to decode: {exc}", index=index) from exc
    except Exception as exc:  # truncated or corrupt data surfaces as OSError, SyntaxError, ValueError, EOFError, ...
        raise InvalidImage(f"image {index} ({fmt}, {width}x{height}) cannot be decoded: {_describe(exc)}", index=index) from exc


def _draft(image: Image.Image, target: ResizeSpec) -> None:
    """Let libjpeg decode at 1/2, 1/4 or 1/8 scale while both sides stay >= what the resize needs.

    `draft` works on the stored orientation, so a 90-degree EXIF orientation swaps the requested sides.
    Pillow picks the largest scale s with floor(stored / requested) >= s per side and gives ceil(stored / s).
    """
    need_w, need_h = target.needed()
    if image.getexif().get(_EXIF_ORIENTATION) in (5, 6, 7, 8):
        need_w, need_h = need_h, need_w
    if image.width >= 2 * need_w and image.height >= 2 * need_h:
        image.draft("RGB", (need_w, need_h))


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode in _WIDE_GREY_MODES:
        image = _rescale_to_8bit(image)
    if image.mode in _ALPHA_MODES or "transparency" in image.info:
        rgba = image.convert("RGBA")  # applies palette / single-colour transparency as alpha
        return Image.alpha_composite(Image.new("RGBA", rgba.size, _WHITE), rgba).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


def _rescale_to_8bit(image: Image.Image) -> Image.Image:
    """16-bit / 32-bit / float greyscale -> L, scaled to the value range (see the module docstring)."""
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


def _unsupported_message(data: bytes, index: int) -> str:
    detected = _sniff_format(data)
    if detected in SUPPORTED_FORMATS:
        return f"image {index} looks like {detected} but its header cannot be read (corrupt or truncated)"
    what = f"in {detected} format, which is not supported" if detected else "not a recognised image"
    return f"image {index} is {what}; supported formats: {SUPPORTED_NAMES}"


def _sniff_format(data: bytes) -> str | None:
    """Name the format from its leading bytes, using Pillow's byte-signature checks only (no parsing)."""
    prefix = data[:16]
    if prefix[4:8] == b"ftyp":  # ISO media: HEIC / HEIF / AVIF photos
        brand = prefix[8:12].decode("ascii", "replace").strip()
        return {"avif": "AVIF", "avis": "AVIF", "heic": "HEIC", "heix": "HEIC", "mif1": "HEIF"}.get(brand, f"ISO media ({brand})")
    head = data[:256].lstrip().lower()
    if head.startswith(b"%pdf"):
        return "PDF"
    if head.startswith(b"<svg") or (head.startswith(b"<?xml") and b"<svg" in data[:1024].lower()):
        return "SVG"
    for fmt in Image.ID:
        accept = Image.OPEN.get(fmt, (None, None))[1]
        if accept is None or fmt in ("DIB",):  # formats without a signature would claim anything
            continue
        if _accepts(accept, prefix):
            return fmt
    return None


def _accepts(accept: Any, prefix: bytes) -> bool:
    try:
        return bool(accept(prefix))
    except (IndexError, ValueError, TypeError, struct.error):  # a short prefix can trip a signature check
        return False


def _describe(exc: Exception) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


# ---------------------------------------------------------------------------------------------- resizing

# Beyond this many times the target's pixels, the resize-then-crop intermediate is skipped (memory bound).
MAX_INTERMEDIATE_FACTOR = 64


def resize_for_model(image: Image.Image, spec: ResizeSpec) -> np.ndarray:
    """RGB image -> uint8 (H, W, 3), exactly as training evaluation (model/transforms.py resize_and_centre_crop).

    Already (H, W): the pixels as they are. Otherwise scale so the image covers (H, W) / crop_fraction,
    resample, then cut the centre (H, W).
    """
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
            # source region that the crop keeps, straight to (W, H). Not bit-identical to training, but bounded.
            box = (left / scale, top / scale, (left + width) / scale, (top + height) / scale)
            image = image.resize((width, height), RESAMPLING[spec.interpolation], box=box)
    return np.ascontiguousarray(np.asarray(image, dtype=np.uint8))


def prepare_image(data: bytes, spec: ResizeSpec, limits: ImageLimits, *, index: int = 0, draft: bool = True) -> np.ndarray:
    """Bytes -> uint8 (H, W, 3) ready for the graph: decode (JPEG at reduced scale when `draft`) and resize."""
    image = decode_image(data, limits, index=index, target=spec if draft else None)
    return resize_for_model(image, spec)


# ---------------------------------------------------------------------------------------------- encoding

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
