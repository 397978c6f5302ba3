"""uvicorn's HTTP protocol (httptools) with a deadline for a request's headers.

uvicorn times a connection out only between requests (the keep-alive timeout, after a response). A connection that
opens and sends nothing, or sends its headers a byte at a time, would otherwise stay open for as long as the client
likes: each one costs a file descriptor and a little memory, and enough of them exhaust the process. Here a
connection must deliver a request's complete headers within `header_timeout_s` of opening (or, on a kept-alive
connection, of the request's first byte); else it is closed. A slow body is the app's to bound (the request's
deadline, `service.inference`); a client that does not read its response only stalls its own connection (uvicorn's
flow control), never a batch."""
from __future__ import annotations

import asyncio

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol


class HeaderTimeoutConfig(uvicorn.Config):
    """uvicorn's configuration plus the header deadline the protocol reads."""

    def __init__(self, app, *, header_timeout_s: float, **options) -> None:
        super().__init__(app, http=HeaderTimeoutProtocol, **options)
        self.header_timeout_s = header_timeout_s


class HeaderTimeoutProtocol(HttpToolsProtocol):
    def __init__(self, config: HeaderTimeoutConfig, *args, **kwargs) -> None:
        super().__init__(config, *args, **kwargs)
        self._header_timeout_s = config.header_timeout_s
        self._header_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._start_header_timer()  # the first request's headers are due from now

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if self._header_timer is None:  # a later request on a kept-alive connection: due from its first byte
            self._start_header_timer()

    def on_headers_complete(self) -> None:
        self._cancel_header_timer()
        super().on_headers_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_header_timer()
        super().connection_lost(exc)

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
