"""POST /v2/models/{name}[/versions/{v}]/infer, top-down: body -> JSON header and binary part -> checks (outputs,
inputs, limits, queue admission) -> tensors -> images (pixels as sent, or decoded like /classify) -> the task
handler's batch work -> the model's batcher under the request's deadline -> the V2 response. The same handlers,
batchers, limits, deadlines and metrics as the vitserve API. The middle (`infer_tensors`, from the checks to the
batcher) is shared with gRPC (grpc_service.py); only reading the body and writing the answer are REST's."""
from __future__ import annotations

import asyncio
import functools
import math
from collections.abc import Awaitable, Callable
from typing import TypeVar

from fastapi import Request
from fastapi.responses import Response

from ..errors import NotFound, NotReady
from ..inference import RequestTiming, disconnect_probe, prepare_images, request_deadline, within_server_deadline
from ..state import ServedModel, ServiceState
from ..tasks import PreparedImage
from ..tasks.base import Item
from .binary import HEADER_LENGTH, decoded_body, split_body
from .inputs import batch_work, check_inputs, model_inputs, tensor_data
from .messages import InferenceRequest, RequestInput, int_parameter, parse_request
from .outputs import OutputPlan, encode_response, plan_outputs

T = TypeVar("T")
# Large JSON (a header carrying pixel data, a response carrying patches) is read or written in the decode threads, so
# that one such request does not hold up every other one on the event loop. Each limit is about 1 ms of the loop's
# time on this project's 2-core machine (reading 64 KiB of numbers into arrays; json.dumps of 1024 floats), far more
# than the hop to a thread.
LARGE_JSON_BYTES = 64 * 1024
LARGE_JSON_OUTPUT_ELEMENTS = 1024


def served_model(state: ServiceState, name: str, version: str | None) -> ServedModel:
    """The served model `name`, at `version` or its newest; 404 for another name or a version not served."""
    if state.draining:
        raise NotReady("the server is shutting down")
    if version is not None and not (version.isascii() and version.isdigit()):
        raise NotFound(f"model '{name}' has no version '{version}': versions are numbers")
    return state.control.version(name, int(version) if version is not None else None)


async def serve_infer(request: Request, state: ServiceState, name: str, version: str | None) -> Response:
    served_model(state, name, version)  # an unknown model is refused before its body is read
    raw = await within_server_deadline(state, request.scope["state"]["arrived"], request.body())
    body = decoded_body(raw, request.headers.get("content-encoding"), state.settings.max_body_bytes)
    # Leased once the body is in (as the task routes do): a slow upload must not hold a version that is being replaced.
    with served_model(state, name, version).lease() as model:
        return await _serve_infer(request, state, model, body)


async def _serve_infer(request: Request, state: ServiceState, model: ServedModel, body: bytes) -> Response:
    header_length = request.headers.get(HEADER_LENGTH)
    header, binary = split_body(body, header_length)
    has_binary_part = header_length is not None
    large = len(header) > LARGE_JSON_BYTES

    parsed = await run(state, large, parse_request, header, has_binary_part)
    arrived, timing = request.scope["state"]["arrived"], RequestTiming()
    plans, outputs = await infer_tensors(state, model, parsed, lambda given: tensor_data(given, binary, has_binary_part),
                                         off_loop=large, arrived=arrived, is_disconnected=disconnect_probe(request),
                                         timing=timing)
    json_elements = sum(outputs[0][plan.name].size for plan in plans if not plan.binary) * len(outputs)
    response = await run(state, json_elements > LARGE_JSON_OUTPUT_ELEMENTS,
                         lambda: encode_response(parsed, model, plans, outputs).to_response())
    timing.add_header(response, arrived)
    return response


async def infer_tensors(state: ServiceState, model: ServedModel, parsed: InferenceRequest,
                        read_tensors: Callable[[dict[str, RequestInput]], dict], *, off_loop: bool, arrived: float,
                        is_disconnected: Callable[[], Awaitable[bool]] | None,
                        timeout_ms: int | None = None, timing: RequestTiming | None = None,
                        ) -> tuple[list[OutputPlan], list[Item]]:
    """The middle of an inference, for any protocol: checks (outputs, inputs, limits, queue admission), the protocol's
    `read_tensors` (each checked input's data), images, the model's batcher. `timeout_ms`: the protocol's own deadline
    (a gRPC deadline), besides Triton's `timeout` parameter; the server's caps both. `timing` learns where the time
    went (decoding stays 0 for pixels sent as they are)."""
    plans = plan_outputs(parsed, model)
    given, batch = check_inputs(parsed, model, state.settings.max_images_per_request)
    budgets = [ms for ms in (_timeout_ms(parsed.parameters), timeout_ms) if ms]
    deadline = request_deadline(state, min(budgets, default=None), arrived=arrived)
    # refused now, before any tensor is converted or image decoded
    with model.batcher.admit(batch, deadline) as admission, state.at_work():
        inputs = await run(state, off_loop, lambda: model_inputs(parsed, read_tensors(given), batch, model))
        if inputs.pixels is not None:
            images = [PreparedImage(pixels) for pixels in inputs.pixels]
        else:
            images = await prepare_images(state, model, inputs.encoded, timing=timing)
        work = batch_work(model, inputs, images)
        outputs = await model.batcher.submit(work.items, deadline=deadline, is_disconnected=is_disconnected,
                                             batch_key=work.batch_key, admission=admission,
                                             timing=timing.batch if timing is not None else None)
    return plans, outputs


def _timeout_ms(parameters: dict) -> int | None:
    """Triton's `timeout` request parameter, in microseconds (0: none); the server's deadline still caps it."""
    microseconds = int_parameter(parameters, "timeout", "request")
    return math.ceil(microseconds / 1000) if microseconds else None


async def run(state: ServiceState, off_loop: bool, function: Callable[..., T], *args) -> T:
    """`function(*args)`, in the decode threads when `off_loop` (large work that would hold up the event loop)."""
    if not off_loop:
        return function(*args)
    return await asyncio.get_running_loop().run_in_executor(state.decode_pool, functools.partial(function, *args))
