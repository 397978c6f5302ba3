"""The model repository: the only contract between `export/` and `service/`.

    <repo>/<name>/config.pbtxt              Triton's model configuration (the same repository loads in Triton)
    <repo>/<name>/<version>/model.onnx      the fp32 graph; variants beside it: model.int8.onnx, model.fp16.onnx
    <repo>/<name>/<version>/vitserve.json   everything the service needs: task, input layout, sizes, labels, ...

Versions are integers; a new export of the same name gets the next one. A version is built in a
staging directory inside the repository and renamed into place only when complete, so a failed
export never leaves a half-written version behind.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

METADATA_FILE = "vitserve.json"
METADATA_FORMAT = "vitserve-model"
METADATA_VERSION = 1
VARIANT_FILES = {"fp32": "model.onnx", "int8": "model.int8.onnx", "fp16": "model.fp16.onnx"}
STAGING_PREFIX = ".staging-"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")

# ONNX tensor element types -> Triton data types (only those our graphs use).
_TRITON_TYPES = {"uint8": "TYPE_UINT8", "float32": "TYPE_FP32", "float16": "TYPE_FP16", "int64": "TYPE_INT64"}


class RepositoryError(ValueError):
    """A repository path or model name that cannot hold an export."""


def check_repository(repo: Path) -> None:
    if repo.exists() and not repo.is_dir():
        raise RepositoryError(f"repository path {repo} is a file, not a directory")


def check_name(name: str) -> None:
    if not _NAME.match(name):
        raise RepositoryError(f"model name {name!r} must be 1-128 letters, digits, '_', '.' or '-', starting with a letter or digit")


def versions(repo: Path, name: str) -> list[int]:
    """The committed versions of a model, ascending."""
    model_dir = repo / name
    if not model_dir.is_dir():
        return []
    return sorted(int(p.name) for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit())


@dataclass
class StagedVersion:
    path: Path  # where to write the files
    version: int | None = None  # the number it got, once committed


@contextlib.contextmanager
def staged_version(repo: Path, name: str) -> Iterator[StagedVersion]:
    """Yield an empty staging directory; on success it becomes `<repo>/<name>/<next version>`, on error it is removed."""
    check_repository(repo)
    check_name(name)
    repo.mkdir(parents=True, exist_ok=True)
    staged = StagedVersion(repo / f"{STAGING_PREFIX}{name}-{uuid.uuid4().hex[:8]}")
    staged.path.mkdir()
    try:
        yield staged
        staged.version = commit_version(staged.path, repo, name)
    finally:
        shutil.rmtree(staged.path, ignore_errors=True)


def commit_version(staging: Path, repo: Path, name: str) -> int:
    """Rename a complete staging directory to the next free version number and record it in the metadata."""
    (repo / name).mkdir(exist_ok=True)
    for _ in range(100):  # another exporter may take a number between our look and our rename
        version = (versions(repo, name) or [0])[-1] + 1
        metadata_path = staging / METADATA_FILE
        if metadata_path.exists():
            metadata = json.loads(metadata_path.read_text())
            metadata["version"] = version
            write_json(metadata_path, metadata)
        try:
            os.rename(staging, repo / name / str(version))
            return version
        except OSError:
            if not (repo / name / str(version)).exists():
                raise
    raise RepositoryError(f"could not claim a version number for {name} in {repo}")


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Write JSON atomically (temp file + rename): readers never see half a file."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def read_metadata(version_dir: Path) -> dict[str, Any]:
    return json.loads((version_dir / METADATA_FILE).read_text())


def triton_config(name: str, inputs: list[dict], outputs: list[dict], *, max_batch_size: int, batch_delay_us: int = 2000) -> str:
    """Triton `config.pbtxt` (protobuf text format) for an onnxruntime model.

    `inputs`/`outputs` are dicts with `name`, `dtype` and `shape` whose first axis is the batch (-1).
    Inputs without a batch axis (scalars such as the reconstructor's `keep`) cannot be batched by
    Triton, so such a model gets `max_batch_size: 0` and full shapes; a scalar is declared as
    dims [1] reshaped to [] (Triton's convention for scalars)."""
    batched = max_batch_size > 0 and all(_has_batch_axis(t) for t in inputs)
    lines = [f'name: "{name}"', 'platform: "onnxruntime_onnx"', f"max_batch_size: {max_batch_size if batched else 0}"]
    for section, tensors in (("input", inputs), ("output", outputs)):
        entries = [_triton_tensor(t, batched) for t in tensors]
        lines.append(f"{section} [\n" + ",\n".join(entries) + "\n]")
    if batched:
        lines.append(f"dynamic_batching {{\n  max_queue_delay_microseconds: {batch_delay_us}\n}}")
    return "\n".join(lines) + "\n"


def _has_batch_axis(tensor: dict) -> bool:
    return len(tensor["shape"]) > 0 and tensor["shape"][0] == -1


def _triton_tensor(tensor: dict, batched: bool) -> str:
    shape = list(tensor["shape"])
    if batched:
        shape = shape[1:]  # Triton adds the batch axis itself
    fields = [f'    name: "{tensor["name"]}"', f"    data_type: {_TRITON_TYPES[tensor['dtype']]}"]
    if shape:
        fields.append(f"    dims: [ {', '.join(str(d) for d in shape)} ]")
    else:
        fields += ["    dims: [ 1 ]", "    reshape: { shape: [ ] }"]
    return "  {\n" + "\n".join(fields) + "\n  }"


def write_triton_config(repo: Path, name: str, text: str) -> None:
    path = repo / name / "config.pbtxt"
    tmp = path.with_name(f".config.pbtxt.{uuid.uuid4().hex[:8]}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
