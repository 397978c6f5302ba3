"""Export a graph (export/graphs.py) to one self-contained .onnx file, and open it with onnxruntime.

The paths torch 2.13 offers, as measured by bench/export_paths.py (figures at DEFAULT_OPSET below):

- dynamo=True, opset 23: SDPA becomes the fused ONNX `Attention` op and GELU the `Gelu` op;
  onnxruntime 1.32 runs both on CPU. Parity with eager ~1e-6.
- dynamo=True, opset 18: SDPA is decomposed into Mul/MatMul/Softmax/MatMul. Parity ~1e-6.
- dynamo=False (TorchScript), opset 18: still exports the classifier and embedder, but it traces
  `keep.item()` into a constant and has no stable sort, so it cannot build the reconstructor;
  it is deprecated in torch 2.13.

The dynamo exporter has no lowering for `torch.argsort(..., stable=True)` (aten.sort.stable, used by
the MAE's random_masking) in torch 2.13 ("No ONNX function found"); SORT_TRANSLATION maps it to
ONNX TopK, whose specification breaks ties by the lower index first, i.e. exactly a stable sort.
"""
from __future__ import annotations

import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime
import torch
from onnx.external_data_helper import uses_external_data
from onnxscript import opset18 as op

from modelrepo.session import open_session

from .errors import ExportError
from .graphs import ExportGraph, ReconstructorGraph

# Chosen by measurement: `python bench/export_paths.py` (onnxruntime 1.32 CPU, 2 threads, random
# weights, 1000 classes, paired interleaved runs; per path the median of per-round time ratios
# against dynamo-23; the 2-core machine was shared with other jobs, so single runs drift by ~5%):
#   ViT-Tiny/16 224, batch 8, 4 quiet runs of 20-40 rounds (100-111 ms/batch for dynamo-23):
#     dynamo-18       1.024  1.054  1.071  1.034
#     TorchScript-18  0.950  1.056  1.038  0.956
#   and 3 runs under heavier load (~250 ms/batch): dynamo-18 1.055 1.060 1.047, dynamo-20 1.014,
#     TorchScript-18 0.990 0.933 0.952
#   ViT-Base/16 224, batch 4, 12 rounds (422 ms/batch): dynamo-18 1.021, TorchScript-18 0.991
# Under dynamo, opset 23 beats opset 18 in every run (2-7%: the fused Attention op, where opset 18
# scales q and k separately). TorchScript is on balance ~3% faster than dynamo-23 on the classifier
# (a profile puts onnxruntime's CPU `Attention` kernel at ~49 ms per batch against ~33 ms for
# MatMul+Softmax), but it cannot export the reconstructor at all (see above) and is deprecated, so
# one path, dynamo at opset 23, serves all three graphs. Every path matches eager to ~1e-6.
DEFAULT_OPSET = 23
DEFAULT_DYNAMO = True
MIN_DYNAMO_OPSET = 18  # the dynamo exporter's op library (onnxscript) starts here; older opsets are "converted" or not

MAX_SINGLE_FILE_BYTES = 2 * 1024**3  # protobuf's limit: beyond it weights must live in a sidecar


def sort_with_topk(self, *, stable=None, dim: int = -1, descending: bool = False):
    """aten.sort.stable as ONNX TopK over the whole axis; TopK puts equal values in index order (stable)."""
    length = op.Gather(op.Shape(self), op.Constant(value_ints=[dim]), axis=0)
    values, indices = op.TopK(self, length, axis=dim, largest=descending, sorted=True)
    return values, indices


SORT_TRANSLATION = {torch.ops.aten.sort.stable: sort_with_topk}


