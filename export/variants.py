"""Cheaper variants of an fp32 graph: int8 (dynamic, or static calibrated on real images) for CPU, fp16 for CUDA,
and how far each strays.

Both are measured against the fp32 file they came from (`compare_variant`) and judged by
`check_variant` with the tolerances below.
"""
from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from modelrepo.names import IMAGES, LOGITS, MASK

from .errors import VariantError
from .onnx_export import ort_session
from .parity import max_abs_diff

# Dynamic quantisation touches only MatMul/Gemm with constant weights (the Linear layers). Left to
# its defaults, quantize_dynamic takes opset 23's ONNX `Attention` op for the com.microsoft one of
# the same name and writes an invalid QAttention node, so the op types are listed explicitly.
INT8_OP_TYPES = ("MatMul", "Gemm")
# Per-channel weight scales, by measurement (max |int8 - fp32| / logit range, top-1 agreement, on
# 600-1000 validation images): vit-test trained 150 / 300 steps 0.015 vs 0.017 / 0.018 vs 0.020
# per-tensor; the vit-demo classifier 0.040 vs 0.039 (top-1 1.000 vs 0.999); vit-demo fine-tuned from
# the MAE 0.018 vs 0.027. Never worse beyond noise, up to 1.5x better, same speed. reduce_range
# (7-bit weights, for CPUs without VNNI) was not better on balance (0.020, 0.019, 0.035, 0.020).
INT8_PER_CHANNEL = True

# Static int8 (QDQ): which matrix products stay in fp32 and how activation ranges are calibrated, by measurement
# (bench/static_int8.py; max |diff| / logit range, top-1 agreement with fp32, throughput over fp32 at batch 4):
#  - random-weight ViT-Base/16, 64 synthetic images: everything quantised 0.028 / 0.94 / ORT 1.77x; patch embedding
#    and head kept in float 0.021 / 0.95 / 1.93x (their inputs are the raw normalised pixels and the final features,
#    the least int8-friendly ranges, and they are 2 of 50 products); also the post-GELU MLP products (heavy-tailed
#    inputs, as PTQ4ViT and FQ-ViT report) 0.017 / 0.95 / 1.46x: a quarter of the speed for little accuracy.
#    Percentile (99.999) calibration instead of min/max: 0.021 / 0.95, no better, and twice as slow to calibrate.
#  - the trained vit-demo classifier, 256 held-out images: every configuration 1.000 agreement and the fp32
#    accuracy (0.996); max |diff| 0.010 everything quantised, 0.005 ends in float.
STATIC_INT8_KEEP_FLOAT: tuple[str, ...] = ("patch_embed", "head")
STATIC_INT8_CALIBRATION = "minmax"
# The products' outputs stay in float (only their inputs are quantised): left to its defaults onnxruntime's quantiser
# also rounds every output to uint8 before the bias add, a second rounding that costs accuracy and time. Random-weight
# ViT-Base, ends in float: max |diff| / range 0.016 instead of 0.021; throughput over fp32 at batch 4, onnxruntime
# 2.25x instead of 2.04x, OpenVINO 1.68x instead of 1.55x (over its own bf16 fp32); OpenVINO two streams of batch 1
# (the service's layout at c=16): 44.6 instead of 39.9 img/s, 3.51x onnxruntime fp32 instead of 3.16x.
STATIC_INT8_QUANTIZE_OUTPUTS = False

# Tolerances, as fractions of the reference's output scale (its range over the compared set): trained
# logits spread over several units and an absolute bound would mean something else for every model.
# Top-1 agreement is counted on validation images (the caller passes them).
#  - int8: measured 0.015-0.040 of the range on the four classifiers above (top-1 agreement
#    0.995-1.000); 0.10 leaves 2.5x headroom and still catches a broken quantisation (wrong scales, a
#    saturated layer: errors of the order of the range). Top-1 >= 0.98: only near-ties may flip.
#  - fp16 (preprocessing kept in fp32, see _preprocessing_nodes): measured 0.001-0.003 of the range,
#    top-1 agreement 1.000; 0.01 leaves 3x headroom for deeper models; top-1 >= 0.995.
#  - accuracy (static int8, when the checkpoint's held-out images are labelled): at most 1 point below fp32's on
#    the same images (measured: no drop on vit-demo).
INT8_TOLERANCE = {"relative_max_abs_diff": 0.10, "top1_agreement": 0.98}
STATIC_INT8_TOLERANCE = {**INT8_TOLERANCE, "accuracy_drop": 0.01}
FP16_TOLERANCE = {"relative_max_abs_diff": 0.01, "top1_agreement": 0.995}
TOLERANCES = {"int8": INT8_TOLERANCE, "int8-static": STATIC_INT8_TOLERANCE, "fp16": FP16_TOLERANCE}


