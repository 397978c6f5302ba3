"""The Open Inference Protocol (KServe V2) over REST, end to end: the real `vit-serve` process, the real
`tritonclient.http` client (binary tensors by default), raw HTTP for every bad input. V2 answers must agree with
/classify, /embed and /reconstruct on the same images, and every failure answers `{"error": "<message>"}`."""
from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import httpx
import numpy as np
import pytest
import tritonclient.http as tritonclient_http
from PIL import Image
from tritonclient._plugin import InferenceServerClientPlugin
from tritonclient.utils import InferenceServerException

import imageprep
from model.data import SYNTHETIC_CLASSES
from modelrepo import read_metadata
from serving_harness import API_KEY, Server, files, shapes
from service.repository import ModelVersion

MAX_IMAGES = 4
MAX_BODY = 256 * 1024
AUTH = {"Authorization": f"Bearer {API_KEY}"}
HEADER_LENGTH = "Inference-Header-Content-Length"


@pytest.fixture(scope="module")
def server(serving_repo):
    srv = Server(serving_repo, api_key=API_KEY, max_batch_size="4", max_images_per_request=str(MAX_IMAGES),
                 max_body_bytes=str(MAX_BODY))
    yield srv
    srv.stop()


class BearerKey(InferenceServerClientPlugin):
    """tritonclient's hook for headers on every call: here the server's API key."""

    def __call__(self, request) -> None:
        request.headers.update(AUTH)


@pytest.fixture(scope="module")
def triton(server):
    client = tritonclient_http.InferenceServerClient(server.url.removeprefix("http://"), network_timeout=30)
    client.register_plugin(BearerKey())
    yield client
    client.close()


@pytest.fixture()
def http(server):
    with httpx.Client(base_url=server.url, headers=AUTH, timeout=30) as client:
        yield client
    # the server survives every test, bad inputs included
    assert httpx.get(f"{server.url}/v2/health/live").status_code == 200
    assert httpx.get(f"{server.url}/v2/health/ready").status_code == 200


def model_pixels(repo: Path, name: str, images: list[bytes]) -> np.ndarray:
    """What the service makes of these files for this model: the ground floor's decode and resize rule."""
    version = ModelVersion(name, 1, repo / name / "1", read_metadata(repo / name / "1"))
    return np.stack([imageprep.prepare(data, version.resize) for data in images])


def pixels_input(pixels: np.ndarray, binary: bool = True):
    tensor = tritonclient_http.InferInput("images", list(pixels.shape), "UINT8")
    tensor.set_data_from_numpy(pixels, binary_data=binary)
    return tensor


def bytes_input(images: list[bytes]):
    tensor = tritonclient_http.InferInput("image_bytes", [len(images)], "BYTES")
    tensor.set_data_from_numpy(np.array(images, dtype=object))
    return tensor


def v2_error(response: httpx.Response, status: int, fragment: str) -> str:
    """The protocol's error shape: {"error": "<message>"} and the status, never FastAPI's {"detail": ...}."""
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and isinstance(body["error"], str), body
    assert fragment in body["error"], body["error"]
    return body["error"]


# --- tritonclient: probes, metadata ------------------------------------------------------------------------

def test_tritonclient_sees_a_live_ready_server_with_its_extensions(triton, server):
    assert triton.is_server_live() and triton.is_server_ready()
    metadata = triton.get_server_metadata()
    assert metadata["name"] == "vitserve" and {"binary_tensor_data", "classification"} <= set(metadata["extensions"])
    assert triton.is_model_ready("shapes") and triton.is_model_ready("shapes", "1")
    assert not triton.is_model_ready("shapes", "2") and not triton.is_model_ready("no-such-model")
    # probes are open without the API key, like /healthz; everything else is not
    assert httpx.get(f"{server.url}/v2/health/live").status_code == 200
    assert httpx.get(f"{server.url}/v2/health/ready").status_code == 200
    v2_error(httpx.get(f"{server.url}/v2"), 401, "API key")


