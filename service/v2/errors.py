"""Errors over V2, in one place: the protocol's body `{"error": "<message>"}` with the service error's status. The
app's error handlers (service/api.py) and the middleware answer every failure under /v2 in this shape (also FastAPI's
own validation and HTTP errors, which would otherwise answer 422 `{"detail": ...}` that V2 clients cannot read)."""
from __future__ import annotations

import logging

from fastapi.responses import JSONResponse

from ..errors import ServiceError

log = logging.getLogger("vitserve")
PREFIX = "/v2"
# The protocol answers a bad request with 400; the vitserve API's 422 (a well-formed request with a bad value) is one.
_STATUS = {422: 400}


def v2_status(error: ServiceError) -> int:
    return _STATUS.get(error.status, error.status)


def v2_error_body(error: ServiceError) -> dict:
    return {"error": error.message}  # an image's errors name it ("image 2: ...") in the message itself


def is_v2_path(path: str) -> bool:
    return path == PREFIX or path.startswith(PREFIX + "/")


def error_body_for(path: str, error: ServiceError) -> dict:
    """The error body in the shape of the protocol `path` belongs to: for answers given before any route runs."""
    return v2_error_body(error) if is_v2_path(path) else error.body()


def v2_error_response(error: ServiceError) -> JSONResponse:
    return JSONResponse(v2_error_body(error), status_code=v2_status(error), headers=error.headers)
