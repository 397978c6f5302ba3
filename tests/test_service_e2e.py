"""End to end: the real `vit-serve` process on 127.0.0.1, a repository exported in the test session, real HTTP."""
from __future__ import annotations

import base64
import collections
import concurrent.futures
import io
import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from bench.loadgen import parse_server_timing
from model.data import SYNTHETIC_CLASSES, make_synthetic
from serving_harness import API_KEY, VIT_SERVE, Server, assert_error, files, png_bytes, shapes


@pytest.fixture(scope="module")
def repo(serving_repo) -> Path:
    return serving_repo


@pytest.fixture(scope="module")
def server(repo):
    srv = Server(repo, api_key=API_KEY, max_batch_size="8")  # pinned: the batching test needs room to batch
    yield srv
    srv.stop()


@pytest.fixture()
def client(server):
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=30) as http:
        yield http
    assert httpx.get(f"{server.url}/healthz").status_code == 200  # the server survives every test


# --- the happy paths ---------------------------------------------------------------------------------------

def test_probes_and_model_listing(client, server):
    assert httpx.get(f"{server.url}/readyz").json()["status"] == "ready"  # probes need no key
    listing = {m["name"]: m for m in client.get("/models").json()["models"]}
    assert set(listing) == {"shapes", "mae-embed", "mae-reconstruct"}
    assert listing["shapes"]["task"] == "classify" and listing["shapes"]["labels"] == ["circle", "square", "triangle", "cross", "bar_top", "bar_bottom"]
    assert listing["shapes"]["provider"] == "CPUExecutionProvider" and listing["shapes"]["variant"] == "fp32"
    assert listing["shapes"]["batching"]["max_batch_size"] == 8
    assert listing["shapes"]["batching"]["instances"] == (2 if len(os.sched_getaffinity(0)) >= 2 else 1)


def test_classify_multipart_with_several_images(client):
    response = client.post("/classify", files=files(shapes(3)), data={"top_k": "2"})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model"] == "shapes" and len(body["results"]) == 3
    for result in body["results"]:
        scores = [p["score"] for p in result["predictions"]]
        assert len(scores) == 2 and scores == sorted(scores, reverse=True)
        assert all(p["label"] in SYNTHETIC_CLASSES for p in result["predictions"])
    assert response.headers["x-request-id"]


def test_classify_json_base64_and_data_url_agree_with_multipart(client):
    image = shapes(1)[0]
    by_json = client.post("/classify", json={"images": [base64.b64encode(image).decode(), "data:image/png;base64," + base64.b64encode(image).decode()]})
    by_form = client.post("/classify", files=files([image]))
    assert by_json.status_code == 200 and by_form.status_code == 200
    assert by_json.json()["results"][0] == by_json.json()["results"][1] == by_form.json()["results"][0]


def test_classify_scores_are_a_softmax_over_all_labels(client):
    body = client.post("/classify", files=files(shapes(1)), data={"top_k": "6"}).json()
    assert sum(p["score"] for p in body["results"][0]["predictions"]) == pytest.approx(1.0, abs=1e-5)


def test_embed_normalised_and_raw(client):
    normalised = client.post("/embed", files=files(shapes(2))).json()
    raw = client.post("/embed", files=files(shapes(2)), data={"normalize": "false"}).json()
    assert normalised["dim"] == 32 and normalised["pooling"] == "cls" and normalised["normalized"] is True
    vectors = np.array(normalised["embeddings"])
    assert vectors.shape == (2, 32) and np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    raw_vectors = np.array(raw["embeddings"])
    assert np.allclose(raw_vectors / np.linalg.norm(raw_vectors, axis=1, keepdims=True), vectors, atol=1e-5)


def test_reconstruct_with_a_seed_is_reproducible_and_masks_the_right_share(client):
    first = client.post("/reconstruct", files=files(shapes(2)), data={"seed": "3", "mask_ratio": "0.75"})
    second = client.post("/reconstruct", files=files(shapes(2)), data={"seed": "3", "mask_ratio": "0.75"})
    assert first.status_code == 200, first.text
    body = first.json()
    assert body["grid"] == [4, 4] and body["visible_patches"] == 4
    for result in body["results"]:
        assert len(result["mask"]) == 16 and sum(result["mask"]) == 12 and result["mse"] >= 0
        for key in ("masked_png", "reconstruction_png", "composite_png"):
            assert Image.open(io.BytesIO(base64.b64decode(result[key]))).size == (16, 16)
    assert body["results"] == second.json()["results"]


