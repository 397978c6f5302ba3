"""The Open Inference Protocol (KServe V2) over gRPC, end to end: the real `vit-serve` process with its gRPC port on,
the real `tritonclient.grpc` client (raw binary tensors by default), and tritonclient's own generated messages for what
that client never sends (typed contents). Answers must agree with /classify, /embed and V2 over REST on the same
images; failures are gRPC status codes with the REST API's messages; SIGTERM lets a call in flight finish."""
from __future__ import annotations

import functools
import io
import os
import socket
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import httpx
import numpy as np
import pytest
import tritonclient.grpc as tritonclient_grpc
from PIL import Image
from tritonclient._plugin import InferenceServerClientPlugin
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

import imageprep
from modelrepo import read_metadata
from serving_harness import API_KEY, VIT_SERVE, Server, files, free_port, shapes
from service.repository import ModelVersion

MAX_IMAGES = 4
MAX_BODY = 256 * 1024
AUTH = {"authorization": f"Bearer {API_KEY}"}
INFER_ROUTE = "/inference.GRPCInferenceService/ModelInfer"


def grpc_server(repo, **env: str) -> Server:
    """A server with its gRPC port on; `grpc_address` says where."""
    port = free_port()
    srv = Server(repo, grpc_port=str(port), **env)
    srv.grpc_address = f"127.0.0.1:{port}"
    return srv


@pytest.fixture(scope="module")
def server(serving_repo):
    srv = grpc_server(serving_repo, api_key=API_KEY, max_batch_size="4", max_images_per_request=str(MAX_IMAGES),
                      max_body_bytes=str(MAX_BODY))
    yield srv
    assert srv.stop() == 0


class BearerKey(InferenceServerClientPlugin):
    """tritonclient's hook for headers on every call (gRPC metadata here): the server's API key."""

    def __call__(self, request) -> None:
        request.headers.update(AUTH)


@pytest.fixture(scope="module")
def triton(server):
    client = tritonclient_grpc.InferenceServerClient(server.grpc_address)
    client.register_plugin(BearerKey())
    yield client
    client.close()


@pytest.fixture(scope="module")
def stub(server):
    """tritonclient's generated stub and messages: an encoder of the protocol that is not ours."""
    with grpc.insecure_channel(server.grpc_address) as channel:
        yield service_pb2_grpc.GRPCInferenceServiceStub(channel)


@pytest.fixture()
def http(server):
    with httpx.Client(base_url=server.url, headers=AUTH, timeout=30) as client:
        yield client


def model_pixels(repo, name: str, images: list[bytes]) -> np.ndarray:
    """What the service makes of these files for this model: the ground floor's decode and resize rule."""
    version = ModelVersion(name, 1, repo / name / "1", read_metadata(repo / name / "1"))
    return np.stack([imageprep.prepare(data, version.resize) for data in images])


def pixels_input(pixels: np.ndarray):
    tensor = tritonclient_grpc.InferInput("images", list(pixels.shape), "UINT8")
    tensor.set_data_from_numpy(pixels)
    return tensor


def bytes_input(images: list[bytes]):
    tensor = tritonclient_grpc.InferInput("image_bytes", [len(images)], "BYTES")
    tensor.set_data_from_numpy(np.array(images, dtype=object))
    return tensor


def grpc_error(call, status: str, fragment: str) -> str:
    with pytest.raises(InferenceServerException) as caught:
        call()
    assert caught.value.status() == f"StatusCode.{status}", (caught.value.status(), caught.value.message())
    assert fragment in caught.value.message(), caught.value.message()
    return caught.value.message()


# --- the messages are the protocol's ----------------------------------------------------------------------

def describe(descriptor, seen=frozenset()) -> dict:
    """Every field's number, type and cardinality, nested messages included: what the wire format depends on."""
    fields = {}
    for field in descriptor.fields:
        fields[field.name] = (field.number, field.type, field.is_repeated)
        inner = field.message_type
        if inner is not None and inner.full_name not in seen:
            fields[field.name + "."] = describe(inner, seen | {descriptor.full_name})
    return fields


def test_our_messages_encode_as_tritons_generated_code():
    from service.v2 import grpc_schema

    triton_service = service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    assert grpc_schema.SERVICE == triton_service.full_name
    for method, (request, response) in grpc_schema.METHODS.items():
        theirs = triton_service.methods_by_name[method]
        assert (theirs.input_type.name, theirs.output_type.name) == (request, response)
        for name in (request, response):
            ours = describe(grpc_schema.message_class(name).DESCRIPTOR)
            if name == "ModelMetadataResponse":  # the Open Inference Protocol's properties (6), which Triton lacks
                assert ours.pop("properties")[0] == 6 and ours.pop("properties.")
            assert ours == describe(getattr(service_pb2, name).DESCRIPTOR), name


