"""The requests of the `v2` and `v2-bytes` contenders: Open Inference Protocol (KServe V2) inference requests with
Triton's binary tensor data extension, as tritonclient sends them by default. Each body is a JSON header followed by
the input tensor's bytes; `Inference-Header-Content-Length` says where the header ends and the input's
`binary_data_size` how many bytes it has. Built once per image and replayed by the load generator.

The binary layout is written here from the protocol, not taken from the service's own decoder, so that a mistake on
either side shows up as an error instead of cancelling out. The answer asked for is the one /classify gives by
default: the top classes of the `logits` output (Triton's classification extension), in JSON."""
from __future__ import annotations

import json
import struct

import numpy as np

from modelrepo.names import IMAGES, LOGITS
from service.schemas import ClassifyParams
from service.v2.binary import HEADER_LENGTH
from service.v2.metadata import IMAGE_BYTES

from .loadgen import HttpRequest

TOP_K = ClassifyParams.model_fields["top_k"].default  # what /classify answers when not asked otherwise
BYTES_LENGTH = struct.Struct("<I")  # a binary BYTES element: its length, 4 bytes little-endian, then its bytes


def pixels_request(model: str, pixels: np.ndarray) -> HttpRequest:
    """One image already at the model's size, (H, W, 3) uint8, as the [1, H, W, 3] UINT8 `images` tensor."""
    batch = np.ascontiguousarray(pixels, dtype=np.uint8)[None]
    return _binary_request(model, {"name": IMAGES, "datatype": "UINT8", "shape": list(batch.shape)}, batch.tobytes())


def bytes_request(model: str, image: bytes) -> HttpRequest:
    """One encoded image (the JPEG /classify receives) as the [1] BYTES `image_bytes` tensor."""
    return _binary_request(model, {"name": IMAGE_BYTES, "datatype": "BYTES", "shape": [1]},
                           BYTES_LENGTH.pack(len(image)) + image)


def _binary_request(model: str, tensor: dict, data: bytes) -> HttpRequest:
    header = {"inputs": [{**tensor, "parameters": {"binary_data_size": len(data)}}],
              "outputs": [{"name": LOGITS, "parameters": {"classification": TOP_K}}]}
    text = json.dumps(header, separators=(",", ":")).encode()
    return HttpRequest(f"/v2/models/{model}/infer", text + data, "application/octet-stream",
                       ((HEADER_LENGTH, str(len(text))),))
