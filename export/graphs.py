"""The exported graphs, as torch modules: what runs in eager here is what ONNX holds.

Preprocessing lives in the graph. Every graph takes `images`, uint8 RGB pixels
(B, H, W, 3) already resized to the model's size, and normalises them itself
with the checkpoint's mean/std, so a server only decodes and resizes.

- ClassifierGraph:    images -> logits (B, num_classes)
- AttentionGraph:     images -> attention (B, rows, cols), the classifier's attention rollout (cls or gap pooling)
- EmbedderGraph:      images -> embedding (B, D), the encoder's pooled features, not L2-normalised
- ReconstructorGraph: images, noise (B, L), keep () -> patches, mask, loss, reconstruction

Masking is driven by (noise, keep) at run time: the `keep` patches with the lowest
noise stay visible, ties in patch order (stable sort). A mask ratio r is
noise ~ U(0, 1) with keep = int(L * (1 - r)); an explicit visible set S is noise 0
on S and 1 elsewhere with keep = |S|. Nothing about the mask is baked into the graph;
eager refuses a keep outside 1..L, the exported graph clamps it into that range.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from einops import rearrange
from torch import nn

from model.mae import MaskedAutoencoder, denormalise_patches, encoder_of, num_visible
from model.vit import VisionTransformer
from modelrepo import TensorSpec
from modelrepo.names import ATTENTION, BATCH, EMBEDDING, IMAGES, KEEP, LOGITS, LOSS, MASK, NOISE, PATCHES, RECONSTRUCTION


class Normalise(nn.Module):
    """uint8 (B, H, W, 3) -> float32 (B, 3, H, W) as (x / 255 - mean) / std, and back."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        pixels = rearrange(images, "b h w c -> b c h w").to(torch.float32) / 255.0
        return (pixels - self.mean) / self.std

    def to_pixels(self, images: torch.Tensor) -> torch.Tensor:
        """float32 (B, 3, H, W) normalised -> uint8 (B, H, W, 3): undo mean/std, * 255, round, clip."""
        pixels = ((images * self.std + self.mean) * 255.0).round().clamp(0.0, 255.0)
        return rearrange(pixels.to(torch.uint8), "b c h w -> b h w c")


