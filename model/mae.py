"""Masked Autoencoder (He et al., 2021), one method per step of the algorithm.

images -> patchify -> embed + position -> random_masking (keep 25%) -> encoder on
visible patches (+ CLS) -> decoder_embed -> append mask tokens, unshuffle ->
+ decoder position -> light decoder -> predicted pixels per patch -> MSE on masked patches.
"""
from __future__ import annotations

import numpy as np
import torch
from einops import rearrange, repeat
from torch import nn

from .presets import MAEConfig
from .vit import Block, InputShapeError, VisionTransformer


def sincos_pos_embed_2d(dim: int, grid: tuple[int, int], cls_token: bool = True) -> torch.Tensor:
    """Fixed 2D sin-cos position embeddings, (1, [1 +] H*W, dim).

    The first half of the channels encodes the column, the second half the row,
    each as [sin | cos] at geometric frequencies; the class token gets zeros.
    """
    if dim % 4:
        raise ValueError(f"sin-cos position embeddings need a width divisible by 4, got {dim}")
    rows, cols = np.meshgrid(np.arange(grid[0], dtype=np.float64), np.arange(grid[1], dtype=np.float64), indexing="ij")
    omega = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float64) / (dim / 4))

    def encode(positions: np.ndarray) -> np.ndarray:  # (H*W,) -> (H*W, dim/2)
        angles = np.outer(positions.reshape(-1), omega)
        return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)

    table = np.concatenate([encode(cols), encode(rows)], axis=1)
    if cls_token:
        table = np.concatenate([np.zeros((1, dim)), table], axis=0)
    return torch.from_numpy(table).float().unsqueeze(0)


def patchify(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, L, p*p*C), patches row-major, pixels (row, col, channel) inside a patch."""
    return rearrange(images, "b c (h p) (w q) -> b (h w) (p q c)", p=patch_size, q=patch_size)


def unpatchify(patches: torch.Tensor, patch_size: int, grid: tuple[int, int]) -> torch.Tensor:
    """(B, L, p*p*C) -> (B, C, H, W); the inverse of `patchify`."""
    return rearrange(patches, "b (h w) (p q c) -> b c (h p) (w q)", h=grid[0], w=grid[1], p=patch_size, q=patch_size)


def num_visible(num_patches: int, mask_ratio: float) -> int:
    """Visible patches for a mask ratio, as the paper counts them: int(L * (1 - ratio))."""
    return int(num_patches * (1 - mask_ratio))


NORM_PIX_EPS = 1.0e-6  # per-patch normalised targets: (x - mean) / sqrt(var + eps)


def patch_statistics(target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-patch mean and standard deviation of (B, L, p*p*C) targets, as norm_pix_loss uses them: (B, L, 1) each."""
    mean = target.mean(dim=-1, keepdim=True)
    std = (target.var(dim=-1, keepdim=True) + NORM_PIX_EPS) ** 0.5
    return mean, std


