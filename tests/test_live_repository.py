"""The live model repository, against the real `vit-serve` process: a version exported with the real `vit-export`
while requests stream in is served without one failed request; a broken version never replaces a working one; the
repository API (Triton's shape, driven by the real tritonclient) loads and unloads; version policies choose what
serves."""
from __future__ import annotations

import base64
import itertools
import json
import re
import shutil
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest
import torch
import tritonclient.http as triton_http
from tritonclient.utils import InferenceServerException

from export.pipeline import ExportRequest, export_checkpoint
from model.checkpoints import save_checkpoint
from model.data import SYNTHETIC_CLASSES, SYNTHETIC_MEAN, SYNTHETIC_STD
from model.presets import vit_preset
from model.vit import VisionTransformer
from modelrepo import VersionPolicy
from modelrepo.names import VERSION_POLICY_FILE
from tests.serving_harness import API_KEY, Server, assert_error, files, shapes

VIT_EXPORT = str(Path(sys.executable).with_name("vit-export"))
POLL_S = 0.3


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> list[Path]:
    """Two classifiers of the same shape with different weights (so each version answers differently)."""
    root = tmp_path_factory.mktemp("live-checkpoints")
    paths = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        path = root / f"seed{seed}" / "checkpoint.pt"
        save_checkpoint(path, VisionTransformer(vit_preset("vit-test", num_classes=6)), labels=SYNTHETIC_CLASSES,
                        mean=SYNTHETIC_MEAN, std=SYNTHETIC_STD)
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def exported(tmp_path_factory, checkpoints) -> Path:
    repository = tmp_path_factory.mktemp("live-exported") / "repo"
    for name in ("shapes", "other"):
        export_checkpoint(ExportRequest(checkpoint=checkpoints[0], repo=repository, name=name))
    return repository


@pytest.fixture()
def repo(tmp_path, exported) -> Path:
    """`shapes` version 1, and `other` version 1 (a second model for load/unload): a fresh copy per test."""
    return Path(shutil.copytree(exported, tmp_path / "repo"))


class RequestStream:
    """Clients that keep classifying until stopped, recording every answer's status and version."""

    def __init__(self, url: str, model: str, clients: int = 3) -> None:
        self.url, self.model = url, model
        self.answers: list[tuple[int, int | None]] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._loop, daemon=True) for _ in range(clients)]
        self._image = shapes(1)

    def __enter__(self) -> RequestStream:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *_) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=30)

    def _loop(self) -> None:
        """Alternates the vitserve API and the Open Inference Protocol: a swap must fail neither."""
        v2_body = {"inputs": [{"name": "image_bytes", "shape": [1], "datatype": "BYTES",
                               "data": [base64.b64encode(self._image[0]).decode()]}]}
        with httpx.Client(base_url=self.url, timeout=30) as client:
            for turn in itertools.count():
                if self._stop.is_set():
                    return
                if turn % 2:
                    response = client.post(f"/v2/models/{self.model}/infer", json=v2_body)
                    version = int(response.json()["model_version"]) if response.status_code == 200 else None
                else:
                    response = client.post("/classify", params={"model": self.model}, files=files(self._image))
                    version = response.json().get("version") if response.status_code == 200 else None
                self.answers.append((response.status_code, version))

    def wait_for_version(self, version: int, timeout: float = 60) -> float:
        """Seconds until the first answer from `version`."""
        started = time.monotonic()
        while time.monotonic() - started < timeout:
            if any(v == version for _, v in list(self.answers)):
                return time.monotonic() - started
            time.sleep(0.02)
        raise AssertionError(f"no answer from version {version} within {timeout} s: {Counter(self.answers)}")

    def statuses(self) -> Counter:
        return Counter(status for status, _ in self.answers)


def index(server: Server, **headers) -> dict[tuple[str, int], dict]:
    response = httpx.post(f"{server.url}/v2/repository/index", headers=headers, timeout=10)
    assert response.status_code == 200, response.text
    return {(row["name"], int(row["version"])): row for row in response.json()}


