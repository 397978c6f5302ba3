"""What differs between training tasks: one object per task, so the training loop never asks which task it runs.

A task knows its defaults and own options, how to build its model (fresh from a preset, or from an
--init-from checkpoint), the loss of a batch, how to evaluate, and which extra artefacts to write.
Fine-tuning is the classifier task started from an MAE checkpoint (or any ViT `load_checkpoint` reads).
The numbers a run uses (sizes, budget, regularisers) come from its `model.recipe.Recipe`.
"""
from __future__ import annotations

import argparse
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .argtypes import bounded, non_negative_float, non_negative_int, ratio
from .checkpoints import LoadedCheckpoint
from .data import DataSplits
from .mae import MaskedAutoencoder, denormalise_patches, image_size_of
from .mixing import Mixing
from .plots import plot_confusion, plot_reconstructions
from .presets import ConfigError, mae_preset, vit_preset
from .recipe import Recipe
from .vit import VisionTransformer


class Task(ABC):
    """The task-specific half of a training run; `model.loop` is the other half."""

    name: ClassVar[str]
    summary: ClassVar[str]  # one line for --help
    # The demo recipe: tuned on the built-in dataset so that `vit-train [task] --out DIR` trains the demo model.
    # An image folder gets a recipe chosen from its data instead (model/recipe.py).
    defaults: ClassVar[dict[str, Any]]

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.recipe: Recipe | None = None  # set by the loop before the model is built
        self.init_notes: list[str] = []  # what --init-from loaded and what started fresh

    @classmethod
    def add_options(cls, group: argparse._ArgumentGroup) -> None:
        """Options that only this task reads."""

    def preset_overrides(self) -> dict[str, Any]:
        recipe = self.recipe
        overrides = {"image_size": recipe.image_size, "pooling": self.args.pooling, "stem": recipe.stem, "patch_size": recipe.patch_size}
        return {k: v for k, v in overrides.items() if v is not None}

    @abstractmethod
    def build_model(self, data: DataSplits, loaded: LoadedCheckpoint | None) -> nn.Module:
        """A fresh model from the recipe's preset, or one initialised from the --init-from checkpoint; in training mode."""

    @abstractmethod
    def loss(self, model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The training loss of one batch (`model` may be wrapped in DistributedDataParallel)."""

    @abstractmethod
    def evaluate(self, model: nn.Module, loader, device: torch.device) -> dict[str, float]:
        """Validation metrics over the whole loader; the model is left in training mode."""

    def checkpoint_labels(self, data: DataSplits) -> list[str] | None:
        return None

    def write_artefacts(self, model: nn.Module, data: DataSplits, out: Path, device: torch.device) -> dict[str, Any]:
        """Files beyond the checkpoint, metrics, curves and summary that every task writes; what they add to the summary."""
        return {}


class ClassifierTask(Task):
    name = "classifier"
    summary = "train a ViT classifier (fine-tune an MAE's encoder or imported weights with --init-from)"
    # 300 steps of 64 at a high rate: the demo classifier passes 99% on the built-in set (more, smaller steps
    # learned faster per CPU-second than 128-image batches).
    defaults = dict(preset="vit-demo", epochs=2, lr=2e-3, weight_decay=0.05, batch_size=64)

    @classmethod
    def add_options(cls, group: argparse._ArgumentGroup) -> None:
        recipe = "(default: from the recipe)"
        group.add_argument("--label-smoothing", type=ratio, metavar="F", help=f"share of the target spread over all classes {recipe}")
        group.add_argument("--randaugment", type=non_negative_int, metavar="N", help=f"RandAugment operations per image, 0: none {recipe}")
        group.add_argument("--magnitude", type=bounded(int, 0, below=11), metavar="M", help=f"RandAugment magnitude, 0-10 {recipe}")
        group.add_argument("--mixup", type=non_negative_float, metavar="ALPHA", help=f"mixup's Beta(alpha, alpha), 0: off {recipe}")
        group.add_argument("--cutmix", type=non_negative_float, metavar="ALPHA", help=f"CutMix's Beta(alpha, alpha), 0: off {recipe}")
        group.add_argument("--mix-prob", type=bounded(float, 0, below=1.000001), metavar="P", help=f"share of batches mixed {recipe}")
        group.add_argument("--drop-path", type=ratio, metavar="RATE", help=f"stochastic depth of the last block {recipe}")
        group.add_argument("--ema", type=ratio, metavar="DECAY", help=f"weight average for validation and the checkpoint, 0: off {recipe}")
        group.add_argument("--layer-decay", type=bounded(float, 0, inclusive=False, below=1.000001), metavar="F",
                           help=f"layer-wise learning-rate decay when fine-tuning, 1: off {recipe}")
        group.add_argument("--baseline", action="store_true",
                           help="also fit logistic regression and a linear SVM on the raw pixels of the same split, "
                           "for comparison (needs scikit-learn: the baseline extra)")

    def build_model(self, data: DataSplits, loaded: LoadedCheckpoint | None) -> nn.Module:
        num_classes = len(data.classes)
        if loaded is None:
            model = VisionTransformer(vit_preset(self.recipe.preset, num_classes=num_classes, **self.preset_overrides()))
        else:
            model = self.from_checkpoint(loaded, num_classes)
        model.set_drop_path(self.recipe.drop_path)
        return model.train()

    def from_checkpoint(self, loaded: LoadedCheckpoint, num_classes: int) -> VisionTransformer:
        """The checkpoint's encoder with a head for these classes, at the recipe's input size; notes what it did."""
        model, notes = loaded.model, self.init_notes
        origin = f"{loaded.source} checkpoint" + (f", step {loaded.step}" if loaded.step else "")
        if loaded.kind == "mae":
            model = model.classifier(num_classes, pooling=self.args.pooling)
            notes.append(f"loaded the MAE's encoder ({origin}): patch embedding, position embeddings, {len(model.blocks)} blocks, "
                         f"final norm; the decoder is dropped; {model.config.pooling} pooling")
            notes.append(f"initialised fresh: the head ({num_classes} classes)")
        else:
            notes.append(f"loaded a ViT ({origin}): patch embedding, position embeddings, {len(model.blocks)} blocks, norm"
                         + (", head" if model.config.num_classes == num_classes else ""))
            if model.config.num_classes != num_classes:
                before = model.config.num_classes
                model.reset_head(num_classes)
                notes.append(f"initialised fresh: the head ({before or 'no'} classes in the checkpoint, {num_classes} here)")
            if self.args.pooling and self.args.pooling != model.config.pooling:
                raise ConfigError(f"--pooling {self.args.pooling}: the checkpoint's ViT pools with {model.config.pooling}; "
                                  "a ViT's pooling can only be chosen when fine-tuning an MAE's encoder")
        size = (self.recipe.image_size, self.recipe.image_size)
        if model.config.image_size != size:
            before = model.config.grid_size
            model.set_image_size(size)
            notes.append(f"position embeddings resized from a {before[0]}x{before[1]} to a "
                         f"{model.config.grid_size[0]}x{model.config.grid_size[1]} patch grid ({size[0]}x{size[1]} input)")
        return model

    def loss(self, model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        recipe = self.recipe
        mixing = Mixing(recipe.mixup, recipe.cutmix, recipe.mix_prob)
        if not mixing.enabled:
            return F.cross_entropy(model(images), labels, label_smoothing=recipe.label_smoothing)
        images, targets = mixing(images, labels, self.num_classes(model), recipe.label_smoothing)
        return F.cross_entropy(model(images), targets)

    @staticmethod
    def num_classes(model: nn.Module) -> int:
        return getattr(model, "module", model).config.num_classes

    @torch.no_grad()
    def predict(self, model: VisionTransformer, loader, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, float]:
        """(predicted classes, true classes, summed cross-entropy) over the loader; the model is left in training mode."""
        model.eval()
        predicted, true, loss_sum = [], [], 0.0
        for images, labels in loader:
            images, labels = images.to(device), labels.to(device)
            logits = model(images)
            loss_sum += F.cross_entropy(logits, labels, reduction="sum").item()
            predicted.append(logits.argmax(dim=1).cpu())
            true.append(labels.cpu())
        model.train()
        return torch.cat(predicted), torch.cat(true), loss_sum

    def evaluate(self, model: VisionTransformer, loader, device: torch.device) -> dict[str, float]:
        predicted, true, loss_sum = self.predict(model, loader, device)
        return {"loss": loss_sum / len(true), "accuracy": (predicted == true).float().mean().item()}

    def checkpoint_labels(self, data: DataSplits) -> list[str] | None:
        return data.classes

    def write_artefacts(self, model: VisionTransformer, data: DataSplits, out: Path, device: torch.device) -> dict[str, Any]:
        """Per-class accuracy and the confusion matrix (confusion.png) on the validation split."""
        loader = torch.utils.data.DataLoader(data.val, batch_size=256)
        predicted, true, _ = self.predict(model, loader, device)
        classes = data.classes
        matrix = confusion_matrix(true, predicted, len(classes))
        plot_confusion(matrix, classes, out / "confusion.png")
        per_class = {name: round(float(matrix[i, i] / row), 4) if (row := matrix[i].sum()) else None for i, name in enumerate(classes)}
        return {"val_per_class_accuracy": per_class, "confusion_matrix": matrix.tolist()}


def confusion_matrix(true: torch.Tensor, predicted: torch.Tensor, num_classes: int) -> np.ndarray:
    """(C, C) counts: row = true class, column = predicted class."""
    return torch.bincount(true * num_classes + predicted, minlength=num_classes * num_classes).reshape(num_classes, num_classes).numpy()


class MAETask(Task):
    name = "mae"
    summary = "pre-train a masked autoencoder (reconstruct hidden patches)"
    # 1800 steps of 16: the masked patches' loss ends near 0.36 of the mean-patch baseline's in ~40 CPU-seconds.
    defaults = dict(preset="mae-demo", epochs=3, lr=3e-3, weight_decay=0.05, batch_size=16)

    @classmethod
    def add_options(cls, group: argparse._ArgumentGroup) -> None:
        group.add_argument("--mask-ratio", type=ratio, default=0.75, metavar="F", help="share of patches hidden from the encoder")
        group.add_argument("--norm-pix-loss", action=argparse.BooleanOptionalAction,
                           help="per-patch normalised targets (default: off on the built-in images, on for a folder)")

    def build_model(self, data: DataSplits, loaded: LoadedCheckpoint | None) -> nn.Module:
        args = self.args
        if loaded is None:
            config = mae_preset(self.recipe.preset, norm_pix_loss=self.recipe.norm_pix_loss, mask_ratio=args.mask_ratio,
                                **self.preset_overrides())
            return MaskedAutoencoder(config)
        if loaded.kind != "mae":
            raise ConfigError(f"--init-from {args.init_from} holds a {loaded.kind} model; MAE pre-training needs an MAE checkpoint")
        if image_size_of(loaded.model)[0] != self.recipe.image_size:
            raise ConfigError("an MAE's sin-cos position tables are fixed to its training grid; continue it at its own image size")
        self.init_notes.append(f"loaded the whole MAE ({loaded.source} checkpoint), encoder and decoder")
        return loaded.model.train()

    def loss(self, model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return model(images, mask_ratio=self.args.mask_ratio)[0]

    @torch.no_grad()
    def evaluate(self, model: MaskedAutoencoder, loader, device: torch.device) -> dict[str, float]:
        """Validation loss with fixed noise, and the loss of predicting the mean patch for comparison."""
        model.eval()
        generator = torch.Generator().manual_seed(self.args.seed)
        loss_sum, baseline_sum, count = 0.0, 0.0, 0
        batches = [(images.to(device), torch.rand(images.shape[0], model.num_patches, generator=generator).to(device)) for images, _ in loader]
        mean_patch = torch.stack([model.target_patches(images).mean(dim=(0, 1)) for images, _ in batches]).mean(dim=0)
        for images, noise in batches:
            _, pred, mask = model(images, noise=noise)
            loss_sum += model.per_image_loss(images, pred, mask).sum().item()
            baseline_sum += model.per_image_loss(images, mean_patch.expand_as(pred), mask).sum().item()
            count += images.shape[0]
        model.train()
        return {"loss": loss_sum / count, "baseline_loss": baseline_sum / count}

    def write_artefacts(self, model: MaskedAutoencoder, data: DataSplits, out: Path, device: torch.device) -> dict[str, Any]:
        save_reconstruction_grid(model, data, out / "reconstructions.png", device)
        return {}


TASKS: dict[str, type[Task]] = {task.name: task for task in (ClassifierTask, MAETask)}


@torch.no_grad()
def save_reconstruction_grid(model: MaskedAutoencoder, data: DataSplits, path: Path, device, count: int = 8) -> None:
    """original | masked | reconstruction for the first validation images, with fixed noise."""
    model.eval()
    images = torch.stack([data.val[i][0] for i in range(min(count, len(data.val)))]).to(device)
    noise = torch.rand(images.shape[0], model.num_patches, generator=torch.Generator().manual_seed(0)).to(device)
    _, pred, mask = model(images, noise=noise)
    patches = model.patchify(images)
    if model.config.norm_pix_loss:  # predictions are per-patch normalised: undo with the true patch statistics
        pred = denormalise_patches(pred, patches)
    patch_mask = mask[..., None].expand_as(pred)
    masked = model.unpatchify(patches * (1 - patch_mask))
    composite = model.unpatchify(patches * (1 - patch_mask) + pred * patch_mask)
    mean = torch.tensor(data.mean, device=device).view(1, 3, 1, 1)
    std = torch.tensor(data.std, device=device).view(1, 3, 1, 1)

    def to_numpy(batch: torch.Tensor) -> np.ndarray:
        return (batch * std + mean).permute(0, 2, 3, 1).cpu().numpy()

    plot_reconstructions(to_numpy(images), to_numpy(masked), to_numpy(composite), path)
    model.train()
