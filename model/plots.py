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
