"""Pure ASGI middleware around every request: request id, body-size limit, metrics, one access-log line
(structured: its fields become keys of the line in JSON logs, see service.logs)."""
from __future__ import annotations

import hmac
import json
import logging
import re
import time
import uuid

from .errors import PayloadTooLarge, ServiceError, Unauthorized
from .http_protocol import PACE_CONNECTION, retry_after_s
from .metrics import Metrics
from .v2.errors import error_body_for

access_log = logging.getLogger("vitserve.access")
log = logging.getLogger("vitserve")
_SAFE_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


class RequestContextMiddleware:
    def __init__(self, app, *, metrics: Metrics, max_body_bytes: int) -> None:
        self.app, self.metrics, self.max_body_bytes = app, metrics, max_body_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        request_id = request_id_from(headers.get("x-request-id", ""))
        started = time.perf_counter()
        # the request's deadline counts from here: decoding time is part of the budget
        scope.setdefault("state", {}).update(request_id=request_id, arrived=time.monotonic())
        status = {"code": 500}

        started_response = {"sent": False}

        async def send_with_id(message) -> None:
            if message["type"] == "http.response.start":
                started_response["sent"] = True
                status["code"] = message["status"]
                message.setdefault("headers", []).append((b"x-request-id", request_id.encode()))
                if message["status"] == 503:
                    _pace_if_asked_to_retry(scope, message["headers"])
            await send(message)

        try:
            declared = int(headers.get("content-length", "0") or 0)
        except ValueError:
            declared = 0
        try:
            if declared > self.max_body_bytes:
                await _send_error(send_with_id, PayloadTooLarge(f"request body is {declared} bytes; the limit is {self.max_body_bytes}"),
                                  scope["path"])
            else:
                await self.app(scope, self._limited(receive), send_with_id)
        except Exception:  # noqa: BLE001 - whatever escaped the app is still answered, counted and logged
            log.exception("unexpected error in request %s", request_id)
            if not started_response["sent"]:
                await _send_error(send_with_id, ServiceError(f"unexpected error; see the server log for request {request_id}"),
                                  scope["path"])
        elapsed = time.perf_counter() - started
        route = scope.get("route")
        template = getattr(route, "path", None) or "unmatched"
        observe_request(self.metrics, request_id, scope["method"], template, scope["path"], status["code"], elapsed,
                        (scope.get("client") or ["-"])[0])

    def _limited(self, receive):
        """Count body bytes as they arrive: a chunked body without Content-Length is capped too."""
        received = {"bytes": 0}

        async def receive_limited():
            message = await receive()
            if message["type"] == "http.request":
                received["bytes"] += len(message.get("body", b""))
                if received["bytes"] > self.max_body_bytes:
                    raise PayloadTooLarge(f"request body exceeds the limit of {self.max_body_bytes} bytes")
            return message

        return receive_limited


def _pace_if_asked_to_retry(scope, headers) -> None:
    """A refusal that tells the client when to come back paces its connection (see service.http_protocol)."""
    pace = scope["state"].get(PACE_CONNECTION)  # absent when not served by our protocol (tests in-process)
    retry_after = retry_after_s(headers)
    if pace is not None and retry_after is not None:
        pace(retry_after)


def request_id_from(given: str) -> str:
    """The client's request id when it is safe to log and echo, else a new one."""
    return given if _SAFE_ID.match(given) else uuid.uuid4().hex


def observe_request(metrics: Metrics, request_id: str, method: str, route: str, path: str, status: int, elapsed_s: float,
                    client: str) -> None:
    """The request counters, the latency histogram and one access line per request, whatever the protocol."""
    metrics.requests.labels(route, method, str(status)).inc()
    metrics.latency.labels(route).observe(elapsed_s)
    line = {"request_id": request_id, "method": method, "route": route, "path": path, "status": status,
            "duration_ms": round(elapsed_s * 1000, 2), "client": client}
    # the message is the line a person reads; the fields are the keys of the JSON line (service.logs)
    access_log.info("%s %s %d %.2f ms request %s client %s", method, path, status, line["duration_ms"], request_id,
                    client, extra={"fields": line})


def api_key_given(headers: dict[str, str]) -> str | None:
    """The key a request presents (`Authorization: Bearer <key>` or `X-API-Key`); `headers` with lowercase names."""
    auth = headers.get("authorization", "")
    return auth[7:].strip() if auth.lower().startswith("bearer ") else headers.get("x-api-key")


def key_matches(given: str | None, key: bytes) -> bool:
    return given is not None and hmac.compare_digest(given.encode(), key)


WRONG_KEY = "missing or wrong API key (Authorization: Bearer <key> or X-API-Key)"


async def _send_error(send, error: ServiceError, path: str) -> None:
    body = json.dumps(error_body_for(path, error)).encode()  # each protocol's error shape
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.lower().encode(), v.encode()) for k, v in error.headers.items()]
    await send({"type": "http.response.start", "status": error.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class ApiKeyMiddleware:
    """When a key is configured, every route but the open ones needs `Authorization: Bearer <key>` or `X-API-Key`.
    Pure ASGI (not BaseHTTPMiddleware): it must not interfere with disconnect detection further in."""

    def __init__(self, app, *, api_key: str, open_paths: set[str]) -> None:
        self.app, self.key, self.open_paths = app, api_key.encode(), open_paths

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope["path"] not in self.open_paths:
            headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
            if not key_matches(api_key_given(headers), self.key):
                await _send_error(send, Unauthorized(WRONG_KEY), scope["path"])
                return
        await self.app(scope, receive, send)
