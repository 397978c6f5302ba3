"""The exported graphs compute what PyTorch computes: preprocessing in the graph, masking by (noise, keep), variants."""
from __future__ import annotations

import copy

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from onnx.external_data_helper import uses_external_data

from export.graphs import (
    ClassifierGraph,
    EmbedderGraph,
    Normalise,
    ReconstructorGraph,
    visible_set_inputs,
)
from export.errors import ExportError
from export.metadata import task_section
from export.onnx_export import export_onnx, fold_external_data, ort_session
from export.parity import FP32_TOLERANCE, ParityError, check_parity, parity_inputs
from export.variants import check_variant, compare_variant, convert_fp16, quantize_int8
from model.data import SYNTHETIC_MEAN, SYNTHETIC_STD, make_synthetic
from model.mae import MaskedAutoencoder
from model.presets import mae_preset, vit_preset
from model.transforms import eval_transform
from model.vit import VisionTransformer
from modelrepo import Embedding

MEAN, STD = SYNTHETIC_MEAN, SYNTHETIC_STD
SIZE = 16  # the vit-test / mae-test input size; 4x4 patches, L = 16


def eager_normalise(images: np.ndarray) -> torch.Tensor:
    """The training pipeline's normalisation (model/transforms.py): uint8 NHWC -> float32 NCHW."""
    transform = eval_transform(SIZE, MEAN, STD)
    return torch.stack([transform(image) for image in images])


@pytest.fixture(scope="module")
def real_images() -> np.ndarray:
    return make_synthetic(5, SIZE, seed=7)[0]


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    torch.manual_seed(0)
    graph = ClassifierGraph(VisionTransformer(vit_preset("vit-test", num_classes=6)).eval(), MEAN, STD)
    path = tmp_path_factory.mktemp("classifier") / "model.onnx"
    export_onnx(graph, None, path)
    return graph, path


@pytest.fixture(scope="module")
def embedder(tmp_path_factory):
    torch.manual_seed(1)
    graph = EmbedderGraph(MaskedAutoencoder(mae_preset("mae-test", pooling="gap")).eval(), MEAN, STD)
    path = tmp_path_factory.mktemp("embedder") / "model.onnx"
    export_onnx(graph, graph.example_inputs(batch=1), path)  # a lone example must still give a dynamic batch
    return graph, path


@pytest.fixture(scope="module")
def reconstructor(tmp_path_factory):
    torch.manual_seed(2)
    mae = MaskedAutoencoder(mae_preset("mae-test", norm_pix_loss=True)).eval()
    graph = ReconstructorGraph(mae, MEAN, STD)
    path = tmp_path_factory.mktemp("reconstructor") / "model.onnx"
    export_onnx(graph, None, path)
    return graph, path, ort_session(path, threads=1)


def run_reconstructor(session, images: np.ndarray, noise: np.ndarray, keep: int) -> dict[str, np.ndarray]:
    names = [output.name for output in session.get_outputs()]
    feeds = {"images": images, "noise": noise.astype(np.float32), "keep": np.array(keep, dtype=np.int64)}
    return dict(zip(names, session.run(names, feeds)))


def stable_mask(noise: np.ndarray, keep: int) -> np.ndarray:
    """1 = masked: all but the `keep` lowest-noise patches, ties broken by patch order."""
    mask = np.ones_like(noise, dtype=np.float32)
    order = np.argsort(noise, axis=1, kind="stable")[:, :keep]
    np.put_along_axis(mask, order, 0.0, axis=1)
    return mask


# --- classifier and embedder -------------------------------------------------------------------

def test_classifier_onnx_matches_torch_at_batch_1_and_3(classifier, real_images):
    graph, path = classifier
    report = check_parity(graph, path, parity_inputs(graph, real_images=real_images), {})
    assert report["batch_sizes"] == [1, 3]
    assert report["logits"] <= FP32_TOLERANCE


