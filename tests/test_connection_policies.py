"""The server's connection policies against a real uvicorn server on a socket (service.http_protocol), with a small
ASGI app and refusal hook of the test's own, so each case is exact: a request refused when its headers are in is
answered without its body and the connection stays usable; a connection answered 503 with Retry-After is not read
again until its pause ends (clients that retry at once cannot make refusing all the server does), while other
connections are served at once. The app is wrapped in the service's request middleware, which asks for the pause
when the app answers 503 with Retry-After."""
from __future__ import annotations

import asyncio
import json
import socket
import threading
import time

import pytest
import uvicorn

from service.http_protocol import CLIENT_GONE, ServerConfig
from service.metrics import Metrics
from service.middleware import RequestContextMiddleware

PAUSE_S = 0.4
TIMER_SLACK_S = 0.002  # uvloop's timers count whole milliseconds: one may fire that much before perf_counter says
REFUSED = (503, [(b"content-type", b"application/json"), (b"content-length", b"2"), (b"retry-after", b"1")], b"{}")


async def app(scope, receive, send) -> None:
    """Counts the body bytes it read; /busy answers 503 with Retry-After as the service does when it refuses late."""
    if scope["type"] != "http":
        return
    received = 0
    while True:
        message = await receive()
        received += len(message.get("body", b""))
        if not message.get("more_body"):
            break
    if scope["path"] == "/slow":
        await asyncio.sleep(0.3)
    if scope["path"] == "/watch":  # no answer: reports what the disconnect probe says while the client stays, then goes
        client_gone = scope["state"][CLIENT_GONE]
        watched.append(client_gone())
        deadline = time.monotonic() + 5
        while not client_gone() and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        watched.append(client_gone())
        return
    status, headers = (503, [(b"retry-after", b"1")]) if scope["path"] == "/busy" else (200, [])
    body = json.dumps({"path": scope["path"], "received": received}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *headers]})
    await send({"type": "http.response.body", "body": body})


watched: list[bool] = []  # what /watch saw: the probe while the client was connected, then after it left


def refuse_early(path, query, headers, client):
    return REFUSED if path == "/early" else None


@pytest.fixture(scope="module")
def port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        free = probe.getsockname()[1]
    served = RequestContextMiddleware(app, metrics=Metrics(), max_body_bytes=1 << 20)  # the service's, which asks for the pause
    config = ServerConfig(served, header_timeout_s=5, max_pace_s=PAUSE_S, refuse_early=refuse_early, host="127.0.0.1",
                          port=free, log_level="warning", lifespan="off")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline, "the server did not start"
        time.sleep(0.02)
    yield free
    server.should_exit = True
    thread.join(10)


def request(path: str, body: bytes = b"", extra: str = "") -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: test\r\nContent-Length: {len(body)}\r\n{extra}\r\n").encode() + body


_unread: dict[int, bytes] = {}  # bytes received past the answer read, per open socket (answers may arrive together)


@pytest.fixture(autouse=True)
def _forget_unread():
    yield
    _unread.clear()  # socket ids are reused by later tests


def read_answer(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """One whole HTTP response: status, headers (lowercase names), body."""
    answer = _unread.pop(id(sock), b"")
    while b"\r\n\r\n" not in answer:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed after {answer!r}"
        answer += chunk
    head, _, rest = answer.partition(b"\r\n\r\n")
    status_line, *lines = head.decode().split("\r\n")
    headers = {name.lower(): value.strip() for name, _, value in (line.partition(":") for line in lines)}
    length = int(headers["content-length"])
    while len(rest) < length:
        rest += sock.recv(65536)
    _unread[id(sock)] = rest[length:]
    return int(status_line.split()[1]), headers, rest[:length]


def timed_answer(sock: socket.socket, data: bytes) -> tuple[float, int, dict]:
    started = time.perf_counter()
    sock.sendall(data)
    status, _, body = read_answer(sock)
    return time.perf_counter() - started, status, json.loads(body)


def test_a_request_refused_at_its_headers_is_answered_before_its_body_and_the_connection_goes_on(port):
    body = b"x" * 20_000
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        started = time.perf_counter()
        sock.sendall(request("/early", body)[:-len(body)])  # the headers only
        status, headers, answer = read_answer(sock)  # answered without waiting for the body
        assert (status, headers["retry-after"], answer) == (503, "1", b"{}")
        sock.sendall(body)  # the client sends its body anyway: it is read and dropped, not taken for a request
        _, status, answer = timed_answer(sock, request("/echo", b"abc"))
        assert (status, answer) == (200, {"path": "/echo", "received": 3})
        assert time.perf_counter() - started >= PAUSE_S - TIMER_SLACK_S  # paced: the next request was read only after the pause


@pytest.mark.parametrize("path", ["/early", "/busy"])
def test_a_connection_refused_with_retry_after_is_read_again_only_after_the_pause(port, path):
    with socket.create_connection(("127.0.0.1", port), timeout=10) as paced, \
            socket.create_connection(("127.0.0.1", port), timeout=10) as other:
        started = time.perf_counter()
        first, status, _ = timed_answer(paced, request(path))
        assert status == 503 and first < PAUSE_S  # the refusal itself is answered at once
        _, status, _ = timed_answer(other, request("/echo"))
        assert status == 200 and time.perf_counter() - started < PAUSE_S  # other connections are not paced
        _, status, _ = timed_answer(paced, request("/echo"))
        paced_s = time.perf_counter() - started
        assert status == 200 and PAUSE_S - TIMER_SLACK_S <= paced_s < PAUSE_S + 1.0  # min(Retry-After 1 s, the 0.4 s pause)
        third, status, _ = timed_answer(paced, request("/echo"))
        assert status == 200 and third < PAUSE_S  # a 200 does not pace


def test_requests_sent_together_with_a_refused_one_wait_for_the_pause_and_are_answered_in_order(port):
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        started = time.perf_counter()
        sock.sendall(request("/early") + request("/slow", b"12") + request("/echo", b"1"))  # pipelined in one write
        assert read_answer(sock)[0] == 503
        assert json.loads(read_answer(sock)[2]) == {"path": "/slow", "received": 2}
        assert time.perf_counter() - started >= PAUSE_S + 0.3 - TIMER_SLACK_S  # after the pause, then its 0.3 s
        assert json.loads(read_answer(sock)[2]) == {"path": "/echo", "received": 1}


@pytest.mark.parametrize("head", ["Connection: close\r\n", "Expect: 100-continue\r\n", "Transfer-Encoding: chunked\r\n",
                                  "HTTP/1.0"])
def test_an_early_refusal_closes_a_connection_that_will_not_be_reused_or_whose_body_has_no_clean_end(port, head):
    if head == "HTTP/1.0":
        data = b"POST /early HTTP/1.0\r\nConnection: keep-alive\r\nContent-Length: 0\r\n\r\n"
    elif "chunked" in head:
        data = f"POST /early HTTP/1.1\r\nHost: test\r\n{head}\r\n5\r\nhello\r\n".encode()  # and more to come
    else:
        data = request("/early", b"", head)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(data)
        status, headers, _ = read_answer(sock)
        assert status == 503 and headers.get("connection") == "close"
        assert sock.recv(1) == b""  # closed by the server


def test_the_disconnect_probe_tells_when_the_client_has_gone(port):
    watched.clear()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(request("/watch", b"abc"))
        deadline = time.monotonic() + 5
        while not watched and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.1)
        assert watched == [False]  # connected, and still connected a moment later
    deadline = time.monotonic() + 5
    while len(watched) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert watched == [False, True]
