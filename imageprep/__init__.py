"""Image decoding and the resize rule: the one definition that training-time evaluation and serving share,
so the same file gives the same pixels in both. Torch-free; imports only Pillow and NumPy.

    prepare(data, spec, limits)  = decode_bytes(data, limits, target=spec) then resize_for_model(image, spec)

    errors.py   ImageError (with `index`), ImageDecodeError, ImageTooLarge
    limits.py   ImageLimits: bytes and pixels, checked before decoding
    formats.py  the accepted formats; naming a refused one
    modes.py    any Pillow mode -> RGB (alpha over white, wide greyscale rescaled)
    decode.py   bytes or a file -> upright RGB image (JPEG draft given a target); or in two steps: open, decode
    resize.py   ResizeSpec and the resize rule
    prepare.py  decode + resize
"""
from .decode import decode_bytes, decode_opened, decode_path, open_bytes
from .errors import ImageDecodeError, ImageError, ImageTooLarge
from .formats import SUPPORTED_FORMATS, SUPPORTED_NAMES
from .limits import ImageLimits
from .modes import to_rgb
from .prepare import prepare
from .resize import (
    DEFAULT_CROP_FRACTION,
    DEFAULT_INTERPOLATION,
    RESAMPLING,
    ResizeSpec,
    resize_for_model,
    source_box,
)

__all__ = [
    "DEFAULT_CROP_FRACTION", "DEFAULT_INTERPOLATION", "RESAMPLING", "SUPPORTED_FORMATS",
    "SUPPORTED_NAMES", "ImageDecodeError", "ImageError", "ImageLimits", "ImageTooLarge", "ResizeSpec", "decode_bytes",
    "decode_opened", "decode_path", "open_bytes", "prepare", "resize_for_model", "source_box", "to_rgb",
]
