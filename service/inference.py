"""The request path of a task endpoint, top-down: route -> task handler -> batcher -> runtime -> task handler -> response."""
from __future__ import annotations

import asyncio
import dataclasses
import functools
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from fastapi import Request
from fastapi.responses import Response
from PIL import Image

from .batching import BatchTiming
from .errors import DeadlineExceeded
from .http_protocol import CLIENT_GONE
from .images import decode_base64_image, open_image, prepare_image, prepare_image_with_source
from .request_parsing import read_request
from .state import ServedModel, ServiceState
from .tasks import PreparedImage, TaskHandler

T = TypeVar("T")


async def serve_task(request: Request, state: ServiceState, handler: TaskHandler) -> Response:
    arrived = request.scope["state"]["arrived"]
    images, params = await within_server_deadline(
        state, arrived, read_request(request, state.settings.max_images_per_request, handler.params_type))
    media_type = handler.media_type(request.headers.get("accept", ""), len(images))
    timing = RequestTiming()
    with state.model_for(handler.task, params.model, params.version).lease() as model, state.at_work():  # until answered
        deadline = request_deadline(state, params.timeout_ms, arrived=arrived)
        with model.batcher.admit(len(images), deadline) as admission:  # refused now, before any decoding
            prepared = await prepare_images(state, model, images, keep_source=handler.keeps_source(params), timing=timing)
            work = handler.batch_work(prepared, params, model)
            outputs = await model.batcher.submit(work.items, deadline=deadline, is_disconnected=disconnect_probe(request),
                                                 batch_key=work.batch_key, admission=admission, timing=timing.batch)
        if handler.responds_off_loop(params):
            response = await asyncio.get_running_loop().run_in_executor(
                state.decode_pool, handler.respond, model, params, prepared, outputs, media_type)
        else:
            response = handler.respond(model, params, prepared, outputs, media_type)
    timing.add_header(response, arrived)
    return response


@dataclasses.dataclass
class RequestTiming:
    """Where one request's time went, for the W3C Server-Timing header of its answer (milliseconds; browsers'
    developer tools chart it): decoding and resizing its images, waiting for a batch, the runtime's time for its
    batches, and all of it from the request's arrival to the answer made. What the total leaves over is HTTP, parsing,
    the answer and the hand-overs between threads."""

    decode_s: float = 0.0
    batch: BatchTiming = dataclasses.field(default_factory=BatchTiming)

    def add_header(self, response: Response, arrived: float) -> None:
        """`arrived`: the request's time.monotonic() arrival (its scope state's)."""
        response.headers["Server-Timing"] = (
            f"decode;dur={self.decode_s * 1e3:.2f}, queue;dur={self.batch.queued_s * 1e3:.2f}, "
            f"inference;dur={self.batch.inference_s * 1e3:.2f}, total;dur={(time.monotonic() - arrived) * 1e3:.2f}")


def disconnect_probe(request: Request) -> Callable[[], Awaitable[bool]]:
    """How the batcher asks whether a queued request's client has gone: our protocol's flag when it serves the
    request (service.http_protocol), else Starlette's probe (an in-process ASGI client)."""
    client_gone = request.scope["state"].get(CLIENT_GONE)
    if client_gone is None:
        return request.is_disconnected

    async def probe() -> bool:
        return client_gone()
    return probe


# A lone request's image is decoded on the event loop when it is small. Nothing else is waiting for the loop then, and
# the hand-over to a decode thread and back costs a lone request about 0.3 ms (two thread wake-ups; ViT-Tiny at c=1 on
# 2 vCPUs: 3.1 -> 2.8 ms over the runtime's own latency, docs/performance.md). The bounds keep the loop's pause short
# for a request that arrives meanwhile: a 512x512 PNG takes about 3 ms, a 320x240 JPEG 1.
INLINE_DECODE_MAX_PIXELS = 512 * 512
INLINE_DECODE_MAX_BYTES = 256 * 1024


async def prepare_images(state: ServiceState, model: ServedModel, images: list[bytes | str],
                         keep_source: bool = False, timing: RequestTiming | None = None) -> list[PreparedImage]:
    """Decode and resize every image in the decode threads (a lone small image on the loop, see above); the
    lowest-index failure is reported and nothing is inferred. Callers admit the request on the model's batcher and
    count it at work (`ServiceState.at_work`) first. `timing` learns how long it took."""
    started = time.perf_counter()
    lone = _open_lone_image(state, images)
    if lone is not None and lone.width * lone.height <= INLINE_DECODE_MAX_PIXELS:
        results = [_decode_and_prepare(lone, model, state, 0, keep_source)]
    else:
        results = await _decode_in_threads(state, model, images if lone is None else [lone], keep_source)
    if timing is not None:
        timing.decode_s = time.perf_counter() - started
    return results


def _open_lone_image(state: ServiceState, images: list[bytes | str]) -> Image.Image | None:
    """A lone request's one image, opened (its header read and checked: an error is the request's answer);
    None for any other request, decoded in the threads as it came."""
    # base64 text is decoded in the threads, where its errors are reported
    if len(images) != 1 or isinstance(images[0], str) or len(images[0]) > INLINE_DECODE_MAX_BYTES or not state.alone_at_work:
        return None
    return open_image(images[0], state.limits, index=0)


async def _decode_in_threads(state: ServiceState, model: ServedModel, images: list[bytes | str],
                             keep_source: bool) -> list[PreparedImage]:
    loop = asyncio.get_running_loop()
    jobs = [loop.run_in_executor(state.decode_pool, functools.partial(_decode_and_prepare, data, model, state, i, keep_source))
            for i, data in enumerate(images)]
    results = await asyncio.gather(*jobs, return_exceptions=True)
    failure = next((result for result in results if isinstance(result, BaseException)), None)
    if failure is not None:
        try:
            raise failure
        finally:  # the traceback holds this frame: locals reaching the exception (its future too) would make a cycle
            del failure, results, jobs
    return results


def _decode_and_prepare(data: bytes | str | Image.Image, model: ServedModel, state: ServiceState, index: int,
                        keep_source: bool) -> PreparedImage:
    raw = decode_base64_image(data, index=index) if isinstance(data, str) else data
    if keep_source:
        return PreparedImage(*prepare_image_with_source(raw, model.resize, state.limits, index=index))
    return PreparedImage(prepare_image(raw, model.resize, state.limits, index=index))


async def within_server_deadline(state: ServiceState, arrived: float, reading: Awaitable[T]) -> T:
    """`reading` (a request's body), bounded by the server's deadline counted from the request's arrival: a body
    that trickles in must not hold its connection longer (504)."""
    try:
        async with asyncio.timeout(request_deadline(state, None, arrived=arrived) - time.monotonic()):
            return await reading
    except TimeoutError:
        raise DeadlineExceeded("the request's body did not arrive before its deadline") from None


def request_deadline(state: ServiceState, timeout_ms: int | None, *, arrived: float) -> float:
    """A request's deadline, a time.monotonic() value: `timeout_ms` (the request's own, if any) from its arrival,
    capped by the server's."""
    budget_ms = min(timeout_ms or state.settings.timeout_ms, state.settings.timeout_ms)
    return arrived + budget_ms / 1000
