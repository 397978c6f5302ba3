"""`vit-export --int8 static`: QDQ int8 calibrated on real images, judged against fp32 (and on labelled held-out images)
and refused when it strays; the CPU runtime serves it."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from PIL import Image

from export.cli import main
from export.onnx_export import ort_session
from export.variants import matmul_roles
from model.checkpoints import save_checkpoint
from model.data import SYNTHETIC_MEAN, SYNTHETIC_STD, make_synthetic
from model.presets import mae_preset, vit_preset
from model.mae import MaskedAutoencoder
from model.vit import VisionTransformer
from modelrepo import versions

VIT_TRAIN = str(Path(sys.executable).with_name("vit-train"))


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A classifier really trained by vit-train (a few steps on a small built-in set): its checkpoint records the data."""
    out = tmp_path_factory.mktemp("run") / "shapes"
    result = subprocess.run([VIT_TRAIN, "classifier", "--out", str(out), "--preset", "vit-test", "--image-size", "16",
                             "--num-synthetic", "300", "--batch-size", "32", "--epochs", "2", "--threads", "1",
                             "--progress", "off"], capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-2000:]
    return out / "checkpoint.pt"


def metadata(repo: Path, name: str) -> dict:
    return json.loads((repo / name / "1" / "vitserve.json").read_text())


def quantised_products(path: Path) -> tuple[set[str], set[str]]:
    """(names of MatMul/Gemm nodes fed by a DequantizeLinear, of those that are not) in an int8 QDQ graph."""
    graph = onnx.load(str(path)).graph
    producers = {out: node.op_type for node in graph.node for out in node.output}
    products = [node for node in graph.node if node.op_type in ("MatMul", "Gemm")]
    fed = {node.name for node in products if producers.get(node.input[0]) == "DequantizeLinear"}
    return fed, {node.name for node in products} - fed


def requantised_products(path: Path) -> list[str]:
    """MatMul/Gemm nodes whose output is rounded to int8 again (a QuantizeLinear right after them)."""
    graph = onnx.load(str(path)).graph
    producers = {out: node for node in graph.node for out in node.output}
    return [producers[node.input[0]].name for node in graph.node if node.op_type == "QuantizeLinear"
            and node.input[0] in producers and producers[node.input[0]].op_type in ("MatMul", "Gemm")]


def test_static_int8_is_calibrated_on_the_checkpoints_training_images_and_measured_on_its_held_out_ones(tmp_path, trained):
    repo = tmp_path / "repo"
    assert main(["--checkpoint", str(trained), "--repo", str(repo), "--int8", "static"]) == 0
    record = metadata(repo, "shapes")["variants"]["int8-static"]
    assert record["file"] == "model.int8-static.onnx" and not (repo / "shapes" / "1" / "model.int8.onnx").exists()
    assert record["calibration"] == {"source": "training split of synthetic", "images": 64, "held_out_images": 60}
    agreement = record["agreement_vs_fp32"]
    assert agreement["num_images"] == 60 and agreement["top1_agreement"] >= 0.98
    assert agreement["fp32_accuracy"] - agreement["accuracy"] <= record["tolerance"]["accuracy_drop"] == 0.01
    assert 0 < agreement["relative_max_abs_diff"] <= 0.10

    static = repo / "shapes" / "1" / "model.int8-static.onnx"
    fed, plain = quantised_products(static)
    assert len(fed) == 4 * 2 and len(plain) == 2  # qkv, proj, fc1, fc2 of 2 blocks; patch embedding and head float
    assert requantised_products(static) == []  # inputs quantised, outputs left in float for the bias add
    roles = matmul_roles(onnx.load(str(repo / "shapes" / "1" / "model.onnx")).graph)
    assert sorted(roles.values()).count("mlp_out") == 2 and {"patch_embed", "head"} <= set(roles.values())
    images = make_synthetic(8, 16, seed=9)[0]
    fp32 = ort_session(repo / "shapes" / "1" / "model.onnx").run(None, {"images": images})[0]
    int8 = ort_session(static).run(None, {"images": images})[0]
    assert np.abs(fp32 - int8).max() <= 0.1 * np.ptp(fp32)


def test_both_int8_kinds_in_one_export_with_calibration_from_an_images_folder(tmp_path):
    torch.manual_seed(0)
    checkpoint = tmp_path / "plain" / "checkpoint.pt"  # no recorded dataset: calibrated on --images
    save_checkpoint(checkpoint, VisionTransformer(vit_preset("vit-test", num_classes=6)), mean=SYNTHETIC_MEAN,
                    std=SYNTHETIC_STD)
    folder = tmp_path / "photos"
    folder.mkdir()
    for index, image in enumerate(make_synthetic(12, 40, seed=4)[0]):  # other size than the model's: resized
        Image.fromarray(image).save(folder / f"{index}.png")
    repo = tmp_path / "repo"
    assert main(["--checkpoint", str(checkpoint), "--repo", str(repo), "--int8", "--int8", "static",
                 "--images", str(folder)]) == 0
    variants = metadata(repo, "plain")["variants"]
    assert set(variants) == {"fp32", "int8", "int8-static"}
    assert variants["int8-static"]["calibration"] == {"source": f"images folder {folder}", "images": 12}
    assert "accuracy" not in variants["int8-static"]["agreement_vs_fp32"]  # unlabelled images: agreement only
    assert "calibration" not in variants["int8"]


def test_an_mae_gets_a_static_int8_embedder_and_reconstructor(tmp_path):
    torch.manual_seed(0)
    checkpoint = tmp_path / "mae" / "checkpoint.pt"
    save_checkpoint(checkpoint, MaskedAutoencoder(mae_preset("mae-test")), mean=SYNTHETIC_MEAN, std=SYNTHETIC_STD)
    repo = tmp_path / "repo"
    assert main(["--checkpoint", str(checkpoint), "--repo", str(repo), "--int8", "static"]) == 0
    for name in ("mae-embed", "mae-reconstruct"):
        record = metadata(repo, name)["variants"]["int8-static"]
        assert record["calibration"]["source"].startswith("built-in synthetic images")
        assert record["agreement_vs_fp32"]["relative_max_abs_diff"] <= 0.10
        assert quantised_products(repo / name / "1" / "model.int8-static.onnx")[0]


def test_a_static_int8_that_loses_accuracy_on_held_out_images_fails_the_export(tmp_path, trained):
    """The accuracy check is enforced: under a tolerance no variant can meet, the export is refused and writes nothing."""
    prelude = ("import export.variants as v; v.TOLERANCES['int8-static'].update(accuracy_drop=-1.0)")
    code = f"import sys\n{prelude}\nfrom export.cli import main\nsys.exit(main(sys.argv[1:]))"
    repo = tmp_path / "repo"
    result = subprocess.run([sys.executable, "-c", code, "--checkpoint", str(trained), "--repo", str(repo),
                             "--int8", "static"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "vit-export: error: int8-static variant: accuracy" in result.stderr and "held-out images, fp32" in result.stderr
    assert versions(repo, "shapes") == []
