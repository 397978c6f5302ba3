"""Which exporter path and opset make the fastest ONNX classifier that still matches PyTorch?

    python bench/export_paths.py [--preset vit-tiny] [--batch 8] [--repeats 15] [--threads N]

Exports the classifier graph of a random-weight ViT (1000 classes) through every path torch offers
(dynamo at opset 23 and 18, the TorchScript exporter at opset 18), checks each against eager PyTorch,
then times onnxruntime CPU inference with paired, interleaved runs: every round runs each path once,
in an order that rotates from round to round, so drift in machine load hits all paths alike.
Prints medians and the median of the per-round ratios against the default (export.onnx_export.DEFAULT_*).
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
import onnx
import torch

from export.graphs import ClassifierGraph
from export.onnx_export import DEFAULT_DYNAMO, DEFAULT_OPSET, export_onnx, ort_session
from export.parity import ParityError, check_parity, parity_inputs
from model.data import IMAGENET_MEAN, IMAGENET_STD, make_synthetic
from model.presets import vit_preset
from model.vit import VisionTransformer

PATHS = {  # name -> (dynamo, opset)
    "dynamo-23": (True, 23),
    "dynamo-18": (True, 18),
    "torchscript-18": (False, 18),
}


def path_name(dynamo: bool, opset: int) -> str:
    return f"{'dynamo' if dynamo else 'torchscript'}-{opset}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="vit-tiny")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=15, help="timed rounds (each runs every path once)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="onnxruntime intra-op threads (default: usable cores)")
    parser.add_argument("--paths", default=",".join(PATHS), help=f"comma-separated subset of {', '.join(PATHS)}")
    args = parser.parse_args()

    default = path_name(DEFAULT_DYNAMO, DEFAULT_OPSET)
    names = [name.strip() for name in args.paths.split(",") if name.strip()]
    if default not in names:
        names.insert(0, default)
    torch.manual_seed(0)
    vit = VisionTransformer(vit_preset(args.preset, num_classes=1000, image_size=args.image_size)).eval()
    graph = ClassifierGraph(vit, IMAGENET_MEAN, IMAGENET_STD).eval()
    real, _ = make_synthetic(3, args.image_size, seed=0)
    checks = parity_inputs(graph, real_images=real, batch_sizes=(1, 3))
    print(f"{args.preset} at {args.image_size}, batch {args.batch}, torch {torch.__version__}, "
          f"onnx {onnx.__version__}, onnxruntime {__import__('onnxruntime').__version__}; default {default}")

    sessions, rows = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            dynamo, opset = PATHS.get(name) or (name.startswith("dynamo"), int(name.rsplit("-", 1)[1]))
            file = Path(tmp) / f"{name}.onnx"
            started = time.perf_counter()
            try:
                export_onnx(graph, None, file, opset=opset, dynamo=dynamo)
            except Exception as exc:  # noqa: BLE001 - a path that no longer works is a finding, not a crash
                print(f"{name:>15}: export failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
                continue
            export_s = time.perf_counter() - started
            ops = {node.op_type for node in onnx.load(str(file)).graph.node}
            try:
                diff = check_parity(graph, file, checks)["logits"]
            except ParityError as exc:
                print(f"{name:>15}: parity failed: {exc}")
                continue
            rows[name] = {"export_s": export_s, "mb": file.stat().st_size / 1e6, "parity": diff,
                          "fused": "Attention" if "Attention" in ops else "MatMul+Softmax"}
            sessions[name] = ort_session(file, args.threads)

    if default not in sessions:
        sys.exit(f"the default path {default} failed; nothing to compare against")
    feeds = {"images": np.random.default_rng(1).integers(0, 256, (args.batch, args.image_size, args.image_size, 3), dtype=np.uint8)}
    for session in sessions.values():
        for _ in range(args.warmup):
            session.run(None, feeds)
    times: dict[str, list[float]] = {name: [] for name in sessions}
    order = list(sessions)
    for round_index in range(args.repeats):
        shift = round_index % len(order)
        for name in order[shift:] + order[:shift]:
            started = time.perf_counter()
            sessions[name].run(None, feeds)
            times[name].append(time.perf_counter() - started)

    print(f"{'path':>15} {'attention':>15} {'export s':>9} {'MB':>6} {'max|diff|':>10} {'median ms':>10} {'vs default':>10}")
    for name in sessions:
        ratio = statistics.median(a / b for a, b in zip(times[name], times[default]))
        row = rows[name]
        print(f"{name:>15} {row['fused']:>15} {row['export_s']:>9.1f} {row['mb']:>6.1f} {row['parity']:>10.2e} "
              f"{statistics.median(times[name]) * 1e3:>10.2f} {ratio:>10.3f}")


if __name__ == "__main__":
    main()
