"""Named model sizes as frozen dataclasses: a preset is a few lines of data."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

POOLINGS = ("cls", "gap", "map")
STEMS = ("linear", "conv")


class ConfigError(ValueError):
    """A model configuration that cannot build a working model."""


def as_size(value: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    """Normalise an image size given as N or (H, W) to (H, W)."""
    if isinstance(value, int):
        return (value, value)
    height, width = (int(v) for v in value)
    return (height, width)


@dataclass(frozen=True)
class ViTConfig:
    image_size: tuple[int, int] = (224, 224)
    patch_size: int = 16
    in_chans: int = 3
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    norm_eps: float = 1e-6
    pooling: str = "cls"  # cls | gap | map
    stem: str = "linear"  # linear (patchify + Linear) | conv (stride-2 3x3 convs)
    class_token: bool = True
    # Apply the final LayerNorm to the pooled vector instead of the tokens
    # (timm's `fc_norm`, used by average pooling and MAE fine-tuning).
    fc_norm: bool = False
    num_classes: int = 0  # 0: no head, the model returns pooled features

    def __post_init__(self) -> None:
        object.__setattr__(self, "image_size", as_size(self.image_size))
        self.validate()

    @property
    def grid_size(self) -> tuple[int, int]:
        return (self.image_size[0] // self.patch_size, self.image_size[1] // self.patch_size)

    @property
    def num_patches(self) -> int:
        return self.grid_size[0] * self.grid_size[1]

    def validate(self) -> None:
        height, width = self.image_size
        if self.patch_size <= 0 or height <= 0 or width <= 0:
            raise ConfigError(f"patch size and image size must be positive, got patch {self.patch_size}, image {self.image_size}")
        if height % self.patch_size or width % self.patch_size:
            raise ConfigError(
                f"patch size {self.patch_size} does not divide image size {height}x{width}; "
                "pick an image size that is a multiple of the patch size"
            )
        if self.embed_dim % self.num_heads:
            raise ConfigError(f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")
        if self.pooling not in POOLINGS:
            raise ConfigError(f"unknown pooling {self.pooling!r}; choose one of {', '.join(POOLINGS)}")
        if self.stem not in STEMS:
            raise ConfigError(f"unknown stem {self.stem!r}; choose one of {', '.join(STEMS)}")
        if self.stem == "conv" and (self.patch_size < 2 or self.patch_size & (self.patch_size - 1)):
            raise ConfigError(f"the conv stem halves the resolution per layer: patch size must be a power of two, got {self.patch_size}")
        if self.pooling == "cls" and not self.class_token:
            raise ConfigError("pooling 'cls' needs a class token")

    def replace(self, **changes: Any) -> "ViTConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["image_size"] = list(self.image_size)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ViTConfig":
        return cls(**_known_fields(cls, data))


@dataclass(frozen=True)
class MAEConfig:
    encoder: ViTConfig = ViTConfig()
    decoder_embed_dim: int = 512
    decoder_depth: int = 8
    decoder_num_heads: int = 16
    mask_ratio: float = 0.75
    norm_pix_loss: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.encoder, dict):
            object.__setattr__(self, "encoder", ViTConfig.from_dict(self.encoder))
        if self.decoder_embed_dim % self.decoder_num_heads:
            raise ConfigError(
                f"decoder_embed_dim {self.decoder_embed_dim} is not divisible by decoder_num_heads {self.decoder_num_heads}"
            )
        if not 0.0 <= self.mask_ratio < 1.0:
            raise ConfigError(f"mask_ratio must be in [0, 1), got {self.mask_ratio}")
        if self.encoder.stem != "linear":
            raise ConfigError("the MAE encoder needs the linear stem: a convolutional stem overlaps patches and would see the masked pixels")
        if not self.encoder.class_token:
            raise ConfigError("the MAE encoder needs a class token")
        if self.encoder.fc_norm or self.encoder.pooling == "map":
            # fc_norm would drop the encoder's final norm; an unused attention pool breaks DDP
            raise ConfigError("the MAE encoder must use pooling 'cls' or 'gap' without fc_norm; set those on the fine-tuned classifier")

    def replace(self, **changes: Any) -> "MAEConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["encoder"] = self.encoder.to_dict()
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "MAEConfig":
        return cls(**_known_fields(cls, data))


def encoder_config_of(config: ViTConfig | MAEConfig) -> ViTConfig:
    """The ViT inside a config: an MAE's encoder, or the ViT config itself."""
    return config.encoder if isinstance(config, MAEConfig) else config


