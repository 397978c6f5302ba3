"""What can be wrong with an image, as exception types callers catch by name.

The ground floor knows nothing of HTTP: the service maps these to its 400 / 413 errors, training to DataError.
"""
from __future__ import annotations


class ImageError(ValueError):
    """An image that cannot be used. `index` is its position among the images of one request (0 for a lone one)."""

    def __init__(self, message: str, *, index: int = 0) -> None:
        super().__init__(message)
        self.message = message
        self.index = index


class ImageDecodeError(ImageError):
    """Not an image of a supported format, or corrupt / truncated data."""


class ImageTooLarge(ImageError):
    """Over the byte or pixel limit (the pixel count is checked from the header, before decoding)."""
