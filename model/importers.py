"""Foreign ViT / MAE weights -> our key layout and config: timm, the official MAE release, Hugging Face.

Every converter returns a `Converted`: the state dict in the key layout of
`model/vit.py` (or `model/mae.py`) plus the configuration the weights reveal
by their shapes (width, depth, patch size, ...). `resolve_config` settles the
rest (head counts, pooling, a non-square image shape) from what the caller or a
config.json told, then the preset, then the usual defaults.

timm and the official MAE share one layout (the MAE was written on timm), and
Hugging Face weights are renamed into that layout first, so one converter
(`convert_timm_layout`) does the real work for all three.
"""
from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from einops import rearrange

from .presets import MAEConfig, ViTConfig, as_size, mae_preset, vit_preset

FORMAT = "vitserve"  # our own checkpoints say {"format": FORMAT, "version": N, ...}
SOURCES = ("vitserve", "timm", "mae", "hf")

# Head counts of the standard sizes (64-wide heads), for weights that do not say.
STANDARD_HEADS = {192: 3, 384: 6, 768: 12, 1024: 16, 1280: 16}
DEFAULT_DECODER_HEADS = 16  # the MAE paper's decoder
# LayerNorm eps when nothing says: timm and the official MAE use 1e-6, Hugging Face 1e-12.
DEFAULT_EPS = {"timm": 1e-6, "mae": 1e-6, "hf": 1e-12}

VIT_FIELDS = frozenset(f.name for f in dataclasses.fields(ViTConfig))
MAE_FIELDS = frozenset(f.name for f in dataclasses.fields(MAEConfig)) - {"encoder"}
PRESET_CHECKED = ("embed_dim", "depth", "patch_size")  # what a preset and the weights must agree on


class CheckpointError(ValueError):
    """A checkpoint that cannot be read, recognised or turned into one of our models."""


@dataclass
class Converted:
    source: str  # timm | mae | hf
    kind: str  # vit | mae
    state_dict: dict[str, torch.Tensor]  # our key layout
    facts: dict[str, Any]  # config fields the weights reveal (ViTConfig / MAEConfig names)
    num_patches: int  # patch positions in the position embedding, without the class slot


# --- recognising a checkpoint -------------------------------------------------

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
    """Convert a foreign checkpoint; `image_size` (when told) settles how the position embedding is laid out."""
    tensors, _ = unwrap_state_dict(state)
    if not tensors:
        raise CheckpointError("the checkpoint holds no tensors")
    if source == "hf":
        return convert_timm_layout(rename_hf(tensors), "hf", image_size)
    if source in ("timm", "mae"):
        return convert_timm_layout(tensors, source, image_size)
    raise CheckpointError(f"no importer for source {source!r}; choose one of auto, {', '.join(SOURCES)}")


# --- timm / official MAE ---------------------------------------------------------

_DECODER_PREFIXES = ("decoder_embed.", "mask_token", "decoder_pos_embed", "decoder_blocks.", "decoder_norm.", "decoder_pred.")