def test_model_metadata_lists_both_image_inputs_with_datatypes_and_dynamic_batch(triton):
    shapes_meta = triton.get_model_metadata("shapes", "1")
    assert shapes_meta["name"] == "shapes" and shapes_meta["versions"] == ["1"] and shapes_meta["platform"] == "onnxruntime_onnx"
    inputs = {t["name"]: t for t in shapes_meta["inputs"]}
    assert (inputs["images"]["datatype"], inputs["images"]["shape"]) == ("UINT8", [-1, 16, 16, 3])
    assert (inputs["image_bytes"]["datatype"], inputs["image_bytes"]["shape"]) == ("BYTES", [-1])
    assert all("either images or image_bytes" in t["parameters"]["usage"] for t in inputs.values())
    assert shapes_meta["outputs"] == [{"name": "logits", "datatype": "FP32", "shape": [-1, 6]}]

    mae = triton.get_model_metadata("mae-reconstruct")
    inputs = {t["name"]: t for t in mae["inputs"]}
    assert (inputs["noise"]["datatype"], inputs["noise"]["shape"]) == ("FP32", [-1, 16])
    assert (inputs["keep"]["datatype"], inputs["keep"]["shape"]) == ("INT64", [1])
    assert {t["name"]: (t["datatype"], t["shape"]) for t in mae["outputs"]} == {
        "patches": ("FP32", [-1, 16, 48]), "mask": ("FP32", [-1, 16]), "loss": ("FP32", [-1]),
        "reconstruction": ("UINT8", [-1, 16, 16, 3])}


# --- tritonclient: inference agrees with the vitserve API ---------------------------------------------------

def test_binary_pixels_and_bytes_images_classify_as_classify_does(triton, http, serving_repo):
    images = shapes(4, seed=11)
    expected = [r["predictions"][0] for r in http.post("/classify", files=files(images), data={"top_k": "1"}).json()["results"]]

    from_pixels = triton.infer("shapes", [pixels_input(model_pixels(serving_repo, "shapes", images))], request_id="req-7")
    assert from_pixels.get_response()["id"] == "req-7" and from_pixels.get_response()["model_version"] == "1"
    assert from_pixels.get_output("logits")["parameters"]["binary_data_size"] == 4 * 6 * 4  # binary by default
    logits = from_pixels.as_numpy("logits")
    assert logits.shape == (4, 6) and logits.dtype == np.float32
    assert [int(i) for i in logits.argmax(axis=1)] == [p["index"] for p in expected]

    top = tritonclient_http.InferRequestedOutput("logits", class_count=2)
    from_files = triton.infer("shapes", [bytes_input(images)], outputs=[top]).as_numpy("logits")
    assert from_files.shape == (4, 2)
    for row, prediction, image_logits in zip(from_files, expected, logits):
        value, index, label = row[0].decode().split(":")
        assert (int(index), label) == (prediction["index"], prediction["label"]) and label in SYNTHETIC_CLASSES
        assert float(value) == pytest.approx(float(image_logits[int(index)]), abs=1e-5)  # Triton's value: the logit


def test_bytes_images_embed_as_embed_does(triton, http):
    images = shapes(3, seed=12)
    expected = np.array(http.post("/embed", files=files(images), data={"normalize": "false"}).json()["embeddings"])
    embedding = triton.infer("mae-embed", [bytes_input(images)]).as_numpy("embedding")
    assert embedding.shape == (3, 32)
    np.testing.assert_allclose(embedding, expected, atol=1e-5)


def test_json_inputs_and_outputs_give_the_binary_answer(triton, serving_repo):
    pixels = model_pixels(serving_repo, "mae-embed", shapes(2, seed=13))
    binary = triton.infer("mae-embed", [pixels_input(pixels)]).as_numpy("embedding")
    as_json = triton.infer("mae-embed", [pixels_input(pixels, binary=False)],
                           outputs=[tritonclient_http.InferRequestedOutput("embedding", binary_data=False)])
    assert "data" in as_json.get_output("embedding") and "parameters" not in as_json.get_output("embedding")
    np.testing.assert_array_equal(as_json.as_numpy("embedding"), binary)