# --- tritonclient: probes, metadata ------------------------------------------------------------------------

def test_tritonclient_sees_a_live_ready_server_and_its_models(triton):
    assert triton.is_server_live() and triton.is_server_ready()
    metadata = triton.get_server_metadata(as_json=True)
    assert metadata["name"] == "vitserve" and "classification" in metadata["extensions"]
    assert triton.is_model_ready("shapes") and triton.is_model_ready("shapes", "1")
    assert not triton.is_model_ready("shapes", "2") and not triton.is_model_ready("no-such-model")


def test_model_metadata_lists_inputs_outputs_and_how_to_give_images(triton):
    meta = triton.get_model_metadata("shapes", "1", as_json=True)
    assert (meta["name"], meta["versions"], meta["platform"]) == ("shapes", ["1"], "onnxruntime_onnx")
    inputs = {t["name"]: (t["datatype"], [int(d) for d in t["shape"]]) for t in meta["inputs"]}
    assert inputs == {"images": ("UINT8", [-1, 16, 16, 3]), "image_bytes": ("BYTES", [-1])}
    assert [(t["name"], t["datatype"], [int(d) for d in t["shape"]]) for t in meta["outputs"]] == [("logits", "FP32", [-1, 6])]
    mae = triton.get_model_metadata("mae-reconstruct", as_json=True)
    assert {t["name"] for t in mae["inputs"]} == {"images", "image_bytes", "noise", "keep"}


def test_model_metadata_properties_say_the_task_and_each_inputs_usage(stub):
    meta = stub.ModelMetadata(service_pb2.ModelMetadataRequest(name="shapes"), metadata=tuple(AUTH.items()))
    # the Open Inference Protocol's `properties` (field 6): tritonclient's message has no such field, so read it raw
    from service.v2.grpc_schema import ModelMetadataResponse

    properties = ModelMetadataResponse.FromString(meta.SerializeToString()).properties
    assert properties["task"] == "classify" and properties["image_size"] == "[16, 16]"
    assert "either images or image_bytes" in properties["input image_bytes"]


# --- tritonclient: inference agrees with the vitserve API ---------------------------------------------------

def test_raw_pixels_and_bytes_images_classify_as_classify_does(triton, http, serving_repo):
    images = shapes(4, seed=21)
    expected = [r["predictions"][0] for r in http.post("/classify", files=files(images), data={"top_k": "1"}).json()["results"]]

    from_pixels = triton.infer("shapes", [pixels_input(model_pixels(serving_repo, "shapes", images))], request_id="req-9")
    response = from_pixels.get_response()
    assert (response.id, response.model_version, len(response.raw_output_contents)) == ("req-9", "1", 1)
    logits = from_pixels.as_numpy("logits")
    assert logits.shape == (4, 6) and logits.dtype == np.float32
    assert [int(i) for i in logits.argmax(axis=1)] == [p["index"] for p in expected]

    top = tritonclient_grpc.InferRequestedOutput("logits", class_count=2)
    from_files = triton.infer("shapes", [bytes_input(images)], outputs=[top]).as_numpy("logits")
    assert from_files.shape == (4, 2)
    for row, prediction, image_logits in zip(from_files, expected, logits):
        value, index, label = row[0].decode().split(":")
        assert (int(index), label) == (prediction["index"], prediction["label"])
        assert float(value) == pytest.approx(float(image_logits[int(index)]), abs=1e-5)


def test_bytes_images_embed_as_embed_does(triton, http):
    images = shapes(3, seed=22)
    expected = np.array(http.post("/embed", files=files(images), data={"normalize": "false"}).json()["embeddings"])
    embedding = triton.infer("mae-embed", [bytes_input(images)]).as_numpy("embedding")
    assert embedding.shape == (3, 32)
    np.testing.assert_allclose(embedding, expected, atol=1e-5)


def test_reconstructor_with_noise_and_keep_answers_as_v2_rest(triton, http, serving_repo):
    images, keep = shapes(2, seed=23), 5
    pixels = model_pixels(serving_repo, "mae-reconstruct", images)
    noise = np.random.default_rng(3).random((2, 16), dtype=np.float32)
    inputs = [pixels_input(pixels), tritonclient_grpc.InferInput("noise", [2, 16], "FP32"),
              tritonclient_grpc.InferInput("keep", [1], "INT64")]
    inputs[1].set_data_from_numpy(noise)
    inputs[2].set_data_from_numpy(np.array([keep], dtype=np.int64))
    result = triton.infer("mae-reconstruct", inputs)
    assert [16 - int(row.sum()) for row in result.as_numpy("mask")] == [keep, keep]
    assert result.as_numpy("reconstruction").dtype == np.uint8

    rest = http.post("/v2/models/mae-reconstruct/infer", json={"inputs": [
        {"name": "images", "shape": [2, 16, 16, 3], "datatype": "UINT8", "data": pixels.ravel().tolist()},
        {"name": "noise", "shape": [2, 16], "datatype": "FP32", "data": noise.ravel().tolist()},
        {"name": "keep", "shape": [1], "datatype": "INT64", "data": [keep]}]})
    assert rest.status_code == 200, rest.text
    for output in rest.json()["outputs"]:
        np.testing.assert_allclose(result.as_numpy(output["name"]), np.reshape(output["data"], output["shape"]), atol=1e-5)


