"""`vit-export` end to end: checkpoints in, a model repository out, and every bad input refused cleanly."""
import json

import pytest
import torch

from export import parity
from export.cli import main
from export.onnx_export import ort_session
from model.checkpoints import save_checkpoint
from model.data import SYNTHETIC_MEAN, SYNTHETIC_STD, make_synthetic
from model.mae import MaskedAutoencoder
from model.presets import mae_preset, vit_preset
from model.vit import VisionTransformer
from modelrepo import versions

LABELS = ["circle", "square", "triangle", "cross", "bar_top", "bar_bottom"]


@pytest.fixture(scope="module")
def classifier_ckpt(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "classifier" / "checkpoint.pt"
    model = VisionTransformer(vit_preset("vit-test", num_classes=6))
    save_checkpoint(path, model, labels=LABELS, mean=SYNTHETIC_MEAN, std=SYNTHETIC_STD, step=7)
    return path


@pytest.fixture(scope="module")
def mae_ckpt(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "mae" / "checkpoint.pt"
    save_checkpoint(path, MaskedAutoencoder(mae_preset("mae-test")), mean=SYNTHETIC_MEAN, std=SYNTHETIC_STD)
    return path


def metadata(repo, name, version):
    return json.loads((repo / name / str(version) / "vitserve.json").read_text())


def test_classifier_export_writes_a_loadable_version_with_complete_metadata(tmp_path, classifier_ckpt):
    repo = tmp_path / "repo"
    assert main(["--checkpoint", str(classifier_ckpt), "--repo", str(repo), "--int8"]) == 0
    meta = metadata(repo, "classifier", 1)  # the name comes from the checkpoint's folder
    assert meta["task"] == "classify" and "version" not in meta and meta["labels"] == LABELS
    assert meta["image"]["size"] == [16, 16] and meta["image"]["layout"] == "NHWC" and meta["image"]["dtype"] == "uint8"
    assert meta["normalization"]["in_graph"] and meta["normalization"]["mean"] == list(SYNTHETIC_MEAN)
    assert meta["grid"] == [4, 4] and meta["patch_size"] == 4
    assert meta["variants"]["fp32"]["max_abs_diff_vs_torch"]["logits"] < 1e-4
    assert meta["variants"]["int8"]["agreement_vs_fp32"]["top1_agreement"] >= 0.98
    assert len(meta["source"]["sha256"]) == 64 and meta["exporter"]["opset"] >= 18
    session = ort_session(repo / "classifier" / "1" / "model.onnx")
    images = make_synthetic(5, 16, seed=3)[0]
    assert session.run(["logits"], {"images": images})[0].shape == (5, 6)
    assert (repo / "classifier" / "config.pbtxt").read_text().startswith('name: "classifier"')


def test_a_second_export_of_the_same_name_gets_the_next_version(tmp_path, classifier_ckpt):
    repo = tmp_path / "repo"
    for _ in range(2):
        assert main(["--checkpoint", str(classifier_ckpt), "--repo", str(repo), "--name", "shapes"]) == 0
    assert versions(repo, "shapes") == [1, 2]
    assert metadata(repo, "shapes", 2)["name"] == "shapes"


def test_mae_export_gives_an_embedder_and_a_reconstructor(tmp_path, mae_ckpt):
    repo = tmp_path / "repo"
    assert main(["--checkpoint", str(mae_ckpt), "--repo", str(repo), "--name", "mae"]) == 0
    embed, rec = metadata(repo, "mae-embed", 1), metadata(repo, "mae-reconstruct", 1)
    assert embed["task"] == "embed" and embed["embedding"] == {"dim": 32, "pooling": "cls"}
    assert rec["task"] == "reconstruct" and rec["reconstruction"]["default_mask_ratio"] == 0.75
    assert {i["name"] for i in rec["inputs"]} == {"images", "noise", "keep"}
    assert "max_batch_size: 0" in (repo / "mae-reconstruct" / "config.pbtxt").read_text()


def test_image_size_option_exports_for_another_resolution(tmp_path, classifier_ckpt):
    repo = tmp_path / "repo"
    assert main(["--checkpoint", str(classifier_ckpt), "--repo", str(repo), "--image-size", "24", "--name", "big"]) == 0
    assert metadata(repo, "big", 1)["image"]["size"] == [24, 24] and metadata(repo, "big", 1)["grid"] == [6, 6]


def test_hugging_face_directory_exports(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                    image_size=16, patch_size=4, num_labels=3, id2label={0: "a", 1: "b", 2: "c"})
    transformers.ViTForImageClassification(config).eval().save_pretrained(tmp_path / "hf")
    repo = tmp_path / "repo"
    assert main(["--checkpoint", str(tmp_path / "hf"), "--repo", str(repo), "--name", "hfvit"]) == 0
    meta = metadata(repo, "hfvit", 1)
    assert meta["labels"] == ["a", "b", "c"] and meta["source"]["format"] == "hf"


def timm_layout_checkpoint(path):
    """Our weights in timm's layout (conv patch kernel), as a plain state dict: detected as timm."""
    state = VisionTransformer(vit_preset("vit-test", num_classes=6)).state_dict()
    state["patch_embed.proj.weight"] = state["patch_embed.proj.weight"].reshape(32, 4, 4, 3).permute(0, 3, 1, 2)
    torch.save(state, path)
    return path


def no_version_left(repo):
    return not repo.exists() or all(not p.name.startswith(".staging") for p in repo.iterdir()) and not any(
        p.is_dir() and any(v.name.isdigit() for v in p.iterdir()) for p in repo.iterdir()
    )


@pytest.mark.parametrize(
    "make_checkpoint, extra, message",
    [
        (lambda d: d / "missing.pt", [], "does not exist"),
        (lambda d: (d / "garbage.pt").write_bytes(b"\x00not a checkpoint" * 10) and d / "garbage.pt", [], "garbage.pt"),
        (lambda d: torch.save({"foo": torch.zeros(2)}, d / "unknown.pt") or d / "unknown.pt", [], "unknown.pt"),
        (None, ["--image-size", "18"], "not a positive multiple of the model's patch size 4"),
        (lambda d: timm_layout_checkpoint(d / "timm.pth"), ["--preset", "vit-base"], "768"),
    ],
)
def test_bad_export_input_is_a_clear_error_and_writes_nothing(tmp_path, capsys, classifier_ckpt, make_checkpoint, extra, message):
    checkpoint = make_checkpoint(tmp_path) if make_checkpoint else classifier_ckpt
    repo = tmp_path / "repo"
    assert main(["--checkpoint", str(checkpoint), "--repo", str(repo), *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert no_version_left(repo)


def test_a_repository_path_that_is_a_file_is_refused(tmp_path, capsys, classifier_ckpt):
    target = tmp_path / "repo"
    target.write_text("a file")
    assert main(["--checkpoint", str(classifier_ckpt), "--repo", str(target)]) == 2
    assert "is a file" in capsys.readouterr().err


def test_a_failed_parity_check_fails_the_export_and_leaves_no_half_written_version(tmp_path, capsys, classifier_ckpt, monkeypatch):
    repo = tmp_path / "repo"
    assert main(["--checkpoint", str(classifier_ckpt), "--repo", str(repo), "--name", "m"]) == 0
    real_check = parity.check_parity

    def check_against_a_perturbed_model(graph, path, inputs, tolerance):
        with torch.no_grad():
            graph.vit.head.bias.add_(1.0)  # PyTorch now disagrees with the exported graph
        try:
            return real_check(graph, path, inputs, tolerance)
        finally:
            with torch.no_grad():
                graph.vit.head.bias.sub_(1.0)

    monkeypatch.setattr("export.pipeline.check_parity", check_against_a_perturbed_model)
    assert main(["--checkpoint", str(classifier_ckpt), "--repo", str(repo), "--name", "m"]) == 2
    assert "logits" in capsys.readouterr().err
    assert versions(repo, "m") == [1]
    assert not [p for p in repo.iterdir() if p.name.startswith(".staging")]
