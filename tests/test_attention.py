"""Attention maps: the rollout in PyTorch, its own ONNX graph checked at export, and /classify?attention=true on the
real server (grid, PNG overlay, refused for repositories exported before the maps existed)."""
from __future__ import annotations

import base64
import io
import json
import shutil
from pathlib import Path

import httpx
import numpy as np
import onnx
import pytest
import torch
from matplotlib.cbook import get_sample_data
from PIL import Image

from export.graphs import AttentionGraph, attention_rollout
from export.pipeline import ExportRequest, export_checkpoint
from imageprep import ResizeSpec, prepare
from model.checkpoints import save_checkpoint
from model.data import SYNTHETIC_CLASSES, SYNTHETIC_MEAN, SYNTHETIC_STD, make_synthetic
from model.presets import vit_preset
from model.vit import VisionTransformer
from modelrepo import read_metadata
from modelrepo.names import ATTENTION, ATTENTION_FILE, LOGITS
from modelrepo.session import open_session
from serving_harness import Server, assert_error, files, shapes


def photo() -> bytes:
    with get_sample_data("grace_hopper.jpg") as file:  # a real photo that ships with matplotlib (512x600)
        return file.read()


# --- the rollout, in PyTorch ---------------------------------------------------------------------------------

def test_the_attention_weights_are_the_ones_the_block_applies():
    torch.manual_seed(0)
    attention = VisionTransformer(vit_preset("vit-test", num_classes=3)).blocks[0].attn.eval()
    x = torch.randn(2, 17, 32)
    weights = attention.weights(x)  # (B, heads, T, T)
    _, _, v = attention.heads(x)
    by_hand = attention.proj((weights @ v).transpose(1, 2).reshape(2, 17, 32))
    torch.testing.assert_close(by_hand, attention(x), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 2, 17))


def test_a_patch_every_token_attends_to_is_the_hottest():
    tokens, patch = 1 + 16, 6
    focused = torch.full((1, 2, tokens, tokens), 0.1 / (tokens - 1))
    focused[..., 1 + patch] = 0.9  # every query, every head, every block: mostly this patch
    for pooling in ("cls", "gap"):
        flow = attention_rollout([focused, focused], num_prefix=1, pooling=pooling)
        assert flow.shape == (1, 16) and int(flow.argmax()) == patch
        assert float(flow.sum()) == pytest.approx(1.0)


def test_uniform_attention_gives_a_flat_map():
    torch.manual_seed(0)
    vit = VisionTransformer(vit_preset("vit-test", num_classes=3)).eval()
    with torch.no_grad():
        for block in vit.blocks:  # q = k = 0: every score equal, every softmax row uniform
            block.attn.qkv.weight[:64] = 0
            block.attn.qkv.bias[:64] = 0
    graph = AttentionGraph(vit, SYNTHETIC_MEAN, SYNTHETIC_STD)
    heat = graph.run({"images": make_synthetic(2, 16, seed=1)[0]})[ATTENTION]
    assert heat.shape == (2, 4, 4)
    np.testing.assert_allclose(heat, np.full((2, 4, 4), 1 / 16), atol=1e-6)


# --- the export --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Path:
    """A repository with a cls-pooled classifier (maps) and a map-pooled one (none)."""
    root = tmp_path_factory.mktemp("attention-export")
    torch.manual_seed(1)
    for name, pooling in (("cls-pooled", "cls"), ("map-pooled", "map")):
        save_checkpoint(root / name / "checkpoint.pt", VisionTransformer(vit_preset("vit-test", num_classes=6, pooling=pooling)),
                        labels=SYNTHETIC_CLASSES, mean=SYNTHETIC_MEAN, std=SYNTHETIC_STD)
        export_checkpoint(ExportRequest(checkpoint=root / name / "checkpoint.pt", repo=root / "repo", name=name))
    return root / "repo"


def test_a_classifier_is_exported_with_its_attention_graph_checked_against_pytorch(exported):
    version = exported / "cls-pooled" / "1"
    meta = read_metadata(version)
    assert meta.attention is not None and meta.attention.file == ATTENTION_FILE and meta.attention.method == "rollout"
    assert meta.attention.output.shape == (-1, 4, 4)
    assert meta.attention.max_abs_diff_vs_torch[ATTENTION] <= meta.attention.tolerance
    # the classifier's own graph is the plain one: a request without maps runs nothing of them
    assert [o.name for o in onnx.load(version / "model.onnx").graph.output] == [LOGITS]
    heat = open_session(version / ATTENTION_FILE, ["CPUExecutionProvider"], 1).run(
        [ATTENTION], {"images": make_synthetic(3, 16, seed=2)[0]})[0]
    assert heat.shape == (3, 4, 4) and (heat > 0).all()
    np.testing.assert_allclose(heat.sum(axis=(1, 2)), 1.0, atol=1e-5)


def test_a_map_pooled_classifier_is_exported_without_maps(exported):
    version = exported / "map-pooled" / "1"
    assert read_metadata(version).attention is None and not (version / ATTENTION_FILE).exists()