def test_reconstruct_with_explicit_visible_patches_keeps_exactly_those(client):
    body = client.post("/reconstruct", json={"images": [base64.b64encode(shapes(1)[0]).decode()], "visible": [0, 5, 10, 15]}).json()
    assert [i for i, m in enumerate(body["results"][0]["mask"]) if m == 0] == [0, 5, 10, 15]
    composite = np.asarray(Image.open(io.BytesIO(base64.b64decode(body["results"][0]["composite_png"]))))
    original = make_synthetic(1, 16, seed=5)[0][0]
    assert np.array_equal(composite[:4, :4], original[:4, :4])  # patch 0 was visible: copied from the input


def test_reconstruct_returns_the_composite_png_when_asked(client):
    response = client.post("/reconstruct", files=files(shapes(1)), headers={"Accept": "image/png"})
    assert response.status_code == 200 and response.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(response.content)).size == (16, 16)


def test_concurrent_requests_are_batched(client, server):
    def one(_):
        with httpx.Client(base_url=server.url, headers={"X-API-Key": API_KEY}, timeout=30) as http:
            return http.post("/classify", files=files(shapes(1))).status_code

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        assert set(pool.map(one, range(48))) == {200}
    metrics = client.get("/metrics").text
    count = sample(metrics, 'vitserve_batch_size_count{model="shapes"}')
    total = sample(metrics, 'vitserve_batch_size_sum{model="shapes"}')
    assert total > count, "every batch held one image: nothing was batched"
    assert sample(metrics, 'vitserve_requests_total{method="POST",route="/classify",status="200"}') >= 48


def v2_bytes_request(image: bytes) -> dict:
    return {"json": {"inputs": [{"name": "image_bytes", "shape": [1], "datatype": "BYTES",
                                 "data": [base64.b64encode(image).decode()]}]}}


@pytest.mark.parametrize("model, path, request_of", [
    ("shapes", "/classify", lambda image: {"files": files([image])}),
    ("mae-embed", "/embed", lambda image: {"files": files([image])}),
    ("mae-reconstruct", "/reconstruct", lambda image: {"files": files([image]), "data": {"seed": "1"}}),
    ("shapes", "/v2/models/shapes/infer", v2_bytes_request),
])
def test_answers_say_where_their_time_went(client, model, path, request_of):
    before = client.get("/metrics").text
    response = client.post(path, **request_of(shapes(1)[0]))
    assert response.status_code == 200, response.text
    timing = parse_server_timing(response.headers["server-timing"])  # the benchmark's reader (Chromium's: test_web_page)
    assert set(timing) == {"decode", "queue", "inference", "total"}
    assert all(value >= 0 for value in timing.values()) and timing["decode"] > 0 and timing["inference"] > 0
    assert timing["decode"] + timing["queue"] + timing["inference"] <= timing["total"] + 0.02  # parts of it, rounded
    # the same runtime time that /metrics adds up (this request's one batch)
    name = f'vitserve_inference_seconds_sum{{model="{model}"}}'
    ran_ms = (sample(client.get("/metrics").text, name) - (sample(before, name) if name in before else 0.0)) * 1e3
    assert timing["inference"] == pytest.approx(ran_ms, abs=0.02)


def sample(metrics: str, name: str) -> float:
    for line in metrics.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    raise AssertionError(f"{name} not in /metrics")


# --- bad input ---------------------------------------------------------------------------------------------

def test_a_bad_image_names_its_index_and_nothing_is_inferred(client):
    before = sample(client.get("/metrics").text, 'vitserve_images_inferred_total{model="shapes"}')
    error = assert_error(client.post("/classify", files=files([shapes(1)[0], b"not an image", shapes(1)[0]])), 400, "invalid_image")
    assert error["index"] == 1
    assert sample(client.get("/metrics").text, 'vitserve_images_inferred_total{model="shapes"}') == before


