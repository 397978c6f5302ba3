"""The body of a V2 request or response with Triton's binary tensor data extension: a JSON header of
`Inference-Header-Content-Length` bytes, then each binary tensor's bytes in the order the header lists them
(`binary_data_size` each). Also the request body's Content-Encoding (tritonclient can gzip or deflate it)."""
from __future__ import annotations

import json
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

from fastapi.responses import Response

from ..errors import BadRequest, PayloadTooLarge, UnsupportedMediaType

HEADER_LENGTH = "Inference-Header-Content-Length"
JSON_TYPE = "application/json"
BINARY_TYPE = "application/octet-stream"
_WBITS = {"gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}  # deflate in HTTP is the zlib format


def decoded_body(body: bytes, content_encoding: str | None, limit: int) -> bytes:
    """The body as sent before compression, never more than `limit` bytes (413): a small compressed body must not
    grow past the limit the raw body is held to."""
    encoding = (content_encoding or "identity").strip().lower()
    if encoding == "identity":
        return body
    if encoding not in _WBITS:
        raise UnsupportedMediaType(f"Content-Encoding {encoding!r} is not supported (gzip, deflate or none)")
    decompressor = zlib.decompressobj(_WBITS[encoding])
    try:
        decoded = decompressor.decompress(body, limit + 1)
    except zlib.error as error:
        raise BadRequest(f"the body is not valid {encoding} data: {error}") from None
    if len(decoded) > limit:
        raise PayloadTooLarge(f"the {encoding} body decompresses to more than the limit of {limit} bytes")
    if not decompressor.eof:
        raise BadRequest(f"the {encoding} body is truncated")
    return decoded


def split_body(body: bytes, header_length: str | None) -> tuple[bytes, memoryview]:
    """(the JSON header, the binary part). Without the header length the whole body is JSON."""
    if header_length is None:
        return body, memoryview(b"")
    try:
        length = int(header_length.strip())
    except ValueError:
        raise BadRequest(f"{HEADER_LENGTH} must be a whole number of bytes, got {header_length!r}") from None
    if length < 0:
        raise BadRequest(f"{HEADER_LENGTH} must not be negative, got {length}")
    if length > len(body):
        raise BadRequest(f"{HEADER_LENGTH} is {length}, but the body has only {len(body)} bytes")
    return body[:length], memoryview(body)[length:]


def carve(binary: memoryview, sizes: Sequence[tuple[str, int]]) -> dict[str, memoryview]:
    """Each binary input's bytes, in header order. The sizes must account for the binary part exactly: a shortfall
    or a surplus means the header and the data disagree, and guessing would feed the model shifted bytes."""
    parts, offset = {}, 0
    for name, size in sizes:
        if offset + size > len(binary):
            raise BadRequest(f"input '{name}': binary_data_size {size} goes past the end of the body "
                             f"({len(binary) - offset} bytes of binary data left)")
        parts[name] = binary[offset:offset + size]
        offset += size
    if offset != len(binary):
        raise BadRequest(f"the body has {len(binary) - offset} bytes of binary data after the last input's "
                         f"binary_data_size; check {HEADER_LENGTH} and the sizes")
    return parts


@dataclass
class EncodedResponse:
    """A V2 response: the JSON header, and the binary outputs that follow it."""
    header: dict
    binary: list[bytes]

    def to_response(self) -> Response:
        text = json.dumps(self.header, separators=(",", ":")).encode()
        if not self.binary:
            return Response(text, media_type=JSON_TYPE)
        return Response(b"".join([text, *self.binary]), media_type=BINARY_TYPE, headers={HEADER_LENGTH: str(len(text))})