def test_typed_contents_in_get_typed_contents_out(stub, triton, serving_repo):
    """A client that sends `contents` (not raw bytes) gets `contents` back, with the same values as the raw answer."""
    pixels = model_pixels(serving_repo, "shapes", shapes(2, seed=24))
    request = service_pb2.ModelInferRequest(model_name="shapes", id="typed")
    tensor = request.inputs.add(name="images", datatype="UINT8", shape=list(pixels.shape))
    tensor.contents.uint_contents.extend(pixels.ravel().tolist())
    response = stub.ModelInfer(request, metadata=tuple(AUTH.items()))
    assert response.id == "typed" and not response.raw_output_contents
    [logits] = response.outputs
    assert (logits.datatype, list(logits.shape)) == ("FP32", [2, 6])
    raw = triton.infer("shapes", [pixels_input(pixels)]).as_numpy("logits")
    np.testing.assert_allclose(np.reshape(logits.contents.fp32_contents, (2, 6)), raw, atol=1e-6)

    request.inputs[0].contents.Clear()
    request.inputs[0].contents.fp32_contents.extend([0.0] * pixels.size)
    with pytest.raises(grpc.RpcError) as caught:
        stub.ModelInfer(request, metadata=tuple(AUTH.items()))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "takes its values in contents.uint_contents, not contents.fp32_contents" in caught.value.details()


def test_grpc_calls_are_counted_like_http_requests(triton, http):
    triton.infer("shapes", [bytes_input(shapes(1))])
    with pytest.raises(InferenceServerException):
        triton.infer("no-such-model", [bytes_input(shapes(1))])
    text = http.get("/metrics").text
    assert f'vitserve_requests_total{{method="GRPC",route="{INFER_ROUTE}",status="200"}}' in text
    assert f'vitserve_requests_total{{method="GRPC",route="{INFER_ROUTE}",status="404"}}' in text
    assert f'vitserve_request_duration_seconds_count{{route="{INFER_ROUTE}"}}' in text


# --- errors: status codes, with the REST API's messages -----------------------------------------------------

def test_unknown_model_is_not_found_with_the_rest_message(triton, http):
    message = grpc_error(lambda: triton.infer("no-such-model", [bytes_input(shapes(1))]), "NOT_FOUND",
                         "unknown model 'no-such-model'")
    rest = http.post("/v2/models/no-such-model/infer", json={"inputs": []})
    assert rest.status_code == 404 and rest.json()["error"] == message
    grpc_error(lambda: triton.get_model_metadata("shapes", "7"), "NOT_FOUND", "no version '7'")


def test_wrong_shape_and_wrong_datatype_are_invalid_arguments(triton):
    grpc_error(lambda: triton.infer("shapes", [pixels_input(np.zeros((1, 8, 8, 3), dtype=np.uint8))]),
               "INVALID_ARGUMENT", "input 'images': shape [1, 8, 8, 3] does not match [-1, 16, 16, 3]")
    as_float = tritonclient_grpc.InferInput("images", [1, 16, 16, 3], "FP32")
    as_float.set_data_from_numpy(np.zeros((1, 16, 16, 3), dtype=np.float32))
    grpc_error(lambda: triton.infer("shapes", [as_float]), "INVALID_ARGUMENT", "datatype FP32, expected UINT8")
    grpc_error(lambda: triton.infer("shapes", [bytes_input([b"not an image"])]), "INVALID_ARGUMENT", "image 0")


def test_too_many_images_or_too_large_a_message_is_resource_exhausted(triton):
    grpc_error(lambda: triton.infer("shapes", [bytes_input(shapes(MAX_IMAGES + 1))]), "RESOURCE_EXHAUSTED",
               f"{MAX_IMAGES + 1} images in one request; the limit is {MAX_IMAGES}")
    too_large = np.random.default_rng(0).integers(0, 255, (1, MAX_BODY + 1), dtype=np.uint8)
    image = tritonclient_grpc.InferInput("image_bytes", [1], "BYTES")
    image.set_data_from_numpy(np.array([too_large.tobytes()], dtype=object))
    grpc_error(lambda: triton.infer("shapes", [image]), "RESOURCE_EXHAUSTED", "larger than max")


