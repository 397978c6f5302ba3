"""Mixup and CutMix on a batch: images blended with (or patched from) the batch reversed, targets mixed alike.

Mixup (Zhang et al.) blends whole images with weight lam ~ Beta(a, a); CutMix (Yun et al.) pastes a box
covering 1 - lam of the image and sets lam to the share actually kept. Targets are soft class
probabilities (label smoothing included), which `F.cross_entropy` takes as they are.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


def soft_targets(labels: torch.Tensor, num_classes: int, smoothing: float) -> torch.Tensor:
    """(B,) class indices -> (B, C) probabilities with `smoothing` spread over all classes."""
    return F.one_hot(labels, num_classes).float() * (1 - smoothing) + smoothing / num_classes


@dataclass(frozen=True)
class Mixing:
    mixup_alpha: float = 0.0  # 0: no mixup
    cutmix_alpha: float = 0.0  # 0: no cutmix
    prob: float = 1.0  # share of batches mixed at all

    @property
    def enabled(self) -> bool:
        return self.prob > 0 and (self.mixup_alpha > 0 or self.cutmix_alpha > 0)

    def __call__(self, images: torch.Tensor, labels: torch.Tensor, num_classes: int,
                 smoothing: float) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (mixed images (B, C, H, W), targets (B, num_classes)); a batch left unmixed keeps its images."""
        targets = soft_targets(labels, num_classes, smoothing)
        if not self.enabled or torch.rand(()).item() >= self.prob:
            return images, targets
        use_cutmix = self.cutmix_alpha > 0 and (self.mixup_alpha <= 0 or torch.rand(()).item() < 0.5)
        alpha = self.cutmix_alpha if use_cutmix else self.mixup_alpha
        lam = float(torch.distributions.Beta(alpha, alpha).sample())
        partner = images.flip(0)
        if use_cutmix:
            images, lam = cutmix(images, partner, lam)
        else:
            images = images * lam + partner * (1 - lam)
        return images, targets * lam + targets.flip(0) * (1 - lam)


def cutmix(images: torch.Tensor, partner: torch.Tensor, lam: float) -> tuple[torch.Tensor, float]:
    """Paste a box of about (1 - lam) of the area from `partner`; -> (images, share of each image kept)."""
    height, width = images.shape[-2:]
    cut_h, cut_w = int(height * math.sqrt(1 - lam)), int(width * math.sqrt(1 - lam))
    cy, cx = int(torch.randint(height, ())), int(torch.randint(width, ()))
    top, bottom = max(cy - cut_h // 2, 0), min(cy + cut_h // 2, height)
    left, right = max(cx - cut_w // 2, 0), min(cx + cut_w // 2, width)
    mixed = images.clone()
    mixed[..., top:bottom, left:right] = partner[..., top:bottom, left:right]
    return mixed, 1 - (bottom - top) * (right - left) / (height * width)
