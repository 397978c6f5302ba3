"""uvicorn's HTTP protocol (httptools) with two connection policies of ours: a deadline for a request's headers, and
pacing of a connection whose request was refused for overload.

Headers: uvicorn times a connection out only between requests (the keep-alive timeout, after a response). A
connection that opens and sends nothing, or sends its headers a byte at a time, would otherwise stay open for as long
as the client likes: each one costs a file descriptor and a little memory, and enough of them exhaust the process.
Here a connection must deliver a request's complete headers within `header_timeout_s` of opening (or, on a kept-alive
connection, of the request's first byte); else it is closed. A slow body is the app's to bound (the request's
deadline, `service.inference`); a client that does not read its response only stalls its own connection (uvicorn's
flow control), never a batch.

Refusing early: a request that the app's `EarlyRefusal` hook (`service.shedding`) refuses once its headers are in is
answered here, without an ASGI task or the middleware chain; its body, if any, is read and dropped.

Pacing: a refusal is cheap, but not free, and a client that ignores Retry-After and sends its next request at once
(a load tester, a naive retry loop) can make refusing all the event loop does: with 256 such connections it refused
about 10,000 requests a second and the admitted ones waited seconds for their turn in the loop (goodput 0.08 of
normal). So after a 503 with Retry-After, the app asks (`PACE_CONNECTION` in the request's scope state) that the
connection not be read again for a while: the answer is sent at once, the client's next request is read when the
pause ends (nothing is lost; it waits in the socket). A client that honours Retry-After never notices.

Disconnects: the protocol knows when a client has gone (uvicorn marks the request's cycle when the connection is
lost); `CLIENT_GONE` in the scope state reads that mark. Starlette's `Request.is_disconnected` learns the same
by receiving under a cancelled anyio scope, which formats the current task's repr on every call: about 30 µs of
the event loop per queued request, for a flag."""
from __future__ import annotations

import asyncio
import urllib.parse
import weakref
from collections.abc import Callable

import httptools
import uvicorn
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

PACE_CONNECTION = "vitserve.pace_connection"  # scope["state"] key: call it with seconds to pause reading after the answer
CLIENT_GONE = "vitserve.client_gone"  # scope["state"] key: call it to learn whether the client's connection is lost

Headers = list[tuple[bytes, bytes]]
# A POST's (path, query string, headers, client address) -> (status, headers, body) to answer now, or None
EarlyRefusal = Callable[[str, bytes, Headers, str], tuple[int, Headers, bytes] | None]


class ServerConfig(uvicorn.Config):
    """uvicorn's configuration plus what our protocol reads: the header deadline, the early refusal hook and the
    longest pacing pause."""

    def __init__(self, app, *, header_timeout_s: float, max_pace_s: float, refuse_early: EarlyRefusal | None = None,
                 **options) -> None:
        super().__init__(app, http=ServerProtocol, **options)
        self.header_timeout_s = header_timeout_s
        self.max_pace_s = max_pace_s
        self.refuse_early = refuse_early


def retry_after_s(headers: Headers) -> int | None:
    value = next((value for name, value in headers if name.lower() == b"retry-after"), None)
    return int(value) if value is not None and value.isdigit() else None


class _AnsweredHere:
    """Stands in for uvicorn's request cycle once the protocol answered a request itself: the body is dropped."""

    disconnected, keep_alive = False, False

    def __init__(self) -> None:
        self.response_complete = True  # uvicorn drops the body of a complete cycle

    class message_event:  # noqa: N801 - uvicorn calls .set() on it when the connection is lost
        @staticmethod
        def set() -> None:
            pass


# The scope's state must reach the protocol and the request's cycle only weakly: both hold the scope, so a strong
# reference back makes a reference cycle per request, which only the garbage collector's passes free. Under load those
# passes came every second or so and stopped the event loop for 5-15 ms (the oldest generation's for 25-70 ms).
def _pacer(protocol: ServerProtocol) -> Callable[[float], None]:
    connection = weakref.ref(protocol)

    def pace(seconds: float) -> None:
        alive = connection()
        if alive is not None:
            alive._pace(seconds)
    return pace


def _disconnect_flag(cycle) -> Callable[[], bool]:
    request = weakref.ref(cycle)
    return lambda: (alive := request()) is None or alive.disconnected


