"""Vision Transformer: patchify, embed, pre-norm blocks, pool, classify.

Reads as the paper does: `forward_features` turns images into tokens,
`pool` turns tokens into one vector, `forward_head` turns that into logits.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from einops.layers.torch import Rearrange
from torch import nn

from .presets import ConfigError, ViTConfig, as_size


class InputShapeError(ValueError):
    """Images whose shape the model was not built for."""


class Attention(nn.Module):
    """Multi-head self-attention with one fused qkv projection."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B, N, D) -> q, k, v, each (B, heads, N, D / heads)."""
        return tuple(rearrange(self.qkv(x), "b n (three h d) -> three b h n d", three=3, h=self.num_heads))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, N, D) -> (B, N, D)
        out = F.scaled_dot_product_attention(*self.heads(x))
        return self.proj(rearrange(out, "b h n d -> b n (h d)"))

    def weights(self, x: torch.Tensor) -> torch.Tensor:
        """The attention probabilities `forward` applies, softmax(q k^T / sqrt(d)). (B, N, D) -> (B, heads, N, N)"""
        q, k, _ = self.heads(x)
        return torch.softmax(q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5, dim=-1)


class Mlp(nn.Sequential):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)


class DropPath(nn.Module):
    """Stochastic depth (Huang et al.): in training, drop a residual branch for a random share `rate` of the
    samples and scale the rest up; the identity in evaluation. A training setting, not part of the config."""

    def __init__(self, rate: float = 0.0) -> None:
        super().__init__()
        self.rate = rate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.rate == 0.0:
            return x
        keep = 1.0 - self.rate
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x)) (each branch under stochastic depth)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True, eps: float = 1e-6) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, num_heads, qkv_bias)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path = DropPath()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))

    def forward_with_attention(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`forward`, and the attention probabilities of its heads: (B, T, D) -> (B, T, D), (B, heads, T, T)."""
        return self(x), self.attn.weights(self.norm1(x))


class LinearPatchEmbed(nn.Module):
    """Cut the image into patches (einops) and project each with one Linear layer."""

    def __init__(self, patch_size: int, in_chans: int, dim: int) -> None:
        super().__init__()
        self.to_patches = Rearrange("b c (h p) (w q) -> b (h w) (p q c)", p=patch_size, q=patch_size)
        self.proj = nn.Linear(patch_size * patch_size * in_chans, dim)

    def forward(self, images: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, N, D)
        return self.proj(self.to_patches(images))


class ConvStemPatchEmbed(nn.Module):
    """Stride-2 3x3 convolutions down to the patch grid, then a 1x1 projection
    (Xiao et al., "Early convolutions help transformers see better")."""

    def __init__(self, patch_size: int, in_chans: int, dim: int) -> None:
        super().__init__()
        num_convs = int(math.log2(patch_size))
        widths = [max(8, dim // 2 ** (num_convs - i)) for i in range(1, num_convs + 1)]
        layers: list[nn.Module] = []
        channels = in_chans
        for width in widths:
            layers += [nn.Conv2d(channels, width, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
            channels = width
        layers += [nn.Conv2d(channels, dim, 1), Rearrange("b d h w -> b (h w) d")]
        self.stem = nn.Sequential(*layers)

    def forward(self, images: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, N, D)
        return self.stem(images)


class AttentionPool(nn.Module):
    """`map` pooling: one learned query cross-attends over all output tokens (no mask), then a residual MLP."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, eps: float = 1e-6) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.query = nn.Parameter(torch.zeros(1, 1, dim))
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, dim * 2)
        self.proj = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        nn.init.trunc_normal_(self.query, std=0.02)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:  # (B, N, D) -> (B, D)
        query = repeat(self.query, "1 1 d -> b 1 d", b=tokens.shape[0])
        q = rearrange(self.q(query), "b n (h d) -> b h n d", h=self.num_heads)
        k, v = rearrange(self.kv(tokens), "b n (two h d) -> two b h n d", two=2, h=self.num_heads)
        pooled = self.proj(rearrange(F.scaled_dot_product_attention(q, k, v), "b h n d -> b n (h d)"))
        pooled = pooled + self.mlp(self.norm(pooled))
        return pooled[:, 0]


def resize_pos_embed(pos_embed: torch.Tensor, old_grid: tuple[int, int], new_grid: tuple[int, int], num_prefix: int) -> torch.Tensor:
    """Bicubically resample the grid part of a (1, prefix + H*W, D) position embedding to another grid."""
    if tuple(old_grid) == tuple(new_grid):
        return pos_embed
    prefix, grid = pos_embed[:, :num_prefix], pos_embed[:, num_prefix:]
    grid = rearrange(grid, "1 (h w) d -> 1 d h w", h=old_grid[0], w=old_grid[1])
    shrinking = new_grid[0] < old_grid[0] or new_grid[1] < old_grid[1]
    grid = F.interpolate(grid.float(), size=new_grid, mode="bicubic", align_corners=False, antialias=shrinking)
    grid = rearrange(grid, "1 d h w -> 1 (h w) d").to(pos_embed.dtype)
    return torch.cat([prefix, grid], dim=1)


