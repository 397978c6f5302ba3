"""Image folders from real data that ships inside packages (no download), for training tests and benchmarks:
scikit-learn's handwritten digits (1797 images, 8x8, ten classes) and scikit-image's lfw_subset (100 faces and
100 non-faces, 25x25). Both are greyscale, saved as RGB PNGs in root/<class>/."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def _save(image: np.ndarray, folder: Path, name: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).convert("RGB").save(folder / name)


def digits_folder(root: Path, classes: int = 10, per_class: int | None = None) -> Path:
    """root/<digit>/<index>.png: `per_class` images (default: all) of each of the first `classes` digits."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    counts: dict[int, int] = {}
    for index, (image, label) in enumerate(zip(digits.images, digits.target)):
        label = int(label)
        if label >= classes or (per_class is not None and counts.get(label, 0) >= per_class):
            continue
        counts[label] = counts.get(label, 0) + 1
        _save((image / 16 * 255).round().astype(np.uint8), root / str(label), f"{index:04d}.png")
    return root


def lfw_folder(root: Path) -> Path:
    """root/face, root/not_face: the 200 images of scikit-image's lfw_subset (faces first)."""
    from skimage.data import lfw_subset

    for index, image in enumerate(lfw_subset()):
        _save((image * 255).round().astype(np.uint8), root / ("face" if index < 100 else "not_face"), f"{index:03d}.png")
    return root


BUILDERS = {"digits": digits_folder, "lfw": lfw_folder}
