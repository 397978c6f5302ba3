"""What the served API promises a user beyond the happy path: repositories in the previous format still serve, a
newer format is refused with the reason on /readyz, label names in /models, and contradictory or misplaced input
refused with a message that says what to send instead. Real `vit-serve` process, real HTTP."""
from __future__ import annotations

import base64
import io
import json
import shutil

import httpx
import numpy as np
import pytest
from PIL import Image

from model.data import SYNTHETIC_CLASSES
from modelrepo.names import METADATA_FILE
from serving_harness import Server, assert_error, files, png_bytes, shapes


@pytest.fixture(scope="module")
def server(serving_repo, tmp_path_factory):
    """The test repository plus the classifier in the previous metadata format and one from a future exporter."""
    repo = tmp_path_factory.mktemp("contract") / "repo"
    shutil.copytree(serving_repo, repo)
    for name, rewrite in (("legacy", _as_previous_format), ("future", _as_future_format)):
        shutil.copytree(repo / "shapes", repo / name)
        path = repo / name / "1" / METADATA_FILE
        path.write_text(json.dumps(rewrite(json.loads(path.read_text()))))
    srv = Server(repo, wait=False)
    srv.wait_until(lambda: httpx.get(f"{srv.url}/readyz").json()["reasons"] != ["models are loading"])
    yield srv
    srv.stop()


def _as_previous_format(meta: dict) -> dict:
    return {**meta, "format_version": 1, "version": 1}


def _as_future_format(meta: dict) -> dict:
    return {**meta, "format_version": 99, "brand_new_field": {"x": 1}}


@pytest.fixture()
def client(server):
    with httpx.Client(base_url=server.url, timeout=30) as http:
        yield http
    assert httpx.get(f"{server.url}/healthz").status_code == 200


def test_a_newer_metadata_format_is_refused_and_readyz_says_why(client):
    ready = client.get("/readyz")
    assert ready.status_code == 503
    [reason] = ready.json()["reasons"]
    assert "future" in reason and "format_version 99" in reason and "newer vit-export" in reason
    assert "future" not in [m["name"] for m in client.get("/models").json()["models"]]


def test_a_repository_written_by_the_previous_exporter_still_serves(client):
    legacy = client.post("/classify", files=files(shapes(2)), params={"model": "legacy"})
    current = client.post("/classify", files=files(shapes(2)), params={"model": "shapes"})
    assert legacy.status_code == 200 and legacy.json()["version"] == 1, legacy.text
    assert legacy.json()["results"] == current.json()["results"]


def test_models_lists_the_label_names(client):
    listing = {m["name"]: m for m in client.get("/models").json()["models"]}
    assert listing["legacy"]["labels"] == list(SYNTHETIC_CLASSES)
    assert listing["mae-embed"]["labels"] is None and listing["mae-embed"]["task"] == "embed"


def test_visible_patches_and_a_mask_ratio_together_are_refused(client):
    for extra in ({"visible": "0,1,2", "mask_ratio": "0.5"}, {"masked": "3", "mask_ratio": "0.5"}, {"visible": "0", "masked": "3"}):
        error = assert_error(client.post("/reconstruct", files=files(shapes(1)), data=extra), 422, "invalid_parameter")
        assert "give one of 'visible', 'masked' or 'mask_ratio'" in error["message"]
    assert client.post("/reconstruct", files=files(shapes(1)), data={"visible": "0,1,2"}).status_code == 200


def test_a_png_answer_for_several_images_is_not_acceptable(client):
    error = assert_error(client.post("/reconstruct", files=files(shapes(2)), headers={"Accept": "image/png"}), 406, "not_acceptable")
    assert "one image" in error["message"] and "application/json" in error["message"]
    either = client.post("/reconstruct", files=files(shapes(2)), headers={"Accept": "image/png, application/json;q=0.5"})
    assert either.status_code == 200 and len(either.json()["results"]) == 2
    one = client.post("/reconstruct", files=files(shapes(1)), headers={"Accept": "image/png"})
    assert one.status_code == 200 and one.headers["content-type"] == "image/png"


def test_an_image_in_a_wrongly_named_part_says_which_name_is_expected(client):
    [image] = shapes(1)
    error = assert_error(client.post("/classify", files=[("image", ("a.png", image, "image/png"))]), 422, "invalid_parameter")
    assert "named 'file'" in error["message"] and "'image'" in error["message"]
    mixed = [("file", ("a.png", image, "image/png")), ("photo", ("b.png", image, "image/png"))]
    error = assert_error(client.post("/classify", files=mixed), 422, "invalid_parameter")
    assert "'photo'" in error["message"]


def test_pictures_at_the_upload_size_keep_its_pixels_where_visible_and_fade_what_the_model_never_saw(client):
    upload = np.random.default_rng(3).integers(0, 256, (60, 80, 3), dtype=np.uint8)  # 80x60, the model takes 16x16
    body = client.post("/reconstruct", files=files([png_bytes(upload)]), data={"masked": "0", "size": "input"}).json()
    [result] = body["results"]
    pictures = {name: np.asarray(Image.open(io.BytesIO(base64.b64decode(result[f"{name}_png"]))))
                for name in ("masked", "reconstruction", "composite")}
    assert all(p.shape == upload.shape for p in pictures.values())
    faded = np.rint(upload.astype(np.float32) * 0.5 + 64).astype(np.uint8)
    assert (pictures["composite"][0, 0] == faded[0, 0]).all()  # the corner lies outside the centre crop
    assert (pictures["composite"][40, 60] == upload[40, 60]).all()  # inside, on a visible patch: the upload itself
    assert (pictures["masked"][5, 15] == 128).all()  # inside, on patch 0, the hidden one
    assert not (pictures["composite"][5, 15] == upload[5, 15]).all()
    png = client.post("/reconstruct", files=files([png_bytes(upload)]), data={"size": "input", "seed": "1"},
                      headers={"Accept": "image/png"})
    assert png.headers["content-type"] == "image/png" and Image.open(io.BytesIO(png.content)).size == (80, 60)
    at_model_size = client.post("/reconstruct", files=files([png_bytes(upload)]), headers={"Accept": "image/png"})
    assert Image.open(io.BytesIO(at_model_size.content)).size == (16, 16)


def test_a_parameter_of_another_endpoint_is_named_with_the_ones_this_endpoint_takes(client):
    error = assert_error(client.post("/classify", files=files(shapes(1)), data={"visible": "1"}), 422, "invalid_parameter")
    assert error["message"] == "visible: unknown parameter; this endpoint takes attention, attention_png, model, timeout_ms, top_k, version"


def test_a_one_pixel_wide_upload_still_gets_pictures_at_its_own_size(client):
    for height, width in ((16, 1), (2, 6000), (1, 1)):
        upload = np.full((height, width, 3), 200, dtype=np.uint8)
        response = client.post("/reconstruct", files=files([png_bytes(upload)]), data={"size": "input", "seed": "0"},
                               headers={"Accept": "image/png"})
        assert response.status_code == 200, response.text
        assert Image.open(io.BytesIO(response.content)).size == (min(width, 2048), max(1, round(height * min(1, 2048 / width))))


def test_patch_lists_from_the_query_string_and_the_json_body_are_merged(client):
    [image] = shapes(1)
    body = {"images": [base64.b64encode(image).decode()], "visible": [1, 2]}
    merged = client.post("/reconstruct", params={"visible": "0"}, json=body)
    assert merged.status_code == 200 and merged.json()["visible_patches"] == 3
