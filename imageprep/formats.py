"""Which encoded formats are accepted, and naming the ones that are not (from their leading bytes only)."""
from __future__ import annotations

import struct
from typing import Any

from PIL import Image

# Pillow's format ids for what we accept. The JPEG opener also returns MPO images (the multi-picture JPEG
# many cameras write), decoded as their first picture.
SUPPORTED_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF")
SUPPORTED_NAMES = "JPEG, PNG, WebP, BMP, GIF, TIFF"
Image.init()  # register every plugin once, so `formats=` finds them and sniff_format can name the others


def unsupported_message(data: bytes, name: str) -> str:
    """Why Pillow could not identify `data`: a broken header of a supported format, or a format we refuse."""
    detected = sniff_format(data)
    if detected in SUPPORTED_FORMATS:
        return f"{name} looks like {detected} but its header cannot be read (corrupt or truncated)"
    what = f"in {detected} format, which is not supported" if detected else "not a recognised image"
    return f"{name} is {what}; supported formats: {SUPPORTED_NAMES}"


def sniff_format(data: bytes) -> str | None:
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
