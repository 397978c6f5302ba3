"""The classical baseline a small dataset should be compared against: linear models on the raw pixels.

Logistic regression and a linear SVM (scikit-learn, the optional `baseline` extra) fitted on the training
split's pixels as evaluation sees them (resized, centre-cropped, standardised per pixel) and scored on the
validation split: the figure a ViT on a few thousand images has to beat to be worth its cost.
"""
from __future__ import annotations

import time
import warnings
from typing import Any

import numpy as np

from .data import DataSplits
from .presets import ConfigError
from .transforms import EvalTransform

MAX_ITERATIONS = 2000


def raw_pixels(dataset, transform: EvalTransform) -> tuple[np.ndarray, np.ndarray]:
    """(N, H*W*3) float32 pixels in [0, 1] and (N,) labels of every item, through the evaluation resize."""
    pixels, labels = [], []
    for index in range(len(dataset)):
        image, label = dataset.raw_item(index, transform.decode_target)
        pixels.append(transform.pixels(image).reshape(-1))
        labels.append(label)
    return np.stack(pixels).astype(np.float32) / 255.0, np.asarray(labels)


def is_grey(pixels: np.ndarray) -> bool:
    """Whether (N, H*W*3) pixels (channels last) have R = G = B everywhere."""
    rgb = pixels.reshape(len(pixels), -1, 3)
    return bool(np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 0], rgb[..., 2]))


def fit_baseline(data: DataSplits) -> dict[str, Any]:
    """Validation accuracy of logistic regression and a linear SVM on the raw pixels of the same split."""
    try:
        from sklearn.exceptions import ConvergenceWarning
        from sklearn.linear_model import LogisticRegression
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler
        from sklearn.svm import LinearSVC
    except ImportError as exc:
        raise ConfigError("--baseline needs scikit-learn: pip install 'vitserve[baseline]'") from exc
    transform = data.val.transform
    train_x, train_y = raw_pixels(data.train, transform)
    val_x, val_y = raw_pixels(data.val, transform)
    if is_grey(train_x):  # three equal channels: one carries it all, at a third of the fitting time
        train_x, val_x = train_x[:, ::3], val_x[:, ::3]
    models = {
        "logistic_regression": LogisticRegression(max_iter=MAX_ITERATIONS, C=0.1),
        "linear_svm": LinearSVC(C=0.01, max_iter=MAX_ITERATIONS),
    }
    accuracy, seconds = {}, {}
    for name, model in models.items():
        started = time.perf_counter()
        with warnings.catch_warnings():  # a linear model that has not fully converged is still the reference asked for
            warnings.simplefilter("ignore", ConvergenceWarning)
            fitted = make_pipeline(StandardScaler(), model).fit(train_x, train_y)
        accuracy[name] = round(float((fitted.predict(val_x) == val_y).mean()), 4)
        seconds[name] = round(time.perf_counter() - started, 1)
    return {"val_accuracy": accuracy, "fit_seconds": seconds, "features": int(train_x.shape[1]),
            "train_images": len(train_y), "val_images": len(val_y)}
