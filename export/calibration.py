"""Real images for static int8: what calibrates the activation ranges, and labelled held-out images to measure accuracy.

A checkpoint written by vit-train records the dataset it was trained on (`training["data"]`): its training split
calibrates and its validation split, with labels, measures. Otherwise the images come from `--images DIR`
(unlabelled: only agreement with fp32 is measured), or from the built-in synthetic set as a last resort.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from model.data import ArrayDataset, DataError, ImageFolder, decode_image, load_dataset, make_synthetic
from model.transforms import resize_and_centre_crop

from .errors import ExportError
from .metadata import CROP_FRACTION

NUM_CALIBRATION_IMAGES = 64  # ranges settle by ~32 images on the models measured (bench/static_int8.py)
NUM_HELD_OUT_IMAGES = 256


@dataclass(frozen=True)
class CalibrationSet:
    images: np.ndarray  # uint8 (N, H, W, 3): calibrates the activation ranges
    source: str  # where they came from, for the metadata
    held_out: np.ndarray | None = None  # uint8 (M, H, W, 3) never used for calibration
    held_out_labels: np.ndarray | None = None  # (M,) class indices, when known

    def describe(self) -> dict[str, Any]:
        record: dict[str, Any] = {"source": self.source, "images": int(len(self.images))}
        if self.held_out is not None:
            record["held_out_images"] = int(len(self.held_out))
        return record


def recorded_dataset(training: Mapping[str, Any] | None) -> Mapping[str, Any] | None:
    """The dataset a vit-train checkpoint says it was trained on, or None."""
    data = (training or {}).get("data")
    return data if isinstance(data, Mapping) and data.get("source") else None


def calibration_set(training: Mapping[str, Any] | None, images_dir: Path | None, size: tuple[int, int],
                    real_images: np.ndarray) -> CalibrationSet:
    """The images static int8 is calibrated on, and held-out ones to judge it on (see the module docstring).

    `real_images`: the images the export already loaded for its checks (from `images_dir`, or synthetic).
    """
    recorded = recorded_dataset(training)
    if recorded is not None:
        return _from_training_data(recorded, size)
    if images_dir is not None:
        return CalibrationSet(real_images[:NUM_CALIBRATION_IMAGES], f"images folder {images_dir}")
    synthetic = make_synthetic(NUM_CALIBRATION_IMAGES, size, seed=54321)[0]
    return CalibrationSet(synthetic, "built-in synthetic images (pass --images for real ones)")


def _from_training_data(recorded: Mapping[str, Any], size: tuple[int, int]) -> CalibrationSet:
    source = str(recorded["source"])
    try:
        splits = load_dataset(source, size, seed=int(recorded.get("seed", 0)),
                              val_fraction=float(recorded.get("val_fraction", 0.2)),
                              num_synthetic=int(recorded.get("num_synthetic", 12000)), augment=False)
    except (DataError, OSError) as error:
        raise ExportError(f"the checkpoint was trained on {source}, which cannot be read now ({error}); "
                          "pass --images DIR to calibrate on other images") from None
    calibration, _ = _uint8_images(splits.train, NUM_CALIBRATION_IMAGES, size)
    held_out, labels = _uint8_images(splits.val, NUM_HELD_OUT_IMAGES, size)
    return CalibrationSet(calibration, f"training split of {source}", held_out, labels)


def _uint8_images(dataset: ArrayDataset | ImageFolder, count: int, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Up to `count` images spread evenly over the split (so every class shows up), as the service would see them."""
    picks = np.unique(np.linspace(0, len(dataset) - 1, min(count, len(dataset))).round().astype(int))
    labels = np.asarray(dataset.labels)[picks]
    if isinstance(dataset, ArrayDataset):
        images = dataset.images[picks]
        if images.shape[1:3] != tuple(size):
            images = np.stack([np.asarray(resize_and_centre_crop(image, size, CROP_FRACTION)) for image in images])
        return images, labels
    files = [dataset.samples[i][0] for i in picks]
    return np.stack([np.asarray(resize_and_centre_crop(decode_image(path), size, CROP_FRACTION)) for path in files]), labels