def export_onnx(
    graph: ExportGraph,
    example_inputs: Mapping[str, Any] | Sequence[Any] | None,
    path: str | os.PathLike,
    *,
    opset: int = DEFAULT_OPSET,
    dynamo: bool = DEFAULT_DYNAMO,
) -> None:
    """Write `graph` to ONE .onnx file at `path`, with a dynamic batch axis on every input and output.

    `example_inputs`: named inputs (dict) or positional ones in `graph.input_names` order, as tensors
    or arrays; None uses `graph.example_inputs()`. A batch of 1 is tiled to 2 so that the exporter
    does not specialise the batch axis. The file passes `onnx.checker.check_model`.
    """
    check_opset(opset, dynamo)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    graph.eval()
    args = _as_args(graph, example_inputs)
    batched = [name for name, value in zip(graph.input_names, args) if value.ndim > 0]
    if dynamo:
        batch = torch.export.Dim("batch", min=1, max=65536)
        dynamic_shapes = tuple({0: batch} if value.ndim > 0 else None for value in args)
        with warnings.catch_warnings():
            # Every input shares the one `batch` dimension, which the exporter remarks on for each extra input.
            warnings.filterwarnings("ignore", message=".*shares the same shape constraints with another axis")
            torch.onnx.export(
                graph, args, str(path), input_names=list(graph.input_names), output_names=list(graph.output_names),
                opset_version=opset, dynamo=True, external_data=False, dynamic_shapes=dynamic_shapes,
                custom_translation_table=SORT_TRANSLATION, verbose=False,
            )
    else:
        if isinstance(graph, ReconstructorGraph):
            raise ExportError("the TorchScript exporter (dynamo=False) freezes `keep` into a constant and cannot "
                              "export a stable sort; export the reconstructor with dynamo=True")
        dynamic_axes = {name: {0: "batch"} for name in [*batched, *graph.output_names]}
        torch.onnx.export(
            graph, args, str(path), input_names=list(graph.input_names), output_names=list(graph.output_names),
            opset_version=opset, dynamo=False, dynamic_axes=dynamic_axes,
        )
    fold_external_data(path)
    onnx.checker.check_model(str(path))
    written = {entry.version for entry in onnx.load(str(path), load_external_data=False).opset_import if entry.domain in ("", "ai.onnx")}
    if written != {opset}:  # the exporter falls back quietly when it cannot convert: never record an opset we did not write
        raise ExportError(f"asked for opset {opset}, the exporter wrote {sorted(written)}")


def check_opset(opset: int, dynamo: bool = DEFAULT_DYNAMO) -> None:
    newest = onnx.defs.onnx_opset_version()
    oldest = MIN_DYNAMO_OPSET if dynamo else 7  # TorchScript: whatever it cannot write, the check after export catches
    if not oldest <= opset <= newest:
        raise ExportError(f"opset {opset} is not supported: this exporter writes opsets {oldest} to {newest}")


def _as_args(graph: ExportGraph, example_inputs: Mapping[str, Any] | Sequence[Any] | None) -> tuple[torch.Tensor, ...]:
    if example_inputs is None:
        example_inputs = graph.example_inputs(batch=2)
    if isinstance(example_inputs, Mapping):
        missing = [name for name in graph.input_names if name not in example_inputs]
        if missing:
            raise ExportError(f"example inputs lack {', '.join(missing)}; the graph takes {', '.join(graph.input_names)}")
        values = [example_inputs[name] for name in graph.input_names]
    else:
        values = list(example_inputs)
        if len(values) != len(graph.input_names):
            raise ExportError(f"{len(values)} example inputs for a graph that takes {', '.join(graph.input_names)}")
    tensors = [torch.as_tensor(np.asarray(value)) if not isinstance(value, torch.Tensor) else value for value in values]
    # torch.export specialises a dimension seen as 1: tile a lone example to a batch of 2.
    return tuple(t.repeat(2, *([1] * (t.ndim - 1))) if t.ndim > 0 and t.shape[0] == 1 else t for t in tensors)


def fold_external_data(path: str | os.PathLike) -> None:
    """If weights live beside the model (an external-data sidecar), put them back inside and delete the sidecar.

    Raises ExportError when the model is too big for one file (protobuf's 2 GB limit).
    """
    path = Path(path)
    skeleton = onnx.load(str(path), load_external_data=False)
    external = [tensor for tensor in skeleton.graph.initializer if uses_external_data(tensor)]
    if not external:
        return
    sidecars = {path.parent / entry.value for tensor in external for entry in tensor.external_data if entry.key == "location"}
    model = onnx.load(str(path))
    if model.ByteSize() >= MAX_SINGLE_FILE_BYTES:
        raise ExportError(f"{path.name} is {model.ByteSize() / 1024**3:.1f} GB with its weights: too big for one .onnx file")
    onnx.save(model, str(path), save_as_external_data=False)
    for sidecar in sidecars:
        sidecar.unlink(missing_ok=True)


def ort_session(path: str | os.PathLike, threads: int | None = None) -> onnxruntime.InferenceSession:
    """An onnxruntime session on the CPU provider, opened as the service opens it (threads default to the usable cores)."""
    return open_session(Path(path), ["CPUExecutionProvider"], threads)