def test_embedder_onnx_matches_torch_and_names_its_pooling(embedder, real_images):
    graph, path = embedder
    report = check_parity(graph, path, parity_inputs(graph, real_images=real_images, batch_sizes=(1, 3, 5)), {})
    assert report["batch_sizes"] == [1, 3, 5] and report["embedding"] <= FP32_TOLERANCE
    assert task_section(graph, None) == {"embedding": Embedding(32, "gap")}


def test_graphs_take_uint8_nhwc_and_normalise_like_training(classifier, embedder, real_images):
    graph, path = classifier
    with torch.no_grad():
        expected = graph.vit(eager_normalise(real_images)).numpy()
        eager = graph(torch.from_numpy(real_images)).numpy()
    onnx_logits = ort_session(path).run(None, {"images": real_images})[0]
    np.testing.assert_allclose(eager, expected, atol=1e-6)
    np.testing.assert_allclose(onnx_logits, expected, atol=FP32_TOLERANCE)

    graph, path = embedder
    with torch.no_grad():
        encoder = graph.encoder
        expected = encoder.pool(encoder.forward_features(eager_normalise(real_images))).numpy()
    np.testing.assert_allclose(ort_session(path).run(None, {"images": real_images})[0], expected, atol=FP32_TOLERANCE)


def test_conv_stem_and_attention_pooling_export_too(real_images, tmp_path):
    torch.manual_seed(3)
    vit = VisionTransformer(vit_preset("vit-test", num_classes=4, stem="conv", pooling="map")).eval()
    graph = ClassifierGraph(vit, MEAN, STD)
    export_onnx(graph, None, tmp_path / "model.onnx")
    assert check_parity(graph, tmp_path / "model.onnx", parity_inputs(graph, real_images=real_images), {})["logits"] <= FP32_TOLERANCE


def test_batch_axis_is_dynamic_on_every_graph(classifier, embedder, reconstructor):
    for graph, path in (classifier, embedder):
        session = ort_session(path)
        for batch in (1, 2, 7):
            images = np.zeros((batch, SIZE, SIZE, 3), np.uint8)
            assert session.run(None, {"images": images})[0].shape[0] == batch
    session = reconstructor[2]
    for batch in (1, 4):
        out = run_reconstructor(session, np.zeros((batch, SIZE, SIZE, 3), np.uint8), np.random.rand(batch, 16), 4)
        assert [value.shape[0] for value in out.values()] == [batch] * 4


def test_the_tensor_specs_written_to_the_metadata_match_the_onnx_file(classifier, reconstructor):
    for graph, path in (classifier, reconstructor[:2]):
        session = ort_session(path)
        onnx_types = {"tensor(uint8)": "uint8", "tensor(float)": "float32", "tensor(int64)": "int64"}
        for described, actual in ((graph.input_specs, session.get_inputs()), (graph.output_specs, session.get_outputs())):
            assert [spec.name for spec in described] == [item.name for item in actual]
            for spec, onnx_item in zip(described, actual):
                assert spec.dtype == onnx_types[onnx_item.type]
                assert len(spec.shape) == len(onnx_item.shape)
                for size, onnx_size in zip(spec.shape, onnx_item.shape):
                    assert (size == -1) == isinstance(onnx_size, str), (spec, onnx_item.shape)
                    assert size == -1 or size == onnx_size
    graph = reconstructor[0]
    assert graph.task == "reconstruct" and graph.default_keep == 4 and graph.num_patches == 16
    assert task_section(graph, None)["reconstruction"].patch_dim == 4 * 4 * 3


# --- reconstructor: masking through (noise, keep) ---------------------------------------------------