@pytest.mark.parametrize(
    "kwargs, status, kind",
    [
        (dict(content=b"raw bytes", headers={"Content-Type": "application/octet-stream"}), 415, "unsupported_media_type"),
        (dict(json={"images": []}), 422, "invalid_parameter"),
        (dict(json={"images": ["%%% not base64 %%%"]}), 400, "invalid_image"),
        (dict(json={"top_k": 3}), 422, "invalid_parameter"),
        (dict(data={"top_k": "2"}, files=[("file", ("a.png", b"", "image/png"))]), 400, "invalid_image"),
        (dict(data={"top_k": "0"}, files=[("file", ("a.png", b"x", "image/png"))]), 422, "invalid_parameter"),
        (dict(params={"top_k": "zero"}, json={"images": [base64.b64encode(b"x").decode()]}), 422, "invalid_parameter"),
        (dict(params={"model": "nope"}, json={"images": [base64.b64encode(b"x").decode()]}), 404, "not_found"),
        (dict(json={"images": [base64.b64encode(b"x").decode()] * 33}), 413, "payload_too_large"),
    ],
)
def test_bad_classify_requests_get_the_envelope_and_status(client, kwargs, status, kind):
    assert_error(client.post("/classify", **kwargs), status, kind)


def multipart_body(parts: list[tuple[str, str]], boundary: str = "b0undary", close: bool = True) -> bytes:
    """A multipart body from (Content-Disposition, content) pairs, written by hand so that it can be wrong."""
    body = b"".join(f"--{boundary}\r\nContent-Disposition: {disposition}\r\n\r\n{content}\r\n".encode()
                    for disposition, content in parts)
    return body + (f"--{boundary}--\r\n".encode() if close else b"")


IMAGE_PART = 'form-data; name="file"; filename="a.png"'


@pytest.mark.parametrize(
    "content_type, body, status, kind, says",
    [
        ("multipart/form-data", multipart_body([(IMAGE_PART, "x")]), 400, "bad_request", "names no boundary"),
        ("multipart/form-data; boundary=b0undary", multipart_body([("form-data", "x")]), 400, "bad_request", "no name"),
        ("multipart/form-data; boundary=b0undary", multipart_body([(IMAGE_PART, "x")] * 33), 413, "payload_too_large",
         "limit is 32"),
        ("multipart/form-data; boundary=b0undary", multipart_body([(f'form-data; name="f{i}"', "1") for i in range(65)]),
         400, "bad_request", "more than 64 fields"),
        ("multipart/form-data; boundary=b0undary", multipart_body([('form-data; name="top_k"', "1" * (1024 * 1024 + 1))]),
         400, "bad_request", "over 1024 KiB"),
        ("multipart/form-data; boundary=b0undary", b"no boundary line at all", 400, "bad_request", "malformed multipart"),
        ("multipart/form-data; boundary=b0undary", multipart_body([(IMAGE_PART, "x")], close=False)[:-8], 422,
         "invalid_parameter", "holds no images"),  # cut inside its only part: no complete image
        ("multipart/form-data; boundary=b0undary", multipart_body([('form-data; name="file"', "x")]), 400, "bad_request",
         "must be a file upload"),
        ("multipart/form-data; boundary=b0undary", multipart_body([('form-data; name="image"; filename="a.png"', "x")]),
         422, "invalid_parameter", "file parts named 'image'"),
    ],
    ids=["no boundary", "part without a name", "33 images", "65 fields", "a field over 1 MiB", "not multipart at all",
         "cut short", "image as a field", "image under another name"],
)
def test_malformed_multipart_bodies_are_refused_saying_what_is_wrong(client, content_type, body, status, kind, says):
    error = assert_error(client.post("/classify", content=body, headers={"Content-Type": content_type}), status, kind)
    assert says in error["message"]


def test_multipart_fields_are_text_in_utf8_unless_the_body_says_otherwise(client):
    def refused(charset: str, name: bytes) -> str:
        body = (b'--b0undary\r\nContent-Disposition: form-data; name="model"\r\n\r\n' + name +
                b'\r\n' + multipart_body([(IMAGE_PART, "x")]))
        response = client.post("/classify", content=body,
                               headers={"Content-Type": f"multipart/form-data; boundary=b0undary{charset}"})
        return assert_error(response, 404, "not_found")["message"]
    assert "'modèle'" in refused("", "modèle".encode())
    assert "'modèle'" in refused("; charset=iso-8859-1", "modèle".encode("latin-1"))