def metric(server: Server, name: str, **labels) -> float | None:
    text = httpx.get(f"{server.url}/metrics", timeout=10).text
    wanted = ",".join(f'{k}="{v}"' for k, v in labels.items())
    series = f"{name}{{{wanted}}}" if labels else name
    match = re.search(rf"^{re.escape(series)} (\S+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else None


def classify(server: Server, **params) -> httpx.Response:
    return httpx.post(f"{server.url}/classify", params=params, files=files(shapes(1)), timeout=30)


def test_a_new_export_is_served_while_requests_stream_without_one_failure(repo, checkpoints):
    server = Server(repo, model_control="poll", repository_poll_s=str(POLL_S))
    try:
        with RequestStream(server.url, "shapes") as stream:
            stream.wait_for_version(1)
            exported = subprocess.run([VIT_EXPORT, "--checkpoint", str(checkpoints[1]), "--repo", str(repo),
                                       "--name", "shapes"], capture_output=True, text=True, timeout=300)
            assert exported.returncode == 0, exported.stderr
            assert (repo / "shapes" / "2").is_dir()
            stream.wait_for_version(2)
            seen_v2 = len(stream.answers)
            while len(stream.answers) < seen_v2 + 20:
                time.sleep(0.02)
        assert stream.statuses() == Counter({200: len(stream.answers)}), "every request of the stream is answered"
        assert {v for _, v in stream.answers} == {1, 2}
        assert all(v == 2 for _, v in stream.answers[-10:]), "once version 2 serves, new requests go to it"
        server.wait_until(lambda: metric(server, "vitserve_model_unloads_total", model="shapes") == 1.0)
        assert metric(server, "vitserve_model_served_version", model="shapes") == 2.0
        assert metric(server, "vitserve_model_loads_total", model="shapes", outcome="success") == 2.0
        rows = index(server)
        assert rows[("shapes", 2)]["state"] == "READY"
        assert rows[("shapes", 1)]["state"] == "UNAVAILABLE" and "version policy" in rows[("shapes", 1)]["reason"]
        assert re.search(r"serving shapes version 2 .* loaded in", server.output())
    finally:
        assert server.stop() == 0


def test_a_broken_version_never_replaces_the_working_one_and_is_retried_when_its_files_change(repo):
    server = Server(repo, model_control="poll", repository_poll_s=str(POLL_S))
    try:
        # as a copy by another tool looks halfway: metadata there, the graph truncated (renamed in whole, so that the
        # test does not depend on when the polls fall)
        staging = repo / ".incoming"
        staging.mkdir()
        shutil.copy(repo / "shapes" / "1" / "vitserve.json", staging)
        (staging / "model.onnx").write_bytes((repo / "shapes" / "1" / "model.onnx").read_bytes()[:1000])
        broken = repo / "shapes" / "2"
        staging.rename(broken)
        server.wait_until(lambda: index(server)[("shapes", 2)]["reason"].startswith("failed"))
        reason = index(server)[("shapes", 2)]["reason"]
        assert reason.startswith("failed to load:"), reason
        assert classify(server, model="shapes").json()["version"] == 1
        assert httpx.get(f"{server.url}/readyz").status_code == 200
        described = httpx.get(f"{server.url}/models").json()["models"]
        [shapes_model] = [m for m in described if m["name"] == "shapes"]
        assert shapes_model["version"] == 1
        assert {"version": 2, "state": "UNAVAILABLE", "reason": reason} in shapes_model["versions"]
        assert metric(server, "vitserve_model_loads_total", model="shapes", outcome="failure") == 1.0
        assert "model shapes version 2 failed to load" in server.output() and "still serving version 1" in server.output()

        scans = metric(server, "vitserve_repository_scans_total")
        server.wait_until(lambda: metric(server, "vitserve_repository_scans_total") >= scans + 3)
        assert metric(server, "vitserve_model_loads_total", model="shapes", outcome="failure") == 1.0, \
            "unchanged files are not tried again"

        shutil.copy(repo / "shapes" / "1" / "model.onnx", broken)  # the copy completes
        server.wait_until(lambda: classify(server, model="shapes").json()["version"] == 2)
        assert index(server)[("shapes", 2)]["state"] == "READY"

        # a served version whose files are replaced in place is loaded again, then the old copy is let go
        replacement = repo / "replacement.onnx"
        shutil.copy(broken / "model.onnx", replacement)
        replacement.replace(broken / "model.onnx")
        server.wait_until(lambda: metric(server, "vitserve_model_loads_total", model="shapes", outcome="success") == 3.0)
        server.wait_until(lambda: metric(server, "vitserve_model_unloads_total", model="shapes") == 2.0)
        assert classify(server, model="shapes").json()["version"] == 2
    finally:
        assert server.stop() == 0


def test_a_new_model_directory_is_served_and_a_removed_one_leaves(repo):
    server = Server(repo, model_control="poll", repository_poll_s=str(POLL_S))
    try:
        shutil.copytree(repo / "shapes", repo / ".copying")
        (repo / ".copying").rename(repo / "copied")  # hidden directories are not models: only the rename counts
        server.wait_until(lambda: classify(server, model="copied").status_code == 200)
        shutil.rmtree(repo / "copied")
        server.wait_until(lambda: classify(server, model="copied").status_code == 404)
        assert httpx.get(f"{server.url}/readyz").status_code == 200

        # a new model that does not load is reported, but does not take the server out of service
        shutil.copytree(repo / "shapes", repo / ".copying")
        (repo / ".copying" / "1" / "model.onnx").write_bytes(b"not a graph")
        (repo / ".copying").rename(repo / "broken")
        server.wait_until(lambda: index(server)[("broken", 1)]["reason"].startswith("failed to load"))
        assert httpx.get(f"{server.url}/readyz").status_code == 200
        unavailable = httpx.get(f"{server.url}/models").json()["unavailable"]
        assert [m["name"] for m in unavailable] == ["broken"] and "failed to load" in unavailable[0]["reason"]
    finally:
        assert server.stop() == 0


def test_tritonclient_loads_and_unloads_in_explicit_mode(repo):
    server = Server(repo, model_control="explicit", models='["shapes"]')
    client = triton_http.InferenceServerClient(server.url.removeprefix("http://"))
    try:
        states = {(row["name"], row["version"]): row["state"] for row in client.get_model_repository_index()}
        assert states == {("shapes", "1"): "READY", ("other", "1"): "UNAVAILABLE"}
        assert not client.is_model_ready("other")
        assert_error(classify(server, model="other"), 404, "not_found")

        client.load_model("other")
        assert client.is_model_ready("other")
        assert classify(server, model="other").json()["model"] == "other"

        with RequestStream(server.url, "other") as stream:  # unloading waits for the requests routed to it
            stream.wait_for_version(1)
            client.unload_model("other")
            server.wait_until(lambda: 404 in stream.statuses(), timeout=30)
        assert not client.is_model_ready("other")
        # routed before the unload: answered; after: 404 (never a 503 or 500 from a half-stopped model)
        assert set(stream.statuses()) == {200, 404}, stream.statuses()
        error = assert_error(classify(server, model="other"), 404, "not_found")
        assert "other" in error["message"]
        assert httpx.get(f"{server.url}/readyz").status_code == 200  # the models still wanted all serve
        ready_only = httpx.post(f"{server.url}/v2/repository/index", json={"ready": True}).json()
        assert ready_only == [{"name": "shapes", "version": "1", "state": "READY", "reason": ""}]

        with pytest.raises(InferenceServerException, match="no model 'missing' in the repository"):
            client.load_model("missing")
        bad = httpx.post(f"{server.url}/v2/repository/models/shapes/load", json={"parameters": {"config": "{}"}})
        assert bad.status_code == 400 and "takes no parameters config" in bad.json()["error"]
    finally:
        client.close()
        assert server.stop() == 0


def test_a_load_that_fails_is_an_error_with_the_reason_and_the_model_stays_unserved(repo):
    (repo / "other" / "1" / "model.onnx").write_bytes(b"not an onnx graph")
    server = Server(repo, model_control="explicit", models='["shapes"]')
    client = triton_http.InferenceServerClient(server.url.removeprefix("http://"))
    try:
        with pytest.raises(InferenceServerException, match="failed to load 'other'.*version 1 failed to load"):
            client.load_model("other")
        assert index(server)[("other", 1)]["state"] == "UNAVAILABLE"
        assert classify(server, model="shapes").status_code == 200
    finally:
        client.close()
        assert server.stop() == 0


def test_load_and_unload_are_refused_unless_the_mode_is_explicit_and_need_the_api_key(repo):
    server = Server(repo, model_control="poll", api_key=API_KEY)
    key = {"X-API-Key": API_KEY}
    try:
        assert httpx.post(f"{server.url}/v2/repository/index").status_code == 401
        refused = httpx.post(f"{server.url}/v2/repository/models/shapes/unload", headers=key)
        assert refused.status_code == 409 and "--model-control explicit" in refused.json()["error"]
        assert set(index(server, **key)) == {("shapes", 1), ("other", 1)}
        assert httpx.get(f"{server.url}/v2/health/ready").status_code == 200  # probes stay open
    finally:
        assert server.stop() == 0


def test_a_version_policy_serves_several_versions_and_requests_may_name_one(repo, checkpoints):
    export_checkpoint(ExportRequest(checkpoint=checkpoints[1], repo=repo, name="shapes"))
    (repo / "shapes" / VERSION_POLICY_FILE).write_text(json.dumps(VersionPolicy("specific", versions=(1, 2)).to_json()))
    export_checkpoint(ExportRequest(checkpoint=checkpoints[1], repo=repo, name="shapes"))  # writes it into config.pbtxt
    server = Server(repo)
    try:
        assert classify(server, model="shapes").json()["version"] == 2  # the newest served
        assert classify(server, model="shapes", version=1).json()["version"] == 1
        error = assert_error(classify(server, model="shapes", version=3), 404, "not_found")
        assert "served: 1, 2" in error["message"] and "version policy" in error["message"]
        meta = httpx.get(f"{server.url}/v2/models/shapes").json()
        assert meta["versions"] == ["1", "2"]
        v1 = httpx.post(f"{server.url}/v2/models/shapes/versions/1/infer", json={"inputs": [
            {"name": "image_bytes", "shape": [1], "datatype": "BYTES", "data": [_base64(shapes(1)[0])]}]})
        assert v1.status_code == 200 and v1.json()["model_version"] == "1"
        assert index(server)[("shapes", 3)]["state"] == "UNAVAILABLE"
        assert "specific" in (repo / "shapes" / "config.pbtxt").read_text()  # Triton serves the same versions
    finally:
        assert server.stop() == 0


def _base64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def test_tritonclient_grpc_lists_loads_and_unloads(repo):
    import tritonclient.grpc as triton_grpc

    from tests.serving_harness import free_port

    port = free_port()
    server = Server(repo, model_control="explicit", models='["shapes"]', grpc_port=str(port))
    client = triton_grpc.InferenceServerClient(f"127.0.0.1:{port}")
    try:
        rows = {(m.name, m.version): (m.state, m.reason) for m in client.get_model_repository_index().models}
        assert rows == {("shapes", "1"): ("READY", ""), ("other", "1"): ("UNAVAILABLE", "unloaded")}
        client.load_model("other")
        assert client.is_model_ready("other")
        client.unload_model("other")
        assert not client.is_model_ready("other")
        assert {m.name: m.state for m in client.get_model_repository_index().models} == {"shapes": "READY", "other": "UNAVAILABLE"}
        with pytest.raises(InferenceServerException, match="no model 'missing'") as caught:
            client.load_model("missing")
        assert caught.value.status() == "StatusCode.NOT_FOUND"
    finally:
        client.close()
        assert server.stop() == 0
