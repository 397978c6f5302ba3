"""The Open Inference Protocol over gRPC: `inference.GRPCInferenceService` (ServerLive, ServerReady, ModelReady,
ServerMetadata, ModelMetadata, ModelInfer; RepositoryIndex, RepositoryModelLoad, RepositoryModelUnload) on its own port, served by grpc.aio in the process and event loop of the
HTTP server, on the same models, task handlers, batchers, limits, deadlines and metrics as V2 over REST (infer.py).

Started and stopped by the app's lifespan (service/api.py): on SIGTERM the calls in flight finish (up to the drain
timeout) before the batchers drain; calls that arrive meanwhile get UNAVAILABLE, as REST answers 503. The largest
message is the largest HTTP body (max_body_bytes). Failures are the service's exception types with their messages,
each mapped to a gRPC status code in one place (STATUS_CODES); the API key, when set, goes in the `authorization`
(Bearer) or `x-api-key` metadata, and the health methods stay open as the REST probes do. Metrics and the access log
are those of HTTP requests, with the method's path as the route, GRPC as the method, and the status its HTTP
equivalent (so that the dashboards' error rates count gRPC too).

This module imports grpc: it is imported only when the gRPC port is set (the `grpc` extra)."""
from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Awaitable, Callable

import grpc

from ..errors import NotFound, NotReady, ServiceError, Unauthorized
from ..middleware import WRONG_KEY, api_key_given, key_matches, observe_request, request_id_from
from ..state import ServiceState
from .grpc_codec import (infer_response, inference_request, model_metadata_response, tensor_data, typed_elements,
                         uses_raw_contents)
from .grpc_schema import METHODS, SERVICE, message_class
from .infer import LARGE_JSON_OUTPUT_ELEMENTS, infer_tensors, run, served_model
from .metadata import model_metadata, server_metadata
from .repository import check_control_parameters

log = logging.getLogger("vitserve")
Code = grpc.StatusCode
# The service errors' HTTP statuses as gRPC codes. 413 (a request over a limit) is RESOURCE_EXHAUSTED, as gRPC itself
# answers a message over the size limit; 503 (not ready, shutting down, queue full) is UNAVAILABLE, which clients retry.
STATUS_CODES = {400: Code.INVALID_ARGUMENT, 401: Code.UNAUTHENTICATED, 404: Code.NOT_FOUND, 405: Code.UNIMPLEMENTED,
                406: Code.INVALID_ARGUMENT, 413: Code.RESOURCE_EXHAUSTED, 415: Code.INVALID_ARGUMENT,
                409: Code.FAILED_PRECONDITION, 422: Code.INVALID_ARGUMENT, 500: Code.INTERNAL, 503: Code.UNAVAILABLE, 504: Code.DEADLINE_EXCEEDED}
OPEN_METHODS = {"ServerLive", "ServerReady"}  # probes: open without an API key, as /v2/health/*
CANCELLED = 499  # the metrics' status of a call the client cancelled ("client closed request", as nginx counts it)
# Typed contents are Python numbers: converting 16 Ki of them held the event loop for 0.7 ms (this 2-core machine).
LARGE_TYPED_ELEMENTS = 16 * 1024
RESPONSE = {method: message_class(response) for method, (_, response) in METHODS.items()}


class GrpcStartError(RuntimeError):
    """The gRPC port cannot be listened on."""


class InferenceService:
    """The methods, each `async (request message, context) -> response message`."""

    def __init__(self, state: ServiceState) -> None:
        self.state = state

    async def ServerLive(self, request, context):
        return RESPONSE["ServerLive"](live=True)

    async def ServerReady(self, request, context):
        return RESPONSE["ServerReady"](ready=self.state.ready)

    async def ModelReady(self, request, context):
        try:
            served_model(self.state, request.name, request.version or None)
        except (NotFound, NotReady):  # a question with a yes/no answer: not served is "not ready"
            return RESPONSE["ModelReady"](ready=False)
        return RESPONSE["ModelReady"](ready=True)

    async def ServerMetadata(self, request, context):
        return RESPONSE["ServerMetadata"](**server_metadata())

    async def ModelMetadata(self, request, context):
        model = served_model(self.state, request.name, request.version or None)
        return model_metadata_response(model_metadata(model, self.state.control.served_versions(model.name)))

    async def ModelInfer(self, request, context):
        arrived = time.monotonic()
        state = self.state
        with served_model(state, request.model_name, request.model_version or None).lease() as model:
            return await self._infer(request, context, model, arrived)

    async def _infer(self, request, context, model, arrived: float):
        state = self.state
        parsed = inference_request(request)
        remaining_s = context.time_remaining()  # the client's deadline, when it set one
        plans, outputs = await infer_tensors(
            state, model, parsed, lambda given: tensor_data(request, given),
            off_loop=typed_elements(request) > LARGE_TYPED_ELEMENTS, arrived=arrived, is_disconnected=None,
            timeout_ms=math.ceil(remaining_s * 1000) if remaining_s is not None else None)
        raw = uses_raw_contents(request)
        typed_out = 0 if raw else sum(outputs[0][plan.name].size for plan in plans) * len(outputs)
        return await run(state, typed_out > LARGE_JSON_OUTPUT_ELEMENTS,
                         lambda: infer_response(parsed, model, plans, outputs, raw))


    async def RepositoryIndex(self, request, context):
        rows = self.state.control.index(ready_only=request.ready)
        return RESPONSE["RepositoryIndex"](models=rows)

    async def RepositoryModelLoad(self, request, context):
        check_control_parameters(request.parameters, "load")
        await self.state.control.load(request.model_name)
        return RESPONSE["RepositoryModelLoad"]()

    async def RepositoryModelUnload(self, request, context):
        check_control_parameters(request.parameters, "unload")
        await self.state.control.unload(request.model_name)
        return RESPONSE["RepositoryModelUnload"]()