def test_raw_json_nested_data_and_base64_bytes_elements(http, serving_repo):
    images = shapes(4, seed=14)
    pixels = model_pixels(serving_repo, "shapes", images)
    nested = {"id": "nested", "inputs": [{"name": "images", "shape": [4, 16, 16, 3], "datatype": "UINT8", "data": pixels.tolist()}]}
    encoded = {"inputs": [{"name": "image_bytes", "shape": [4], "datatype": "BYTES",
                           "data": [base64.b64encode(image).decode() for image in images]}]}
    pretty = json.dumps(nested, indent=2).encode()  # as a person writes it: over 64 KiB, so read off the event loop
    assert len(pretty) > 64 * 1024
    answers = [http.post("/v2/models/shapes/infer", content=pretty, headers={"Content-Type": "application/json"}),
               http.post("/v2/models/shapes/infer", json=encoded)]
    for answer in answers:
        assert answer.status_code == 200 and answer.headers["content-type"] == "application/json", answer.text
    assert answers[0].json()["id"] == "nested" and "id" not in answers[1].json()
    [logits_a], [logits_b] = (answer.json()["outputs"] for answer in answers)
    assert logits_a["shape"] == [4, 6] and logits_a["datatype"] == "FP32"
    np.testing.assert_allclose(logits_a["data"], logits_b["data"], atol=1e-5)


def test_reconstructor_with_noise_and_keep_matches_reconstruct(triton, http, serving_repo):
    images, seed, keep = shapes(2, seed=15), 42, 4  # /reconstruct's default mask: ratio 0.75 of 16 patches keeps 4
    expected = http.post("/reconstruct", files=files(images), data={"seed": str(seed)}).json()["results"]
    noise = np.random.default_rng(seed).random((2, 16), dtype=np.float32)  # the same draw as /reconstruct's
    inputs = [pixels_input(model_pixels(serving_repo, "mae-reconstruct", images)),
              tritonclient_http.InferInput("noise", [2, 16], "FP32"), tritonclient_http.InferInput("keep", [1], "INT64")]
    inputs[1].set_data_from_numpy(noise)
    inputs[2].set_data_from_numpy(np.array([keep], dtype=np.int64))
    result = triton.infer("mae-reconstruct", inputs)
    assert result.as_numpy("patches").shape == (2, 16, 48)
    mask, loss, composite = result.as_numpy("mask"), result.as_numpy("loss"), result.as_numpy("reconstruction")
    assert (mask.shape, loss.shape, composite.shape, composite.dtype) == ((2, 16), (2,), (2, 16, 16, 3), np.uint8)
    for i, answer in enumerate(expected):
        assert mask[i].astype(int).tolist() == answer["mask"] and int(16 - mask[i].sum()) == keep
        assert float(loss[i]) == pytest.approx(answer["mse"], abs=1e-5)
        png = np.asarray(Image.open(io.BytesIO(base64.b64decode(answer["composite_png"]))))
        assert np.abs(composite[i].astype(int) - png.astype(int)).max() <= 1

    # the same in JSON, both ways (patches are large enough to be written off the event loop)
    as_json = http.post("/v2/models/mae-reconstruct/infer", json={
        "inputs": [{"name": "images", "shape": [2, 16, 16, 3], "datatype": "UINT8",
                    "data": model_pixels(serving_repo, "mae-reconstruct", images).ravel().tolist()},
                   {"name": "noise", "shape": [2, 16], "datatype": "FP32", "data": noise.tolist()},
                   {"name": "keep", "shape": [], "datatype": "INT64", "data": keep}]})
    assert as_json.status_code == 200, as_json.text
    json_outputs = {o["name"]: o for o in as_json.json()["outputs"]}
    assert [o["name"] for o in as_json.json()["outputs"]] == ["patches", "mask", "loss", "reconstruction"]
    for name in json_outputs:
        values = np.array(json_outputs[name]["data"]).reshape(json_outputs[name]["shape"])
        np.testing.assert_allclose(values, result.as_numpy(name), atol=1e-5)

    # without noise: the default mask, drawn from the request's seed as /reconstruct draws it; keep as a parameter
    defaulted = triton.infer("mae-reconstruct", [bytes_input(images)], parameters={"seed": seed, "keep": keep},
                             outputs=[tritonclient_http.InferRequestedOutput("mask")])
    assert [o["name"] for o in defaulted.get_response()["outputs"]] == ["mask"]
    assert defaulted.as_numpy("mask").astype(int).tolist() == [answer["mask"] for answer in expected]