class VisionTransformer(nn.Module):
    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        self.config = config
        dim = config.embed_dim
        stem = LinearPatchEmbed if config.stem == "linear" else ConvStemPatchEmbed
        self.patch_embed = stem(config.patch_size, config.in_chans, dim)
        self.num_prefix_tokens = 1 if config.class_token else 0
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim)) if config.class_token else None
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_prefix_tokens + config.num_patches, dim))
        self.blocks = nn.Sequential(
            *[Block(dim, config.num_heads, config.mlp_ratio, config.qkv_bias, config.norm_eps) for _ in range(config.depth)]
        )
        self.norm = nn.Identity() if config.fc_norm else nn.LayerNorm(dim, eps=config.norm_eps)
        self.attn_pool = AttentionPool(dim, config.num_heads, config.mlp_ratio, config.norm_eps) if config.pooling == "map" else None
        self.fc_norm = nn.LayerNorm(dim, eps=config.norm_eps) if config.fc_norm else nn.Identity()
        self.head = nn.Linear(dim, config.num_classes) if config.num_classes > 0 else nn.Identity()
        self._init_weights()

    def _init_weights(self) -> None:
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        if self.cls_token is not None:
            nn.init.normal_(self.cls_token, std=0.02)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    @property
    def embed_dim(self) -> int:
        return self.config.embed_dim

    def check_images(self, images: torch.Tensor) -> None:
        """Fail with a message that names the problem instead of a shape error deep inside."""
        expected = (self.config.in_chans, *self.config.image_size)
        if images.ndim != 4 or tuple(images.shape[1:]) != expected:
            raise InputShapeError(
                f"expected images of shape (B, {expected[0]}, {expected[1]}, {expected[2]}), got {tuple(images.shape)}; "
                "resize the images, or call set_image_size() to adapt the position embeddings"
            )

    def patch_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """Patch embeddings plus their position embeddings, no prefix token. (B, C, H, W) -> (B, N, D)"""
        self.check_images(images)
        return self.patch_embed(images) + self.pos_embed[:, self.num_prefix_tokens:]

    def prepend_cls(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, N, D) -> (B, 1 + N, D); the class token carries its own position embedding."""
        if self.cls_token is None:
            return tokens
        cls = repeat(self.cls_token + self.pos_embed[:, :1], "1 1 d -> b 1 d", b=tokens.shape[0])
        return torch.cat([cls, tokens], dim=1)

    def encode(self, tokens: torch.Tensor) -> torch.Tensor:
        """Transformer blocks and the final norm. (B, T, D) -> (B, T, D)"""
        return self.norm(self.blocks(tokens))

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, prefix + N, D) output tokens."""
        return self.encode(self.prepend_cls(self.patch_tokens(images)))

    def forward_features_with_attention(self, images: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """`forward_features`, and each block's attention probabilities: (B, T, D), [(B, heads, T, T)] * depth."""
        tokens, weights = self.prepend_cls(self.patch_tokens(images)), []
        for block in self.blocks:
            tokens, block_weights = block.forward_with_attention(tokens)
            weights.append(block_weights)
        return self.norm(tokens), weights

    def pool(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, prefix + N, D) -> (B, D) by the configured pooling."""
        if self.config.pooling == "cls":
            pooled = tokens[:, 0]
        elif self.config.pooling == "gap":
            pooled = tokens[:, self.num_prefix_tokens:].mean(dim=1)
        else:
            pooled = self.attn_pool(tokens)
        return self.fc_norm(pooled)

    def forward_head(self, pooled: torch.Tensor) -> torch.Tensor:
        """(B, D) -> (B, num_classes), or the pooled features when there is no head."""
        return self.head(pooled)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.pool(self.forward_features(images)))

    @torch.no_grad()
    def set_image_size(self, image_size: int | tuple[int, int]) -> None:
        """Adapt to another input size by resampling the position embeddings (bicubic)."""
        new_config = self.config.replace(image_size=as_size(image_size))
        resized = resize_pos_embed(self.pos_embed.data, self.config.grid_size, new_config.grid_size, self.num_prefix_tokens)
        self.pos_embed = nn.Parameter(resized, requires_grad=self.pos_embed.requires_grad)
        self.config = new_config

    def set_drop_path(self, rate: float) -> None:
        """Stochastic depth rising linearly from 0 at the first block to `rate` at the last."""
        depth = len(self.blocks)
        for index, block in enumerate(self.blocks):
            block.drop_path.rate = rate * index / max(1, depth - 1)

    def reset_head(self, num_classes: int) -> None:
        """Replace the classification head (e.g. when fine-tuning on other labels)."""
        self.config = self.config.replace(num_classes=num_classes)
        self.head = nn.Linear(self.embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        if num_classes > 0:
            nn.init.trunc_normal_(self.head.weight, std=0.02)
            nn.init.zeros_(self.head.bias)


def build_vit(config: ViTConfig) -> VisionTransformer:
    if not isinstance(config, ViTConfig):
        raise ConfigError(f"expected a ViTConfig, got {type(config).__name__}")
    return VisionTransformer(config)