class CallsInFlight:
    """How many calls are being answered, and a way to wait until none is."""

    def __init__(self) -> None:
        self.count = 0
        self._none = asyncio.Event()
        self._none.set()

    @contextlib.contextmanager
    def one(self):
        self.count += 1
        self._none.clear()
        try:
            yield
        finally:
            self.count -= 1
            if self.count == 0:
                self._none.set()

    async def finished(self, timeout_s: float) -> bool:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._none.wait(), timeout_s)
        return self.count == 0


def service_handler(state: ServiceState, in_flight: CallsInFlight) -> grpc.GenericRpcHandler:
    service = InferenceService(state)
    api_key = state.settings.api_key.get_secret_value().encode() if state.settings.api_key else None
    handlers = {}
    for method, (request_type, response_type) in METHODS.items():
        call = _observed(state, in_flight, method, getattr(service, method),
                         api_key if method not in OPEN_METHODS else None)
        handlers[method] = grpc.unary_unary_rpc_method_handler(
            call, request_deserializer=message_class(request_type).FromString,
            response_serializer=message_class(response_type).SerializeToString)
    return grpc.method_handlers_generic_handler(SERVICE, handlers)


def _observed(state: ServiceState, in_flight: CallsInFlight, method: str, function: Callable[..., Awaitable],
              api_key: bytes | None):
    """`function` with what every call gets: the API key check, errors as status codes with the service's
    messages, the request id (metadata `x-request-id`, echoed in the trailers), metrics and one access line."""
    route = f"/{SERVICE}/{method}"

    async def call(request, context):
        with in_flight.one():
            return await answer(request, context)

    async def answer(request, context):
        started = time.perf_counter()
        metadata = {key: value for key, value in context.invocation_metadata() or () if isinstance(value, str)}
        request_id = request_id_from(metadata.get("x-request-id", ""))
        trailers = [("x-request-id", request_id)]

        def observe(status: int) -> None:
            elapsed = time.perf_counter() - started
            observe_request(state.metrics, request_id, "GRPC", route, route, status, elapsed, _client(context.peer()))

        try:
            if api_key is not None and not key_matches(api_key_given(metadata), api_key):
                raise Unauthorized(WRONG_KEY)
            response = await function(request, context)
        except ServiceError as error:
            status, code, message = error.status, STATUS_CODES.get(error.status, Code.INTERNAL), error.message
            trailers += [(name.lower(), value) for name, value in error.headers.items()]  # Retry-After of a full queue
        except asyncio.CancelledError:  # the client went away (or its deadline passed): its queued images went too
            observe(CANCELLED)
            raise
        except Exception:  # noqa: BLE001 - answered with a status; the traceback goes to the log
            log.exception("unexpected error in gRPC request %s", request_id)
            status, code, message = 500, Code.INTERNAL, f"unexpected error; see the server log for request {request_id}"
        else:
            observe(200)
            context.set_trailing_metadata(trailers)
            return response
        # Counted before the status leaves: abort sends it at once, and a client may read /metrics right after.
        observe(status)
        await context.abort(code, message, tuple(trailers))

    return call


def _client(peer: str | None) -> str:
    """'ipv4:127.0.0.1:5050' -> '127.0.0.1'; 'ipv6:[::1]:5050' -> '::1'."""
    if not peer or ":" not in peer:
        return "-"
    address = peer.split(":", 1)[1]
    return address.rsplit(":", 1)[0].strip("[]") if peer.startswith(("ipv4:", "ipv6:")) else address


class GrpcServer:
    """The gRPC server of one app, started and stopped by its lifespan."""

    def __init__(self, state: ServiceState) -> None:
        settings = self.settings = state.settings
        self.state, self.in_flight = state, CallsInFlight()
        # No SO_REUSEPORT: a port already taken must be an error, not a port silently shared with another process.
        options = [("grpc.max_receive_message_length", settings.max_body_bytes), ("grpc.so_reuseport", 0)]
        self.server = grpc.aio.server(options=options)
        self.server.add_generic_rpc_handlers((service_handler(state, self.in_flight),))
        host = f"[{settings.host}]" if ":" in settings.host else settings.host
        self.address = f"{host}:{settings.grpc_port}"

    async def start(self) -> None:
        try:
            self.server.add_insecure_port(self.address)
        except RuntimeError as error:
            raise GrpcStartError(f"cannot listen for gRPC on {self.address} (is the port in use?): {error}") from None
        await self.server.start()
        log.info("Open Inference Protocol over gRPC on %s (largest message %d bytes)", self.address,
                 self.settings.max_body_bytes)

    async def stop(self, grace_s: float) -> None:
        """Let the calls in flight finish (up to `grace_s`), then stop. Meanwhile the server still answers: new calls
        get UNAVAILABLE "the server is shutting down" from the handlers, as REST answers 503 while draining; grpc's
        own stop would end them as CANCELLED, which clients do not retry."""
        self.state.draining = True
        started = time.monotonic()
        if not await self.in_flight.finished(grace_s):
            log.warning("gRPC: %d calls still running after %gs; cancelling them", self.in_flight.count, grace_s)
        await self.server.stop(max(0.0, grace_s - (time.monotonic() - started)) or None)


async def start_grpc_server(state: ServiceState) -> GrpcServer:
    server = GrpcServer(state)
    await server.start()
    return server