@pytest.mark.parametrize(
    "data, kind",
    [({"mask_ratio": "1.5"}, "invalid_parameter"), ({"mask_ratio": "0"}, "invalid_parameter"),
     ({"visible": "0,99"}, "invalid_parameter"), ({"visible": "1,1"}, "invalid_parameter"),
     ({"visible": "0", "masked": "1"}, "invalid_parameter"), ({"masked": ",".join(map(str, range(16)))}, "invalid_parameter"),
     ({"seed": "-1"}, "invalid_parameter"), ({"size": "huge"}, "invalid_parameter")],
)
def test_bad_reconstruct_parameters_are_422(client, data, kind):
    assert_error(client.post("/reconstruct", files=files(shapes(1)), data=data), 422, kind)


def test_a_model_of_another_task_is_not_found(client):
    error = assert_error(client.post("/classify", files=files(shapes(1)), params={"model": "mae-embed"}), 404, "not_found")
    assert "mae-embed serves the embed task" in error["message"]


def test_an_oversized_body_is_refused_with_413(client):
    assert_error(client.post("/classify", files=[("file", ("big.png", b"0" * (17 * 1024 * 1024), "image/png"))]), 413, "payload_too_large")


def test_too_many_pixels_are_refused_before_decoding(client):
    huge = png_bytes(np.zeros((7000, 6000, 3), dtype=np.uint8))  # 42 MP, a few hundred KB compressed
    assert_error(client.post("/classify", files=files([huge])), 413, "payload_too_large")


def test_api_key_is_required_except_for_probes(server):
    assert_error(httpx.post(f"{server.url}/classify", files=files(shapes(1))), 401, "unauthorized")
    assert_error(httpx.get(f"{server.url}/models", headers={"X-API-Key": "wrong"}), 401, "unauthorized")
    assert httpx.get(f"{server.url}/models", headers={"X-API-Key": API_KEY}).status_code == 200
    assert httpx.get(f"{server.url}/metrics").status_code == 200


def test_unknown_route_and_wrong_method_get_the_envelope(client, server):
    assert_error(client.get("/nope"), 404, "not_found")
    response = client.get("/classify")
    assert_error(response, 405, "method_not_allowed")
    assert "POST" in response.headers["allow"]
    assert httpx.head(f"{server.url}/healthz").status_code == 200


def test_a_refused_request_still_gets_a_request_id(server):
    response = httpx.post(f"{server.url}/classify", files=files(shapes(1)), headers={"X-Request-ID": "trace-42"})
    assert_error(response, 401, "unauthorized")
    assert response.headers["x-request-id"] == "trace-42"


def test_repeated_parameters_accumulate_for_patch_lists_and_are_refused_otherwise(client):
    body = client.post("/reconstruct?visible=0&visible=3", files=files(shapes(1))).json()
    assert [i for i, m in enumerate(body["results"][0]["mask"]) if m == 0] == [0, 3]
    assert_error(client.post("/classify?top_k=2&top_k=3", files=files(shapes(1))), 422, "invalid_parameter")


def test_more_files_than_allowed_are_refused_with_413(client):
    assert_error(client.post("/classify", files=files(shapes(1) * 40)), 413, "payload_too_large")


def test_a_request_whose_deadline_passes_gets_504(client):
    big = png_bytes(np.random.default_rng(0).integers(0, 255, (1500, 1500, 3), dtype=np.uint8))  # decoding alone takes > 1 ms
    assert_error(client.post("/classify", files=files([big]), data={"timeout_ms": "1"}), 504, "deadline_exceeded")


