"""Reading the model repository that vit-export wrote: `<repo>/<name>/<version>/{model*.onnx, vitserve.json}`.
This file layout is the whole contract with `export/`; nothing of export/ is imported."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

METADATA_FILE = "vitserve.json"
METADATA_FORMAT = "vitserve-model"
VARIANT_FILES = {"fp32": "model.onnx", "int8": "model.int8.onnx", "fp16": "model.fp16.onnx"}
TASKS = ("classify", "embed", "reconstruct")


class RepositoryError(Exception):
    """A repository or model version the service cannot use."""


@dataclass(frozen=True)
class ModelVersion:
    name: str
    version: int
    path: Path
    metadata: dict[str, Any]

    @property
    def task(self) -> str:
        return self.metadata["task"]

    def variant_path(self, variant: str) -> Path | None:
        path = self.path / VARIANT_FILES[variant]
        return path if path.is_file() else None


def find_models(repo: Path, names: list[str] | None = None, pins: dict[str, int] | None = None) -> list[ModelVersion]:
    """The version to serve of each model (latest unless pinned), sorted by name."""
    pins = pins or {}
    available = sorted(p.name for p in repo.iterdir() if p.is_dir() and not p.name.startswith(".")) if repo.is_dir() else []
    wanted = names or available
    missing = [n for n in wanted if n not in available]
    if missing:
        raise RepositoryError(f"model(s) {', '.join(missing)} not in {repo} (it holds: {', '.join(available) or 'nothing'})")
    if not wanted:
        raise RepositoryError(f"model repository {repo} holds no models; export one with vit-export")
    unknown_pins = set(pins) - set(wanted)
    if unknown_pins:
        raise RepositoryError(f"pinned version for unknown model(s): {', '.join(sorted(unknown_pins))}")
    return [_version_to_serve(repo / name, pins.get(name)) for name in wanted]


def _version_to_serve(model_dir: Path, pinned: int | None) -> ModelVersion:
    versions = sorted(int(p.name) for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit())
    if not versions:
        raise RepositoryError(f"{model_dir} has no numbered version directories")
    if pinned is not None and pinned not in versions:
        raise RepositoryError(f"{model_dir.name} has no version {pinned} (versions: {versions})")
    version = pinned if pinned is not None else versions[-1]
    path = model_dir / str(version)
    return ModelVersion(model_dir.name, version, path, read_metadata(path))


def read_metadata(version_dir: Path) -> dict[str, Any]:
    try:
        metadata = json.loads((version_dir / METADATA_FILE).read_text())
    except (OSError, ValueError) as error:
        raise RepositoryError(f"cannot read {version_dir / METADATA_FILE}: {error}") from error
    if metadata.get("format") != METADATA_FORMAT:
        raise RepositoryError(f"{version_dir / METADATA_FILE} is not vitserve model metadata")
    if metadata.get("task") not in TASKS:
        raise RepositoryError(f"{version_dir}: unknown task {metadata.get('task')!r}")
    return metadata