def test_a_gzip_request_body_is_read(triton):
    result = triton.infer("shapes", [bytes_input(shapes(1, seed=16))], request_compression_algorithm="gzip")
    assert result.as_numpy("logits").shape == (1, 6)


def test_v2_requests_are_counted_under_their_route_template(http, triton):
    triton.infer("shapes", [bytes_input(shapes(1))])
    text = http.get("/metrics").text
    assert 'route="/v2/models/{model_name}/infer"' in text and 'vitserve_images_inferred_total{model="shapes"}' in text


# --- every bad input: the V2 error shape and the right status -----------------------------------------------

PIXELS = np.zeros((1, 16, 16, 3), dtype=np.uint8)


def json_request(*inputs: dict, **fields) -> dict:
    return {"inputs": list(inputs), **fields}


def pixels_json(shape=(1, 16, 16, 3), datatype="UINT8", data=None) -> dict:
    count = int(np.prod(shape))
    return {"name": "images", "shape": list(shape), "datatype": datatype, "data": data if data is not None else [0] * count}


def binary_body(header: dict, binary: bytes, header_length: int | str | None = "auto") -> tuple[bytes, dict]:
    text = json.dumps(header).encode()
    headers = {"Content-Type": "application/octet-stream"}
    if header_length is not None:
        headers[HEADER_LENGTH] = str(len(text) if header_length == "auto" else header_length)
    return text + binary, headers


def binary_pixels(size: int | None = None) -> dict:
    return {"name": "images", "shape": [1, 16, 16, 3], "datatype": "UINT8",
            "parameters": {"binary_data_size": PIXELS.nbytes if size is None else size}}


JSON_CASES = {
    "wrong datatype": (json_request(pixels_json(datatype="FP32")), 400, "datatype FP32, expected UINT8"),
    "unknown datatype": (json_request(pixels_json(datatype="FLOAT")), 400, "unknown datatype 'FLOAT'"),
    "wrong image size": (json_request(pixels_json(shape=(1, 32, 32, 3))), 400, "[-1, 16, 16, 3]"),
    "wrong rank": (json_request(pixels_json(shape=(16, 16, 3))), 400, "does not match"),
    "wrong element count": (json_request(pixels_json(data=[0] * 700)), 400, "holds 768 elements, the data has 700"),
    "nested data of another shape": (json_request(pixels_json(data=np.zeros((1, 16, 3, 16), int).tolist())), 400, "nested data"),
    "values out of range": (json_request(pixels_json(data=[300] * 768)), 400, "out of range for UINT8"),
    "non-integers for UINT8": (json_request(pixels_json(data=[0.5] * 768)), 400, "cannot hold non-integers"),
    "no data": (json_request({"name": "images", "shape": [1, 16, 16, 3], "datatype": "UINT8"}), 400, "has no data"),
    "unknown input": (json_request(pixels_json(), {"name": "extra", "shape": [1], "datatype": "FP32", "data": [1]}),
                      400, "has no input 'extra'"),
    "both image inputs": (json_request(pixels_json(), {"name": "image_bytes", "shape": [1], "datatype": "BYTES", "data": ["eA=="]}),
                          400, "not both"),
    "no image input": (json_request({"name": "noise", "shape": [1, 16], "datatype": "FP32", "data": [0.0] * 16}), 400, "has no input"),
    "too many pixel images": (json_request(pixels_json(shape=(5, 16, 16, 3))), 413, "the limit is 4"),
    "too many encoded images": (json_request({"name": "image_bytes", "shape": [5], "datatype": "BYTES", "data": ["eA=="] * 5}),
                                413, "the limit is 4"),
    "BYTES element that is not an image": (
        json_request({"name": "image_bytes", "shape": [2], "datatype": "BYTES",
                      "data": [base64.b64encode(shapes(1)[0]).decode(), base64.b64encode(b"not an image").decode()]}),
        400, "image 1"),
    "BYTES element that is not base64": (
        json_request({"name": "image_bytes", "shape": [1], "datatype": "BYTES", "data": ["%%%"]}), 400, "invalid base64"),
    "unknown output": (json_request(pixels_json(), outputs=[{"name": "probabilities"}]), 400, "has no output 'probabilities'"),
    "classification of zero classes": (json_request(pixels_json(), outputs=[{"name": "logits", "parameters": {"classification": 0}}]),
                                       400, "classification"),
    "binary_data_output not a boolean": (json_request(pixels_json(), parameters={"binary_data_output": "yes"}), 400, "true or false"),
    "no inputs": ({"inputs": []}, 400, "malformed inference request"),
    "inputs missing": ({"id": "x"}, 400, "inputs"),
    "negative dimension": (json_request(pixels_json(shape=(1, -16, 16, 3), data=[0] * 768)), 400, "malformed inference request"),
    "binary_data_size without binary part": (json_request(binary_pixels()), 400, "no Inference-Header-Content-Length"),
}


