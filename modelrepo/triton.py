"""Triton's `config.pbtxt` (protobuf text format) for a model of the repository, so the same repository loads in Triton."""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from .layout import write_atomically
from .metadata import TensorSpec
from .policy import VersionPolicy
from .names import TRITON_CONFIG_FILE

_TRITON_TYPES = {"uint8": "TYPE_UINT8", "float32": "TYPE_FP32", "float16": "TYPE_FP16", "int64": "TYPE_INT64"}


def triton_config(name: str, inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec], *, max_batch_size: int,
                  batch_delay_us: int = 2000, version_policy: VersionPolicy | None = None) -> str:
    """An onnxruntime model's configuration. Inputs without a batch axis (scalars such as the reconstructor's
    `keep`) cannot be batched by Triton, so such a model gets `max_batch_size: 0` and full shapes; a scalar is
    declared as dims [1] reshaped to [] (Triton's convention for scalars). `version_policy`: the model's own
    (version_policy.json), so that Triton serves the same versions as vit-serve."""
    batched = max_batch_size > 0 and all(t.batched for t in inputs)
    lines = [f'name: "{name}"', 'platform: "onnxruntime_onnx"', f"max_batch_size: {max_batch_size if batched else 0}"]
    for section, tensors in (("input", inputs), ("output", outputs)):
        entries = [_tensor(t, batched) for t in tensors]
        lines.append(f"{section} [\n" + ",\n".join(entries) + "\n]")
    if version_policy is not None:
        lines.append(version_policy.to_triton())
    if batched:
        lines.append(f"dynamic_batching {{\n  max_queue_delay_microseconds: {batch_delay_us}\n}}")
    return "\n".join(lines) + "\n"


def _tensor(tensor: TensorSpec, batched: bool) -> str:
    shape = list(tensor.shape[1:] if batched else tensor.shape)  # Triton adds the batch axis itself
    fields = [f'    name: "{tensor.name}"', f"    data_type: {_TRITON_TYPES[tensor.dtype]}"]
    if shape:
        fields.append(f"    dims: [ {', '.join(str(d) for d in shape)} ]")
    else:
        fields += ["    dims: [ 1 ]", "    reshape: { shape: [ ] }"]
    return "  {\n" + "\n".join(fields) + "\n  }"


def write_triton_config(repo: Path, name: str, text: str) -> None:
    write_atomically(repo / name / TRITON_CONFIG_FILE, text)
