"""Errors over V2, in one place: the protocol's body `{"error": "<message>"}` with the service error's status, for
everything a V2 route raises (also FastAPI's own validation and HTTP errors, which would otherwise answer 422
`{"detail": ...}` that V2 clients cannot read)."""
from __future__ import annotations

import logging
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import BadRequest, ServiceError

log = logging.getLogger("vitserve")
PREFIX = "/v2"
# The protocol answers a bad request with 400; the vitserve API's 422 (a well-formed request with a bad value) is one.
_STATUS = {422: 400}


def v2_status(error: ServiceError) -> int:
    return _STATUS.get(error.status, error.status)


def v2_error_body(error: ServiceError) -> dict:
    return {"error": error.message}  # an image's errors name it ("image 2: ...") in the message itself


def error_body_for(path: str, error: ServiceError) -> dict:
    """The error body in the shape of the protocol `path` belongs to: for answers given before any route runs."""
    return v2_error_body(error) if path == PREFIX or path.startswith(PREFIX + "/") else error.body()


def v2_error_response(error: ServiceError) -> JSONResponse:
    return JSONResponse(v2_error_body(error), status_code=v2_status(error), headers=error.headers)


class V2Route(APIRoute):
    """A route whose every failure answers in the V2 error shape."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def handle(request: Request) -> Response:
            try:
                return await handler(request)
            except ServiceError as error:
                return v2_error_response(error)
            except RequestValidationError as error:
                return v2_error_response(BadRequest(str(error.errors())))
            except StarletteHTTPException as error:
                wrapped = ServiceError(str(error.detail), headers=dict(error.headers or {}))
                wrapped.status = error.status_code
                return v2_error_response(wrapped)
            except Exception:  # noqa: BLE001 - answered in the protocol's shape; the traceback goes to the log
                request_id = request.scope.get("state", {}).get("request_id", "?")
                log.exception("unexpected error in V2 request %s", request_id)
                return v2_error_response(ServiceError(f"unexpected error; see the server log for request {request_id}"))

        return handle
