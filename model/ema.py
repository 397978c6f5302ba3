"""An exponential moving average of a model's weights (and BatchNorm statistics), for evaluation.

torch's `AveragedModel` keeps the copy; the update warms up (decay (1 + n) / (10 + n) until it reaches the
target), so that the average does not drag the random initialisation through the first steps of a short run.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel


def _warm_ema(decay: float):
    def update(averaged: list[torch.Tensor], current: list[torch.Tensor], num_averaged: torch.Tensor | int) -> None:
        n = int(num_averaged)
        weight = 1.0 - min(decay, (1.0 + n) / (10.0 + n))
        floats = [(a, c) for a, c in zip(averaged, current) if a.is_floating_point()]
        if floats:
            torch._foreach_lerp_([a for a, _ in floats], [c for _, c in floats], weight)
        for a, c in zip(averaged, current):
            if not a.is_floating_point():  # counters such as BatchNorm's num_batches_tracked: the latest value
                a.copy_(c)

    return update


class WeightAverage:
    def __init__(self, model: nn.Module, decay: float) -> None:
        self.averaged = AveragedModel(model, multi_avg_fn=_warm_ema(decay), use_buffers=True)

    @property
    def model(self) -> nn.Module:
        """The averaged model (evaluate, save and export this one)."""
        return self.averaged.module

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.averaged.update_parameters(model)

    def state(self) -> dict[str, Any]:
        return {"count": int(self.averaged.n_averaged)}

    def load_state(self, weights: dict[str, torch.Tensor], state: dict[str, Any]) -> None:
        self.model.load_state_dict(weights)
        self.averaged.n_averaged.fill_(state["count"])
