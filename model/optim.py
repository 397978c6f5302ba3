"""AdamW with the usual no-decay groups, and a linear warm-up into a cosine decay."""
from __future__ import annotations

import math

import torch
from torch import nn

# Parameters that are offsets or embeddings, not weights: decaying them only hurts.
_NO_DECAY_NAMES = ("pos_embed", "cls_token", "mask_token", "query")


def layer_id(name: str, depth: int) -> int:
    """Depth of a ViT parameter for layer-wise rate decay: 0 for the embeddings, i + 1 for block i, depth + 1 above."""
    if name.startswith(("cls_token", "pos_embed", "patch_embed")):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return depth + 1


def param_groups(model: nn.Module, weight_decay: float, layer_decay: float = 1.0) -> list[dict]:
    """Decayed and undecayed parameters; with layer_decay < 1 also one group per depth, whose rate is scaled by
    layer_decay ** (distance from the top) (fine-tuning: the lower, more general layers move least)."""
    depth = len(getattr(model, "blocks", ()))
    groups: dict[tuple[bool, int], dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        decays = not (param.ndim <= 1 or name.split(".")[-1] in _NO_DECAY_NAMES)
        layer = layer_id(name, depth) if layer_decay < 1.0 else depth + 1
        group = groups.setdefault((decays, layer), {"params": [], "weight_decay": weight_decay if decays else 0.0,
                                                    "lr_scale": layer_decay ** (depth + 1 - layer)})
        group["params"].append(param)
    # decayed first, then by depth: without layer decay exactly [decayed, undecayed], as older checkpoints saved them
    return [groups[key] for key in sorted(groups, key=lambda key: (not key[0], key[1]))]


def build_optimizer(model: nn.Module, lr: float, weight_decay: float, betas=(0.9, 0.999),
                    layer_decay: float = 1.0) -> torch.optim.AdamW:
    groups = param_groups(model, weight_decay, layer_decay)
    for group in groups:
        group["lr"] = lr * group.pop("lr_scale")
    return torch.optim.AdamW(groups, lr=lr, betas=betas)


def warmup_cosine(warmup_steps: int, total_steps: int, min_ratio: float = 0.01):
    """Learning-rate factor per step: 0 -> 1 linearly over the warm-up, then cosine down to `min_ratio`."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def build_scheduler(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(warmup_steps, total_steps))