class ExportGraph(nn.Module):
    """A graph's names and shapes; subclasses define forward(*inputs in `input_names` order)."""

    task: str = ""
    input_names: tuple[str, ...] = (IMAGES,)
    output_names: tuple[str, ...] = ()

    def __init__(self, encoder: VisionTransformer, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.normalise = Normalise(mean, std)
        self._encoder_config = encoder.config

    @property
    def image_size(self) -> tuple[int, int]:
        return tuple(self._encoder_config.image_size)

    @property
    def num_patches(self) -> int:
        return self._encoder_config.num_patches

    def shapes(self) -> dict[str, tuple[str, tuple[int, ...]]]:
        """name -> (numpy dtype name, shape with BATCH for the batch axis), inputs and outputs."""
        height, width = self.image_size
        return {IMAGES: ("uint8", (BATCH, height, width, 3))}

    @property
    def input_specs(self) -> tuple[TensorSpec, ...]:
        return self._specs(self.input_names)

    @property
    def output_specs(self) -> tuple[TensorSpec, ...]:
        return self._specs(self.output_names)

    def _specs(self, names: Sequence[str]) -> tuple[TensorSpec, ...]:
        shapes = self.shapes()
        return tuple(TensorSpec(name, shapes[name][0], tuple(shapes[name][1])) for name in names)

    def example_inputs(self, batch: int = 2, seed: int = 0) -> dict[str, torch.Tensor]:
        """Random inputs of the right dtypes and shapes, for tracing and smoke tests."""
        generator = torch.Generator().manual_seed(seed)
        height, width = self.image_size
        return {IMAGES: torch.randint(0, 256, (batch, height, width, 3), dtype=torch.uint8, generator=generator)}

    def run(self, inputs: dict[str, Any]) -> dict[str, np.ndarray]:
        """Eager forward on named NumPy (or torch) inputs -> named NumPy outputs; the reference for parity."""
        args = [torch.as_tensor(np.asarray(inputs[name])) for name in self.input_names]
        with torch.inference_mode():
            outputs = self(*args)
        outputs = outputs if isinstance(outputs, tuple) else (outputs,)
        return {name: value.numpy() for name, value in zip(self.output_names, outputs)}


class ClassifierGraph(ExportGraph):
    task = "classify"
    output_names = (LOGITS,)

    def __init__(self, vit: VisionTransformer, mean: Sequence[float], std: Sequence[float]) -> None:
        if not isinstance(vit, VisionTransformer):
            raise TypeError(f"ClassifierGraph needs a VisionTransformer, got {type(vit).__name__}")
        if vit.config.num_classes <= 0:
            raise ValueError("ClassifierGraph needs a classification head (num_classes > 0); export an EmbedderGraph instead")
        super().__init__(vit, mean, std)
        self.vit = vit

    def forward(self, images: torch.Tensor) -> torch.Tensor:  # (B, H, W, 3) uint8 -> (B, num_classes)
        return self.vit(self.normalise(images))

    def shapes(self) -> dict[str, tuple[str, tuple[int, ...]]]:
        return {**super().shapes(), LOGITS: ("float32", (BATCH, self.vit.config.num_classes))}


class AttentionGraph(ExportGraph):
    """Where a classifier looks: an attention-rollout heat map over its patch grid, a graph of its own beside the
    classifier's, so a request that does not ask for it runs nothing of it (onnxruntime runs every node of a
    graph whichever outputs are fetched; RunOptions.only_execute_path_to_fetches did not prune in 1.32).
    `map` pooling has no such map (its pooling attention is not a block's)."""

    task = "classify"
    output_names = (ATTENTION,)

    def __init__(self, vit: VisionTransformer, mean: Sequence[float], std: Sequence[float]) -> None:
        if not isinstance(vit, VisionTransformer):
            raise TypeError(f"AttentionGraph needs a VisionTransformer, got {type(vit).__name__}")
        if vit.config.pooling not in ROLLOUT_POOLINGS:
            raise ValueError(f"attention rollout needs cls or gap pooling, not {vit.config.pooling!r}")
        super().__init__(vit, mean, std)
        self.vit = vit

    @staticmethod
    def supports(vit: VisionTransformer) -> bool:
        return vit.config.pooling in ROLLOUT_POOLINGS

    def forward(self, images: torch.Tensor) -> torch.Tensor:  # (B, H, W, 3) uint8 -> (B, rows, cols)
        _, weights = self.vit.forward_features_with_attention(self.normalise(images))
        flow = attention_rollout(weights, self.vit.num_prefix_tokens, self.vit.config.pooling)  # (B, N)
        rows, cols = self.vit.config.grid_size
        return rearrange(flow, "b (h w) -> b h w", h=rows, w=cols)

    def shapes(self) -> dict[str, tuple[str, tuple[int, ...]]]:
        rows, cols = self.vit.config.grid_size
        return {**super().shapes(), ATTENTION: ("float32", (BATCH, rows, cols))}


ROLLOUT_POOLINGS = ("cls", "gap")


def attention_rollout(weights: Sequence[torch.Tensor], num_prefix: int, pooling: str) -> torch.Tensor:
    """How much of the pooled representation flows from each patch (Abnar & Zuidema, "Quantifying attention flow
    in transformers", 2020): per block the heads' mean attention plus the identity for the residual path, halved
    so rows still sum to 1, multiplied through the blocks; then the pooled token's row (cls) or the mean of the
    patch rows (gap), over the patch columns, renormalised to sum to 1.

    Rollout rather than the last block's class-token attention: that one ignores the residual stream and every
    earlier block, is noisy in small models, and does not exist for gap pooling.

    weights: [(B, heads, T, T)] per block, T = num_prefix + N -> (B, N)
    """
    tokens = weights[0].shape[-1]
    identity = torch.eye(tokens, dtype=weights[0].dtype, device=weights[0].device)
    rollout = identity.expand(weights[0].shape[0], tokens, tokens)  # (B, T, T)
    for block_weights in weights:
        mixed = 0.5 * block_weights.mean(dim=1) + 0.5 * identity  # (B, T, T), rows sum to 1
        rollout = mixed @ rollout
    if pooling == "cls":
        flow = rollout[:, 0, num_prefix:]  # (B, N)
    elif pooling == "gap":
        flow = rollout[:, num_prefix:, num_prefix:].mean(dim=1)  # (B, N)
    else:
        raise ValueError(f"attention rollout needs cls or gap pooling, not {pooling!r}")
    return flow / flow.sum(dim=-1, keepdim=True).clamp_min(1e-12)


class EmbedderGraph(ExportGraph):
    """The encoder's pooled features (its configured pooling: cls, gap or map, then fc_norm if any); no head."""

    task = "embed"
    output_names = (EMBEDDING,)

    def __init__(self, encoder: VisionTransformer | MaskedAutoencoder, mean: Sequence[float], std: Sequence[float]) -> None:
        encoder = encoder_of(encoder)
        if not isinstance(encoder, VisionTransformer):
            raise TypeError(f"EmbedderGraph needs a VisionTransformer or MaskedAutoencoder, got {type(encoder).__name__}")
        super().__init__(encoder, mean, std)
        self.encoder = encoder

    @property
    def pooling(self) -> str:
        return self.encoder.config.pooling

    def forward(self, images: torch.Tensor) -> torch.Tensor:  # (B, H, W, 3) uint8 -> (B, D)
        return self.encoder.pool(self.encoder.forward_features(self.normalise(images)))

    def shapes(self) -> dict[str, tuple[str, tuple[int, ...]]]:
        return {**super().shapes(), EMBEDDING: ("float32", (BATCH, self.encoder.embed_dim))}


class ReconstructorGraph(ExportGraph):
    """The whole MAE with masking given as (noise, keep); see the module docstring."""

    task = "reconstruct"
    input_names = (IMAGES, NOISE, KEEP)
    output_names = (PATCHES, MASK, LOSS, RECONSTRUCTION)

    def __init__(self, mae: MaskedAutoencoder, mean: Sequence[float], std: Sequence[float]) -> None:
        if not isinstance(mae, MaskedAutoencoder):
            raise TypeError(f"ReconstructorGraph needs a MaskedAutoencoder, got {type(mae).__name__}")
        super().__init__(mae.encoder, mean, std)
        self.mae = mae

    @property
    def default_keep(self) -> int:
        """Visible patches at the model's own mask ratio (at least one)."""
        return max(1, num_visible(self.num_patches, self.mae.config.mask_ratio))

    def visible_count(self, keep: torch.Tensor | int) -> int:
        """The `keep` input as a size: a plain int in eager, a symbolic one while exporting.

        Eager refuses a keep outside 1..L; the exported graph clamps it into that range
        (ONNX has no way to raise), so a bad request can never slice past the patches.
        """
        length = self.num_patches
        if not torch.compiler.is_compiling():
            value = int(keep)
            if not 0 < value <= length:
                raise ValueError(f"keep must be in 1..{length} (the number of visible patches), got {value}")
        if not isinstance(keep, torch.Tensor):
            return int(keep)
        count = keep.clamp(1, length).item()
        torch._check(count >= 1)
        torch._check(count <= length)
        return count

    def forward(self, images: torch.Tensor, noise: torch.Tensor, keep: torch.Tensor):
        """images (B, H, W, 3) uint8, noise (B, L) float32, keep () int64 ->
        patches (B, L, p*p*3), mask (B, L) 1 = masked, loss (B,), reconstruction (B, H, W, 3) uint8."""
        x = self.normalise(images)  # (B, 3, H, W)
        latent, mask, ids_restore = self.mae.forward_encoder(x, noise, self.visible_count(keep))
        patches = self.mae.forward_decoder(latent, ids_restore)  # (B, L, p*p*3)
        loss = self.mae.per_image_loss(x, patches, mask)  # (B,)
        return patches, mask, loss, self.composite(x, patches, mask)

    def composite(self, images: torch.Tensor, patches: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Visible patches from the input, masked ones predicted, as uint8 (B, H, W, 3) pixels.

        With norm_pix_loss the predictions are per-patch normalised; they are mapped back with
        each target patch's own mean and variance, as the MAE paper's visualisations do.
        """
        target = self.mae.patchify(images)  # (B, L, p*p*3)
        if self.mae.config.norm_pix_loss:
            patches = denormalise_patches(patches, target)
        mixed = torch.where(mask.unsqueeze(-1) > 0.5, patches, target)  # (B, L, p*p*3)
        return self.normalise.to_pixels(self.mae.unpatchify(mixed))

    def shapes(self) -> dict[str, tuple[str, tuple[int, ...]]]:
        height, width = self.image_size
        length, patch = self.num_patches, self.mae.patch_size
        return {
            **super().shapes(),
            NOISE: ("float32", (BATCH, length)),
            KEEP: ("int64", ()),
            PATCHES: ("float32", (BATCH, length, patch * patch * 3)),
            MASK: ("float32", (BATCH, length)),
            LOSS: ("float32", (BATCH,)),
            RECONSTRUCTION: ("uint8", (BATCH, height, width, 3)),
        }

    def example_inputs(self, batch: int = 2, seed: int = 0) -> dict[str, torch.Tensor]:
        inputs = super().example_inputs(batch, seed)
        generator = torch.Generator().manual_seed(seed + 1)
        inputs[NOISE] = torch.rand(batch, self.num_patches, generator=generator)
        inputs[KEEP] = torch.tensor(self.default_keep, dtype=torch.int64)
        return inputs


def visible_set_inputs(visible: Sequence[Sequence[int]], num_patches: int) -> tuple[np.ndarray, np.ndarray]:
    """(noise, keep) that make exactly the given patches visible, one list per image (all the same length)."""
    counts = {len(set(indices)) for indices in visible}
    if len(counts) != 1:
        raise ValueError("every image needs the same number of visible patches (keep is one number per batch)")
    noise = np.ones((len(visible), num_patches), dtype=np.float32)
    for row, indices in enumerate(visible):
        noise[row, list(indices)] = 0.0
    return noise, np.array(counts.pop(), dtype=np.int64)
