"""The service's onnxruntime layer: the solo session that a lone batch runs on (all cores) computes what the
per-instance session computes, and exists only where it helps (CPU, more threads than an instance has)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from export.pipeline import ExportRequest, export_checkpoint
from model.checkpoints import save_checkpoint
from model.presets import vit_preset
from model.vit import VisionTransformer
from service.repository import newest_version
from service.runtime import load_model
from service.settings import Settings


@pytest.fixture(scope="module")
def entry(tmp_path_factory):
    root = tmp_path_factory.mktemp("runtime")
    torch.manual_seed(0)
    save_checkpoint(root / "checkpoint.pt", VisionTransformer(vit_preset("vit-test", num_classes=6)))
    export_checkpoint(ExportRequest(checkpoint=root / "checkpoint.pt", repo=root / "repo", name="shapes"))
    return newest_version(root / "repo", "shapes")


def test_a_lone_batch_on_the_solo_session_gives_the_instance_session_results(entry):
    model = load_model(entry, device="cpu", variant="fp32", intra_op_threads=1, solo_threads=2)
    assert model.solo_session is not None
    images = np.random.default_rng(0).integers(0, 256, (3, 16, 16, 3), dtype=np.uint8)
    shared = model.run({"images": images})["logits"]
    alone = model.run({"images": images}, alone=True)["logits"]
    np.testing.assert_allclose(alone, shared, rtol=1e-5, atol=1e-5)
    model.warm_up((1, 4))  # warms both sessions


def test_no_solo_session_when_it_would_not_add_threads(entry):
    assert load_model(entry, device="cpu", variant="fp32", intra_op_threads=2, solo_threads=2).solo_session is None
    assert load_model(entry, device="cpu", variant="fp32", intra_op_threads=2).solo_session is None


def test_instances_default_to_two_on_a_multi_core_cpu_and_one_on_cuda(tmp_path, monkeypatch):
    settings = Settings(repo=tmp_path)
    monkeypatch.setattr(Settings, "cores", property(lambda self: 8))
    assert settings.instances_for("CPUExecutionProvider") == 2
    assert settings.intra_op_threads_for(2) == 4
    assert settings.instances_for("CUDAExecutionProvider") == 1
    monkeypatch.setattr(Settings, "cores", property(lambda self: 1))
    assert settings.instances_for("CPUExecutionProvider") == 1
    assert Settings(repo=tmp_path, instances=3, intra_op_threads=2).instances_for("CPUExecutionProvider") == 3
    assert Settings(repo=tmp_path, instances=3, intra_op_threads=2).intra_op_threads_for(3) == 2
    assert Settings(repo=tmp_path, instances=3, intra_op_threads=2).solo_threads_for(3) == 6  # not the node's cores
    assert settings.solo_threads_for(2) == 1  # the cores (1, patched above)


def _timed_by(model, seconds_for_batch):
    """Replace the model's session call by a sleep that depends only on the batch size."""
    import time

    def run(feeds, alone=False):
        time.sleep(seconds_for_batch(len(feeds["images"])))
        return {}

    model.run = run
    return model


def test_cpu_batch_size_is_the_smallest_with_the_best_time_per_image(entry):
    model = load_model(entry, device="cpu", variant="fp32", intra_op_threads=1)
    # a call costs the same per image whatever the batch (a big ViT on a CPU): batching adds only latency
    assert _timed_by(model, lambda b: 0.004 * b).efficient_batch_size()[0] == 1
    # a fixed cost per call dominates (a small model): the largest batch
    batch, per_image = _timed_by(model, lambda b: 0.02 + 0.001 * b).efficient_batch_size()
    assert batch == 8 and set(per_image) == {1, 2, 4, 8}
    # per image worse beyond 2 (caches): 2, and 8 is never tried
    batch, per_image = _timed_by(model, lambda b: {1: 0.010, 2: 0.016, 4: 0.040}[b]).efficient_batch_size()
    assert batch == 2 and 8 not in per_image


def test_a_static_int8_variant_is_served_when_asked_for_and_its_absence_says_how_to_export_it(tmp_path, entry):
    from service.runtime import RuntimeStartError

    with pytest.raises(RuntimeStartError, match=r"has no int8-static variant .* vit-export --int8 static"):
        load_model(entry, device="cpu", variant="int8-static", intra_op_threads=1)
    save_checkpoint(tmp_path / "checkpoint.pt", VisionTransformer(vit_preset("vit-test", num_classes=6)))
    export_checkpoint(ExportRequest(checkpoint=tmp_path / "checkpoint.pt", repo=tmp_path / "repo", name="q", int8_static=True))
    quantised = newest_version(tmp_path / "repo", "q")
    model = load_model(quantised, device="cpu", variant="int8-static", intra_op_threads=1)
    assert model.variant == "int8-static" and model.entry.variant_path("int8-static").name == "model.int8-static.onnx"
    images = np.random.default_rng(0).integers(0, 256, (2, 16, 16, 3), dtype=np.uint8)
    assert model.run({"images": images})["logits"].shape == (2, 6)
