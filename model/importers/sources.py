"""Which format a loaded checkpoint is in, and the converter for each foreign one."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .common import CheckpointError, Converted, few, unwrap_state_dict
from .huggingface import rename_hf
from .timm_layout import convert_timm_layout

FORMAT = "vitserve"  # our own checkpoints say {"format": FORMAT, "version": N, ...}
SOURCES = ("vitserve", "timm", "mae", "hf")


def detect_source(state: Any) -> str:
    """Which format a loaded checkpoint is in: vitserve | timm | mae | hf."""
    if not isinstance(state, Mapping):
        raise CheckpointError(f"expected a dict of weights, found a {type(state).__name__}")
    if state.get("format") == FORMAT:
        return "vitserve"
    tensors, wrapper = unwrap_state_dict(state)
    if any(key.startswith(("vit.embeddings.", "embeddings.patch_embeddings.")) for key in tensors):
        return "hf"
    if "patch_embed.proj.weight" in tensors and "blocks.0.attn.qkv.weight" in tensors:
        if "decoder_embed.weight" in tensors:
            return "mae"
        # The official MAE encoder-only release: timm layout under `model`, no head.
        if wrapper == "model" and not any(key.startswith(("head.", "fc_norm.")) for key in tensors):
            return "mae"
        return "timm"
    raise CheckpointError(
        "not a checkpoint format we know (vitserve, timm VisionTransformer, official MAE, "
        f"Hugging Face ViT / ViTMAE); its first keys: {few(list(tensors) or list(state))}"
    )


def convert(state: Mapping, source: str, image_size: tuple[int, int] | None = None) -> Converted:
    """Convert a foreign checkpoint; `image_size` (when told) settles how the position embedding is laid out.

    timm and the official MAE share one layout (the MAE was written on timm), and Hugging Face
    weights are renamed into that layout first, so one converter does the real work for all three.
    """
    tensors, _ = unwrap_state_dict(state)
    if not tensors:
        raise CheckpointError("the checkpoint holds no tensors")
    if source == "hf":
        return convert_timm_layout(rename_hf(tensors), "hf", image_size)
    if source in ("timm", "mae"):
        return convert_timm_layout(tensors, source, image_size)
    raise CheckpointError(f"no importer for source {source!r}; choose one of auto, {', '.join(SOURCES)}")