def test_a_full_queue_refuses_at_once_with_503_and_retry_after(repo):
    srv = Server(repo, max_queue_images="4", max_images_per_request="4", max_batch_size="1")
    images = files(shapes(4))

    def one(_):
        with httpx.Client(base_url=srv.url, timeout=30) as http:
            return http.post("/classify", files=images)

    try:
        with concurrent.futures.ThreadPoolExecutor(12) as pool:
            responses = list(pool.map(one, range(36)))
        refused = [r for r in responses if r.status_code == 503]
        assert refused and all(r.json()["error"]["type"] == "overloaded" and int(r.headers["retry-after"]) >= 1 for r in refused)
        assert {r.status_code for r in responses} <= {200, 503}
        assert "vitserve_rejections_total" in httpx.get(f"{srv.url}/metrics").text
        assert httpx.get(f"{srv.url}/healthz").status_code == 200
    finally:
        assert srv.stop() == 0


def test_a_request_that_would_wait_past_the_queue_time_bound_is_refused_at_once(repo):
    # 0 ms: a request is admitted only when an instance is free to start it at once (after the first batch is timed)
    srv = Server(repo, max_queue_delay_ms="0", max_batch_size="1", instances="1")
    images = files(shapes(1))

    def one(_):
        with httpx.Client(base_url=srv.url, timeout=30) as http:
            return http.post("/classify", files=images)

    try:
        with concurrent.futures.ThreadPoolExecutor(12) as pool:
            responses = list(pool.map(one, range(60)))
        statuses = [r.status_code for r in responses]
        assert set(statuses) == {200, 503}, statuses  # every admitted request answered; none ran past its deadline
        for refused in (r for r in responses if r.status_code == 503):
            error = refused.json()["error"]
            assert error["type"] == "overloaded" and "ms of work queued" in error["message"], error
            assert int(refused.headers["retry-after"]) >= 1
        metrics = httpx.get(f"{srv.url}/metrics").text
        assert 'vitserve_rejections_total{model="shapes",reason="queue_delay"}' in metrics
        assert 'vitserve_requests_total{method="POST",route="/classify",status="503"}' in metrics  # also those refused unread
        assert httpx.get(f"{srv.url}/healthz").status_code == 200
    finally:
        assert srv.stop() == 0


def test_v2_requests_the_model_would_refuse_are_refused_before_their_body_is_read(repo):
    srv = Server(repo, max_queue_delay_ms="0", max_batch_size="1", instances="1")
    body = {"inputs": [{"name": "image_bytes", "shape": [1], "datatype": "BYTES",
                        "data": [base64.b64encode(shapes(1)[0]).decode()]}]}

    def one(index):
        with httpx.Client(base_url=srv.url, timeout=30) as http:  # a connection each: a refused one is paced
            if index % 2:  # a body the app would answer 400: a 503 shows the request was refused before it was read
                return http.post("/v2/models/shapes/infer", content=b"not json", headers={"content-type": "application/json"})
            return http.post("/v2/models/shapes/infer", json=body)

    try:
        with concurrent.futures.ThreadPoolExecutor(12) as pool:
            responses = list(pool.map(one, range(80)))
        valid, invalid = responses[::2], responses[1::2]
        assert {r.status_code for r in valid} == {200, 503}
        assert {r.status_code for r in invalid} == {400, 503}
        for refused in (r for r in responses if r.status_code == 503):
            assert set(refused.json()) == {"error"} and "ms of work queued" in refused.json()["error"]
            assert int(refused.headers["retry-after"]) >= 1 and refused.headers["x-request-id"]
        metrics = httpx.get(f"{srv.url}/metrics").text
        assert 'vitserve_requests_total{method="POST",route="/v2/models/{model_name}/infer",status="503"}' in metrics
        assert httpx.get(f"{srv.url}/v2/health/live").status_code == 200
    finally:
        assert srv.stop() == 0


