"""What can be wrong with a repository, as exception types both sides catch by name."""
from __future__ import annotations


class RepositoryError(ValueError):
    """A repository path, model name or version that cannot be written or read."""


class InvalidMetadata(RepositoryError):
    """A vitserve.json that is missing, unreadable or incomplete."""


class UnsupportedFormat(RepositoryError):
    """Metadata of a format this code does not know (another tool's file, or a newer vit-export)."""