# --- the service ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def repos(serving_repo, tmp_path_factory) -> Path:
    """The session's repository, plus `legacy`: the same classifier as exported before attention maps existed."""
    legacy = tmp_path_factory.mktemp("legacy-repo")
    shutil.copytree(serving_repo, legacy, dirs_exist_ok=True)
    shutil.copytree(serving_repo / "shapes", legacy / "legacy")
    shutil.rmtree(legacy / "shapes")
    metadata = legacy / "legacy" / "1" / "vitserve.json"
    data = json.loads(metadata.read_text())
    del data["attention"]
    data["name"] = "legacy"
    metadata.write_text(json.dumps(data))
    (legacy / "legacy" / "1" / ATTENTION_FILE).unlink()
    return serving_repo, legacy


@pytest.fixture(scope="module")
def server(repos):
    srv = Server(repos[0])
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def legacy_server(repos):
    srv = Server(repos[1])
    yield srv
    srv.stop()


def test_the_maps_are_the_attention_graphs_own_and_cost_nothing_until_asked(server, serving_repo):
    image = photo()
    plain = httpx.post(f"{server.url}/classify", files=files([image]), timeout=30)
    assert plain.status_code == 200 and "attention" not in plain.json()["results"][0]
    assert "attention graph opened" not in server.output()  # not even loaded yet

    answer = httpx.post(f"{server.url}/classify", files=files([image, shapes(1)[0]]), params={"attention": "true"}, timeout=30)
    assert answer.status_code == 200, answer.text
    results = answer.json()["results"]
    assert results[0]["predictions"] == plain.json()["results"][0]["predictions"]  # the labels do not change
    version = serving_repo / "shapes" / "1"
    meta = read_metadata(version)
    pixels = prepare(image, ResizeSpec(*meta.image.size, meta.image.crop_fraction, meta.image.interpolation))
    expected = open_session(version / ATTENTION_FILE, ["CPUExecutionProvider"], 1).run([ATTENTION], {"images": pixels[None]})[0][0]
    np.testing.assert_allclose(np.array(results[0]["attention"]), expected, atol=1e-6)
    for result in results:
        heat = np.array(result["attention"])
        assert heat.shape == (4, 4) and heat.sum() == pytest.approx(1.0, abs=1e-5)
    assert "attention graph opened" in server.output()


def test_the_overlay_is_drawn_over_the_upload(server):
    answer = httpx.post(f"{server.url}/classify", files=files([photo()]), params={"attention_png": "true", "top_k": 1}, timeout=30)
    assert answer.status_code == 200, answer.text
    result = answer.json()["results"][0]
    overlay = Image.open(io.BytesIO(base64.b64decode(result["attention_png"])))
    assert overlay.format == "PNG" and overlay.size == (512, 600)  # the upload's own size
    assert np.array(result["attention"]).shape == (4, 4)  # the overlay comes with its grid


def test_the_model_listing_says_which_classifiers_have_maps(server, legacy_server):
    listed = {m["name"]: m["attention"] for m in httpx.get(f"{server.url}/models").json()["models"]}
    assert listed["shapes"] is True and listed["mae-reconstruct"] is False
    legacy = {m["name"]: m["attention"] for m in httpx.get(f"{legacy_server.url}/models").json()["models"]}
    assert legacy["legacy"] is False


def test_a_repository_exported_before_the_maps_keeps_serving_and_refuses_them_clearly(legacy_server):
    assert httpx.post(f"{legacy_server.url}/classify", files=files(shapes(1)), timeout=30).status_code == 200
    for params in ({"attention": "true"}, {"attention_png": "1"}):
        refused = httpx.post(f"{legacy_server.url}/classify", files=files(shapes(1)), params=params, timeout=30)
        error = assert_error(refused, 422, "invalid_parameter")
        assert "exported without attention maps" in error["message"] and "'legacy'" in error["message"]
    assert httpx.get(f"{legacy_server.url}/readyz").status_code == 200


def test_openvino_answers_the_same_maps(serving_repo, server):
    """The attention graph opens in the runtime the server runs (--runtime openvino: OpenVINO, f32)."""
    pytest.importorskip("openvino")
    images = files([photo(), shapes(1)[0]])
    expected = httpx.post(f"{server.url}/classify", files=images, params={"attention": "true"}, timeout=30).json()
    openvino = Server(serving_repo, runtime="openvino", precision="f32", models='["shapes"]')
    try:
        assert httpx.get(f"{openvino.url}/models").json()["models"][0]["runtime"] == "openvino"
        answer = httpx.post(f"{openvino.url}/classify", files=images, params={"attention": "true"}, timeout=60)
        assert answer.status_code == 200, answer.text
        for mine, reference in zip(answer.json()["results"], expected["results"]):
            np.testing.assert_allclose(np.array(mine["attention"]), np.array(reference["attention"]), atol=1e-4)
    finally:
        openvino.stop()