def test_reconstructor_reproduces_pytorch_mask_patches_and_loss(reconstructor, real_images):
    graph, path, session = reconstructor
    report = check_parity(graph, path, parity_inputs(graph, real_images=real_images), {})
    assert report["mask"] == 0.0 and report["patches"] <= FP32_TOLERANCE and report["loss"] <= FP32_TOLERANCE
    assert report["reconstruction"] <= 1

    # Against the model's own forward (the official MAE outputs), not just our wrapper.
    mae = graph.mae
    noise = np.random.default_rng(3).random((3, 16), dtype=np.float32)
    images = real_images[:3]
    with torch.no_grad():
        _, pred, mask = mae(eager_normalise(images), noise=torch.from_numpy(noise), mask_ratio=0.75)
        per_image = mae.per_image_loss(eager_normalise(images), pred, mask)
    out = run_reconstructor(session, images, noise, keep=4)
    np.testing.assert_array_equal(out["mask"], mask.numpy())
    np.testing.assert_allclose(out["patches"], pred.numpy(), atol=FP32_TOLERANCE)
    np.testing.assert_allclose(out["loss"], per_image.numpy(), atol=FP32_TOLERANCE)


def test_noise_with_ties_keeps_patch_order_like_eager(reconstructor, real_images):
    graph, _, session = reconstructor
    rng = np.random.default_rng(4)
    noise = (rng.integers(0, 3, (3, 16)) / 2).astype(np.float32)  # three levels: every cut falls inside a tie
    noise[2] = 0.5  # all tied: the first `keep` patches stay visible
    for keep in (3, 8):
        out = run_reconstructor(session, real_images[:3], noise, keep)
        eager = graph.run({"images": real_images[:3], "noise": noise, "keep": np.array(keep)})
        np.testing.assert_array_equal(out["mask"], stable_mask(noise, keep))
        np.testing.assert_array_equal(eager["mask"], stable_mask(noise, keep))
        np.testing.assert_allclose(out["patches"], eager["patches"], atol=FP32_TOLERANCE)
        assert out["mask"][2].tolist() == [0.0] * keep + [1.0] * (16 - keep)


def test_explicit_visible_patches_give_exactly_that_mask(reconstructor, real_images):
    _, _, session = reconstructor
    visible = [[0, 5, 10, 15], [3, 2, 1, 0], [12, 13, 14, 15]]
    noise, keep = visible_set_inputs(visible, 16)
    out = run_reconstructor(session, real_images[:3], noise, int(keep))
    expected = np.ones((3, 16), np.float32)
    for row, indices in enumerate(visible):
        expected[row, indices] = 0.0
    np.testing.assert_array_equal(out["mask"], expected)
    # The visible patches of the composite are the input's own pixels, exactly.
    grid = out["reconstruction"].reshape(3, 4, 4, 4, 4, 3).transpose(0, 1, 3, 2, 4, 5).reshape(3, 16, 48)
    source = real_images[:3].reshape(3, 4, 4, 4, 4, 3).transpose(0, 1, 3, 2, 4, 5).reshape(3, 16, 48)
    for row, indices in enumerate(visible):
        np.testing.assert_array_equal(grid[row, indices], source[row, indices])


def test_keep_is_a_runtime_input(reconstructor, real_images):
    graph, _, session = reconstructor
    noise = np.random.default_rng(5).random((2, 16), dtype=np.float32)
    for keep in (1, 4, 9, 16):
        out = run_reconstructor(session, real_images[:2], noise, keep)
        assert out["mask"].sum(axis=1).tolist() == [16 - keep] * 2
        np.testing.assert_array_equal(out["mask"], stable_mask(noise, keep))
        eager = graph.run({"images": real_images[:2], "noise": noise, "keep": np.array(keep)})
        np.testing.assert_allclose(out["patches"], eager["patches"], atol=FP32_TOLERANCE)
    # Nothing masked: the loss counts no patch and the composite is the input.
    assert out["loss"].tolist() == [0.0, 0.0]
    np.testing.assert_array_equal(out["reconstruction"], real_images[:2])