def _known_fields(cls: type, data: dict[str, Any]) -> dict[str, Any]:
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - names
    if unknown:
        raise ConfigError(f"unknown {cls.__name__} fields: {', '.join(sorted(unknown))}")
    return dict(data)


def _vit(dim: int, depth: int, heads: int, patch: int = 16, image: int = 224, **extra: Any) -> ViTConfig:
    return ViTConfig(image_size=image, patch_size=patch, embed_dim=dim, depth=depth, num_heads=heads, **extra)


# Encoder sizes from the ViT paper (and ViT-Ti from DeiT); MLP ratio 4, LayerNorm eps 1e-6.
VIT_PRESETS: dict[str, ViTConfig] = {
    "vit-tiny": _vit(192, 12, 3),
    "vit-small": _vit(384, 12, 6),
    "vit-base": _vit(768, 12, 12),
    "vit-large": _vit(1024, 24, 16),
    "vit-huge": _vit(1280, 32, 16, patch=14),
    # Small sizes for the demo (32x32 synthetic images) and for fast tests. The demo classifier is a
    # convolutional stem down to 8x8 patches: on 2 CPU cores it passes 99% in ~15 s, where a linear
    # 4x4-patch ViT needed minutes to learn where a bar is (bar_top vs bar_bottom).
    "vit-demo": _vit(64, 4, 2, patch=8, image=32, stem="conv"),
    "vit-test": _vit(32, 2, 2, patch=4, image=16),
}

# The MAE paper's decoder (512-d, 8 blocks, 16 heads) for every encoder size.
MAE_DECODER_DEFAULTS = dict(decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16)

MAE_PRESETS: dict[str, MAEConfig] = {
    **{f"mae-{name[4:]}": MAEConfig(encoder=VIT_PRESETS[name], **MAE_DECODER_DEFAULTS)
       for name in ("vit-tiny", "vit-small", "vit-base", "vit-large", "vit-huge")},
    # The demo MAE keeps 4x4 patches and the linear stem (a conv stem would see the masked pixels); its
    # encoder sees only the 16 kept patches, so two blocks do, and the cost is in the decoder's 64 tokens.
    "mae-demo": MAEConfig(encoder=_vit(64, 2, 2, patch=4, image=32), decoder_embed_dim=64, decoder_depth=2, decoder_num_heads=2),
    # The MAE vit-train pre-trains on an image folder: the demo's width, four encoder blocks (what fine-tuning keeps is
    # the encoder) and average pooling (the MAE paper's fine-tuning pools the patch tokens, not the class token).
    "mae-compact": MAEConfig(encoder=_vit(64, 4, 2, patch=4, image=32, pooling="gap"), decoder_embed_dim=64, decoder_depth=2,
                             decoder_num_heads=2),
    "mae-test": MAEConfig(encoder=VIT_PRESETS["vit-test"], decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2),
}


def vit_preset(name: str, **overrides: Any) -> ViTConfig:
    """The ViT config of a named preset (`vit-base`, `mae-base` or `base`), with overrides."""
    size = name.split("-", 1)[1] if name.startswith(("vit-", "mae-")) else name
    key = f"vit-{size}"
    if key not in VIT_PRESETS:
        raise ConfigError(f"unknown preset {name!r}; known: {', '.join(VIT_PRESETS)}")
    return VIT_PRESETS[key].replace(**overrides) if overrides else VIT_PRESETS[key]


def mae_preset(name: str, **overrides: Any) -> MAEConfig:
    """The MAE config of a named preset (`mae-base`, `vit-base` or `base`); encoder overrides go to the encoder."""
    size = name.split("-", 1)[1] if name.startswith(("mae-", "vit-")) else name
    key = f"mae-{size}"
    if key not in MAE_PRESETS:
        raise ConfigError(f"unknown preset {name!r}; known: {', '.join(MAE_PRESETS)}")
    config = MAE_PRESETS[key]
    encoder_fields = {f.name for f in dataclasses.fields(ViTConfig)}
    encoder_changes = {k: v for k, v in overrides.items() if k in encoder_fields}
    own_changes = {k: v for k, v in overrides.items() if k not in encoder_fields}
    if encoder_changes:
        config = config.replace(encoder=config.encoder.replace(**encoder_changes))
    return config.replace(**own_changes) if own_changes else config
