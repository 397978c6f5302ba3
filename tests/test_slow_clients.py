"""Slow and hostile clients against the real `vit-serve` process: idle connections, headers or a body sent a byte at
a time, and a client that never reads its responses hold no inference capacity and do not delay /healthz; the
server closes what it must (header deadline, request deadline) and keeps answering everyone else."""
from __future__ import annotations

import socket
import threading
import time

import httpx
import pytest

from serving_harness import Server, files, shapes

IDLE_CONNECTIONS = 300
HEADER_TIMEOUT_S = 1.5


@pytest.fixture(scope="module")
def server(serving_repo):
    srv = Server(serving_repo, header_timeout_s=str(HEADER_TIMEOUT_S), timeout_ms="3000")
    yield srv
    assert srv.stop() == 0


def connect(server: Server) -> socket.socket:
    return socket.create_connection(("127.0.0.1", server.port), timeout=10)


def closed_by_server(sock: socket.socket, within_s: float) -> bool:
    """Whether the server closes `sock` (EOF, or a reset) within `within_s`, reading and dropping what it sends."""
    sock.settimeout(within_s)
    try:
        while sock.recv(65536):
            pass
        return True
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def read_answer(sock: socket.socket) -> bytes:
    """One whole HTTP response (head and Content-Length body), however the bytes are split."""
    sock.settimeout(10)
    answer = b""
    while b"\r\n\r\n" not in answer:
        answer += sock.recv(65536)
    head, _, body = answer.partition(b"\r\n\r\n")
    length = int(next(line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:")))
    while len(body) < length:
        body += sock.recv(65536)
    return head + b"\r\n\r\n" + body


def others_are_served(server: Server) -> None:
    """/healthz answers at once and a real request is answered, while the hostile clients do their thing."""
    with httpx.Client(base_url=server.url, timeout=10) as http:
        started = time.perf_counter()
        assert http.get("/healthz").status_code == 200
        assert time.perf_counter() - started < 1.0  # not queued behind anything (typically ~1 ms)
        response = http.post("/classify", files=files(shapes(2)))
        assert response.status_code == 200, response.text


def test_hundreds_of_idle_connections_are_closed_after_the_header_deadline(server):
    idle = [connect(server) for _ in range(IDLE_CONNECTIONS)]
    try:
        others_are_served(server)
        time.sleep(HEADER_TIMEOUT_S)
        assert all(closed_by_server(sock, within_s=2.0) for sock in idle)
        others_are_served(server)
    finally:
        for sock in idle:
            sock.close()


def test_headers_sent_a_byte_at_a_time_are_cut_off_at_the_header_deadline(server):
    trickler = connect(server)
    stop = threading.Event()

    def trickle() -> None:
        for byte in b"POST /classify HTTP/1.1\r\nHost: localhost\r\nX-Padding: " + b"a" * 10_000:
            if stop.wait(0.1):
                return
            try:
                trickler.send(bytes([byte]))
            except OSError:  # closed by the server: what we expect
                return

    thread = threading.Thread(target=trickle, daemon=True)
    started = time.monotonic()
    thread.start()
    try:
        others_are_served(server)
        assert closed_by_server(trickler, within_s=HEADER_TIMEOUT_S + 3)
        assert time.monotonic() - started >= HEADER_TIMEOUT_S * 0.9  # the deadline, not something sooner
        others_are_served(server)
    finally:
        stop.set()
        thread.join()
        trickler.close()


MULTIPART_START = b'--b\r\nContent-Disposition: form-data; name="file"; filename="a.png"\r\nContent-Type: image/png\r\n\r\n\x89PNG'


@pytest.mark.parametrize("path, content_type, start", [
    ("/classify", "multipart/form-data; boundary=b", MULTIPART_START),
    ("/v2/models/shapes/infer", "application/json", b'{"inputs": [{"name": "image_bytes", '),
])
def test_a_body_that_trickles_in_is_answered_504_at_the_request_deadline(server, path, content_type, start):
    sock = connect(server)
    try:  # a valid start of a body announced as 10 kB longer, and then nothing
        sock.sendall(f"POST {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: {content_type}\r\n".encode()
                     + b"Content-Length: " + str(len(start) + 10_000).encode() + b"\r\n\r\n" + start)
        started = time.monotonic()
        others_are_served(server)
        answer = read_answer(sock)
        assert answer.startswith(b"HTTP/1.1 504"), answer[:200]
        assert b"did not arrive before its deadline" in answer
        assert 2.0 < time.monotonic() - started < 6.0  # the server's 3 s deadline, counted from the headers
        others_are_served(server)
    finally:
        sock.close()


def test_a_client_that_never_reads_its_responses_stalls_only_itself(server):
    """Requests pipelined on one connection whose responses are never read: once the socket buffers are full the
    server stops writing to it, and everyone else is still served."""
    greedy = socket.socket()
    greedy.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    greedy.connect(("127.0.0.1", server.port))
    request = httpx.Request("POST", f"{server.url}/embed", files=files(shapes(8)))
    raw = (f"POST /embed HTTP/1.1\r\nHost: localhost\r\nContent-Type: {request.headers['content-type']}\r\n"
           f"Content-Length: {len(request.read())}\r\n\r\n").encode() + request.read()
    greedy.setblocking(False)
    sent = 0
    try:
        for _ in range(200):
            try:
                sent += greedy.send(raw)
            except BlockingIOError:  # the server stopped reading: its writes to us are stalled
                break
        others_are_served(server)
        time.sleep(0.5)
        others_are_served(server)
        metrics = httpx.get(f"{server.url}/metrics").text
        assert 'vitserve_queue_depth_images{model="mae-embed"} 0.0' in metrics  # nothing of ours waits for a batch
    finally:
        greedy.close()
    assert sent > 0
    others_are_served(server)
