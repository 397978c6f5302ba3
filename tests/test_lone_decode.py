"""Where a request's images are decoded: a lone small image on the event loop (no thread hand-overs on the lone
request's path), anything else in the decode threads, so that the loop never pauses for long while others wait."""
from __future__ import annotations

import asyncio
import base64
import io
import threading
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

import imageprep
from service import inference
from service.errors import InvalidImage
from service.images import ImageLimits, ResizeSpec
from service.inference import INLINE_DECODE_MAX_PIXELS, RequestTiming, prepare_images
from service.state import ServiceState


def encoded(width: int, height: int, fmt: str = "JPEG") -> bytes:
    pixels = np.random.default_rng(width * height).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, fmt)
    return buffer.getvalue()


class Server:
    """What prepare_images reads from the service state and the model, with a real decode pool and counter."""

    def __init__(self) -> None:
        self.decode_pool = ThreadPoolExecutor(1, thread_name_prefix="decode")
        self.limits = ImageLimits()
        self.requests_at_work = 0
        self.model = SimpleNamespace(resize=ResizeSpec(32, 32))

    at_work = ServiceState.at_work
    alone_at_work = ServiceState.alone_at_work

    def decode(self, images: list, *, others_at_work: int = 0) -> tuple[list[str], list]:
        """Threads that decoded each image, and what prepare_images returned."""
        threads = []
        original = inference._decode_and_prepare

        def recording(*args, **kwargs):
            threads.append(threading.current_thread().name)
            return original(*args, **kwargs)

        async def request():
            with self.at_work():
                self.requests_at_work += others_at_work
                try:
                    return await prepare_images(self, self.model, images, timing=RequestTiming())
                finally:
                    self.requests_at_work -= others_at_work
        inference._decode_and_prepare = recording
        try:
            prepared = asyncio.run(request())
        finally:
            inference._decode_and_prepare = original
        return threads, prepared


@pytest.fixture
def server():
    server = Server()
    yield server
    server.decode_pool.shutdown()


def test_a_lone_small_image_is_decoded_on_the_event_loop_with_the_same_pixels(server):
    jpeg = encoded(320, 240)
    threads, prepared = server.decode([jpeg])
    assert threads == [threading.main_thread().name]
    expected = imageprep.prepare(jpeg, server.model.resize, server.limits)
    assert np.array_equal(prepared[0].pixels, expected)


@pytest.mark.parametrize("case", ["another request at work", "two images", "over the pixel bound", "base64 text"])
def test_anything_else_is_decoded_in_the_decode_threads(server, case):
    small = encoded(320, 240)
    side = int(INLINE_DECODE_MAX_PIXELS ** 0.5) + 1
    images, others = {
        "another request at work": ([small], 1),
        "two images": ([small, small], 0),
        "over the pixel bound": ([encoded(side, side, "PNG")], 0),
        "base64 text": ([base64.b64encode(small).decode()], 0),
    }[case]
    threads, prepared = server.decode(images, others_at_work=others)
    assert len(threads) == len(images) and all(name.startswith("decode") for name in threads)
    assert len(prepared) == len(images)


@pytest.mark.parametrize("case", ["truncated", "not an image"])
def test_a_broken_lone_image_is_refused_as_in_the_decode_threads(server, case):
    jpeg = encoded(320, 240)
    data = {"truncated": jpeg[:2000], "not an image": b"not an image"}[case]
    with pytest.raises(InvalidImage, match="image 0") as alone:
        server.decode([data])
    with pytest.raises(InvalidImage) as beside_another:
        server.decode([data], others_at_work=1)
    assert alone.value.index == 0 and str(alone.value) == str(beside_another.value)


def test_opening_reads_the_header_only_and_decoding_finishes_it():
    png = encoded(640, 480, "PNG")
    opened = imageprep.open_bytes(png)
    assert opened.size == (640, 480) and opened.tile  # tiles still to decode: nothing decoded yet
    assert np.array_equal(np.asarray(imageprep.decode_opened(opened)), np.asarray(imageprep.decode_bytes(png)))
