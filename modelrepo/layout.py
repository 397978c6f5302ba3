"""Where things are in a repository, and how a version is written so that readers never see half of one.

A version is built in a staging directory inside the repository (skipped by readers) and renamed to
the next free number only when complete; a failed export leaves nothing behind.
"""
from __future__ import annotations

import contextlib
import os
import re
import shutil
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from .errors import InvalidMetadata, RepositoryError
from .metadata import ModelMetadata
from .names import METADATA_FILE, STAGING_PREFIX

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


def check_repository(repo: Path) -> None:
    if repo.exists() and not repo.is_dir():
        raise RepositoryError(f"repository path {repo} is a file, not a directory")


def check_name(name: str) -> None:
    if not _NAME.match(name):
        raise RepositoryError(f"model name {name!r} must be 1-128 letters, digits, '_', '.' or '-', starting with a letter or digit")


def model_names(repo: Path) -> list[str]:
    """The models in a repository, sorted (staging and hidden directories excluded)."""
    if not repo.is_dir():
        return []
    return sorted(p.name for p in repo.iterdir() if p.is_dir() and not p.name.startswith("."))


def versions(repo: Path, name: str) -> list[int]:
    """The committed versions of a model, ascending."""
    model_dir = repo / name
    if not model_dir.is_dir():
        return []
    return sorted(int(p.name) for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit())


def version_dirs(repo: Path, name: str) -> dict[int, Path]:
    return {version: repo / name / str(version) for version in versions(repo, name)}


def read_metadata(version_dir: Path) -> ModelMetadata:
    """The typed metadata of one version directory; the error says which file and why."""
    path = version_dir / METADATA_FILE
    try:
        text = path.read_text()
    except OSError as error:
        raise InvalidMetadata(f"cannot read {path}: {error.strerror or error}") from None
    try:
        return ModelMetadata.loads(text)
    except RepositoryError as error:
        raise type(error)(f"{path}: {error}") from None


def write_metadata(version_dir: Path, metadata: ModelMetadata) -> None:
    write_atomically(version_dir / METADATA_FILE, metadata.dumps())


def write_atomically(path: Path, text: str) -> None:
    """Temp file + rename: readers never see half a file."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


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
        staged.version = _commit(staged.path, repo, name)
    finally:
        shutil.rmtree(staged.path, ignore_errors=True)


def _commit(staging: Path, repo: Path, name: str) -> int:
    """Rename a complete staging directory to the next free version number."""
    (repo / name).mkdir(exist_ok=True)
    for _ in range(100):  # another exporter may take a number between our look and our rename
        version = (versions(repo, name) or [0])[-1] + 1
        try:
            os.rename(staging, repo / name / str(version))
            return version
        except OSError:
            if not (repo / name / str(version)).exists():
                raise
    raise RepositoryError(f"could not claim a version number for {name} in {repo}")