class ServerProtocol(HttpToolsProtocol):
    def __init__(self, config: ServerConfig, *args, **kwargs) -> None:
        super().__init__(config, *args, **kwargs)
        self._header_timeout_s = config.header_timeout_s
        self._max_pace_s = config.max_pace_s
        self._refuse_early = config.refuse_early
        self._header_timer: asyncio.TimerHandle | None = None
        self._pace_s = 0.0  # asked by the current request's answer
        self._pacer = _pacer(self)  # what each request's scope gets to ask it (one per connection)
        self._pace_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._start_header_timer()  # the first request's headers are due from now

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._pace_s = 0.0
        self.scope["state"][PACE_CONNECTION] = self._pacer
        if self._header_timer is None:  # a later request on a kept-alive connection: due from its first byte
            self._start_header_timer()

    def on_headers_complete(self) -> None:
        self._cancel_header_timer()
        if self._pace_timer is not None:
            # Read in the same chunk as the request that was paced: it must wait for the pause as if read after it,
            # so uvicorn is told the connection is busy and queues it as a pipelined request (started at the end).
            self.cycle.response_complete = False
        elif self._answered_early():
            return
        super().on_headers_complete()
        self.scope["state"][CLIENT_GONE] = _disconnect_flag(self.cycle)  # this request's, even when pipelined

    def _answered_early(self) -> bool:
        """Asks the early refusal hook about a POST (not pipelined behind an unanswered one); writes its answer."""
        if self._refuse_early is None or self.parser.get_method() != b"POST" or self.parser.should_upgrade():
            return False
        if self.cycle is not None and not self.cycle.response_complete:
            return False  # pipelined: answers must go out in order
        url = httptools.parse_url(self.url)
        path = url.path.decode("ascii")
        path = urllib.parse.unquote(path) if "%" in path else path
        client = self.client[0] if self.client else "-"
        try:
            answer = self._refuse_early(path, url.query or b"", self.headers, client)
        except Exception:  # a bug here must not turn requests into 400s (the parser's error): the app decides
            self.logger.exception("the early refusal check failed; the app decides instead")
            return False
        if answer is None:
            return False
        status, headers, body = answer
        # Kept alive as uvicorn would (never HTTP/1.0), unless the body is not read cleanly: a client waiting for
        # 100-continue has not sent it, and a chunked one has no length, so dropping it has no bound.
        keep_alive = (self.parser.get_http_version() != "1.0" and self.parser.should_keep_alive()
                      and not self.expect_100_continue and any(name == b"content-length" for name, _ in self.headers))
        lines = [STATUS_LINE[status]]
        for name, value in [*self.server_state.default_headers, *headers, *([] if keep_alive else [(b"connection", b"close")])]:
            lines += [name, b": ", value, b"\r\n"]
        self.transport.write(b"".join([*lines, b"\r\n", body]))
        self.cycle = _AnsweredHere()  # type: ignore[assignment]
        if not keep_alive:
            self.transport.close()
            return True
        self._pace(retry_after_s(headers) or 0)
        self.on_response_complete()
        return True

    def on_response_complete(self) -> None:
        if self._pace_timer is not None:  # not expected (nothing runs during a pause); one timer at a time
            self._pace_timer.cancel()
            self._pace_timer = None
        if self._pace_s > 0 and not self.transport.is_closing():
            # Read nothing more until the pause ends; then uvicorn resumes reading and arms its keep-alive timeout.
            self.flow.pause_reading()
            self._pace_timer = self.loop.call_later(self._pace_s, self._pace_ended)
            self._pace_s = 0.0
            return
        super().on_response_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_header_timer()
        if self._pace_timer is not None:
            self._pace_timer.cancel()
            self._pace_timer = None
        super().connection_lost(exc)

    def _pace(self, seconds: float) -> None:
        self._pace_s = min(max(seconds, 0.0), self._max_pace_s)

    def _pace_ended(self) -> None:
        self._pace_timer = None
        super().on_response_complete()

    def _start_header_timer(self) -> None:
        self._header_timer = self.loop.call_later(self._header_timeout_s, self._headers_overdue)

    def _cancel_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_overdue(self) -> None:
        self._header_timer = None
        if not self.transport.is_closing():
            self.transport.close()
