"""Hugging Face ViT / ViTMAE weights and config.json -> the timm / official MAE layout and our config's names."""
from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch

from .common import CheckpointError
from .mae_layout import DECODER_PREFIXES

# Per-layer names: hub files (attention.attention.query, intermediate.dense, ...) and the
# module names of transformers >= 5 (attention.q_proj, mlp.fc1, ...), both onto timm's.
_LAYER_PARTS = {
    "layernorm_before": "norm1", "layernorm_after": "norm2",
    "attention.attention.query": "attn.q", "attention.q_proj": "attn.q",
    "attention.attention.key": "attn.k", "attention.k_proj": "attn.k",
    "attention.attention.value": "attn.v", "attention.v_proj": "attn.v",
    "attention.output.dense": "attn.proj", "attention.o_proj": "attn.proj",
    "intermediate.dense": "mlp.fc1", "mlp.fc1": "mlp.fc1",
    "output.dense": "mlp.fc2", "mlp.fc2": "mlp.fc2",
}
_ENCODER_LAYER = re.compile(r"^(?:vit\.)?(?:encoder\.layer|layers)\.(\d+)\.(.+)\.(weight|bias)$")
# transformers 5 save_pretrained writes decoder layers as `decoder.decoder_encoder.layer.N`.
_DECODER_LAYER = re.compile(r"^decoder\.(?:decoder_layers|decoder_encoder\.layer)\.(\d+)\.(.+)\.(weight|bias)$")
_NAMES = {
    "embeddings.cls_token": "cls_token",
    "embeddings.position_embeddings": "pos_embed",
    "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
    "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
    "layernorm.weight": "norm.weight", "layernorm.bias": "norm.bias",
    "classifier.weight": "head.weight", "classifier.bias": "head.bias",
}
# Parts of HF models that never touch the outputs we reproduce: ViT's mask token (for
# masked image modelling) and ViTModel's tanh pooler (the classifier reads the CLS token).
_UNUSED = ("embeddings.mask_token", "pooler.")

# config.json names -> our config's names.
_CONFIG_NAMES = {
    "hidden_size": "embed_dim", "num_hidden_layers": "depth", "num_attention_heads": "num_heads",
    "qkv_bias": "qkv_bias", "layer_norm_eps": "norm_eps", "num_channels": "in_chans",
    "decoder_hidden_size": "decoder_embed_dim", "decoder_num_hidden_layers": "decoder_depth",
    "decoder_num_attention_heads": "decoder_num_heads", "mask_ratio": "mask_ratio", "norm_pix_loss": "norm_pix_loss",
}


def rename_hf(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Hugging Face ViT / ViTMAE names -> the timm / official MAE layout, q, k and v fused into qkv."""
    state: dict[str, torch.Tensor] = {}
    for key, value in tensors.items():
        short = key.removeprefix("vit.")
        if short.startswith(_UNUSED):
            continue
        state[_timm_name(key, short)] = value
    for prefix in {key.rsplit(".attn.", 1)[0] for key in state if ".attn." in key}:
        _fuse_qkv(state, prefix)
    return state


def _timm_name(key: str, short: str) -> str:
    for pattern, prefix in ((_ENCODER_LAYER, "blocks"), (_DECODER_LAYER, "decoder_blocks")):
        match = pattern.match(key)
        if match and match.group(2) in _LAYER_PARTS:
            index, part, kind = match.groups()
            return f"{prefix}.{index}.{_LAYER_PARTS[part]}.{kind}"
    if short in _NAMES:
        return _NAMES[short]
    if key.startswith("decoder.") and key[8:].startswith(DECODER_PREFIXES):
        return key[8:]  # decoder.decoder_embed.weight -> decoder_embed.weight, ...
    return key  # unknown: reported as a leftover key when the weights are loaded


def _fuse_qkv(state: dict[str, torch.Tensor], prefix: str) -> None:
    """Our attention has one (3D, D) projection, rows in q, k, v order (heads inside each)."""
    for name in ("weight", "bias"):
        parts = [state.pop(f"{prefix}.attn.{p}.{name}", None) for p in "qkv"]
        if all(part is None for part in parts):
            continue
        if any(part is None for part in parts):
            raise CheckpointError(f"{prefix}: query, key and value {name}s are not all present")
        state[f"{prefix}.attn.qkv.{name}"] = torch.cat(parts, dim=0)


def hf_config_settings(config: Mapping[str, Any]) -> tuple[dict[str, Any], list[str] | None]:
    """What a Hugging Face config.json says, in our config's names; plus its labels (id2label)."""
    act = config.get("hidden_act", "gelu")
    if act != "gelu":
        raise CheckpointError(f"config.json hidden_act is {act!r}; our blocks use the exact GELU ('gelu') only")
    settings = {ours: config[theirs] for theirs, ours in _CONFIG_NAMES.items() if config.get(theirs) is not None}
    if "image_size" in config:
        settings["image_size"] = config["image_size"]
    if "patch_size" in config:
        patch = config["patch_size"]
        if isinstance(patch, (list, tuple)):
            if len(set(patch)) != 1:
                raise CheckpointError(f"config.json patch_size {patch} is not square; our patches are square")
            patch = patch[0]
        settings["patch_size"] = int(patch)
    id2label = config.get("id2label")
    labels = [str(id2label[k]) for k in sorted(id2label, key=int)] if isinstance(id2label, Mapping) and id2label else None
    return settings, labels
