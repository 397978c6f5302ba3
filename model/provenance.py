"""Where a checkpoint's training images came from, recorded in it so that later steps can use the same data.

`vit-train` stores a data record (source, split seed, validation share) and a model name in the checkpoint's
training state; `vit-export` names the model from it and checks its graphs on the checkpoint's own
validation images, the images the user cares about, rather than on the built-in synthetic ones.
"""
from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Any

import numpy as np

from .data import DataError, load_dataset
from .transforms import EvalTransform


def data_record(args: argparse.Namespace) -> dict[str, Any]:
    """What `load_dataset` needs to rebuild this run's splits (vit-export checks on the validation split; static int8
    calibrates on the training split)."""
    source = args.data if args.data == "synthetic" else str(Path(args.data).resolve())
    return {"source": source, "seed": args.seed, "val_fraction": args.val_fraction, "num_synthetic": args.num_synthetic}


def model_name(task: str, explicit: str | None, record: dict[str, Any]) -> str | None:
    """The name a model repository should give this model: --name, else the data folder's (an MAE's with -mae);
    None for the built-in images, which say nothing about the model."""
    if explicit:
        return explicit
    if record["source"] == "synthetic":
        return None
    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", Path(record["source"]).name).lstrip("_.-")[:120] or "model"
    return f"{name}-mae" if task == "mae" else name


def recorded_name(training: dict[str, Any] | None) -> str | None:
    return (training or {}).get("name")


def validation_images(training: dict[str, Any] | None, image_size: tuple[int, int], limit: int) -> tuple[np.ndarray, str] | None:
    """Up to `limit` uint8 (N, H, W, 3) validation images of the run that wrote the checkpoint, resized as the service
    resizes them, and where they came from; None when the checkpoint has no record or its images are gone."""
    record = (training or {}).get("data")
    if not record:
        return None
    try:
        splits = load_dataset(record["source"], image_size, seed=record["seed"], val_fraction=record["val_fraction"],
                              num_synthetic=record["num_synthetic"], augment=False)
    except (DataError, OSError):
        return None
    val, transform = splits.val, EvalTransform(image_size, splits.mean, splits.std)
    count = min(limit, len(val))
    picked = np.linspace(0, len(val) - 1, count).astype(int)  # spread over the classes, which are stored in order
    images = np.stack([transform.pixels(val.raw_item(int(i), transform.decode_target)[0]) for i in picked])
    return images, f"{count} validation images of {record['source']}"