def test_keep_outside_1_to_L_is_refused_in_eager_and_clamped_in_onnx(reconstructor, real_images):
    graph, _, session = reconstructor
    noise = np.random.default_rng(8).random((2, 16), dtype=np.float32)
    for keep in (0, 17):
        with pytest.raises(ValueError, match="keep must be in 1..16"):
            graph.run({"images": real_images[:2], "noise": noise, "keep": np.array(keep)})
    for keep, clamped in ((0, 1), (-3, 1), (17, 16), (1000, 16)):
        out = run_reconstructor(session, real_images[:2], noise, keep)
        np.testing.assert_array_equal(out["mask"], stable_mask(noise, clamped))


@pytest.mark.parametrize("norm_pix_loss", [False, True])
def test_composite_shows_input_where_visible_and_prediction_where_masked(norm_pix_loss, real_images):
    torch.manual_seed(6)
    mae = MaskedAutoencoder(mae_preset("mae-test", norm_pix_loss=norm_pix_loss)).eval()
    graph = ReconstructorGraph(mae, MEAN, STD)
    noise, keep = visible_set_inputs([list(range(8))] * 2, 16)  # top half visible
    out = graph.run({"images": real_images[:2], "noise": noise, "keep": keep})
    np.testing.assert_array_equal(out["reconstruction"][:, :8], real_images[:2, :8])
    pred = torch.from_numpy(out["patches"])
    if norm_pix_loss:  # predictions are in per-patch normalised units: map back with the target's statistics
        target = mae.patchify(graph.normalise(torch.from_numpy(real_images[:2])))
        pred = pred * (target.var(dim=-1, keepdim=True) + 1e-6) ** 0.5 + target.mean(dim=-1, keepdim=True)
    pixels = Normalise(MEAN, STD).to_pixels(mae.unpatchify(pred)).numpy()
    np.testing.assert_array_equal(out["reconstruction"][:, 8:], pixels[:, 8:])


# --- files, exporters, errors ----------------------------------------------------------------

def test_export_writes_one_self_contained_onnx_file(classifier, tmp_path):
    _, path = classifier
    assert [p.name for p in path.parent.iterdir()] == ["model.onnx"]
    model = onnx.load(str(path), load_external_data=False)
    assert not any(uses_external_data(tensor) for tensor in model.graph.initializer)

    # A model that arrives with a sidecar is folded back into one file.
    onnx.save(onnx.load(str(path)), str(tmp_path / "split.onnx"), save_as_external_data=True,
              all_tensors_to_one_file=True, location="split.onnx.data", size_threshold=0)
    assert (tmp_path / "split.onnx.data").exists()
    fold_external_data(tmp_path / "split.onnx")
    assert [p.name for p in tmp_path.iterdir()] == ["split.onnx"]
    onnx.checker.check_model(str(tmp_path / "split.onnx"))


def test_torchscript_exporter_is_refused_for_the_reconstructor(reconstructor, tmp_path):
    graph = reconstructor[0]
    with pytest.raises(ExportError, match="dynamo=True"):
        export_onnx(graph, None, tmp_path / "model.onnx", dynamo=False)


def test_parity_error_names_output_difference_and_tolerance(classifier, real_images):
    graph, path = classifier
    wrong = copy.deepcopy(graph)
    with torch.no_grad():
        wrong.vit.head.bias.add_(0.01)
    with pytest.raises(ParityError, match=r"'logits'.*differ by 0\.01.*tolerance 0\.0001"):
        check_parity(wrong, path, parity_inputs(wrong, real_images=real_images), {})
    # A loose enough tolerance lets the same difference through (per output, or one number for all float outputs).
    assert check_parity(wrong, path, parity_inputs(wrong, real_images=None), {"logits": 0.02})["logits"] < 0.011
    assert check_parity(wrong, path, parity_inputs(wrong, real_images=None), 0.02)["logits"] < 0.011


