"""timm `VisionTransformer` weights (and the official MAE's, written on timm) -> our ViT, or with a decoder our MAE."""
from __future__ import annotations

import torch
from einops import rearrange

from .common import (
    CheckpointError,
    Converted,
    count_blocks,
    few,
    is_square,
    mlp_ratio,
    require,
)
from .mae_layout import DECODER_PREFIXES, convert_decoder

# Key fragments of timm features our ViT does not have; named so the error says what is missing.
UNSUPPORTED = {
    "attn_pool.": "timm attention pooling (global_pool='map') is not supported: its layout differs from our 'map' "
                  "pooling; import a checkpoint with 'token' or 'avg' pooling",
    "reg_token": "register tokens are not supported",
    ".ls1.": "layer scale (LayerScale gammas) is not supported",
    ".q_norm.": "query/key normalisation (qk_norm) is not supported",
    "norm_pre.": "a pre-norm after the patch embedding (norm_pre) is not supported",
    "patch_embed.norm.": "a norm inside the patch embedding is not supported",
}


def convert_timm_layout(tensors: dict[str, torch.Tensor], source: str, image_size: tuple[int, int] | None) -> Converted:
    """timm `VisionTransformer` or official MAE weights -> our ViT (or, with a decoder, our MAE)."""
    for fragment, problem in UNSUPPORTED.items():
        hits = [key for key in tensors if fragment in key]
        if hits:
            raise CheckpointError(f"{problem} (found {few(hits)})")
    decoder = {k: v for k, v in tensors.items() if k.startswith(DECODER_PREFIXES)}
    encoder = {k: v for k, v in tensors.items() if k not in decoder}
    state, facts, num_patches = _convert_encoder(encoder, image_size)
    if not decoder:
        return Converted(source, "vit", state, facts, num_patches)
    decoder_state, decoder_facts = convert_decoder(decoder, facts["mlp_ratio"])
    state = {**{f"encoder.{k}": v for k, v in state.items()}, **decoder_state}
    return Converted(source, "mae", state, {**facts, **decoder_facts}, num_patches)


def _convert_encoder(tensors: dict[str, torch.Tensor], image_size: tuple[int, int] | None):
    state = dict(tensors)
    weight = require(state, "patch_embed.proj.weight")
    if weight.ndim != 4 or weight.shape[2] != weight.shape[3]:
        raise CheckpointError(f"patch_embed.proj.weight should be a square conv kernel (D, C, p, p), got {tuple(weight.shape)}")
    dim, in_chans, patch = (int(n) for n in weight.shape[:3])
    # The conv kernel is (D, C, row, col); our Linear reads a patch's pixels in (row, col, channel) order.
    state["patch_embed.proj.weight"] = rearrange(weight, "d c p q -> d (p q c)")
    state.setdefault("patch_embed.proj.bias", weight.new_zeros(dim))  # a bias-free projection is a zero bias

    class_token = "cls_token" in state
    pos = require(state, "pos_embed")
    has_slot = class_token and _pos_has_class_slot(pos.shape[1], patch, image_size)
    num_patches = pos.shape[1] - int(has_slot)
    if class_token and not has_slot:
        # timm's no_embed_class: the class token gets no position; a zero slot adds the same nothing.
        state["pos_embed"] = torch.cat([pos.new_zeros(1, 1, pos.shape[2]), pos], dim=1)

    hidden = require(state, "blocks.0.mlp.fc1.weight").shape[0]
    facts = dict(
        embed_dim=dim, depth=count_blocks(state, "blocks"), patch_size=patch, in_chans=in_chans,
        mlp_ratio=mlp_ratio(dim, hidden, "blocks.0.mlp.fc1"), qkv_bias="blocks.0.attn.qkv.bias" in state,
        class_token=class_token, fc_norm="fc_norm.weight" in state,
        num_classes=int(state["head.weight"].shape[0]) if "head.weight" in state else 0,
    )
    return state, facts, num_patches


def _pos_has_class_slot(positions: int, patch: int, image_size: tuple[int, int] | None) -> bool:
    """Whether a class token's position embedding has its own slot (timm's default) or not (no_embed_class)."""
    if image_size is not None:
        patches = (image_size[0] // patch) * (image_size[1] // patch)
        if positions not in (patches, patches + 1):
            raise CheckpointError(
                f"image_size {image_size[0]}x{image_size[1]} gives {patches} patches of {patch}px, "
                f"but pos_embed holds {positions} positions"
            )
        return positions == patches + 1
    # A square grid with a slot has side**2 + 1 positions; both readings square only for 1 position.
    return is_square(positions - 1) or not is_square(positions)