def denormalise_patches(predicted: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-patch normalised predictions back into the target's space, with each true patch's own statistics."""
    mean, std = patch_statistics(target)
    return predicted * std + mean


def encoder_of(model: nn.Module) -> VisionTransformer:
    """The ViT inside: an MAE's encoder, or the model itself."""
    return model.encoder if isinstance(model, MaskedAutoencoder) else model


def image_size_of(model: nn.Module) -> tuple[int, int]:
    """The input size (H, W) of a ViT or of an MAE's encoder."""
    return encoder_of(model).config.image_size


def random_masking(tokens: torch.Tensor, noise: torch.Tensor, keep: int):
    """Keep the `keep` patches with the lowest noise in each sample.

    tokens (B, L, D), noise (B, L) -> kept (B, keep, D), mask (B, L) with 1 = masked,
    ids_restore (B, L) that puts the shuffled sequence back in patch order.
    The sort is stable, so equal noise values keep patch order and the result
    does not depend on the sorting algorithm (eager or exported).
    """
    batch, length, dim = tokens.shape
    ids_shuffle = torch.argsort(noise, dim=1, stable=True)  # ascending: lowest noise is kept
    ids_restore = torch.argsort(ids_shuffle, dim=1, stable=True)
    ids_keep = ids_shuffle[:, :keep]
    kept = torch.gather(tokens, 1, repeat(ids_keep, "b l -> b l d", d=dim))
    mask = torch.ones(batch, length, dtype=tokens.dtype, device=tokens.device)
    mask[:, :keep] = 0
    mask = torch.gather(mask, 1, ids_restore)
    return kept, mask, ids_restore


class MaskedAutoencoder(nn.Module):
    def __init__(self, config: MAEConfig) -> None:
        super().__init__()
        self.config = config
        enc = config.encoder
        if enc.num_classes:
            config = config.replace(encoder=enc.replace(num_classes=0))
            enc = config.encoder
            self.config = config
        self.encoder = VisionTransformer(enc)
        # The MAE's position embeddings are fixed sin-cos tables, not learned.
        self.encoder.pos_embed.requires_grad_(False)
        self.encoder.pos_embed.data.copy_(sincos_pos_embed_2d(enc.embed_dim, enc.grid_size))

        dim = config.decoder_embed_dim
        self.decoder_embed = nn.Linear(enc.embed_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.decoder_pos_embed = nn.Parameter(sincos_pos_embed_2d(dim, enc.grid_size), requires_grad=False)
        self.decoder_blocks = nn.Sequential(
            *[Block(dim, config.decoder_num_heads, enc.mlp_ratio, True, enc.norm_eps) for _ in range(config.decoder_depth)]
        )
        self.decoder_norm = nn.LayerNorm(dim, eps=enc.norm_eps)
        self.decoder_pred = nn.Linear(dim, enc.patch_size**2 * enc.in_chans)
        nn.init.normal_(self.mask_token, std=0.02)
        for module in (self.decoder_embed, self.decoder_pred):
            nn.init.xavier_uniform_(module.weight)
            nn.init.zeros_(module.bias)

    @property
    def patch_size(self) -> int:
        return self.config.encoder.patch_size

    @property
    def num_patches(self) -> int:
        return self.config.encoder.num_patches

    def patchify(self, images: torch.Tensor) -> torch.Tensor:
        return patchify(images, self.patch_size)

    def unpatchify(self, patches: torch.Tensor) -> torch.Tensor:
        return unpatchify(patches, self.patch_size, self.config.encoder.grid_size)

    def forward_encoder(self, images: torch.Tensor, noise: torch.Tensor, keep: int):
        """images (B, C, H, W), noise (B, L) -> latent (B, 1 + keep, D), mask (B, L), ids_restore (B, L)."""
        tokens = self.encoder.patch_tokens(images)  # (B, L, D), with positions
        if noise.shape != tokens.shape[:2]:
            raise InputShapeError(f"noise must have shape (B, L) = {tuple(tokens.shape[:2])}, got {tuple(noise.shape)}")
        kept, mask, ids_restore = random_masking(tokens, noise, keep)  # (B, keep, D)
        latent = self.encoder.encode(self.encoder.prepend_cls(kept))  # (B, 1 + keep, D)
        return latent, mask, ids_restore

    def forward_decoder(self, latent: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        """latent (B, 1 + keep, D), ids_restore (B, L) -> predicted pixels (B, L, p*p*C)."""
        x = self.decoder_embed(latent)  # (B, 1 + keep, Dd)
        batch, length = ids_restore.shape
        mask_tokens = repeat(self.mask_token, "1 1 d -> b n d", b=batch, n=length - (x.shape[1] - 1))
        shuffled = torch.cat([x[:, 1:], mask_tokens], dim=1)  # (B, L, Dd) in shuffled order
        patches = torch.gather(shuffled, 1, repeat(ids_restore, "b l -> b l d", d=x.shape[2]))  # patch order
        x = torch.cat([x[:, :1], patches], dim=1) + self.decoder_pos_embed
        x = self.decoder_norm(self.decoder_blocks(x))
        return self.decoder_pred(x)[:, 1:]  # drop the class token

    def target_patches(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, L, p*p*C) targets; per-patch normalised when `norm_pix_loss`."""
        target = self.patchify(images)
        if self.config.norm_pix_loss:
            mean, std = patch_statistics(target)
            target = (target - mean) / std
        return target

    def per_image_loss(self, images: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Mean squared error over the masked patches of each image. -> (B,)"""
        per_patch = ((pred - self.target_patches(images)) ** 2).mean(dim=-1)  # (B, L)
        return (per_patch * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)

    def forward_loss(self, images: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Mean squared error over all masked patches of the batch; visible patches do not count."""
        per_patch = ((pred - self.target_patches(images)) ** 2).mean(dim=-1)  # (B, L)
        return (per_patch * mask).sum() / mask.sum().clamp(min=1)

    def forward(self, images: torch.Tensor, noise: torch.Tensor | None = None, mask_ratio: float | None = None):
        """-> (loss, pred (B, L, p*p*C), mask (B, L)), the official MAE's outputs."""
        ratio = self.config.mask_ratio if mask_ratio is None else mask_ratio
        if not 0.0 <= ratio < 1.0:
            raise ValueError(f"mask_ratio must be in [0, 1), got {ratio}")
        if noise is None:
            noise = torch.rand(images.shape[0], self.num_patches, device=images.device)
        latent, mask, ids_restore = self.forward_encoder(images, noise, num_visible(self.num_patches, ratio))
        pred = self.forward_decoder(latent, ids_restore)
        return self.forward_loss(images, pred, mask), pred, mask

    def classifier(self, num_classes: int, pooling: str | None = None) -> VisionTransformer:
        """A ViT classifier initialised from this encoder, for fine-tuning (learned position embeddings start from sin-cos)."""
        enc = self.config.encoder
        vit = VisionTransformer(enc.replace(num_classes=num_classes, pooling=pooling or enc.pooling))
        missing, unexpected = vit.load_state_dict(self.encoder.state_dict(), strict=False)
        allowed_missing = {name for name in missing if name.startswith(("head.", "attn_pool.", "fc_norm."))}
        if set(missing) - allowed_missing or unexpected:
            raise RuntimeError(f"encoder weights do not fit the classifier: missing {missing}, unexpected {unexpected}")
        vit.pos_embed.requires_grad_(True)
        return vit