def test_mask_must_match_exactly_whatever_the_tolerance(reconstructor, real_images):
    graph, path, _ = reconstructor
    wrong = ReconstructorGraph(graph.mae, MEAN, STD)
    wrong.visible_count = lambda keep: max(1, int(keep) - 1)  # one patch fewer visible than asked for
    with pytest.raises(ParityError, match="'mask'"):
        check_parity(wrong, path, parity_inputs(wrong, real_images=real_images), {"mask": 1.0, "patches": 1e9,
                                                                                   "loss": 1e9, "reconstruction": 255})


# --- variants ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def trained_classifier(tmp_path_factory):
    """vit-test trained briefly on 16x16 synthetic shapes: logits with real margins, unlike random weights."""
    torch.manual_seed(0)
    vit = VisionTransformer(vit_preset("vit-test", num_classes=6))
    graph = ClassifierGraph(vit, MEAN, STD)
    images, labels = make_synthetic(2000, SIZE, seed=1)
    x, y = graph.normalise(torch.from_numpy(images)), torch.from_numpy(labels)
    steps = 200
    optimizer = torch.optim.AdamW(vit.parameters(), lr=3e-3, weight_decay=0.05)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=3e-3, total_steps=steps, pct_start=0.1)
    for _ in range(steps):
        batch = torch.randint(0, len(x), (64,))
        loss = F.cross_entropy(vit(x[batch]), y[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
    graph.eval()
    val_images, val_labels = make_synthetic(400, SIZE, seed=2)
    accuracy = (graph.run({"images": val_images})["logits"].argmax(axis=1) == val_labels).mean()
    assert accuracy > 0.3, f"training failed (accuracy {accuracy:.2f} on 6 classes)"
    directory = tmp_path_factory.mktemp("trained")
    export_onnx(graph, None, directory / "model.onnx")
    return directory / "model.onnx", [{"images": val_images[i:i + 100]} for i in range(0, 400, 100)]


def test_int8_variant_agrees_with_fp32_on_top1(trained_classifier, tmp_path):
    path, validation = trained_classifier
    quantize_int8(path, tmp_path / "int8.onnx")
    ops = {node.op_type for node in onnx.load(str(tmp_path / "int8.onnx")).graph.node}
    assert "MatMulInteger" in ops or "DynamicQuantizeMatMul" in ops
    report = compare_variant(path, tmp_path / "int8.onnx", validation)
    assert report["num_images"] == 400 and report["top1_agreement"] >= 0.95
    check_variant(report, "int8")


def test_fp16_variant_loads_on_cpu_keeps_io_dtypes_and_agrees(trained_classifier, tmp_path):
    path, validation = trained_classifier
    convert_fp16(path, tmp_path / "fp16.onnx")
    session = ort_session(tmp_path / "fp16.onnx")
    assert [item.type for item in session.get_inputs()] == ["tensor(uint8)"]
    assert [item.type for item in session.get_outputs()] == ["tensor(float)"]
    model = onnx.load(str(tmp_path / "fp16.onnx"))
    assert any(tensor.data_type == onnx.TensorProto.FLOAT16 for tensor in model.graph.initializer)
    report = compare_variant(path, tmp_path / "fp16.onnx", validation)
    check_variant(report, "fp16")
    assert report["relative_max_abs_diff"] < 0.01 and report["top1_agreement"] >= 0.995


def test_fp16_reconstructor_masks_exactly_like_fp32_on_near_ties(reconstructor, real_images, tmp_path):
    _, path, session = reconstructor
    convert_fp16(path, tmp_path / "fp16.onnx")
    noise = 0.5 + np.random.default_rng(9).random((3, 16), dtype=np.float32) / 2
    noise[:, 3], noise[:, 7] = 0.3, 0.3 - 1e-5  # equal in fp16: patch 7 must still win, as in fp32
    fp16 = run_reconstructor(ort_session(tmp_path / "fp16.onnx"), real_images[:3], noise, keep=1)
    np.testing.assert_array_equal(fp16["mask"], run_reconstructor(session, real_images[:3], noise, keep=1)["mask"])
    assert fp16["mask"][:, 7].tolist() == [0.0] * 3
