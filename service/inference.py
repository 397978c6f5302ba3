"""The request path of a task endpoint, top-down: route -> task handler -> batcher -> runtime -> task handler -> response."""
from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable, Callable

from fastapi import Request
from fastapi.responses import Response

from .images import decode_base64_image, prepare_image, prepare_image_with_source
from .request_parsing import read_request
from .state import ServedModel, ServiceState
from .tasks import PreparedImage, TaskHandler
from .tasks.base import Item


async def serve_task(request: Request, state: ServiceState, handler: TaskHandler) -> Response:
    images, params = await read_request(request, state.settings.max_images_per_request, handler.params_type)
    media_type = handler.media_type(request.headers.get("accept", ""), len(images))
    with state.model_for(handler.task, params.model, params.version).lease() as model:  # held until answered
        prepared = await prepare_images(state, model, images, keep_source=handler.keeps_source(params))
        work = handler.batch_work(prepared, params, model)
        outputs = await infer(request, state, model, work.items, params.timeout_ms, work.batch_key)
        if handler.respond_off_loop:
            return await asyncio.get_running_loop().run_in_executor(
                state.decode_pool, handler.respond, model, params, prepared, outputs, media_type)
        return handler.respond(model, params, prepared, outputs, media_type)


async def prepare_images(state: ServiceState, model: ServedModel, images: list[bytes | str],
                         keep_source: bool = False) -> list[PreparedImage]:
    """Decode and resize every image in the decode threads; the lowest-index failure is reported and nothing is inferred.

    Refuses at once, before any decoding, when the model's queue cannot take this many images now."""
    model.batcher.check_capacity(len(images))
    loop = asyncio.get_running_loop()
    jobs = [loop.run_in_executor(state.decode_pool, functools.partial(_decode_and_prepare, data, model, state, i, keep_source))
            for i, data in enumerate(images)]
    results = await asyncio.gather(*jobs, return_exceptions=True)
    for result in results:
        if isinstance(result, BaseException):
            raise result
    return results


def _decode_and_prepare(data: bytes | str, model: ServedModel, state: ServiceState, index: int,
                        keep_source: bool) -> PreparedImage:
    raw = decode_base64_image(data, index=index) if isinstance(data, str) else data
    if keep_source:
        return PreparedImage(*prepare_image_with_source(raw, model.resize, state.limits, index=index))
    return PreparedImage(prepare_image(raw, model.resize, state.limits, index=index))


async def infer(request: Request, state: ServiceState, model: ServedModel, items: list[Item], timeout_ms: int | None,
                batch_key=None) -> list[Item]:
    """Queue the items on the model's batcher under the request's deadline (counted from its arrival)."""
    return await submit(state, model, items, timeout_ms, arrived=request.scope["state"]["arrived"],
                        is_disconnected=request.is_disconnected, batch_key=batch_key)


async def submit(state: ServiceState, model: ServedModel, items: list[Item], timeout_ms: int | None, *, arrived: float,
                 is_disconnected: Callable[[], Awaitable[bool]] | None, batch_key=None) -> list[Item]:
    """`infer` for any protocol: `arrived` is the request's time.monotonic() at arrival; the server's deadline caps
    the request's own."""
    budget_ms = min(timeout_ms or state.settings.timeout_ms, state.settings.timeout_ms)
    return await model.batcher.submit(items, deadline=arrived + budget_ms / 1000, is_disconnected=is_disconnected,
                                      batch_key=batch_key)
