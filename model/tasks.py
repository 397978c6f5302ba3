"""What differs between training tasks: one object per task, so the training loop never asks which task it runs.

A task knows its defaults and own options, how to build its model (fresh from a preset, or from an
--init-from checkpoint), the loss of a batch, how to evaluate, and which extra artefacts to write.
Fine-tuning is the classifier task started from an MAE checkpoint.
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

from .argtypes import ratio
from .checkpoints import LoadedCheckpoint
from .data import DataSplits
from .mae import MaskedAutoencoder, denormalise_patches, image_size_of
from .plots import plot_reconstructions
from .presets import ConfigError, mae_preset, vit_preset
from .vit import VisionTransformer


class Task(ABC):
    """The task-specific half of a training run; `model.loop` is the other half."""

    name: ClassVar[str]
    summary: ClassVar[str]  # one line for --help
    # Tuned on the built-in dataset so that `vit-train [task] --out DIR` trains the demo model.
    defaults: ClassVar[dict[str, Any]]

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args

    @classmethod
    def add_options(cls, group: argparse._ArgumentGroup) -> None:
        """Options that only this task reads."""

    def preset_overrides(self) -> dict[str, Any]:
        args = self.args
        return {k: v for k, v in (("image_size", args.image_size), ("pooling", args.pooling), ("stem", args.stem)) if v is not None}

    def initial_image_size(self, loaded: LoadedCheckpoint | None) -> tuple[int, int]:
        """The input size the model will see: the checkpoint's when starting from one, else the preset's."""
        if self.args.image_size:
            return (self.args.image_size, self.args.image_size)
        if loaded is not None:
            return image_size_of(loaded.model)
        return self.preset_image_size()

    @abstractmethod
    def preset_image_size(self) -> tuple[int, int]:
        """The input size of the --preset model."""

    @abstractmethod
    def build_model(self, data: DataSplits, loaded: LoadedCheckpoint | None) -> nn.Module:
        """A fresh model from the preset, or one initialised from the --init-from checkpoint; in training mode."""

    @abstractmethod
    def loss(self, model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The training loss of one batch (`model` may be wrapped in DistributedDataParallel)."""

    @abstractmethod
    def evaluate(self, model: nn.Module, loader, device: torch.device) -> dict[str, float]:
        """Validation metrics over the whole loader; the model is left in training mode."""

    def checkpoint_labels(self, data: DataSplits) -> list[str] | None:
        return None

    def write_artefacts(self, model: nn.Module, data: DataSplits, out: Path, device: torch.device) -> None:
        """Files beyond the checkpoint, metrics, curves and summary that every task writes."""


class ClassifierTask(Task):
    name = "classifier"
    summary = "train a ViT classifier (fine-tune an MAE's encoder with --init-from)"
    # 300 steps of 64 at a high rate: the demo classifier passes 99% on the built-in set (more, smaller steps
    # learned faster per CPU-second than 128-image batches).
    defaults = dict(preset="vit-demo", epochs=2, lr=2e-3, weight_decay=0.05, batch_size=64)

    @classmethod
    def add_options(cls, group: argparse._ArgumentGroup) -> None:
        group.add_argument("--label-smoothing", type=ratio, default=0.1, metavar="F", help="share of the target spread over all classes")

    def preset_image_size(self) -> tuple[int, int]:
        return vit_preset(self.args.preset).image_size

    def build_model(self, data: DataSplits, loaded: LoadedCheckpoint | None) -> nn.Module:
        num_classes = len(data.classes)
        if loaded is None:
            return VisionTransformer(vit_preset(self.args.preset, num_classes=num_classes, **self.preset_overrides()))
        model = loaded.model
        if loaded.kind == "mae":
            model = model.classifier(num_classes, pooling=self.args.pooling)
        elif model.config.num_classes != num_classes:
            model.reset_head(num_classes)
        if self.args.image_size and model.config.image_size != (self.args.image_size, self.args.image_size):
            model.set_image_size(self.args.image_size)
        return model.train()

    def loss(self, model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(model(images), labels, label_smoothing=self.args.label_smoothing)

    @torch.no_grad()
    def evaluate(self, model: VisionTransformer, loader, device: torch.device) -> dict[str, float]:
        model.eval()
        correct, total, loss_sum = 0, 0, 0.0
        for images, labels in loader:
            images, labels = images.to(device), labels.to(device)
            logits = model(images)
            loss_sum += F.cross_entropy(logits, labels, reduction="sum").item()
            correct += (logits.argmax(dim=1) == labels).sum().item()
            total += labels.numel()
        model.train()
        return {"loss": loss_sum / total, "accuracy": correct / total}

    def checkpoint_labels(self, data: DataSplits) -> list[str] | None:
        return data.classes


class MAETask(Task):
    name = "mae"
    summary = "pre-train a masked autoencoder (reconstruct hidden patches)"
    # 1800 steps of 16: the masked patches' loss ends near 0.36 of the mean-patch baseline's in ~40 CPU-seconds.
    defaults = dict(preset="mae-demo", epochs=3, lr=3e-3, weight_decay=0.05, batch_size=16)

    @classmethod
    def add_options(cls, group: argparse._ArgumentGroup) -> None:
        group.add_argument("--mask-ratio", type=ratio, default=0.75, metavar="F", help="share of patches hidden from the encoder")
        group.add_argument("--norm-pix-loss", action="store_true", help="per-patch normalised targets")

    def preset_image_size(self) -> tuple[int, int]:
        return mae_preset(self.args.preset).encoder.image_size

    def build_model(self, data: DataSplits, loaded: LoadedCheckpoint | None) -> nn.Module:
        args = self.args
        if loaded is None:
            config = mae_preset(args.preset, norm_pix_loss=args.norm_pix_loss, mask_ratio=args.mask_ratio, **self.preset_overrides())
            return MaskedAutoencoder(config)
        if loaded.kind != "mae":
            raise ConfigError(f"--init-from {args.init_from} holds a {loaded.kind} model; MAE pre-training needs an MAE checkpoint")
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

    def write_artefacts(self, model: MaskedAutoencoder, data: DataSplits, out: Path, device: torch.device) -> None:
        save_reconstruction_grid(model, data, out / "reconstructions.png", device)


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
