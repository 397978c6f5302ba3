"""A real Prometheus (Debian's) scrapes a real `vit-serve`: the exposition passes promtool's lint, and the request
counter carries one series per protocol's route template (REST, Open Inference Protocol over REST and over gRPC)."""
from __future__ import annotations

import shutil
import subprocess
import time

import httpx
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient

from serving_harness import Server, files, free_port, shapes

pytestmark = pytest.mark.skipif(shutil.which("prometheus") is None or shutil.which("promtool") is None,
                                reason="Debian's prometheus is not installed (.ci/run installs it)")


@pytest.fixture()
def server(serving_repo):
    grpc_port = free_port()
    srv = Server(serving_repo, grpc_port=str(grpc_port))
    srv.grpc_address = f"127.0.0.1:{grpc_port}"
    yield srv
    assert srv.stop() == 0


def image_bytes(client_module):
    tensor = client_module.InferInput("image_bytes", [1], "BYTES")
    tensor.set_data_from_numpy(np.array(shapes(1), dtype=object))
    return tensor


def test_prometheus_scrapes_every_protocol_under_its_route_template(server, tmp_path):
    assert httpx.post(f"{server.url}/classify", files=files(shapes(1))).status_code == 200
    httpclient.InferenceServerClient(f"127.0.0.1:{server.port}").infer("shapes", [image_bytes(httpclient)])
    grpcclient.InferenceServerClient(server.grpc_address).infer("shapes", [image_bytes(grpcclient)])

    lint = subprocess.run(["promtool", "check", "metrics"], input=httpx.get(f"{server.url}/metrics").text,
                          capture_output=True, text=True, timeout=30)
    assert lint.returncode == 0, lint.stdout + lint.stderr

    port = free_port()
    (tmp_path / "prometheus.yml").write_text(
        "global: {scrape_interval: 1s}\n"
        f"scrape_configs: [{{job_name: vitserve, static_configs: [{{targets: ['127.0.0.1:{server.port}']}}]}}]\n")
    prometheus = subprocess.Popen(["prometheus", f"--config.file={tmp_path / 'prometheus.yml'}",
                                   f"--storage.tsdb.path={tmp_path / 'data'}", f"--web.listen-address=127.0.0.1:{port}"],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wanted = {("POST", "/classify"), ("POST", "/v2/models/{model_name}/infer"),
              ("GRPC", "/inference.GRPCInferenceService/ModelInfer")}
    seen: set = set()
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not wanted <= seen:
            time.sleep(1)
            try:
                answer = httpx.get(f"http://127.0.0.1:{port}/api/v1/query",
                                   params={"query": 'vitserve_requests_total{status="200"}'}).json()
            except httpx.TransportError:
                continue
            seen = {(r["metric"]["method"], r["metric"]["route"]) for r in answer.get("data", {}).get("result", [])}
    finally:
        prometheus.terminate()
        prometheus.wait(timeout=30)
    assert wanted <= seen, seen
