"""Which versions of a model to serve: Triton's `version_policy` semantics, one definition for the server (which
applies it) and the export (which mirrors it into Triton's config.pbtxt).

    latest      the newest N versions (default: the newest one)
    all         every version
    specific    the listed versions

Written per model as `<repo>/<name>/version_policy.json`, in the JSON form of Triton's model configuration
(`{"latest": {"num_versions": 2}}`, `{"all": {}}`, `{"specific": {"versions": [1, 3]}}`), or given to the server as
text for every model without that file (`latest`, `latest:2`, `all`, `specific:1,3`).
"""
from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from .errors import RepositoryError
from .names import VERSION_POLICY_FILE

PolicyKind = Literal["latest", "all", "specific"]


class InvalidPolicy(RepositoryError):
    """A version policy that cannot be read."""


@dataclass(frozen=True)
class VersionPolicy:
    kind: PolicyKind = "latest"
    num_versions: int = 1  # latest only
    versions: tuple[int, ...] = ()  # specific only

    def __post_init__(self) -> None:
        if self.kind == "latest" and self.num_versions < 1:
            raise InvalidPolicy(f"latest needs num_versions >= 1, not {self.num_versions}")
        if self.kind == "specific" and (not self.versions or any(v < 1 for v in self.versions)):
            raise InvalidPolicy(f"specific needs one or more version numbers >= 1, not {list(self.versions)}")

    def select(self, available: Iterable[int]) -> list[int]:
        """The versions of `available` this policy serves, newest first."""
        newest_first = sorted(set(available), reverse=True)
        if self.kind == "all":
            return newest_first
        if self.kind == "latest":
            return newest_first[:self.num_versions]
        return [v for v in newest_first if v in self.versions]

    def describe(self) -> str:
        """The text form (`parse` reads it back)."""
        if self.kind == "latest":
            return "latest" if self.num_versions == 1 else f"latest:{self.num_versions}"
        if self.kind == "specific":
            return "specific:" + ",".join(str(v) for v in sorted(self.versions))
        return "all"

    @classmethod
    def parse(cls, text: str) -> VersionPolicy:
        """`latest`, `latest:N`, `all` or `specific:V1,V2,...`."""
        kind, _, argument = text.strip().partition(":")
        try:
            if kind == "all" and not argument:
                return cls("all")
            if kind == "latest":
                return cls("latest", num_versions=int(argument) if argument else 1)
            if kind == "specific":
                return cls("specific", versions=tuple(int(v) for v in argument.split(",")))
        except ValueError:
            pass
        raise InvalidPolicy(f"version policy {text!r}: expected latest, latest:N, all or specific:V1,V2,...")

    def to_json(self) -> dict:
        if self.kind == "latest":
            return {"latest": {"num_versions": self.num_versions}}
        if self.kind == "specific":
            return {"specific": {"versions": sorted(self.versions)}}
        return {"all": {}}

    @classmethod
    def from_json(cls, data: object) -> VersionPolicy:
        if not isinstance(data, dict) or len(data) != 1:
            raise InvalidPolicy('expected one of {"latest": {"num_versions": N}}, {"all": {}}, '
                                '{"specific": {"versions": [...]}}')
        [(kind, body)] = data.items()
        body = body or {}
        if not isinstance(body, dict):
            raise InvalidPolicy(f"{kind}: expected an object, not {body!r}")
        try:
            if kind == "all":
                return cls("all")
            if kind == "latest":
                return cls("latest", num_versions=int(body.get("num_versions", 1)))
            if kind == "specific":
                return cls("specific", versions=tuple(int(v) for v in body.get("versions", ())))
        except (TypeError, ValueError) as error:
            raise InvalidPolicy(f"{kind}: {error}") from None
        raise InvalidPolicy(f"unknown version policy {kind!r}: expected latest, all or specific")

    def to_triton(self) -> str:
        """The `version_policy` field of Triton's config.pbtxt."""
        if self.kind == "latest":
            return f"version_policy: {{ latest: {{ num_versions: {self.num_versions} }} }}"
        if self.kind == "specific":
            return f"version_policy: {{ specific: {{ versions: [ {', '.join(str(v) for v in sorted(self.versions))} ] }} }}"
        return "version_policy: { all: { } }"


def read_version_policy(repo: Path, name: str) -> VersionPolicy | None:
    """The model's own policy file, if it has one; an unreadable one raises InvalidPolicy naming the file."""
    path = repo / name / VERSION_POLICY_FILE
    if not path.is_file():
        return None
    try:
        return VersionPolicy.from_json(json.loads(path.read_text()))
    except (OSError, json.JSONDecodeError) as error:
        raise InvalidPolicy(f"{path}: {error}") from None
    except InvalidPolicy as error:
        raise InvalidPolicy(f"{path}: {error}") from None
