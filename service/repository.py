"""Which model versions this server serves, read from the repository through its one definition (`modelrepo`)."""
from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

from imageprep import ResizeSpec
from modelrepo import ModelMetadata, RepositoryError, Task, model_names, read_metadata, versions
from modelrepo.names import VARIANT_FILES


@dataclass(frozen=True)
class ModelVersion:
    name: str
    version: int
    path: Path
    metadata: ModelMetadata

    @property
    def task(self) -> Task:
        return self.metadata.task

    @functools.cached_property
    def resize(self) -> ResizeSpec:
        """How a photo is brought to the graph's input: the resize the model was evaluated with."""
        image = self.metadata.image
        return ResizeSpec(image.height, image.width, image.crop_fraction, image.interpolation)

    def variant_path(self, variant: str) -> Path | None:
        path = self.path / VARIANT_FILES[variant]
        return path if path.is_file() else None

    def variants_present(self) -> list[str]:
        return [variant for variant in VARIANT_FILES if self.variant_path(variant)]


@dataclass(frozen=True)
class Unservable:
    """A model whose version to serve cannot be read (bad metadata, an unknown format): reported, not served."""
    name: str
    reason: str


def find_models(repo: Path, names: list[str] | None = None,
                pins: dict[str, int] | None = None) -> tuple[list[ModelVersion], list[Unservable]]:
    """The version to serve of each model (latest unless pinned), sorted by name, and the models that cannot be
    served with the reason. A repository-wide problem (no such models, no models at all) raises RepositoryError."""
    pins = pins or {}
    available = model_names(repo)
    wanted = names or available
    missing = [n for n in wanted if n not in available]
    if missing:
        raise RepositoryError(f"model(s) {', '.join(missing)} not in {repo} (it holds: {', '.join(available) or 'nothing'})")
    if not wanted:
        raise RepositoryError(f"model repository {repo} holds no models; export one with vit-export")
    unknown_pins = set(pins) - set(wanted)
    if unknown_pins:
        raise RepositoryError(f"pinned version for unknown model(s): {', '.join(sorted(unknown_pins))}")
    found, unservable = [], []
    for name in wanted:
        try:
            found.append(version_to_serve(repo, name, pins.get(name)))
        except RepositoryError as error:
            unservable.append(Unservable(name, str(error)))
    return found, unservable


def version_to_serve(repo: Path, name: str, pinned: int | None) -> ModelVersion:
    present = versions(repo, name)
    if not present:
        raise RepositoryError(f"{repo / name} has no numbered version directories")
    if pinned is not None and pinned not in present:
        raise RepositoryError(f"{name} has no version {pinned} (versions: {present})")
    version = pinned if pinned is not None else present[-1]
    path = repo / name / str(version)
    return ModelVersion(name, version, path, read_metadata(path))
