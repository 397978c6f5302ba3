"""Where should normalisation live: inside the ONNX graph (uint8 NHWC input) or in the service (NumPy)?

    python bench/preprocessing.py [--repeats 30] [--threads N] [--json OUT]

For random-weight classifiers (vit-demo at 32x32, vit-tiny at 224x224) and batch sizes 1 and 8, times
the whole service-side path from a stacked uint8 NHWC batch to logits:

  (a) the exported ClassifierGraph, which normalises in the graph: session.run on the uint8 batch;
  (b) the bare VisionTransformer exported the same way (same opset, dynamo, dynamic batch) taking
      float32 NCHW, after `(x / 255 - mean) / std` + transpose in NumPy for every batch.

Both sessions come from ort_session with the same options. Every round runs (a), (b) and the NumPy
preprocessing alone once each, in an order that rotates between rounds, so drift in machine load hits
all three alike; a sample repeats a call enough times to last ~20 ms (tiny models). Prints medians and
the median of the per-round ratios (b)/(a).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import onnxruntime
import torch

from export.graphs import ClassifierGraph, ExportGraph
from modelrepo.names import IMAGES, LOGITS
from export.onnx_export import DEFAULT_OPSET, export_onnx, ort_session
from model.data import IMAGENET_MEAN, IMAGENET_STD, SYNTHETIC_MEAN, SYNTHETIC_STD
from model.presets import vit_preset
from model.vit import VisionTransformer

# model -> (preset, image size, classes, mean, std)
MODELS = {
    "vit-demo": ("vit-demo", 32, 6, SYNTHETIC_MEAN, SYNTHETIC_STD),
    "vit-tiny": ("vit-tiny", 224, 1000, IMAGENET_MEAN, IMAGENET_STD),
}
BATCHES = (1, 8)
SAMPLE_S = 0.02  # a timed sample repeats a call until it lasts about this long


class FloatClassifierGraph(ExportGraph):
    """The bare ViT: float32 NCHW, already normalised -> logits. Same names as ClassifierGraph, so
    export_onnx exports it with exactly the same settings."""

    task = "classify"
    output_names = (LOGITS,)

    def __init__(self, vit: VisionTransformer) -> None:
        super().__init__(vit, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))  # normalise is unused
        self.vit = vit

    def forward(self, images: torch.Tensor) -> torch.Tensor:  # (B, 3, H, W) float32 -> (B, num_classes)
        return self.vit(images)

    def example_inputs(self, batch: int = 2, seed: int = 0) -> dict[str, torch.Tensor]:
        height, width = self.image_size
        return {IMAGES: torch.randn(batch, 3, height, width, generator=torch.Generator().manual_seed(seed))}


def make_preprocess(mean, std) -> Callable[[np.ndarray], np.ndarray]:
    """uint8 (B, H, W, 3) -> float32 (B, 3, H, W) contiguous, as x * 1/(255 std) - mean/std in one expression."""
    scale = (1.0 / (255.0 * np.asarray(std, dtype=np.float64))).astype(np.float32)
    shift = (np.asarray(mean, dtype=np.float64) / np.asarray(std, dtype=np.float64)).astype(np.float32)

    def preprocess(batch: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray((batch * scale - shift).transpose(0, 3, 1, 2))

    return preprocess


def build_sessions(name: str, tmp: Path, threads: int | None):
    """Export both graphs of one random-weight model; return (uint8 session, float session, preprocess)."""
    preset, size, classes, mean, std = MODELS[name]
    torch.manual_seed(0)
    vit = VisionTransformer(vit_preset(preset, image_size=size, num_classes=classes)).eval()
    uint8_file, float_file = tmp / f"{name}-uint8.onnx", tmp / f"{name}-float.onnx"
    export_onnx(ClassifierGraph(vit, mean, std), None, uint8_file)
    export_onnx(FloatClassifierGraph(vit), None, float_file)
    return ort_session(uint8_file, threads), ort_session(float_file, threads), make_preprocess(mean, std)


def paths(uint8_session: onnxruntime.InferenceSession, float_session: onnxruntime.InferenceSession,
          preprocess: Callable[[np.ndarray], np.ndarray]) -> dict[str, Callable[[np.ndarray], object]]:
    """The three timed callables, each from a stacked uint8 NHWC batch."""
    return {
        "a": lambda batch: uint8_session.run(None, {IMAGES: batch}),
        "b": lambda batch: float_session.run(None, {IMAGES: preprocess(batch)}),
        "prep": preprocess,
    }


def max_logit_diff(calls, batch: np.ndarray) -> float:
    """Sanity check: (a) and (b) compute the same logits."""
    return float(np.abs(calls["a"](batch)[0] - calls["b"](batch)[0]).max())


def calibrate(call: Callable[[], object], warmup: int) -> int:
    """Warm up, then the number of calls per sample so that one sample lasts ~SAMPLE_S."""
    for _ in range(warmup):
        call()
    started = time.perf_counter()
    call()
    return max(1, int(SAMPLE_S / max(time.perf_counter() - started, 1e-6)))


def time_interleaved(calls: dict[str, Callable[[], object]], repeats: int, inner: int) -> dict[str, list[float]]:
    """Seconds per call, one sample per name per round, order rotating between rounds."""
    times: dict[str, list[float]] = {name: [] for name in calls}
    order = list(calls)
    for round_index in range(repeats):
        shift = round_index % len(order)
        for name in order[shift:] + order[:shift]:
            started = time.perf_counter()
            for _ in range(inner):
                calls[name]()
            times[name].append((time.perf_counter() - started) / inner)
    return times


def measure(name: str, batch_size: int, calls, repeats: int, warmup: int) -> dict:
    size = MODELS[name][1]
    batch = np.random.default_rng(batch_size).integers(0, 256, (batch_size, size, size, 3), dtype=np.uint8)
    bound = {key: (lambda call=call: call(batch)) for key, call in calls.items()}
    inner = calibrate(bound["a"], warmup)
    calibrate(bound["b"], warmup)
    times = time_interleaved(bound, repeats, inner)
    ms = {key: statistics.median(values) * 1e3 for key, values in times.items()}
    return {
        "model": name, "batch": batch_size, "rounds": repeats, "calls_per_sample": inner,
        "a_ms": ms["a"], "b_ms": ms["b"], "prep_ms": ms["prep"],
        "b_over_a": statistics.median(b / a for a, b in zip(times["a"], times["b"])),
        "prep_share_of_b": statistics.median(p / b for p, b in zip(times["prep"], times["b"])),
        "max_logit_diff": max_logit_diff(calls, batch),
    }


def print_table(rows: list[dict]) -> None:
    print(f"{'model':>9} {'batch':>5} {'(a) uint8 ms':>12} {'(b) float ms':>12} {'(b)/(a)':>8} "
          f"{'numpy prep ms':>13} {'prep/(b)':>8} {'max|diff|':>9}")
    for row in rows:
        print(f"{row['model']:>9} {row['batch']:>5} {row['a_ms']:>12.3f} {row['b_ms']:>12.3f} {row['b_over_a']:>8.3f} "
              f"{row['prep_ms']:>13.3f} {row['prep_share_of_b']:>8.3f} {row['max_logit_diff']:>9.1e}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=30, help="timed rounds per model and batch size")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="onnxruntime intra-op threads (default: usable cores)")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = parser.parse_args()

    print(f"torch {torch.__version__}, onnxruntime {onnxruntime.__version__}, numpy {np.__version__}, "
          f"opset {DEFAULT_OPSET}; {args.repeats} interleaved rounds; medians")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in MODELS:
            calls = paths(*build_sessions(name, Path(tmp), args.threads))
            rows += [measure(name, batch, calls, args.repeats, args.warmup) for batch in BATCHES]
    print_table(rows)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
