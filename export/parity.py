"""Does the ONNX file compute what the torch graph computes? onnxruntime (CPU) against eager, output by output."""
from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from modelrepo.names import IMAGES, KEEP, MASK, NOISE

from .errors import ParityError
from .graphs import ExportGraph, ReconstructorGraph
from .onnx_export import ort_session

# Absolute tolerance on float outputs (logits, embedding, patches, loss). fp32 onnxruntime against
# fp32 eager differs by op order and fused kernels only: ~1e-6 on the test and tiny presets, so 1e-4
# leaves two orders of magnitude for deeper models and still catches any real mistake.
FP32_TOLERANCE = 1e-4
# Integer pixels (reconstruction): a prediction within float noise of a .5 boundary may round either way.
UINT8_TOLERANCE = 1.0
# The mask is a pure function of (noise, keep): it must match exactly, ties included.
EXACT_OUTPUTS = frozenset({MASK})

TIE_LEVELS = 4  # tie-heavy noise takes only this many values, so most cut-offs fall inside a run of ties


def default_tolerance(name: str, dtype: np.dtype) -> float:
    if name in EXACT_OUTPUTS:
        return 0.0
    return UINT8_TOLERANCE if np.issubdtype(dtype, np.integer) else FP32_TOLERANCE


def max_abs_diff(expected: np.ndarray, actual: np.ndarray) -> float:
    """Largest |expected - actual| (in float64, integers included); inf when shapes differ or a value is NaN."""
    if expected.shape != actual.shape:
        return float("inf")
    if expected.size == 0:
        return 0.0
    diff = np.abs(expected.astype(np.float64) - actual.astype(np.float64))
    both_nan = np.isnan(expected.astype(np.float64)) & np.isnan(actual.astype(np.float64))
    diff = np.where(both_nan, 0.0, diff)
    return float(np.nan_to_num(diff, nan=np.inf).max())


def check_parity(
    graph: ExportGraph,
    onnx_path: str | os.PathLike,
    inputs_list: Sequence[Mapping[str, np.ndarray]],
    tolerance: Mapping[str, float] | float | None = None,
    *,
    threads: int | None = None,
) -> dict[str, Any]:
    """Run onnxruntime (CPU) and the eager graph on every input set.

    Returns {output name: max abs difference over all sets, ..., "batch_sizes": [...]}; raises
    ParityError naming the output, the difference and the tolerance when one is exceeded.
    `tolerance` maps output names to absolute tolerances; missing ones get the defaults
    (FP32_TOLERANCE for floats, UINT8_TOLERANCE for integers); one number is the tolerance of
    every float output. `mask` always must match exactly.
    """
    if not inputs_list:
        raise ValueError("check_parity needs at least one input set")
    if isinstance(tolerance, (int, float)):
        tolerance = {name: float(tolerance) for name, (dtype, _) in graph.shapes().items()
                     if name in graph.output_names and dtype.startswith("float")}
    tolerance = dict(tolerance or {})
    session = ort_session(onnx_path, threads)
    session_outputs = [output.name for output in session.get_outputs()]
    if sorted(session_outputs) != sorted(graph.output_names):
        raise ParityError(f"{onnx_path} has outputs {session_outputs}, the graph {list(graph.output_names)}")
    worst: dict[str, float] = {name: 0.0 for name in graph.output_names}
    limits: dict[str, float] = {}
    batch_sizes: list[int] = []
    for inputs in inputs_list:
        feeds = {name: np.asarray(inputs[name]) for name in graph.input_names}
        batch_sizes.append(int(feeds[IMAGES].shape[0]))
        expected = graph.run(feeds)
        actual = dict(zip(graph.output_names, session.run(list(graph.output_names), feeds)))
        for name in graph.output_names:
            worst[name] = max(worst[name], max_abs_diff(expected[name], actual[name]))
            limit = tolerance.get(name, default_tolerance(name, expected[name].dtype))
            limits[name] = 0.0 if name in EXACT_OUTPUTS else float(limit)
    for name in graph.output_names:
        if not worst[name] <= limits[name]:
            raise ParityError(
                f"output {name!r}: onnxruntime and PyTorch differ by {worst[name]:.3g} (max abs), "
                f"tolerance {limits[name]:.3g} ({os.fspath(onnx_path)})"
            )
    return {**worst, "batch_sizes": sorted(set(batch_sizes))}


def parity_inputs(
    graph: ExportGraph,
    *,
    real_images: np.ndarray | None,
    batch_sizes: Sequence[int] = (1, 3),
    seed: int = 0,
) -> list[dict[str, np.ndarray]]:
    """Input sets for `check_parity`: random uint8 images and the real ones (cycled to fill a batch), at each batch size.

    For the reconstructor each image set comes twice: with uniform noise, and with tie-heavy noise
    (TIE_LEVELS values only); two keep values (the model's mask ratio, and about half) alternate between them.
    """
    height, width = graph.image_size
    if real_images is not None:
        real_images = np.asarray(real_images)
        if real_images.dtype != np.uint8 or real_images.shape[1:] != (height, width, 3) or len(real_images) == 0:
            raise ValueError(f"real_images must be uint8 (N, {height}, {width}, 3), got {real_images.dtype} {real_images.shape}")
    rng = np.random.default_rng(seed)
    image_sets: list[np.ndarray] = []
    for batch in batch_sizes:
        image_sets.append(rng.integers(0, 256, (batch, height, width, 3), dtype=np.uint8))
        if real_images is not None:
            image_sets.append(real_images[np.arange(batch) % len(real_images)])
    if not isinstance(graph, ReconstructorGraph):
        return [{IMAGES: images} for images in image_sets]

    length = graph.num_patches
    first = graph.default_keep
    keeps = [first, length // 2 if length // 2 not in (0, first) else first % length + 1]
    sets: list[dict[str, np.ndarray]] = []
    for index, images in enumerate(image_sets):
        batch = len(images)
        uniform = rng.random((batch, length), dtype=np.float32)
        ties = (rng.integers(0, TIE_LEVELS, (batch, length)) / TIE_LEVELS).astype(np.float32)
        sets.append({IMAGES: images, NOISE: uniform, KEEP: np.array(keeps[index % 2], dtype=np.int64)})
        sets.append({IMAGES: images, NOISE: ties, KEEP: np.array(keeps[(index + 1) % 2], dtype=np.int64)})
    return sets
