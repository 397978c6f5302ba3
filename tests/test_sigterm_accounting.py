"""SIGTERM under load, accounted request by request: clients keep sending real requests (each on a new connection,
each with its own X-Request-ID) while the real `vit-serve` receives SIGTERM. Every request the server read (its
access log has the id) got a complete response with the status the log says; every other request was refused at
connect or closed before the server read anything; none was cut off mid-answer. The process exits 0."""
from __future__ import annotations

import collections
import http.client
import re
import threading
import time

import httpx

from serving_harness import Server, files, shapes

CLIENTS = 12


def build_request(url: str) -> tuple[bytes, str]:
    request = httpx.Request("POST", f"{url}/classify", files=files(shapes(1)))
    return request.read(), request.headers["content-type"]


def send_one(port: int, request_id: str, body: bytes, content_type: str) -> str:
    """What happened to one request: its status, "refused" (no connection), "unanswered" (connected, but closed
    before a single byte of answer), or "broken" (an answer started and was cut off)."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        try:
            connection.connect()
        except ConnectionRefusedError:
            return "refused"
        try:
            connection.request("POST", "/classify", body, {"Content-Type": content_type, "X-Request-ID": request_id})
            response = connection.getresponse()
        except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
            return "unanswered"
        try:
            response.read()
        except (http.client.IncompleteRead, ConnectionResetError):
            return "broken"
        return str(response.status)
    finally:
        connection.close()


def test_every_request_the_server_read_gets_a_complete_answer_through_sigterm(serving_repo):
    server = Server(serving_repo, max_batch_size="1", drain_timeout_s="20")
    body, content_type = build_request(server.url)
    outcomes: dict[str, str] = {}
    stop = threading.Event()

    def client(index: int) -> None:
        sent = 0
        while not stop.is_set():
            request_id = f"c{index}-{sent}"
            outcomes[request_id] = send_one(server.port, request_id, body, content_type)
            sent += 1
            if outcomes[request_id] == "refused":
                time.sleep(0.01)

    log = open(server.log.name)  # still readable after the harness closes (and deletes) its own handle
    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(CLIENTS)]
    for thread in threads:
        thread.start()
    try:
        time.sleep(2.0)  # under load
        signalled = len(outcomes)
        exit_code = server.stop()  # SIGTERM, then wait for the exit
        time.sleep(0.5)  # clients keep trying after the exit: refused at connect
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=60)
        with log:
            access_lines = log.read()
    assert exit_code == 0

    answered_by_server = {request_id: status for status, request_id
                          in re.findall(r"POST /classify (\d{3}) [\d.]+ ms request (c\d+-\d+)", access_lines)}
    counts = collections.Counter(outcomes.values())
    print(f"\nSIGTERM accounting: {len(outcomes)} requests ({signalled} before the signal): {dict(counts)}; "
          f"{len(answered_by_server)} in the server's access log")
    assert counts["broken"] == 0, "an answer was cut off"
    for request_id, outcome in outcomes.items():
        if request_id in answered_by_server:  # read by the server: the client has its complete answer
            assert outcome == answered_by_server[request_id], (request_id, outcome, answered_by_server[request_id])
        else:  # never read: refused at connect, or closed unread
            assert outcome in ("refused", "unanswered"), (request_id, outcome)
    assert set(counts) <= {"200", "503", "refused", "unanswered"}
    assert counts["200"] > 0 and counts["refused"] > 0  # load before the signal, refusals after the exit
