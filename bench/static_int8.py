"""Which matrix products should static int8 keep in float, and which calibration: accuracy and speed, measured.

    python bench/static_int8.py --checkpoint runs/demo-classifier/checkpoint.pt     # a trained model: accuracy
    python bench/static_int8.py --preset vit-base --repeats 6                       # random weights: error and speed

For one classifier (a trained checkpoint, whose recorded dataset calibrates and measures, or a random-weight preset
at 224 calibrated on synthetic images) exports fp32, the dynamic int8 graph and one static int8 graph per
configuration, and prints for each: max |diff| against fp32 as a fraction of the logit range, top-1 agreement and
accuracy on the held-out images (when labelled), and throughput over fp32 on onnxruntime (and OpenVINO when
installed) at one batch, paired: every round runs every graph once in a rotating order.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch

from export.calibration import calibration_set
from export.graphs import ClassifierGraph
from export.onnx_export import export_onnx, ort_session
from export.variants import compare_variant, image_batches, quantize_int8, quantize_int8_static
from model.checkpoints import load_checkpoint
from model.data import IMAGENET_MEAN, IMAGENET_STD, make_synthetic
from model.mae import image_size_of
from model.presets import vit_preset
from model.vit import VisionTransformer
from modelrepo.names import IMAGES

CONFIGS = {  # name -> (roles kept in float, calibration method, products' outputs quantised too)
    "all/minmax": ((), "minmax", False),
    "ends/minmax": (("patch_embed", "head"), "minmax", False),
    "ends/minmax/outputs": (("patch_embed", "head"), "minmax", True),
    "mlp_out/minmax": (("mlp_out",), "minmax", False),
    "ends+mlp_out/minmax": (("patch_embed", "head", "mlp_out"), "minmax", False),
    "ends/percentile": (("patch_embed", "head"), "percentile", False),
    "ends/entropy": (("patch_embed", "head"), "entropy", False),
}


def build(args, tmp: Path) -> tuple[dict[str, Path], np.ndarray, np.ndarray | None]:
    if args.checkpoint:
        loaded = load_checkpoint(args.checkpoint)
        model, mean, std, training = loaded.model.eval(), loaded.mean, loaded.std, loaded.training
        if args.dataset:  # a checkpoint from before the dataset was recorded
            training = {**(training or {}), "data": {"source": args.dataset}}
    else:
        torch.manual_seed(0)
        model = VisionTransformer(vit_preset(args.preset, image_size=224, num_classes=1000)).eval()
        mean, std, training = IMAGENET_MEAN, IMAGENET_STD, None
    size = image_size_of(model)
    real = make_synthetic(64, size, seed=12345)[0]
    calibration = calibration_set(training, None, size, real)
    files = {"fp32": tmp / "fp32.onnx", "dynamic": tmp / "dynamic.onnx"}
    export_onnx(ClassifierGraph(model, mean, std), None, files["fp32"])
    quantize_int8(files["fp32"], files["dynamic"])
    for name in args.configs.split(","):
        keep, method, outputs = CONFIGS[name]
        started = time.perf_counter()
        files[name] = tmp / f"{name.replace('/', '-')}.onnx"
        quantize_int8_static(files["fp32"], files[name], image_batches(calibration.images), keep_float=keep, method=method,
                             quantize_outputs=outputs)
        print(f"{name}: quantised in {time.perf_counter() - started:.0f} s", flush=True)
    held_out = calibration.held_out if calibration.held_out is not None else real
    return files, held_out, calibration.held_out_labels


def accuracy_of(path: Path, images: np.ndarray, labels: np.ndarray, threads: int | None) -> float:
    logits = ort_session(path, threads).run(None, {IMAGES: images})[0]
    return float((logits.argmax(-1) == labels).mean())


def speeds(files: dict[str, Path], batch: np.ndarray, repeats: int, threads: int | None, runtime: str) -> dict[str, float]:
    """Median per-round throughput ratio over fp32 of each graph."""
    if runtime == "openvino":
        import openvino as ov
        core = ov.Core()
        config = {"INFERENCE_NUM_THREADS": threads or 0, "PERFORMANCE_HINT": "LATENCY"}
        sessions = {name: core.compile_model(str(path), "CPU", config) for name, path in files.items()}
        run = lambda name: sessions[name]({IMAGES: batch})  # noqa: E731
    else:
        sessions = {name: ort_session(path, threads) for name, path in files.items()}
        run = lambda name: sessions[name].run(None, {IMAGES: batch})  # noqa: E731
    for name in files:
        run(name)
    times: dict[str, list[float]] = {name: [] for name in files}
    order = list(files)
    for round_index in range(repeats):
        shift = round_index % len(order)
        for name in order[shift:] + order[:shift]:
            started = time.perf_counter()
            run(name)
            times[name].append(time.perf_counter() - started)
    return {name: statistics.median(f / t for f, t in zip(times["fp32"], times[name])) for name in files}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, help="a trained classifier (default: a random-weight --preset)")
    parser.add_argument("--dataset", help="the checkpoint's dataset, when it does not record one ('synthetic' or a folder)")
    parser.add_argument("--preset", default="vit-base")
    parser.add_argument("--configs", default=",".join(CONFIGS))
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=6, help="timed rounds (0: accuracy only)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--runtimes", default="onnxruntime,openvino")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        files, held_out, labels = build(args, Path(tmp))
        rows = {name: compare_variant(files["fp32"], path, [{IMAGES: held_out}], threads=args.threads)
                for name, path in files.items() if name != "fp32"}
        speed = {}
        if args.repeats:
            batch = held_out[np.arange(args.batch) % len(held_out)]
            for runtime in args.runtimes.split(","):
                try:
                    speed[runtime] = speeds(files, batch, args.repeats, args.threads, runtime)
                except ImportError:
                    print(f"{runtime}: not installed, skipped")
        print(f"\n{len(held_out)} held-out images{' (labelled)' if labels is not None else ''}; batch {args.batch}; "
              f"{args.repeats} paired rounds")
        header = f"{'graph':>22} {'max|diff|/range':>15} {'top-1 agree':>11} {'accuracy':>9}"
        header += "".join(f" {runtime + ' x fp32':>18}" for runtime in speed)
        print(header)
        for name, path in files.items():
            row = rows.get(name, {"relative_max_abs_diff": 0.0, "top1_agreement": 1.0})
            accuracy = f"{accuracy_of(path, held_out, labels, args.threads):.4f}" if labels is not None else "-"
            line = f"{name:>22} {row['relative_max_abs_diff']:>15.4f} {row['top1_agreement']:>11.4f} {accuracy:>9}"
            line += "".join(f" {speed[runtime][name]:>18.2f}" for runtime in speed)
            print(line, flush=True)


if __name__ == "__main__":
    main()
