"""Schemathesis hooks for tests/test_openapi.py (loaded through SCHEMATHESIS_HOOKS): image fields get real image
files most of the time, so fuzzed requests reach the model, and sometimes the fuzzer's own bytes."""
import base64
import io

import numpy as np
import schemathesis
from hypothesis import strategies as st
from PIL import Image


def image_file(width: int, height: int, seed: int, fmt: str) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt)
    return buffer.getvalue()


IMAGE_FILES = st.one_of(
    st.builds(image_file, st.integers(1, 48), st.integers(1, 48), st.integers(0, 2**16), st.sampled_from(["PNG", "JPEG"])),
    st.binary(max_size=64))

# multipart `file` parts are `format: binary`, JSON `images` are `format: byte` (base64)
schemathesis.openapi.format("binary", IMAGE_FILES)
schemathesis.openapi.format("byte", IMAGE_FILES.map(lambda data: base64.b64encode(data).decode("ascii")))


@schemathesis.hook
def filter_case(context, case) -> bool:
    """The API refuses a parameter given both in the query string and in the body (the schema says so in words
    only): such requests would test nothing else, so they are not sent."""
    body = case.body if isinstance(case.body, dict) else {}
    return not set(case.query or {}) & set(body)