# Key fragments of timm features our ViT does not have; named so the error says what is missing.
_UNSUPPORTED = {
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
    for fragment, problem in _UNSUPPORTED.items():
        hits = [key for key in tensors if fragment in key]
        if hits:
            raise CheckpointError(f"{problem} (found {few(hits)})")
    decoder = {k: v for k, v in tensors.items() if k.startswith(_DECODER_PREFIXES)}
    encoder = {k: v for k, v in tensors.items() if k not in decoder}
    state, facts, num_patches = _convert_encoder(encoder, image_size)
    if not decoder:
        return Converted(source, "vit", state, facts, num_patches)
    decoder_state, decoder_facts = _convert_decoder(decoder, facts["mlp_ratio"])
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
    return _is_square(positions - 1) or not _is_square(positions)


def _convert_decoder(tensors: dict[str, torch.Tensor], encoder_mlp_ratio: float):
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


# --- Hugging Face -------------------------------------------------------------------

# Per-layer names: hub files (attention.attention.query, intermediate.dense, ...) and the
# module names of transformers >= 5 (attention.q_proj, mlp.fc1, ...), both onto timm's.
_HF_LAYER_PARTS = {
    "layernorm_before": "norm1", "layernorm_after": "norm2",
    "attention.attention.query": "attn.q", "attention.q_proj": "attn.q",
    "attention.attention.key": "attn.k", "attention.k_proj": "attn.k",
    "attention.attention.value": "attn.v", "attention.v_proj": "attn.v",
    "attention.output.dense": "attn.proj", "attention.o_proj": "attn.proj",
    "intermediate.dense": "mlp.fc1", "mlp.fc1": "mlp.fc1",
    "output.dense": "mlp.fc2", "mlp.fc2": "mlp.fc2",
}
_HF_ENCODER_LAYER = re.compile(r"^(?:vit\.)?(?:encoder\.layer|layers)\.(\d+)\.(.+)\.(weight|bias)$")
# transformers 5 save_pretrained writes decoder layers as `decoder.decoder_encoder.layer.N`.
_HF_DECODER_LAYER = re.compile(r"^decoder\.(?:decoder_layers|decoder_encoder\.layer)\.(\d+)\.(.+)\.(weight|bias)$")
_HF_NAMES = {
    "embeddings.cls_token": "cls_token",
    "embeddings.position_embeddings": "pos_embed",
    "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
    "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
    "layernorm.weight": "norm.weight", "layernorm.bias": "norm.bias",
    "classifier.weight": "head.weight", "classifier.bias": "head.bias",
}
# Parts of HF models that never touch the outputs we reproduce: ViT's mask token (for
# masked image modelling) and ViTModel's tanh pooler (the classifier reads the CLS token).
_HF_UNUSED = ("embeddings.mask_token", "pooler.")


def rename_hf(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Hugging Face ViT / ViTMAE names -> the timm / official MAE layout, q, k and v fused into qkv."""
    state: dict[str, torch.Tensor] = {}
    for key, value in tensors.items():
        short = key.removeprefix("vit.")
        if short.startswith(_HF_UNUSED):
            continue
        state[_hf_name(key, short)] = value
    for prefix in {key.rsplit(".attn.", 1)[0] for key in state if ".attn." in key}:
        _fuse_qkv(state, prefix)
    return state


def _hf_name(key: str, short: str) -> str:
    for pattern, prefix in ((_HF_ENCODER_LAYER, "blocks"), (_HF_DECODER_LAYER, "decoder_blocks")):
        match = pattern.match(key)
        if match and match.group(2) in _HF_LAYER_PARTS:
            index, part, kind = match.groups()
            return f"{prefix}.{index}.{_HF_LAYER_PARTS[part]}.{kind}"
    if short in _HF_NAMES:
        return _HF_NAMES[short]
    if key.startswith("decoder.") and key[8:].startswith(_DECODER_PREFIXES):
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
    names = {
        "hidden_size": "embed_dim", "num_hidden_layers": "depth", "num_attention_heads": "num_heads",
        "qkv_bias": "qkv_bias", "layer_norm_eps": "norm_eps", "num_channels": "in_chans",
        "decoder_hidden_size": "decoder_embed_dim", "decoder_num_hidden_layers": "decoder_depth",
        "decoder_num_attention_heads": "decoder_num_heads", "mask_ratio": "mask_ratio", "norm_pix_loss": "norm_pix_loss",
    }
    settings = {ours: config[theirs] for theirs, ours in names.items() if config.get(theirs) is not None}
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


# --- the config of foreign weights ----------------------------------------------------------

def resolve_config(converted: Converted, preset: str | None, told: dict[str, Any]) -> ViTConfig | MAEConfig:
    """Weights' facts, then what the caller / config.json told, then the preset, then defaults."""
    facts = converted.facts
    base = preset_config(preset, converted.kind, facts) if preset is not None else None
    encoder_base = base.encoder if isinstance(base, MAEConfig) else base
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
    encoder = base.encoder if isinstance(base, MAEConfig) else base
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


# --- small helpers -------------------------------------------------------------------

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


def _is_square(n: int) -> bool:
    return n > 0 and math.isqrt(n) ** 2 == n
