"""OpenVINO as the service's runtime: the same repository files give what onnxruntime gives (within the stated bf16
tolerance), the real server serves through it and says which runtime and precision it runs, and asking for it
without the extra installed, or with settings it cannot honour, is refused at start."""
from __future__ import annotations

import subprocess
import sys

import httpx
import numpy as np
import pytest
import torch

from export.pipeline import ExportRequest, export_checkpoint
from model.checkpoints import save_checkpoint
from model.data import SYNTHETIC_MEAN, SYNTHETIC_STD, make_synthetic
from model.mae import MaskedAutoencoder
from model.presets import mae_preset, vit_preset
from model.vit import VisionTransformer
from service.repository import newest_version
from service.runtime import load_model
from serving_harness import Server, files, png_bytes

pytest.importorskip("openvino")
from service.runtimes.openvino import bf16_supported  # noqa: E402

# Largest |difference| from onnxruntime on the same graph, as a fraction of the output's range. Measured:
#  - f32: ~1e-7 (op order only).
#  - bf16 (8-bit mantissa for the float products, accumulation in f32): 0.002 on random vit-test, 0.0075 on the trained
#    vit-demo classifier (256 held-out images, top-1 agreement 1.000), 0.0008 on random ViT-Base; 0.03 leaves 4x.
#  - int8 graphs: 0.001-0.002 in f32 (requantisation rounding differs), up to 0.0135 with bf16 around them.
TOLERANCE = {("fp32", "f32"): 1e-4, ("fp32", "bf16"): 0.03, ("int8-static", "f32"): 0.02, ("int8-static", "bf16"): 0.05}


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    root = tmp_path_factory.mktemp("openvino")
    torch.manual_seed(0)
    save_checkpoint(root / "cls" / "checkpoint.pt", VisionTransformer(vit_preset("vit-test", num_classes=6)),
                    mean=SYNTHETIC_MEAN, std=SYNTHETIC_STD)
    save_checkpoint(root / "mae" / "checkpoint.pt", MaskedAutoencoder(mae_preset("mae-test")), mean=SYNTHETIC_MEAN,
                    std=SYNTHETIC_STD)
    export_checkpoint(ExportRequest(checkpoint=root / "cls" / "checkpoint.pt", repo=root / "repo", name="shapes",
                                    int8_static=True))
    export_checkpoint(ExportRequest(checkpoint=root / "mae" / "checkpoint.pt", repo=root / "repo", name="mae"))
    return root / "repo"


def relative_difference(expected: np.ndarray, actual: np.ndarray) -> float:
    return float(np.abs(expected - actual).max() / np.ptp(expected))


PRECISIONS = ["f32", "bf16"] if bf16_supported() else ["f32"]


@pytest.mark.parametrize("variant", ["fp32", "int8-static"])
@pytest.mark.parametrize("precision", PRECISIONS)
def test_openvino_matches_onnxruntime_on_the_same_graph(repo, variant, precision):
    entry = newest_version(repo, "shapes")
    images = make_synthetic(16, 16, seed=2)[0]
    expected = load_model(entry, device="cpu", variant=variant, intra_op_threads=1).run({"images": images})["logits"]
    model = load_model(entry, device="cpu", variant=variant, intra_op_threads=1, solo_threads=2, instances=2,
                       runtime="openvino", precision=precision)
    assert (model.runtime, model.provider, model.precision, model.variant) == ("openvino", "OpenVINO:CPU", precision, variant)
    for alone in (False, True):  # the per-instance streams and the all-cores model for lone batches
        actual = model.run({"images": images}, alone=alone)["logits"]
        assert relative_difference(expected, actual) <= TOLERANCE[variant, precision]
    single = model.run({"images": images[:1]})["logits"]  # another batch size on the same compiled model
    assert relative_difference(expected[:1], single) <= TOLERANCE[variant, precision]


def test_the_reconstructor_masks_exactly_as_onnxruntime_does(repo):
    entry = newest_version(repo, "mae-reconstruct")
    rng = np.random.default_rng(0)
    feeds = {"images": make_synthetic(3, 16, seed=1)[0], "noise": rng.random((3, 16), dtype=np.float32),
             "keep": np.array(4, dtype=np.int64)}
    expected = load_model(entry, device="cpu", variant="fp32", intra_op_threads=1).run(feeds)
    actual = load_model(entry, device="cpu", variant="fp32", intra_op_threads=1, runtime="openvino", precision="f32").run(feeds)
    np.testing.assert_array_equal(actual["mask"], expected["mask"])
    assert relative_difference(expected["patches"], actual["patches"]) <= 1e-4
    assert np.abs(actual["reconstruction"].astype(int) - expected["reconstruction"]).max() <= 1


def test_the_server_runs_on_openvino_and_says_so_in_models_and_metrics(repo):
    server = Server(repo, runtime="openvino", precision="auto", models='["shapes"]', variant="int8-static")
    try:
        listing = {m["name"]: m for m in httpx.get(f"{server.url}/models").json()["models"]}
        precision = "bf16" if bf16_supported() else "f32"
        assert listing["shapes"]["runtime"] == "openvino" and listing["shapes"]["precision"] == precision
        assert listing["shapes"]["provider"] == "OpenVINO:CPU" and listing["shapes"]["variant"] == "int8-static"
        images = make_synthetic(3, 16, seed=7)[0]
        response = httpx.post(f"{server.url}/classify", files=files([png_bytes(image) for image in images]), timeout=30)
        assert response.status_code == 200, response.text
        entry = newest_version(repo, "shapes")
        logits = load_model(entry, device="cpu", variant="int8-static", intra_op_threads=1).run({"images": images})["logits"]
        labels = entry.metadata.classification.labels
        assert [r["predictions"][0]["label"] for r in response.json()["results"]] == [labels[i] for i in logits.argmax(-1)]
        metrics = httpx.get(f"{server.url}/metrics").text
        assert (f'vitserve_model_info{{model="shapes",precision="{precision}",provider="OpenVINO:CPU",task="classify",'
                f'variant="int8-static",version="1"}} 1.0') in metrics
    finally:
        assert server.stop() == 0


def run_vit_serve(repo, *options: str, prelude: str = "") -> subprocess.CompletedProcess:
    code = f"import sys\n{prelude}\nfrom service.cli import main\nsys.exit(main(sys.argv[1:]))"
    return subprocess.run([sys.executable, "-c", code, "--repo", str(repo), "--port", "0", *options],
                          capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("options, prelude, message", [
    (["--runtime", "openvino"], "sys.modules['openvino'] = None  # as if the extra were not installed",
     "the openvino runtime needs the openvino extra, which is not installed: pip install 'vitserve[openvino]'"),
    (["--runtime", "openvino", "--device", "cuda"], "", "the openvino runtime serves on the CPU"),
    (["--precision", "bf16"], "", "onnxruntime has no bf16 CPU kernels: precision bf16 needs --runtime openvino"),
], ids=["openvino-not-installed", "openvino-on-cuda", "bf16-on-onnxruntime"])
def test_a_runtime_the_server_cannot_honour_is_refused_at_start(repo, options, prelude, message):
    result = run_vit_serve(repo, *options, prelude=prelude)
    assert result.returncode != 0
    assert message in result.stdout + result.stderr and "Traceback" not in result.stderr
