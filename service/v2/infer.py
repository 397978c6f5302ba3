"""POST /v2/models/{name}[/versions/{v}]/infer, top-down: body -> JSON header and binary part -> checks (outputs,
inputs, limits, queue admission) -> tensors -> images (pixels as sent, or decoded like /classify) -> the task
handler's batch work -> the model's batcher under the request's deadline -> the V2 response. The same handlers,
batchers, limits, deadlines and metrics as the vitserve API."""
from __future__ import annotations

import asyncio
import functools
import math
from collections.abc import Callable
from typing import TypeVar

from fastapi import Request
from fastapi.responses import Response

from ..errors import NotFound, NotReady
from ..inference import infer, prepare_images
from ..state import ServedModel, ServiceState
from ..tasks import PreparedImage
from .binary import HEADER_LENGTH, decoded_body, split_body
from .inputs import batch_work, check_inputs, convert_inputs
from .messages import int_parameter, parse_request
from .outputs import encode_response, plan_outputs

T = TypeVar("T")
# Large JSON (a header carrying pixel data, a response carrying patches) is read or written in the decode threads, so
# that one such request does not hold up every other one on the event loop. Each limit is about 1 ms of the loop's
# time on this project's 2-core machine (reading 64 KiB of numbers into arrays; json.dumps of 1024 floats), far more
# than the hop to a thread.
LARGE_JSON_BYTES = 64 * 1024
LARGE_JSON_OUTPUT_ELEMENTS = 1024


def served_model(state: ServiceState, name: str, version: str | None) -> ServedModel:
    """The served model `name`; 404 for another name or a version that is not the one served."""
    if state.draining:
        raise NotReady("the server is shutting down")
    model = state.models.get(name)
    if model is None:
        served = ", ".join(sorted(state.models)) or "none"
        problems = f"; not served: {'; '.join(state.problems)}" if state.problems else ""
        raise NotFound(f"unknown model '{name}' (served: {served}){problems}")
    if version is not None and version != str(model.version):
        raise NotFound(f"model '{name}' has no version '{version}' being served; the served version is {model.version}")
    return model


async def serve_infer(request: Request, state: ServiceState, name: str, version: str | None) -> Response:
    model = served_model(state, name, version)
    settings = state.settings
    body = decoded_body(await request.body(), request.headers.get("content-encoding"), settings.max_body_bytes)
    header_length = request.headers.get(HEADER_LENGTH)
    header, binary = split_body(body, header_length)
    has_binary_part = header_length is not None
    large = len(header) > LARGE_JSON_BYTES

    parsed = await _run(state, large, parse_request, header, has_binary_part)
    plans = plan_outputs(parsed, model)
    given, batch = check_inputs(parsed, model, settings.max_images_per_request)
    model.batcher.check_capacity(batch)  # refused now, before any tensor is converted or image decoded
    inputs = await _run(state, large, convert_inputs, parsed, given, batch, binary, has_binary_part, model)
    if inputs.pixels is not None:
        images = [PreparedImage(pixels) for pixels in inputs.pixels]
    else:
        images = await prepare_images(state, model, inputs.encoded)
    work = batch_work(model, inputs, images)
    outputs = await infer(request, state, model, work.items, _timeout_ms(parsed.parameters), work.batch_key)

    json_elements = sum(outputs[0][plan.name].size for plan in plans if not plan.binary) * len(outputs)
    return await _run(state, json_elements > LARGE_JSON_OUTPUT_ELEMENTS,
                      lambda: encode_response(parsed, model, plans, outputs).to_response())


def _timeout_ms(parameters: dict) -> int | None:
    """Triton's `timeout` request parameter, in microseconds (0: none); the server's deadline still caps it."""
    microseconds = int_parameter(parameters, "timeout", "request")
    return math.ceil(microseconds / 1000) if microseconds else None


async def _run(state: ServiceState, off_loop: bool, function: Callable[..., T], *args) -> T:
    if not off_loop:
        return function(*args)
    return await asyncio.get_running_loop().run_in_executor(state.decode_pool, functools.partial(function, *args))
