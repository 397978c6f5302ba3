"""Encoded image (bytes, or a file) -> upright RGB Pillow image, within limits.

- formats: JPEG (and MPO), PNG, WebP, BMP, GIF and TIFF; only those plugins are tried. Anything else is
  ImageDecodeError, naming the format when the leading bytes identify one. Animated GIF / WebP / PNG and
  multi-page TIFF: the first frame.
- limits: the byte count, then the pixel count from the header, before a single pixel is decoded
  (`Image.open` is lazy), so a decompression bomb costs a header parse: ImageTooLarge. Pillow's own
  DecompressionBombError (it fires only above twice Pillow's MAX_IMAGE_PIXELS) becomes ImageTooLarge too.
  Pillow's DecompressionBombWarning is left alone: it fires only for images our own max_pixels has just
  allowed, and turning warnings into errors needs the process-wide, not thread-safe, warnings filters.
- EXIF orientation is applied (`ImageOps.exif_transpose`); then the mode policy of `modes.py`.
- JPEG draft: given the target ResizeSpec, a large JPEG is decoded by libjpeg at 1/2, 1/4 or 1/8 scale,
  never below what the resize needs (so the resize still only shrinks). About 10x faster on a 12-megapixel
  photo for a 224 model (38 ms against 434 ms, one core). The pixels differ slightly from a full decode; rather
  than give serving that speed up, training-time evaluation decodes with the same target as the service
  (model/data.py), so both get the same pixels. Augmentation, which crops anywhere, decodes fully.
"""
from __future__ import annotations

import io
from pathlib import Path

from PIL import Image, ImageOps

from .errors import ImageDecodeError, ImageTooLarge
from .formats import SUPPORTED_FORMATS, unsupported_message
from .limits import ImageLimits
from .modes import to_rgb
from .resize import ResizeSpec

_EXIF_ORIENTATION = 0x0112
_QUARTER_TURNS = (5, 6, 7, 8)  # EXIF orientations that swap width and height


def decode_bytes(data: bytes | Image.Image, limits: ImageLimits | None = None, *, index: int = 0,
                 target: ResizeSpec | None = None) -> Image.Image:
    """Bytes -> RGB image, upright. `target` allows JPEG draft decoding; `limits=None` checks no limit of ours.
    An image from `open_bytes` (limits checked already) is finished the same way (`decode_opened`)."""
    if isinstance(data, Image.Image):
        return decode_opened(data, index=index, target=target)
    return _decode(data, limits, index=index, name=f"image {index}", target=target)


def decode_path(path: str | Path, limits: ImageLimits | None = None, *, target: ResizeSpec | None = None) -> Image.Image:
    """A file -> RGB image, upright: exactly `decode_bytes` of its contents. Errors name the file."""
    path = Path(path)
    try:
        size = path.stat().st_size
        if limits is not None and size > limits.max_body_bytes:  # before reading it into memory
            raise ImageTooLarge(f"{path} is {size:,} bytes, over the limit of {limits.max_body_bytes:,}")
        data = path.read_bytes()
    except OSError as exc:
        raise ImageDecodeError(f"{path} cannot be read: {_describe(exc)}") from exc
    return _decode(data, limits, index=0, name=str(path), target=target)


def open_bytes(data: bytes, limits: ImageLimits | None = None, *, index: int = 0) -> Image.Image:
    """Bytes -> an image whose header is read and checked against the limits, not one pixel decoded yet (Pillow is
    lazy): its size tells what decoding it will cost. `decode_opened` finishes it."""
    return _open(data, limits, index=index, name=f"image {index}")


def decode_opened(image: Image.Image, *, index: int = 0, target: ResizeSpec | None = None) -> Image.Image:
    """An image from `open_bytes` -> RGB image, upright: `decode_bytes` in two steps."""
    return _finish(image, index=index, name=f"image {index}", target=target)


def _decode(data: bytes, limits: ImageLimits | None, *, index: int, name: str, target: ResizeSpec | None) -> Image.Image:
    return _finish(_open(data, limits, index=index, name=name), index=index, name=name, target=target)


def _open(data: bytes, limits: ImageLimits | None, *, index: int, name: str) -> Image.Image:
    if not data:
        raise ImageDecodeError(f"{name} is empty", index=index)
    if limits is not None and len(data) > limits.max_body_bytes:
        raise ImageTooLarge(f"{name} is {len(data):,} bytes, over the limit of {limits.max_body_bytes:,}", index=index)
    try:
        image = Image.open(io.BytesIO(data), formats=SUPPORTED_FORMATS)
    except Image.DecompressionBombError as exc:
        raise ImageTooLarge(f"{name} is too large to decode: {exc}", index=index) from exc
    except Image.UnidentifiedImageError as exc:
        raise ImageDecodeError(unsupported_message(data, name), index=index) from exc
    except Exception as exc:  # a recognised format whose header is broken: OSError, SyntaxError, struct.error, ...
        raise ImageDecodeError(f"{name} cannot be read: {_describe(exc)}", index=index) from exc

    # No `with image:` - closing would invalidate an image returned as is; the source is an in-memory buffer.
    width, height = image.size
    if limits is not None and width * height > limits.max_pixels:
        raise ImageTooLarge(
            f"{name} is {width}x{height} = {width * height:,} pixels, over the limit of {limits.max_pixels:,}",
            index=index,
        )
    if width < 1 or height < 1:
        raise ImageDecodeError(f"{name} has no pixels ({width}x{height})", index=index)
    return image


def _finish(image: Image.Image, *, index: int, name: str, target: ResizeSpec | None) -> Image.Image:
    width, height = image.size
    fmt = image.format or "unknown"
    try:
        if target is not None and fmt in ("JPEG", "MPO"):
            _draft(image, target)
        image.load()
        ImageOps.exif_transpose(image, in_place=True)  # without in_place, an upright image is copied whole
        return to_rgb(image)
    except MemoryError:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageTooLarge(f"{name} is too large to decode: {exc}", index=index) from exc
    except Exception as exc:  # truncated or corrupt data surfaces as OSError, SyntaxError, ValueError, EOFError, ...
        raise ImageDecodeError(f"{name} ({fmt}, {width}x{height}) cannot be decoded: {_describe(exc)}", index=index) from exc


def _draft(image: Image.Image, target: ResizeSpec) -> None:
    """Let libjpeg decode at 1/2, 1/4 or 1/8 scale while both sides stay >= what the resize needs.

    `draft` works on the stored orientation, so a quarter-turn EXIF orientation swaps the requested sides.
    Pillow picks the largest scale s with floor(stored / requested) >= s per side and gives ceil(stored / s).
    """
    need_w, need_h = target.needed()
    if image.getexif().get(_EXIF_ORIENTATION) in _QUARTER_TURNS:
        need_w, need_h = need_h, need_w
    if image.width >= 2 * need_w and image.height >= 2 * need_h:
        image.draft("RGB", (need_w, need_h))


def _describe(exc: Exception) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