def test_a_request_past_its_timeout_parameter_is_deadline_exceeded(triton):
    """Triton's `timeout` parameter (microseconds): decoding 36 megapixels takes longer than 0.1 s."""
    grpc_error(lambda: triton.infer("shapes", [bytes_input([slow_png()])], timeout=100_000), "DEADLINE_EXCEEDED",
               "deadline passed")


def test_the_api_key_is_needed_except_for_the_probes(server):
    client = tritonclient_grpc.InferenceServerClient(server.grpc_address)  # no key
    try:
        assert client.is_server_live() and client.is_server_ready()
        grpc_error(lambda: client.get_model_metadata("shapes"), "UNAUTHENTICATED", "missing or wrong API key")
        grpc_error(lambda: client.infer("shapes", [bytes_input(shapes(1))], headers={"x-api-key": "wrong"}),
                   "UNAUTHENTICATED", "missing or wrong API key")
        assert client.get_model_metadata("shapes", headers={"x-api-key": API_KEY}).name == "shapes"
    finally:
        client.close()


# --- lifecycle ---------------------------------------------------------------------------------------------

@functools.cache
def slow_png() -> bytes:
    """36 megapixels (under max_pixels) in a small PNG: about half a second to decode, so a call is still in flight."""
    side = 6000
    yy, xx = np.mgrid[0:side, 0:side]
    pixels = np.stack([xx * 255 // side, yy * 255 // side, (xx + yy) % 256], axis=-1).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_sigterm_lets_a_call_in_flight_finish_then_exits_0(serving_repo):
    srv = grpc_server(serving_repo)
    images = [slow_png()] * 4
    client = tritonclient_grpc.InferenceServerClient(srv.grpc_address)
    outcome = {}

    def call() -> None:
        try:
            outcome["logits"] = client.infer("shapes", [bytes_input(images)]).as_numpy("logits")
        except InferenceServerException as error:
            outcome["error"] = error
        outcome["finished"] = time.monotonic()

    busy_before = cpu_seconds(srv.process.pid)
    caller = threading.Thread(target=call)
    caller.start()
    # the call has arrived and is decoding: the idle server has used 0.1 s of CPU on it (a fixed sleep raced the call's
    # arrival on a loaded machine: SIGTERM found nothing in flight and the server was gone before the next call)
    srv.wait_until(lambda: cpu_seconds(srv.process.pid) - busy_before >= 0.1, timeout=30)
    signalled = time.monotonic()
    srv.process.send_signal(signal.SIGTERM)
    time.sleep(0.2)
    grpc_error(lambda: client.infer("shapes", [bytes_input(shapes(1))]), "UNAVAILABLE", "the server is shutting down")
    caller.join(timeout=30)
    client.close()
    assert srv.exit_status() == 0
    error = outcome.get("error")
    assert error is None, (error.status(), error.message())
    assert outcome["finished"] > signalled, "the call ended before SIGTERM: nothing was in flight to test"
    assert outcome["logits"].shape == (4, 6)


def test_a_grpc_port_in_use_stops_the_server_with_the_reason(serving_repo):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run([VIT_SERVE, "--repo", str(serving_repo), "--port", "0",
                                 "--grpc-port", str(port)], capture_output=True, text=True, timeout=60)
    assert result.returncode != 0 and f"cannot listen for gRPC on 127.0.0.1:{port}" in result.stderr, result.stderr


def test_without_the_grpc_extra_a_grpc_port_refuses_to_start(serving_repo):
    hide_grpc = "import sys; sys.modules['grpc'] = None; from service.cli import main; sys.exit(main())"
    result = subprocess.run([sys.executable, "-c", hide_grpc, "--repo", str(serving_repo), "--grpc-port", "8001"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2, result.stderr
    assert "grpc_port (--grpc-port, VITSERVE_GRPC_PORT)" in result.stderr and "vitserve[grpc]" in result.stderr


def test_with_the_grpc_port_off_grpc_is_never_imported(serving_repo):
    code = ("import sys; from fastapi.testclient import TestClient; from service.api import create_app; "
            "from service.settings import load_settings; "
            "app = create_app(load_settings(['--repo', sys.argv[1]]))\n"
            "with TestClient(app) as client: assert client.get('/healthz').status_code == 200\n"
            "assert 'grpc' not in sys.modules, 'grpc was imported'")
    env = {**os.environ, "VITSERVE_GRPC_PORT": "0"}
    subprocess.run([sys.executable, "-c", code, str(serving_repo)], check=True, timeout=120, env=env)
