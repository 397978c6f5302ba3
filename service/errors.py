"""The service's error types: each names its HTTP status and error type once; `api.py` turns any of
them into the one JSON envelope `{"error": {"type": ..., "message": ..., ["index": N]}}`."""
from __future__ import annotations


class ServiceError(Exception):
    status = 500
    type = "internal_error"

    def __init__(self, message: str, *, index: int | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.index = index  # which image of a multi-image request, when one is to blame
        self.headers = headers or {}

    def body(self) -> dict:
        error: dict = {"type": self.type, "message": self.message}
        if self.index is not None:
            error["index"] = self.index
        return {"error": error}


class InvalidImage(ServiceError):
    status, type = 400, "invalid_image"


class BadRequest(ServiceError):
    status, type = 400, "bad_request"


class Unauthorized(ServiceError):
    status, type = 401, "unauthorized"


class NotFound(ServiceError):
    status, type = 404, "not_found"


class MethodNotAllowed(ServiceError):
    status, type = 405, "method_not_allowed"


class NotAcceptable(ServiceError):
    status, type = 406, "not_acceptable"


class Conflict(ServiceError):
    """The request is valid but not in the server's present configuration (e.g. loading models in poll mode)."""

    status, type = 409, "conflict"


class PayloadTooLarge(ServiceError):
    status, type = 413, "payload_too_large"


class UnsupportedMediaType(ServiceError):
    status, type = 415, "unsupported_media_type"


class InvalidParameter(ServiceError):
    status, type = 422, "invalid_parameter"


class Overloaded(ServiceError):
    """The queue is full, or would make the request wait too long: refused at once, with a hint when to come back.
    `reason` labels the refusal in metrics: queue_full | queue_delay | deadline_unreachable."""

    status, type = 503, "overloaded"

    def __init__(self, message: str, *, retry_after_s: int = 1, reason: str = "queue_full") -> None:
        super().__init__(message, headers={"Retry-After": str(retry_after_s)})
        self.reason = reason


class NotReady(ServiceError):
    status, type = 503, "not_ready"


class DeadlineExceeded(ServiceError):
    status, type = 504, "deadline_exceeded"


class InferenceFailed(ServiceError):
    status, type = 500, "inference_failed"
