"""Image folders built from real data that ships inside packages (no download): scikit-learn's handwritten
digits (8x8, ten classes) and scikit-image's lfw_subset (25x25 faces and non-faces)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image


def digits_folder(root: Path, classes: int = 10, per_class: int | None = None) -> Path:
    """root/<digit>/<n>.png, greyscale saved as RGB; `per_class` images of each of the first `classes` digits."""
    datasets = pytest.importorskip("sklearn.datasets")
    digits = datasets.load_digits()
    counts: dict[int, int] = {}
    for index, (image, label) in enumerate(zip(digits.images, digits.target)):
        label = int(label)
        if label >= classes or (per_class is not None and counts.get(label, 0) >= per_class):
            continue
        counts[label] = counts.get(label, 0) + 1
        folder = root / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray((image / 16 * 255).round().astype(np.uint8)).convert("RGB").save(folder / f"{index:04d}.png")
    return root


def lfw_folder(root: Path) -> Path:
    """root/face, root/not_face: the 100 + 100 images of scikit-image's lfw_subset."""
    skimage_data = pytest.importorskip("skimage.data")
    for index, image in enumerate(skimage_data.lfw_subset()):
        folder = root / ("face" if index < 100 else "not_face")
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray((image * 255).round().astype(np.uint8)).convert("RGB").save(folder / f"{index:03d}.png")
    return root
