"""What the served API promises a user beyond the happy path: repositories in the previous format still serve, a
newer format is refused with the reason on /readyz, label names in /models, and contradictory or misplaced input
refused with a message that says what to send instead. Real `vit-serve` process, real HTTP."""
from __future__ import annotations

import json
import shutil

import httpx
import pytest

from model.data import SYNTHETIC_CLASSES
from modelrepo.names import METADATA_FILE
from serving_harness import Server, assert_error, files, shapes


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
