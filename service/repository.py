"""Which model versions this server serves, read from the repository through its one definition (`modelrepo`)."""
from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

from imageprep import ResizeSpec
from modelrepo import ModelMetadata, RepositoryError, Task, read_metadata, versions
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


def read_version(repo: Path, name: str, version: int) -> ModelVersion:
    """One committed version with its metadata; RepositoryError says what is wrong with it."""
    path = repo / name / str(version)
    if not path.is_dir():
        raise RepositoryError(f"{name} has no version {version} (versions: {versions(repo, name)})")
    return ModelVersion(name, version, path, read_metadata(path))


def newest_version(repo: Path, name: str) -> ModelVersion:
    present = versions(repo, name)
    if not present:
        raise RepositoryError(f"{repo / name} has no numbered version directories")
    return read_version(repo, name, present[-1])


Fingerprint = tuple[tuple[str, int, int], ...]


def fingerprint(path: Path) -> Fingerprint:
    """What the files of a version directory are now (path, size, modification time): a version that failed to load
    is tried again only when this changes (a copy that was still being written, a file replaced)."""
    files = []
    for file in sorted(path.rglob("*")):
        try:
            stat = file.stat()
        except OSError:  # removed while we looked
            continue
        if file.is_file():
            files.append((str(file.relative_to(path)), stat.st_size, stat.st_mtime_ns))
    return tuple(files)
