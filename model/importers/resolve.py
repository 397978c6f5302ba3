"""The config of foreign weights: what the weights reveal, then what the caller or a config.json told,
then the preset, then the usual defaults (head counts, pooling, a non-square image shape, LayerNorm eps)."""
from __future__ import annotations

import dataclasses
import math
from typing import Any

from ..presets import MAEConfig, ViTConfig, encoder_config_of, mae_preset, vit_preset
from .common import CheckpointError, Converted, parse_size

# Head counts of the standard sizes (64-wide heads), for weights that do not say.
STANDARD_HEADS = {192: 3, 384: 6, 768: 12, 1024: 16, 1280: 16}
DEFAULT_DECODER_HEADS = 16  # the MAE paper's decoder
# LayerNorm eps when nothing says: timm and the official MAE use 1e-6, Hugging Face 1e-12.
DEFAULT_EPS = {"timm": 1e-6, "mae": 1e-6, "hf": 1e-12}

VIT_FIELDS = frozenset(f.name for f in dataclasses.fields(ViTConfig))
MAE_FIELDS = frozenset(f.name for f in dataclasses.fields(MAEConfig)) - {"encoder"}
PRESET_CHECKED = ("embed_dim", "depth", "patch_size")  # what a preset and the weights must agree on


def resolve_config(converted: Converted, preset: str | None, told: dict[str, Any]) -> ViTConfig | MAEConfig:
    """Weights' facts, then what the caller / config.json told, then the preset, then defaults."""
    facts = converted.facts
    base = preset_config(preset, converted.kind, facts) if preset is not None else None
    encoder_base = encoder_config_of(base) if base is not None else None
    derived = {k: v for k, v in facts.items() if k in VIT_FIELDS}
    derived.update(
        image_size=_image_size(told.get("image_size"), encoder_base, facts["patch_size"], converted.num_patches),
        num_heads=told.get("num_heads") or _num_heads(facts["embed_dim"], encoder_base),
        pooling=_pooling(facts, encoder_base),
        norm_eps=DEFAULT_EPS[converted.source],
    )
    encoder = ViTConfig(**{**derived, **{k: v for k, v in told.items() if k in VIT_FIELDS}})
    if converted.kind == "vit":
        return encoder
    # A decoder's settings come from a preset only when it names an MAE.
    mae_base = base if isinstance(base, MAEConfig) and preset.startswith("mae-") else None
    derived = {"decoder_embed_dim": facts["decoder_embed_dim"], "decoder_depth": facts["decoder_depth"]}
    if mae_base is not None:
        derived.update(decoder_num_heads=mae_base.decoder_num_heads, mask_ratio=mae_base.mask_ratio, norm_pix_loss=mae_base.norm_pix_loss)
    elif "decoder_num_heads" not in told:
        derived["decoder_num_heads"] = _decoder_heads(facts["decoder_embed_dim"])
    return MAEConfig(encoder=encoder, **{**derived, **{k: v for k, v in told.items() if k in MAE_FIELDS}})


def preset_config(preset: str, kind: str, facts: dict[str, Any]) -> ViTConfig | MAEConfig:
    """The preset's config, after checking that the weights do not contradict it."""
    base = mae_preset(preset) if kind == "mae" else vit_preset(preset)
    encoder = encoder_config_of(base)
    expected = {name: getattr(encoder, name) for name in PRESET_CHECKED}
    if isinstance(base, MAEConfig) and preset.startswith("mae-"):
        expected.update(decoder_embed_dim=base.decoder_embed_dim, decoder_depth=base.decoder_depth)
    for name, value in expected.items():
        if name in facts and facts[name] != value:
            raise CheckpointError(f"preset {preset!r} has {name} {value}, but the weights have {name} {facts[name]}")
    return base


def check_agrees(told: dict[str, Any], facts: dict[str, Any], origin: str) -> None:
    """What an override or config.json says must match what the weights show."""
    for name in told.keys() & facts.keys():
        want, have = told[name], facts[name]
        if name == "mlp_ratio":  # compare what gets built: int(width * ratio) hidden units
            same = int(facts["embed_dim"] * float(want)) == int(facts["embed_dim"] * have)
        else:
            same = want == have
        if not same:
            raise CheckpointError(f"{origin} {name}={want!r} contradicts the weights, which have {name}={have!r}")


def _image_size(told: Any, base: ViTConfig | None, patch: int, num_patches: int) -> tuple[int, int]:
    """The told size (checked), else the preset's when its grid fits, else a square grid."""
    if told is not None:
        height, width = parse_size(told)
        if height % patch or width % patch or (height // patch) * (width // patch) != num_patches:
            raise CheckpointError(
                f"image_size {height}x{width} does not fit {num_patches} position embeddings of {patch}px patches"
            )
        return (height, width)
    if base is not None and (base.image_size[0] // patch) * (base.image_size[1] // patch) == num_patches:
        return base.image_size
    side = math.isqrt(num_patches)
    if side * side != num_patches:
        raise CheckpointError(
            f"cannot tell the image size from {num_patches} position embeddings (not a square grid); pass image_size=(height, width)"
        )
    return (side * patch, side * patch)


def _num_heads(dim: int, base: ViTConfig | None) -> int:
    if base is not None:
        return base.num_heads
    if dim in STANDARD_HEADS:
        return STANDARD_HEADS[dim]
    raise CheckpointError(f"the weights do not say the head count and width {dim} has no standard one; pass num_heads=...")


def _decoder_heads(dim: int) -> int:
    if dim % DEFAULT_DECODER_HEADS == 0:
        return DEFAULT_DECODER_HEADS
    raise CheckpointError(
        f"decoder width {dim} does not split into the default {DEFAULT_DECODER_HEADS} heads; pass decoder_num_heads=..."
    )


def _pooling(facts: dict[str, Any], base: ViTConfig | None) -> str:
    # timm's average pooling keeps its final norm in fc_norm; without a class token it is the only choice.
    if facts["fc_norm"] or not facts["class_token"]:
        return "gap"
    return base.pooling if base is not None else "cls"
