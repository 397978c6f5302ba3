"""How large an image may be before a single pixel of it is decoded."""
from __future__ import annotations

from dataclasses import dataclass, fields


@dataclass(frozen=True)
class ImageLimits:
    max_pixels: int = 40_000_000  # per image, read from the header before decoding
    max_body_bytes: int = 16 * 1024 * 1024  # the encoded image (a request part or a file)

    def __post_init__(self) -> None:
        for field in fields(self):  # every limit is a positive count, including those a subclass adds
            value = getattr(self, field.name)
            if value < 1:
                raise ValueError(f"{type(self).__name__}.{field.name} must be at least 1, got {value}")
