"""Plots saved beside a checkpoint: training curves and MAE reconstruction grids."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, never a window
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def plot_curves(records: list[dict], path: Path) -> None:
    """Loss (train and validation) and, when present, validation accuracy against the step."""
    train = [r for r in records if r.get("split") == "train"]
    val = [r for r in records if r.get("split") == "val"]
    has_accuracy = any("accuracy" in r for r in val)
    fig, axes = plt.subplots(1, 2 if has_accuracy else 1, figsize=(11 if has_accuracy else 6, 4), squeeze=False)
    loss_ax = axes[0][0]
    loss_ax.plot([r["step"] for r in train], [r["loss"] for r in train], label="train", alpha=0.7)
    if val:
        loss_ax.plot([r["step"] for r in val], [r["loss"] for r in val], "o-", label="validation")
    if any("baseline_loss" in r for r in val):
        loss_ax.axhline(val[-1]["baseline_loss"], color="grey", linestyle="--", label="predict the mean")
    loss_ax.set(xlabel="step", ylabel="loss", title="loss")
    loss_ax.legend()
    if has_accuracy:
        acc_ax = axes[0][1]
        acc_ax.plot([r["step"] for r in val], [100 * r["accuracy"] for r in val], "o-", color="tab:green")
        acc_ax.set(xlabel="step", ylabel="accuracy (%)", title="validation accuracy", ylim=(0, 100))
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_reconstructions(originals: np.ndarray, masked: np.ndarray, reconstructed: np.ndarray, path: Path) -> None:
    """A grid with one row per image: original | masked input | reconstruction. Arrays are (N, H, W, 3) in [0, 1]."""
    rows = len(originals)
    fig, axes = plt.subplots(rows, 3, figsize=(6, 2 * rows), squeeze=False)
    for row in range(rows):
        for col, (title, images) in enumerate((("original", originals), ("masked", masked), ("reconstruction", reconstructed))):
            ax = axes[row][col]
            ax.imshow(np.clip(images[row], 0, 1), interpolation="nearest")
            ax.set_axis_off()
            if row == 0:
                ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_confusion(matrix: np.ndarray, classes: list[str], path: Path) -> None:
    """The confusion matrix (rows: true class, columns: predicted), each row shaded by its share, counts written in."""
    count = len(classes)
    shares = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
    side = min(2 + 0.45 * count, 16)
    fig, ax = plt.subplots(figsize=(side + 1, side))
    shown = ax.imshow(shares, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(shown, ax=ax, label="share of the true class")
    ticks = np.arange(count)
    ax.set_xticks(ticks, classes, rotation=90 if count > 6 else 0)
    ax.set_yticks(ticks, classes)
    ax.set(xlabel="predicted", ylabel="true", title=f"validation: {np.trace(matrix)} of {matrix.sum()} correct")
    if count <= 30:  # beyond that the numbers would not fit their cells
        for row in range(count):
            for col in range(count):
                if matrix[row, col]:
                    ax.text(col, row, str(matrix[row, col]), ha="center", va="center", fontsize=8,
                            color="white" if shares[row, col] > 0.5 else "black")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
