"""What every importer shares: the error type, the converted result, and small helpers for reading a foreign state dict."""
from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from ..presets import as_size


class CheckpointError(ValueError):
    """A checkpoint that cannot be read, recognised or turned into one of our models."""


@dataclass
class Converted:
    source: str  # timm | mae | hf
    kind: str  # vit | mae
    state_dict: dict[str, torch.Tensor]  # our key layout
    facts: dict[str, Any]  # config fields the weights reveal (ViTConfig / MAEConfig names)
    num_patches: int  # patch positions in the position embedding, without the class slot


def unwrap_state_dict(state: Mapping) -> tuple[dict[str, torch.Tensor], str | None]:
    """The tensors of a checkpoint and the wrapper key they sat under ({'model': ...}, {'state_dict': ...})."""
    for wrapper in ("model", "state_dict"):
        inner = state.get(wrapper)
        if isinstance(inner, Mapping):
            return _tensors(inner), wrapper
    return _tensors(state), None


def _tensors(state: Mapping) -> dict[str, torch.Tensor]:
    """Only the tensors, without the prefixes DDP (`module.`) and torch.compile (`_orig_mod.`) add."""
    tensors = {}
    for key, value in state.items():
        if isinstance(value, torch.Tensor):
            while key.startswith(("module.", "_orig_mod.")):
                key = key.split(".", 1)[1]
            tensors[key] = value
    return tensors


def require(state: Mapping[str, torch.Tensor], key: str) -> torch.Tensor:
    if key not in state:
        raise CheckpointError(f"expected key {key!r} is missing; keys present: {few(list(state))}")
    return state[key]


def count_blocks(state: Mapping[str, Any], prefix: str) -> int:
    """Number of `prefix.N.` blocks; they must be numbered 0..N-1."""
    indices = {int(m.group(1)) for key in state if (m := re.match(rf"^{re.escape(prefix)}\.(\d+)\.", key))}
    if indices != set(range(len(indices))):
        raise CheckpointError(f"{prefix} are not numbered 0..{len(indices) - 1}: found {sorted(indices)}")
    return len(indices)


def mlp_ratio(dim: int, hidden: int, where: str) -> float:
    """The ratio our config stores; Mlp builds int(dim * ratio) hidden units, so it must round-trip."""
    ratio = hidden / dim
    if int(dim * ratio) != hidden:
        raise CheckpointError(f"{where}: MLP width {hidden} cannot be written as an mlp_ratio of width {dim}")
    return ratio


def parse_size(value: Any) -> tuple[int, int]:
    try:
        return as_size(value)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"image_size must be N or (height, width), got {value!r}") from exc


def few(keys: list[str], limit: int = 5) -> str:
    shown = ", ".join(str(k) for k in keys[:limit])
    return f"{shown} (+{len(keys) - limit} more)" if len(keys) > limit else shown or "(none)"


def is_square(n: int) -> bool:
    return n > 0 and math.isqrt(n) ** 2 == n