@pytest.mark.parametrize("case", list(JSON_CASES))
def test_a_bad_json_request_gets_a_v2_error(http, case):
    body, status, fragment = JSON_CASES[case]
    v2_error(http.post("/v2/models/shapes/infer", json=body), status, fragment)


RECONSTRUCT_CASES = {
    "keep out of range": ({"name": "keep", "shape": [1], "datatype": "INT64", "data": [17]}, {}, "between 1 and 16"),
    "keep twice": ({"name": "keep", "shape": [], "datatype": "INT64", "data": 4}, {"keep": 4}, "not both"),
    "keep of another datatype": ({"name": "keep", "shape": [1], "datatype": "INT32", "data": [4]}, {}, "expected INT64"),
    "noise for another batch": ({"name": "noise", "shape": [2, 16], "datatype": "FP32", "data": [0.5] * 32}, {}, "batch size 2"),
}


@pytest.mark.parametrize("case", list(RECONSTRUCT_CASES))
def test_bad_mask_inputs_get_a_v2_error(http, case):
    extra, parameters, fragment = RECONSTRUCT_CASES[case]
    v2_error(http.post("/v2/models/mae-reconstruct/infer", json=json_request(pixels_json(), extra, parameters=parameters)),
             400, fragment)


def test_classification_is_refused_on_a_model_without_logits(http):
    body = json_request(pixels_json(), outputs=[{"name": "embedding", "parameters": {"classification": 2}}])
    v2_error(http.post("/v2/models/mae-embed/infer", json=body), 400, "classifier only")


BINARY_CASES = {
    "binary_data_size larger than the body": (binary_pixels(PIXELS.nbytes + 1), PIXELS.tobytes(), "auto", "goes past the end"),
    "binary_data_size not the tensor's size": (binary_pixels(700), PIXELS.tobytes()[:700], "auto", "is 768 bytes"),
    "binary data left over": (binary_pixels(), PIXELS.tobytes() + b"xx", "auto", "2 bytes of binary data after"),
    "missing header length": (binary_pixels(), PIXELS.tobytes(), None, "needs the Inference-Header-Content-Length header"),
    "negative header length": (binary_pixels(), PIXELS.tobytes(), -5, "must not be negative"),
    "header length past the body": (binary_pixels(), PIXELS.tobytes(), 10**6, "the body has only"),
    "header length not a number": (binary_pixels(), PIXELS.tobytes(), "ten", "whole number"),
    "header length cutting the JSON": (binary_pixels(), PIXELS.tobytes(), 20, "malformed inference request"),
}


@pytest.mark.parametrize("case", list(BINARY_CASES))
def test_a_bad_binary_request_gets_a_v2_error(http, case):
    tensor, binary, header_length, fragment = BINARY_CASES[case]
    body, headers = binary_body(json_request(tensor), binary, header_length)
    v2_error(http.post("/v2/models/shapes/infer", content=body, headers=headers), 400, fragment)


def test_a_bad_bytes_tensor_in_binary_gets_a_v2_error(http):
    cut = (10).to_bytes(4, "little") + b"short"  # says 10 bytes, holds 5
    tensor = {"name": "image_bytes", "shape": [1], "datatype": "BYTES", "parameters": {"binary_data_size": len(cut)}}
    v2_error(http.post("/v2/models/shapes/infer", content=binary_body(json_request(tensor), cut)[0],
                       headers=binary_body(json_request(tensor), cut)[1]), 400, "says 10 bytes")


