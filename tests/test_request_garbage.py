"""Requests leave no reference cycles behind in the real server process.

Objects in a cycle are freed only by the garbage collector, whose passes stop the event loop: with a cycle or two per
request (a scope holding its own connection, an exception held by a frame of its traceback), passes came every second
or so under load, each 5-70 ms during which no request was read or refused. Here the server runs with automatic
collection off and, on SIGUSR1, reports what a collection would free: after warm-up, each kind of request, answered
or refused, must leave nothing to collect."""
from __future__ import annotations

import base64
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from serving_harness import Server, files, png_bytes, shapes

REPORTER = """
import collections, gc, json, signal, sys, types
gc.disable()
report_path = sys.argv.pop(1)

def report(*_):
    gc.set_debug(gc.DEBUG_SAVEALL)
    gc.collect()
    gc.set_debug(0)
    frames = collections.Counter(f"{f.f_code.co_filename}:{f.f_code.co_name}" for f in gc.garbage
                                 if isinstance(f, types.FrameType))
    kinds = collections.Counter(getattr(o, "__qualname__", type(o).__name__) if callable(o) else type(o).__name__ for o in gc.garbage)
    found = {"objects": len(gc.garbage), "kinds": kinds.most_common(8), "frames": frames.most_common(8),
             "frozen": gc.get_freeze_count()}
    gc.garbage.clear()
    with open(report_path + ".tmp", "w") as out:
        out.write(json.dumps(found))  # json.dump's pure-Python encoder would leave cycles of its own
    import os; os.replace(report_path + ".tmp", report_path)

signal.signal(signal.SIGUSR1, report)
from service.cli import main
sys.exit(main())
"""
REQUESTS = 12


@pytest.fixture(scope="module")
def observed(serving_repo, tmp_path_factory):
    report = tmp_path_factory.mktemp("garbage") / "report.json"
    server = Server(serving_repo, command=[sys.executable, "-c", REPORTER, str(report)],
                    max_queue_images="1", max_images_per_request="1", refusal_pause_ms="0")
    yield server, report
    assert server.stop() == 0, server.output()


def left_to_collect(server: Server, report: Path) -> dict:
    report.unlink(missing_ok=True)
    time.sleep(0.2)  # connections closed by the client are closed in the server too
    server.process.send_signal(signal.SIGUSR1)
    server.wait_until(report.exists, timeout=10)
    found = json.loads(report.read_text())
    assert found.pop("frozen") > 10_000, "start-up's objects are not frozen out of the collector's passes"
    return found


def v2_infer(http: httpx.Client) -> httpx.Response:
    image = base64.b64encode(shapes(1)[0]).decode()
    return http.post("/v2/models/shapes/infer",
                     json={"inputs": [{"name": "image_bytes", "shape": [1], "datatype": "BYTES", "data": [image]}]})


KINDS = {
    "classified": (lambda http: http.post("/classify", files=files(shapes(1))), 200),
    "embedded": (lambda http: http.post("/embed", files=files(shapes(1))), 200),
    "reconstructed": (lambda http: http.post("/reconstruct", files=files(shapes(1)), data={"seed": "1"}), 200),
    "V2 inferred": (v2_infer, 200),
    "not an image": (lambda http: http.post("/classify", files=files([b"not an image"])), 400),
    "bad parameter": (lambda http: http.post("/classify?top_k=many", files=files(shapes(1))), 422),
    "V2 bad JSON": (lambda http: http.post("/v2/models/shapes/infer", content=b"{", headers={"content-type": "application/json"}), 400),
    "unknown path": (lambda http: http.get("/nowhere"), 404),
}


@pytest.mark.parametrize("kind", list(KINDS))
def test_answered_requests_leave_nothing_for_the_garbage_collector(observed, kind):
    server, report = observed
    send, status = KINDS[kind]
    with httpx.Client(base_url=server.url, timeout=30) as http:
        assert send(http).status_code == status  # warm-up: first-use caches are not per-request garbage
    left_to_collect(server, report)
    with httpx.Client(base_url=server.url, timeout=30) as http:
        for _ in range(REQUESTS):
            answer = send(http)
            assert answer.status_code == status, answer.text
    assert left_to_collect(server, report) == {"objects": 0, "kinds": [], "frames": []}


@pytest.mark.parametrize("path", ["/classify", "/classify?model=shapes&version=1"], ids=["at the connection", "by the app"])
def test_refused_requests_leave_nothing_for_the_garbage_collector(observed, path):
    """While a large image is decoded, its reservation fills the one-image queue: every request meanwhile is refused
    (503), either as soon as its headers are in, or by the app when the URL alone does not settle the model."""
    server, report = observed
    rows, columns = np.mgrid[0:5000, 0:5000] // 20
    large = png_bytes(np.stack([rows, columns, rows + columns], axis=-1).astype(np.uint8))  # 25 MP, ~0.3 MB: ~0.2 s to decode

    def hold_the_queue() -> None:  # until admitted: a small request may hold the one place when it arrives
        while httpx.post(f"{server.url}/classify", files=files([large]), timeout=60).status_code == 503:
            pass

    def refusals_while_decoding() -> int:
        holder = threading.Thread(target=hold_the_queue)
        holder.start()
        refused = 0
        with httpx.Client(base_url=server.url, timeout=30) as http:
            while holder.is_alive():
                refused += http.post(path, files=files(shapes(1))).status_code == 503
        holder.join()
        return refused

    refusals_while_decoding()  # warm-up
    left_to_collect(server, report)
    assert refusals_while_decoding() >= 3
    assert left_to_collect(server, report) == {"objects": 0, "kinds": [], "frames": []}