def test_settings_that_cannot_work_stop_the_server_with_a_clear_message(repo, tmp_path):
    result = subprocess.run([VIT_SERVE, "--repo", str(tmp_path / "missing")], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "is not a directory" in result.stderr
    env = {**os.environ, "VITSERVE_MAX_QUEUE_IMAGES": "2"}
    result = subprocess.run([VIT_SERVE, "--repo", str(repo)], capture_output=True, text=True, timeout=60, env=env)
    assert result.returncode == 2 and "max_images_per_request" in result.stderr
    env = {**os.environ, "VITSERVE_API_KEY": ""}
    result = subprocess.run([VIT_SERVE, "--repo", str(repo)], capture_output=True, text=True, timeout=60, env=env)
    assert result.returncode == 2 and "empty" in result.stderr
    env = {**os.environ, "VITSERVE_INSTANCES": "0"}
    result = subprocess.run([VIT_SERVE, "--repo", str(repo)], capture_output=True, text=True, timeout=60, env=env)
    assert result.returncode == 2 and "instances" in result.stderr
    result = subprocess.run([VIT_SERVE, "--repo", str(repo), "--intra-op-spin-us", "-1"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "intra_op_spin_us" in result.stderr
    env = {**os.environ, "VITSERVE_WORKERS": "4"}  # removed: refused, never silently ignored
    result = subprocess.run([VIT_SERVE, "--repo", str(repo)], capture_output=True, text=True, timeout=60, env=env)
    assert result.returncode == 2 and "workers" in result.stderr and "scale with replicas" in result.stderr
    result = subprocess.run([VIT_SERVE, "--repo", str(repo), "--workers", "2"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "was removed" in result.stderr


# --- lifecycle ---------------------------------------------------------------------------------------------

def test_sigterm_during_load_answers_every_admitted_request(repo):
    srv = Server(repo, max_delay_ms="5")
    images = files(shapes(4))
    batching = {m["name"]: m["batching"] for m in httpx.get(f"{srv.url}/models").json()["models"]}
    assert batching["shapes"]["max_batch_size"] in (1, 2, 4, 8)  # unset on a CPU: timed at start
    # the auto time bound is known before any request: the batch times measured at start are its first estimates
    assert batching["shapes"]["max_queue_delay_ms"] == "auto" and batching["shapes"]["queue_delay_bound_ms"] >= 1000

    def one(_):
        try:
            with httpx.Client(base_url=srv.url, timeout=30) as http:
                return http.post("/classify", files=images).status_code
        except httpx.TransportError:
            return "not admitted"

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        futures = [pool.submit(one, i) for i in range(200)]
        # once the server is answering (a fixed sleep was sometimes too short on a loaded machine: nothing admitted yet)
        concurrent.futures.wait(futures, return_when=concurrent.futures.FIRST_COMPLETED)
        srv.process.send_signal(signal.SIGTERM)
        outcomes = [f.result() for f in futures]
    print({o: outcomes.count(o) for o in set(outcomes)})
    assert srv.exit_status() == 0
    assert outcomes.count(200) >= 1 and len(outcomes) - outcomes.count(200) >= 1, "SIGTERM came too late to test draining"
    assert set(outcomes) <= {200, "not admitted", 503}, outcomes


def test_importing_the_service_does_not_import_torch():
    code = "import sys, service.api, service.cli; assert 'torch' not in sys.modules, 'torch was imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def cuda_provider_available() -> bool:
    import onnxruntime

    return "CUDAExecutionProvider" in onnxruntime.get_available_providers()


@pytest.mark.gpu
@pytest.mark.skipif(not cuda_provider_available(), reason="no CUDA provider in this onnxruntime (CPU-only machine)")
def test_cuda_device_serves_on_the_cuda_provider(repo):
    srv = Server(repo, device="cuda")
    try:
        listing = {m["name"]: m for m in httpx.get(f"{srv.url}/models").json()["models"]}
        assert listing["shapes"]["provider"] == "CUDAExecutionProvider"
        assert listing["shapes"]["batching"]["max_batch_size"] == 64
        response = httpx.post(f"{srv.url}/classify", files=files(shapes(3)))
        assert response.status_code == 200 and len(response.json()["results"]) == 3
    finally:
        assert srv.stop() == 0


def test_a_one_millisecond_deadline_on_an_idle_model_is_met_or_504_never_503(client):
    """A small image with its own deadline of 1 ms, on an idle server: the tiny model may answer in time, or not;
    either way no wait would help, so a miss is a deadline (504), never an overload to retry (503)."""
    statuses = collections.Counter()
    for _ in range(20):
        response = client.post("/classify?timeout_ms=1", files=files(shapes(1)))
        statuses[response.status_code] += 1
        if response.status_code != 200:
            assert_error(response, 504, "deadline_exceeded")
    assert set(statuses) <= {200, 504}, statuses
