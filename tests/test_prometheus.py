"""A real Prometheus (Debian's) scrapes a real `vit-serve`: the exposition passes promtool's lint, the request
counter carries one series per protocol's route template (REST, Open Inference Protocol over REST and over gRPC),
the shipped scrape configuration and alert rules pass promtool (the rules' own unit tests included), and every query
of the Grafana dashboard returns data from the real service after some traffic."""
from __future__ import annotations

import contextlib
import json
import math
import shutil
import subprocess
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient

from serving_harness import Server, files, free_port, png_bytes, shapes
from test_deploy import adapter_rules

PROMETHEUS_DIR = Path(__file__).resolve().parents[1] / "docker" / "prometheus"
DASHBOARD = Path(__file__).resolve().parents[1] / "docker" / "grafana" / "dashboards" / "vitserve.json"

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


@contextlib.contextmanager
def running_prometheus(tmp_path: Path, target_port: int, rule_files: list[Path] = ()):
    """Prometheus scraping 127.0.0.1:`target_port` every second (job vitserve), evaluating `rule_files`; yields its
    query function (PromQL -> result list, [] while it is not up yet)."""
    port = free_port()
    config = {"global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
              "rule_files": [str(path) for path in rule_files],
              "scrape_configs": [{"job_name": "vitserve", "static_configs": [{"targets": [f"127.0.0.1:{target_port}"]}]}]}
    (tmp_path / "prometheus.yml").write_text(json.dumps(config))  # JSON is YAML
    prometheus = subprocess.Popen(["prometheus", f"--config.file={tmp_path / 'prometheus.yml'}",
                                   f"--storage.tsdb.path={tmp_path / 'data'}", f"--web.listen-address=127.0.0.1:{port}"],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def query(expression: str, path: str = "query") -> list:
        try:
            answer = httpx.get(f"http://127.0.0.1:{port}/api/v1/{path}", params={"query": expression}, timeout=10).json()
        except httpx.TransportError:
            return []
        assert answer["status"] == "success", (expression, answer)
        return answer["data"]["result"] if path == "query" else answer["data"]["groups"]

    try:
        yield query
    finally:
        prometheus.terminate()
        prometheus.wait(timeout=30)


def test_the_scrape_configuration_and_the_alert_rules_pass_promtool():
    config = subprocess.run(["promtool", "check", "config", "prometheus.yml"], cwd=PROMETHEUS_DIR,
                            capture_output=True, text=True, timeout=60)
    assert config.returncode == 0 and "1 rule files found" in config.stdout, config.stdout + config.stderr
    unit_tests = subprocess.run(["promtool", "test", "rules", "alerts.test.yml"], cwd=PROMETHEUS_DIR,
                                capture_output=True, text=True, timeout=60)
    assert unit_tests.returncode == 0, unit_tests.stdout + unit_tests.stderr


def dashboard_queries(window: str) -> dict[str, str]:
    """Every query of the Grafana dashboard, with Grafana's $__rate_interval made `window`, by panel and legend."""
    dashboard = json.loads(DASHBOARD.read_text())
    return {f"{panel['title']} / {target.get('legendFormat', target['refId'])}": target["expr"].replace("$__rate_interval", window)
            for panel in dashboard["panels"] for target in panel.get("targets", [])}


class Traffic:
    """Requests in a background thread until stopped: answered ones, bad images (400) and deadline misses (504), so
    that every rate, ratio and quantile of the dashboard has something to show."""

    def __init__(self, url: str) -> None:
        self.url, self.statuses = url, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        big = png_bytes(np.random.default_rng(0).integers(0, 255, (1500, 1500, 3), dtype=np.uint8))  # decoding > 1 ms
        self.requests = [({"files": files(shapes(2))}, 200), ({"files": files([b"not an image"])}, 400),
                         ({"files": files([big]), "data": {"timeout_ms": "1"}}, 504)]

    def _run(self) -> None:
        with httpx.Client(base_url=self.url, timeout=30) as http:
            while not self._stop.wait(0.2):
                for request, _ in self.requests:
                    self.statuses.append(http.post("/classify", **request).status_code)

    def __enter__(self) -> "Traffic":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=30)


def test_every_dashboard_query_returns_data_and_the_alert_rules_evaluate_on_the_real_service(serving_repo, tmp_path):
    server = Server(serving_repo, model_control="explicit")
    queries = dashboard_queries("20s")
    for rule in adapter_rules():  # prometheus-adapter's query, as it asks for the pods of an HPA (here: the job)
        queries[f"prometheus-adapter: {rule['name']['as']}"] = (
            rule["metricsQuery"].replace("<<.LabelMatchers>>", 'job="vitserve"').replace("<<.GroupBy>>", "job"))
    missing = dict(queries)
    try:
        # an unload and a load, for the rollout panels
        assert httpx.post(f"{server.url}/v2/repository/models/mae-embed/unload").status_code == 200
        assert httpx.post(f"{server.url}/v2/repository/models/mae-embed/load").status_code == 200
        with Traffic(server.url) as traffic, \
                running_prometheus(tmp_path, server.port, [PROMETHEUS_DIR / "alerts.yml"]) as query:
            deadline = time.monotonic() + 90
            while missing and time.monotonic() < deadline:
                time.sleep(2)
                for name, expression in list(missing.items()):
                    if any(not math.isnan(float(series["value"][1])) for series in query(expression)):
                        del missing[name]
            rule_groups = query("", path="rules")
        assert {200, 400, 504} <= set(traffic.statuses), set(traffic.statuses)
    finally:
        assert server.stop() == 0
    assert not missing, f"dashboard queries without data: {json.dumps(missing, indent=1)}"
    rules = [rule for group in rule_groups for rule in group["rules"]]
    assert len(rules) == 7 and all(rule["health"] == "ok" for rule in rules), rules