@contextlib.contextmanager
def _quiet_root_logger() -> Iterator[None]:
    """onnxruntime.quantization warns on the root logger about optional pre-processing; keep it out of our output."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def quantize_int8(src: str | os.PathLike, dst: str | os.PathLike, *, per_channel: bool = INT8_PER_CHANNEL) -> None:
    """Dynamic int8 quantisation for the CPU: QInt8 weights, activations quantised at run time."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    Path(dst).parent.mkdir(parents=True, exist_ok=True)
    with _quiet_root_logger():
        quantize_dynamic(
            Path(src), Path(dst), weight_type=QuantType.QInt8, per_channel=per_channel,
            op_types_to_quantize=list(INT8_OP_TYPES), extra_options={"MatMulConstBOnly": True},
        )
    onnx.checker.check_model(str(dst))


class _FeedReader:
    """onnxruntime's CalibrationDataReader over a list of input sets."""

    def __init__(self, feeds: Sequence[Mapping[str, np.ndarray]]):
        self._feeds = iter([dict(feed) for feed in feeds])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._feeds, None)


def image_batches(images: np.ndarray, batch: int = 8, **other_inputs: np.ndarray) -> list[dict[str, np.ndarray]]:
    """Calibration input sets: the images a few at a time (bounded memory on big models), with any other inputs."""
    return [{IMAGES: images[start:start + batch], **other_inputs} for start in range(0, len(images), batch)]


def quantize_int8_static(src: str | os.PathLike, dst: str | os.PathLike,
                         calibration: Sequence[Mapping[str, np.ndarray]], *,
                         keep_float: Sequence[str] = STATIC_INT8_KEEP_FLOAT,
                         method: str = STATIC_INT8_CALIBRATION,
                         quantize_outputs: bool = STATIC_INT8_QUANTIZE_OUTPUTS) -> None:
    """Static int8 (QDQ): per-channel int8 weights, uint8 activations with ranges calibrated on `calibration` (input
    sets of real images, see `image_batches`).

    `keep_float`: roles of matrix products left in fp32 (see `matmul_roles`); `method`: minmax | percentile | entropy;
    `quantize_outputs`: also round each product's output to uint8 before its bias add (the quantiser's default).
    LayerNorm, Softmax (inside Attention), GELU and the residual adds are never quantised: only MatMul/Gemm are.
    """
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    if not calibration:
        raise ValueError("static int8 needs calibration images")
    methods = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
               "entropy": CalibrationMethod.Entropy}
    model = onnx.load(str(src))
    roles = matmul_roles(model.graph)
    excluded = sorted(name for name, role in roles.items() if role in set(keep_float))
    Path(dst).parent.mkdir(parents=True, exist_ok=True)
    with _quiet_root_logger(), tempfile.TemporaryDirectory() as scratch:
        # The calibrator writes an augmented copy of the model beside the output; keep it out of the version directory.
        staged = Path(scratch) / "model.onnx"
        quantize_static(
            Path(src), staged, _FeedReader(calibration),
            quant_format=QuantFormat.QDQ, op_types_to_quantize=list(INT8_OP_TYPES), per_channel=True,
            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, nodes_to_exclude=excluded,
            calibrate_method=methods[method],
            extra_options={"MatMulConstBOnly": True,
                           "OpTypesToExcludeOutputQuantization": [] if quantize_outputs else list(INT8_OP_TYPES)},
        )
        model = onnx.load(str(staged))
    onnx.save(model, str(dst), save_as_external_data=False)
    onnx.checker.check_model(str(dst))


def matmul_roles(graph: onnx.GraphProto) -> dict[str, str]:
    """Each MatMul/Gemm with a constant weight, by its place in a ViT block, read from what feeds it:

    patch_embed (the first), head (the last, when it feeds a graph output), mlp_out (fed by GELU: its
    input is the heavy-tailed post-GELU activation), and block (qkv, attention projection, fc1).
    """
    constants = {item.name for item in graph.initializer} | {
        out for node in graph.node if node.op_type == "Constant" for out in node.output}
    producers = {out: node for node in graph.node for out in node.output}
    outputs = {item.name for item in graph.output}
    linear = [node for node in graph.node if node.op_type in INT8_OP_TYPES and len(node.input) > 1
              and node.input[1] in constants]
    roles = {}
    for index, node in enumerate(linear):
        feeder = producers.get(node.input[0])
        if index == 0:
            roles[node.name] = "patch_embed"
        elif index == len(linear) - 1 and _reaches(node, outputs, graph):
            roles[node.name] = "head"
        elif feeder is not None and feeder.op_type == "Gelu":
            roles[node.name] = "mlp_out"
        else:
            roles[node.name] = "block"
    return roles