def test_malformed_json_gets_a_v2_error_not_a_422(http):
    v2_error(http.post("/v2/models/shapes/infer", content=b'{"inputs": [', headers={"Content-Type": "application/json"}),
             400, "malformed inference request")


@pytest.mark.parametrize("path, fragment", [
    ("/v2/models/no-such-model/infer", "unknown model 'no-such-model'"),
    ("/v2/models/shapes/versions/2/infer", "(served: 1)"),
])
def test_unknown_models_and_versions_get_404(http, path, fragment):
    v2_error(http.post(path, json=json_request(pixels_json())), 404, fragment)
    v2_error(http.get(path.removesuffix("/infer")), 404, fragment)
    v2_error(http.get(path.replace("/infer", "/ready")), 404, fragment)


def test_paths_and_methods_that_are_no_endpoint_answer_in_the_v2_shape(http):
    v2_error(http.get("/v2/models/shapes/infer"), 405, "allowed: POST")
    v2_error(http.get("/v2/repository/index"), 405, "allowed: POST")
    v2_error(http.get("/v2/repository/elsewhere"), 404, "no V2 endpoint")


def test_limits_on_the_body_answer_in_the_v2_shape(http, server):
    v2_error(http.post("/v2/models/shapes/infer", content=b"{" + b" " * MAX_BODY + b"}"), 413, "the limit is")
    v2_error(http.post("/v2/models/shapes/infer", content=b"{}", headers={"Content-Encoding": "br"}), 415, "Content-Encoding")
    v2_error(http.post("/v2/models/shapes/infer", content=b"not gzip", headers={"Content-Encoding": "gzip"}), 400, "gzip")
    v2_error(httpx.post(f"{server.url}/v2/models/shapes/infer", json=json_request(pixels_json())), 401, "API key")


def test_tritonclient_raises_the_server_message(triton):
    with pytest.raises(InferenceServerException) as raised:
        triton.infer("shapes", [pixels_input(np.zeros((1, 8, 8, 3), dtype=np.uint8))])
    assert raised.value.status() == "400" and "[-1, 16, 16, 3]" in raised.value.message()


# --- the pieces without a server ---------------------------------------------------------------------------

def test_bytes_tensors_round_trip_through_the_binary_format():
    from service.v2.tensors import split_bytes_elements, tensor_to_binary

    elements = [b"", b"\x00\xff" * 3, b"label"]
    raw = tensor_to_binary(np.array(elements, dtype=object))
    assert raw[:4] == (0).to_bytes(4, "little") and split_bytes_elements("x", memoryview(raw)) == elements


def test_classifications_follow_the_logits_with_ties_in_index_order_and_at_most_every_class():
    from service.v2.outputs import classifications

    top = classifications(np.array([[0.5, 2.0, 0.5]], dtype=np.float32), ("a", "b", "c"), count=5)
    assert top.shape == (1, 3) and top[0].tolist() == [b"2.000000:1:b", b"0.500000:0:a", b"0.500000:2:c"]


def test_a_parameter_error_is_a_400_and_the_timeout_parameter_is_in_microseconds():
    from service.errors import InvalidParameter
    from service.v2.errors import v2_error_response
    from service.v2.infer import _timeout_ms

    assert v2_error_response(InvalidParameter("bad")).status_code == 400  # the protocol has no 422
    assert (_timeout_ms({"timeout": 1}), _timeout_ms({"timeout": 2_500_000}), _timeout_ms({"timeout": 0}), _timeout_ms({})) == (1, 2500, None, None)


def test_tritonclient_with_a_one_microsecond_timeout_on_an_idle_model_is_answered_or_gets_504(triton, serving_repo):
    """Triton's `timeout` (microseconds) rounds up to 1 ms here: met, or missed with 504, never 503 (overloaded)."""
    pixels = model_pixels(serving_repo, "shapes", shapes(1))
    for _ in range(10):
        try:
            assert triton.infer("shapes", [pixels_input(pixels)], timeout=1).as_numpy("logits").shape == (1, 6)
        except InferenceServerException as refused:
            assert refused.status() == "504" and "deadline" in refused.message(), (refused.status(), refused.message())
