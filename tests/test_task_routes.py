"""The task routes' short way in (service.task_routes): what the router and the exception middleware did for them
still happens: a bug in a handler is a 500 in the envelope, counted under the route, and the next request is served."""
import time

import pytest
from fastapi.testclient import TestClient

from serving_harness import files, shapes
from service.api import create_app
from service.settings import load_settings
from service.tasks import HANDLERS


@pytest.fixture()
def client(serving_repo):
    with TestClient(create_app(load_settings(["--repo", str(serving_repo)])), raise_server_exceptions=False) as client:
        for _ in range(200):  # models load in the background after start-up
            if client.get("/readyz").status_code == 200:
                break
            time.sleep(0.05)
        yield client


def test_a_failing_task_handler_answers_500_in_the_envelope_and_the_next_request_is_served(client, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("a bug")

    monkeypatch.setattr(HANDLERS["classify"], "respond", broken)
    response = client.post("/classify", files=files(shapes(1)), headers={"X-Request-ID": "bug-1"})
    assert response.status_code == 500
    assert response.json()["error"]["type"] == "internal_error" and "bug-1" in response.json()["error"]["message"]
    assert response.headers["x-request-id"] == "bug-1"
    monkeypatch.undo()
    assert client.post("/classify", files=files(shapes(1))).status_code == 200
    metrics = client.get("/metrics").text
    assert 'vitserve_requests_total{method="POST",route="/classify",status="500"} 1.0' in metrics
    assert 'vitserve_requests_total{method="POST",route="/classify",status="200"} 1.0' in metrics


def test_task_paths_the_router_redirects_or_refuses_still_reach_it(client):
    assert client.post("/classify/", files=files(shapes(1)), follow_redirects=False).status_code == 307
    assert client.put("/classify", files=files(shapes(1))).json()["error"]["type"] == "method_not_allowed"