def _reaches(node: onnx.NodeProto, outputs: set[str], graph: onnx.GraphProto, hops: int = 3) -> bool:
    """Whether a graph output is at most `hops` nodes after `node` (the head: Gemm, maybe Add / Identity)."""
    frontier = set(node.output)
    for _ in range(hops):
        if frontier & outputs:
            return True
        frontier = {out for other in graph.node if set(other.input) & frontier for out in other.output}
    return bool(frontier & outputs)


def convert_fp16(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Half-precision weights and compute for CUDA; inputs and outputs keep their dtypes (keep_io_types).

    The file still loads on the CPU provider (where it is slow: a correctness check, not a CPU variant).
    """
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = onnx.load(str(src))
    model = convert_float_to_float16(model, keep_io_types=True, node_block_list=sorted(_preprocessing_nodes(model)))
    _bypass_input_round_trips(model.graph)
    _sort_topologically(model.graph)  # the converter appends the casts it inserts at the end of the node list
    Path(dst).parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(dst), save_as_external_data=False)
    onnx.checker.check_model(str(dst))


# Ops that make up the in-graph preprocessing (cast, layout, normalisation) between the uint8 input and the
# first matrix product; nothing else hangs off the input before a MatMul or Conv.
_PREPROCESSING_OPS = frozenset({"Cast", "Transpose", "Reshape", "Div", "Sub", "Mul"})


def _preprocessing_nodes(model: onnx.ModelProto) -> set[str]:
    """Names of the nodes that normalise the integer image input, found by walking forward from it.

    They stay in fp32 under convert_fp16: in fp16, (x / 255 - mean) / std keeps ~3 significant digits,
    which measured as 2-3x the logit error of the rest of the half-precision network together.
    """
    integer_inputs = [item.name for item in model.graph.input
                      if item.type.tensor_type.elem_type in (onnx.TensorProto.UINT8, onnx.TensorProto.INT8)]
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    found: set[str] = set()
    frontier = list(integer_inputs)
    while frontier:
        for node in consumers.get(frontier.pop(), []):
            if node.op_type in _PREPROCESSING_OPS and node.name not in found:
                found.add(node.name)
                frontier.extend(node.output)
    return found


def _bypass_input_round_trips(graph: onnx.GraphProto) -> None:
    """Feed fp32 graph inputs straight to the nodes the converter kept in fp32.

    keep_io_types casts every float input to fp16 first, and a node left in fp32 (the reconstructor's
    TopK over `noise`) then gets it cast back: a lossy round trip that merges noise values closer
    than fp16 can tell apart, so ties break differently and the mask differs from the fp32 graph's.
    """
    float_inputs = {item.name for item in graph.input if item.type.tensor_type.elem_type == onnx.TensorProto.FLOAT}
    producers = {output: node for node in graph.node for output in node.output}

    def cast_to(node: onnx.NodeProto | None) -> int | None:
        if node is None or node.op_type != "Cast":
            return None
        return next((attr.i for attr in node.attribute if attr.name == "to"), None)

    shortcuts: dict[str, str] = {}
    for node in graph.node:
        inner = producers.get(node.input[0]) if node.op_type == "Cast" else None
        if cast_to(node) == onnx.TensorProto.FLOAT and cast_to(inner) == onnx.TensorProto.FLOAT16 \
                and inner.input[0] in float_inputs:
            shortcuts[node.output[0]] = inner.input[0]
    if not shortcuts:
        return
    graph_outputs = {item.name for item in graph.output}
    for node in graph.node:
        for index, name in enumerate(node.input):
            if name in shortcuts:
                node.input[index] = shortcuts[name]
    # Drop the casts nothing reads any more.
    while True:
        used = {name for node in graph.node for name in node.input} | graph_outputs
        unused = [node for node in graph.node if node.op_type == "Cast" and not set(node.output) & used]
        if not unused:
            break
        for node in unused:
            graph.node.remove(node)


def _sort_topologically(graph: onnx.GraphProto) -> None:
    """Reorder the nodes so each comes after the producers of its inputs, otherwise keeping their order."""
    available = {item.name for item in graph.input} | {item.name for item in graph.initializer} | {""}
    pending, ordered = list(graph.node), []
    while pending:
        ready = [node for node in pending if all(name in available for name in node.input)]
        if not ready:
            raise ValueError(f"the graph has a cycle or a dangling input at {pending[0].name!r}")
        for node in ready:
            available.update(node.output)
        ordered.extend(ready)
        done = {id(node) for node in ready}
        pending = [node for node in pending if id(node) not in done]
    del graph.node[:]
    graph.node.extend(ordered)


def compare_variant(
    reference_path: str | os.PathLike,
    variant_path: str | os.PathLike,
    inputs_list: Sequence[Mapping[str, np.ndarray]],
    *,
    threads: int | None = None,
    labels: np.ndarray | None = None,
) -> dict[str, Any]:
    """Run the fp32 reference and the variant (onnxruntime CPU) on every input set.

    Returns {output name: max abs diff, ..., "relative_max_abs_diff": the worst, over the float
    outputs, of max abs diff / the reference's scale of that output (max - min, or max |value| where
    larger), "num_images": n,
    and, when there is a `logits` output, "top1_agreement": fraction of images with the same argmax, and with
    `labels` (the class of each image, over all input sets in order) "accuracy" and "fp32_accuracy"}.
    """
    if not inputs_list:
        raise ValueError("compare_variant needs at least one input set")
    reference, variant = ort_session(reference_path, threads), ort_session(variant_path, threads)
    names = [output.name for output in reference.get_outputs()]
    input_names = [item.name for item in reference.get_inputs()]
    worst = {name: 0.0 for name in names}
    low = {name: np.inf for name in names}
    high = {name: -np.inf for name in names}
    agree = total = 0
    correct = {"fp32": 0, "variant": 0}
    for inputs in inputs_list:
        feeds = {name: np.asarray(inputs[name]) for name in input_names}
        expected = dict(zip(names, reference.run(names, feeds)))
        actual = dict(zip(names, variant.run(names, feeds)))
        total += int(feeds[IMAGES].shape[0]) if IMAGES in feeds else 1
        for name in names:
            worst[name] = max(worst[name], max_abs_diff(expected[name], actual[name]))
            if expected[name].size and np.issubdtype(expected[name].dtype, np.floating):
                low[name] = min(low[name], float(expected[name].min()))
                high[name] = max(high[name], float(expected[name].max()))
        if LOGITS in expected:
            agree += int((expected[LOGITS].argmax(axis=-1) == actual[LOGITS].argmax(axis=-1)).sum())
            if labels is not None:
                truth = np.asarray(labels)[total - len(expected[LOGITS]):total]
                correct["fp32"] += int((expected[LOGITS].argmax(axis=-1) == truth).sum())
                correct["variant"] += int((actual[LOGITS].argmax(axis=-1) == truth).sum())
    result: dict[str, Any] = dict(worst)
    # Scale of an output: its range, or its peak magnitude where that is larger (a per-image loss
    # varies little between images, so its range alone would magnify every difference).
    relative = [worst[name] / max(high[name] - low[name], abs(low[name]), abs(high[name]), 1e-12)
                for name in names if np.isfinite(low[name]) and name != MASK]
    result["relative_max_abs_diff"] = float(max(relative)) if relative else 0.0
    result["num_images"] = total
    if LOGITS in names:
        result["top1_agreement"] = agree / total
        if labels is not None:
            if len(labels) != total:
                raise ValueError(f"{len(labels)} labels for {total} images")
            result["accuracy"], result["fp32_accuracy"] = correct["variant"] / total, correct["fp32"] / total
    return result


def check_variant(comparison: Mapping[str, Any], kind: str) -> None:
    """Raise VariantError when a `compare_variant` result exceeds the tolerance for `kind` (a key of TOLERANCES)."""
    if kind not in TOLERANCES:
        raise ValueError(f"unknown variant {kind!r}; known: {', '.join(TOLERANCES)}")
    tolerance = TOLERANCES[kind]
    relative = comparison["relative_max_abs_diff"]
    if not relative <= tolerance["relative_max_abs_diff"]:
        raise VariantError(f"{kind} variant: max abs diff is {relative:.3g} of the output range, "
                           f"tolerance {tolerance['relative_max_abs_diff']:.3g}")
    agreement = comparison.get("top1_agreement")
    if agreement is not None and agreement < tolerance["top1_agreement"]:
        raise VariantError(f"{kind} variant: top-1 agrees with fp32 on {agreement:.1%} of "
                           f"{comparison['num_images']} images, tolerance {tolerance['top1_agreement']:.1%}")
    if "accuracy" in comparison and "accuracy_drop" in tolerance:
        drop = comparison["fp32_accuracy"] - comparison["accuracy"]
        if drop > tolerance["accuracy_drop"]:
            raise VariantError(f"{kind} variant: accuracy {comparison['accuracy']:.1%} on {comparison['num_images']} "
                               f"held-out images, fp32 {comparison['fp32_accuracy']:.1%}: a drop of {drop:.1%}, "
                               f"tolerance {tolerance['accuracy_drop']:.1%}")
