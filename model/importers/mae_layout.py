"""The official MAE release's decoder (models_mae.py) -> our MAE decoder; its encoder is timm's layout."""
from __future__ import annotations

import torch

from .common import CheckpointError, count_blocks, require

# Every key of the MAE decoder starts with one of these; the rest of the file is the timm-layout encoder.
DECODER_PREFIXES = ("decoder_embed.", "mask_token", "decoder_pos_embed", "decoder_blocks.", "decoder_norm.", "decoder_pred.")


def convert_decoder(tensors: dict[str, torch.Tensor], encoder_mlp_ratio: float):
    """The decoder's weights in our layout, and the decoder width and depth they reveal."""
    state = dict(tensors)
    dim = int(require(state, "decoder_embed.weight").shape[0])
    depth = count_blocks(state, "decoder_blocks")
    if depth:
        hidden = state["decoder_blocks.0.mlp.fc1.weight"].shape[0]
        if int(dim * encoder_mlp_ratio) != hidden:
            raise CheckpointError(
                f"decoder MLP width {hidden} is not the encoder's mlp_ratio {encoder_mlp_ratio:g} x {dim}; "
                "our MAE uses one MLP ratio for encoder and decoder"
            )
    for index in range(depth):
        # Our decoder blocks always have qkv biases; a bias-free projection is a zero bias.
        state.setdefault(f"decoder_blocks.{index}.attn.qkv.bias", state["decoder_embed.weight"].new_zeros(3 * dim))
    return state, {"decoder_embed_dim": dim, "decoder_depth": depth}
