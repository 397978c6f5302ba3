"""Image folders built from real data that ships inside packages (bench/real_datasets.py); the tests that use one
skip when its package is missing."""
from __future__ import annotations

from pathlib import Path

import pytest


def digits_folder(root: Path, classes: int = 10, per_class: int | None = None) -> Path:
    pytest.importorskip("sklearn")
    from bench.real_datasets import digits_folder as build
    return build(root, classes, per_class)


def lfw_folder(root: Path) -> Path:
    pytest.importorskip("skimage")
    from bench.real_datasets import lfw_folder as build
    return build(root)
