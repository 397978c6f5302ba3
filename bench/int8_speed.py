"""How much faster is the int8 classifier than the fp32 one on the CPU?

    python bench/int8_speed.py [--presets vit-tiny,vit-base] [--batches 8,1] [--repeats 10] [--threads N] [--json OUT]

For each random-weight preset (224x224, 1000 classes) exports the ClassifierGraph with export_onnx
(defaults), quantises it with export.variants.quantize_int8, and times onnxruntime CPU sessions
(ort_session) on one uint8 batch: every round runs fp32 and int8 once each, in alternating order, so
drift in machine load hits both alike. Prints median ms per batch, images/s, and the int8/fp32
throughput ratio as the median of the per-round ratios fp32 time / int8 time.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import onnxruntime
import torch

from export.graphs import ClassifierGraph
from modelrepo.names import IMAGES
from export.onnx_export import export_onnx, ort_session
from export.variants import quantize_int8
from model.data import IMAGENET_MEAN, IMAGENET_STD
from model.presets import vit_preset
from model.vit import VisionTransformer

IMAGE_SIZE, NUM_CLASSES = 224, 1000


def build_files(preset: str, tmp: Path) -> dict[str, Path]:
    """Export fp32 and quantise to int8; returns {"fp32": path, "int8": path}."""
    torch.manual_seed(0)
    vit = VisionTransformer(vit_preset(preset, image_size=IMAGE_SIZE, num_classes=NUM_CLASSES)).eval()
    files = {"fp32": tmp / f"{preset}-fp32.onnx", "int8": tmp / f"{preset}-int8.onnx"}
    started = time.perf_counter()
    export_onnx(ClassifierGraph(vit, IMAGENET_MEAN, IMAGENET_STD), None, files["fp32"])
    exported = time.perf_counter()
    quantize_int8(files["fp32"], files["int8"])
    print(f"{preset}: export {exported - started:.0f} s, quantise {time.perf_counter() - exported:.0f} s, "
          f"fp32 {files['fp32'].stat().st_size / 1e6:.0f} MB, int8 {files['int8'].stat().st_size / 1e6:.0f} MB")
    return files


def time_pair(sessions: dict[str, onnxruntime.InferenceSession], batch: np.ndarray,
              repeats: int, warmup: int) -> dict[str, list[float]]:
    """Seconds per batch, one sample per session per round, order alternating between rounds."""
    feeds = {IMAGES: batch}
    for session in sessions.values():
        for _ in range(warmup):
            session.run(None, feeds)
    times: dict[str, list[float]] = {name: [] for name in sessions}
    order = list(sessions)
    for round_index in range(repeats):
        for name in (order if round_index % 2 == 0 else order[::-1]):
            started = time.perf_counter()
            sessions[name].run(None, feeds)
            times[name].append(time.perf_counter() - started)
    return times


def summarise(preset: str, batch_size: int, times: dict[str, list[float]]) -> dict:
    fp32_ms, int8_ms = (statistics.median(times[name]) * 1e3 for name in ("fp32", "int8"))
    return {
        "preset": preset, "batch": batch_size, "rounds": len(times["fp32"]),
        "fp32_ms": fp32_ms, "int8_ms": int8_ms,
        "fp32_img_s": batch_size / fp32_ms * 1e3, "int8_img_s": batch_size / int8_ms * 1e3,
        "int8_over_fp32_throughput": statistics.median(f / i for f, i in zip(times["fp32"], times["int8"])),
    }


def print_table(rows: list[dict]) -> None:
    print(f"{'preset':>9} {'batch':>5} {'fp32 ms':>9} {'int8 ms':>9} {'fp32 img/s':>10} {'int8 img/s':>10} "
          f"{'int8/fp32 thru':>14}")
    for row in rows:
        print(f"{row['preset']:>9} {row['batch']:>5} {row['fp32_ms']:>9.1f} {row['int8_ms']:>9.1f} "
              f"{row['fp32_img_s']:>10.1f} {row['int8_img_s']:>10.1f} {row['int8_over_fp32_throughput']:>14.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", default="vit-tiny,vit-base", help="comma-separated ViT presets")
    parser.add_argument("--batches", default="8,1", help="comma-separated batch sizes")
    parser.add_argument("--repeats", type=int, default=10, help="timed rounds (each runs fp32 and int8 once)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="onnxruntime intra-op threads (default: usable cores)")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = parser.parse_args()

    presets = [name.strip() for name in args.presets.split(",") if name.strip()]
    batches = [int(value) for value in args.batches.split(",") if value.strip()]
    print(f"torch {torch.__version__}, onnxruntime {onnxruntime.__version__}; {IMAGE_SIZE}x{IMAGE_SIZE}, "
          f"{NUM_CLASSES} classes, random weights; {args.repeats} alternating rounds; medians")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for preset in presets:
            files = build_files(preset, Path(tmp))
            sessions = {name: ort_session(path, args.threads) for name, path in files.items()}
            for batch_size in batches:
                batch = np.random.default_rng(batch_size).integers(
                    0, 256, (batch_size, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
                rows.append(summarise(preset, batch_size, time_pair(sessions, batch, args.repeats, args.warmup)))
            del sessions  # free the ViT-Base sessions before the next preset
    print_table(rows)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
