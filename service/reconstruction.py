"""Masks for /reconstruct and the images it returns, in NumPy (the graph gives patches, mask and composite)."""
from __future__ import annotations

import math

import numpy as np
from PIL import Image

from .errors import InvalidParameter

MASKED_GREY = 128  # masked patches in the "masked input" picture


def choose_mask(num_images: int, num_patches: int, *, mask_ratio: float, seed: int | None,
                visible: list[int] | None, masked: list[int] | None) -> tuple[np.ndarray, int]:
    """(noise (N, L) float32, keep): the graph keeps the `keep` lowest-noise patches, ties in patch order.

    An explicit `visible` (or `masked`) set becomes noise 0 on the visible patches and 1 elsewhere."""
    if visible is not None and masked is not None:
        raise InvalidParameter("give either 'visible' or 'masked' patch indices, not both")
    if visible is not None or masked is not None:
        chosen = _check_indices(visible if visible is not None else masked, num_patches, "visible" if visible is not None else "masked")
        visible_set = chosen if visible is not None else sorted(set(range(num_patches)) - set(chosen))
        if not visible_set:
            raise InvalidParameter("at least one patch must stay visible")
        noise = np.ones((num_images, num_patches), dtype=np.float32)
        noise[:, visible_set] = 0.0
        return noise, len(visible_set)
    if not 0.0 < mask_ratio < 1.0:
        raise InvalidParameter(f"mask_ratio must be between 0 and 1 (exclusive), got {mask_ratio}")
    keep = int(num_patches * (1 - mask_ratio))
    if keep < 1:
        raise InvalidParameter(f"mask_ratio {mask_ratio} hides every one of the {num_patches} patches; use a smaller ratio")
    rng = np.random.default_rng(seed)
    return rng.random((num_images, num_patches), dtype=np.float32), keep


def _check_indices(indices: list[int], num_patches: int, name: str) -> list[int]:
    bad = [i for i in indices if not 0 <= i < num_patches]
    if bad:
        raise InvalidParameter(f"'{name}' patch indices must be in [0, {num_patches}); got {bad[:5]}")
    if len(set(indices)) != len(indices):
        raise InvalidParameter(f"'{name}' patch indices contain duplicates")
    return sorted(indices)


def _patch_view(pixels: np.ndarray, patch: int) -> np.ndarray:
    """(H, W, C) -> (gh, gw, p, p, C) view-like array, patches row-major."""
    height, width, channels = pixels.shape
    return pixels.reshape(height // patch, patch, width // patch, patch, channels).swapaxes(1, 2)


def masked_input(pixels: np.ndarray, mask: np.ndarray, patch: int) -> np.ndarray:
    """The input with its masked patches painted grey. pixels (H, W, 3) uint8, mask (L,) 1 = masked."""
    out = pixels.copy()
    patches = _patch_view(out, patch)  # a view into `out`
    grid_h, grid_w = patches.shape[:2]
    patches[mask.reshape(grid_h, grid_w) > 0.5] = MASKED_GREY
    return out


def full_reconstruction(pixels: np.ndarray, predicted: np.ndarray, patch: int, mean: list[float], std: list[float],
                        norm_pix_loss: bool) -> np.ndarray:
    """Every patch as the decoder predicted it, in pixels. predicted (L, p*p*3) in the model's normalised space."""
    height, width, _ = pixels.shape
    mean_arr, std_arr = np.asarray(mean, np.float32), np.asarray(std, np.float32)
    predicted = predicted.reshape(-1, patch * patch, 3).astype(np.float32)
    if norm_pix_loss:  # predictions are per-patch standardised: restore each patch's own statistics
        target = _patch_view((pixels.astype(np.float32) / 255.0 - mean_arr) / std_arr, patch).reshape(-1, patch * patch * 3)
        scale = np.sqrt(target.var(axis=1, ddof=1) + 1e-6)[:, None, None]
        predicted = predicted * scale + target.mean(axis=1)[:, None, None]
    image = (predicted * std_arr + mean_arr) * 255.0  # (L, p*p, 3)
    grid_h, grid_w = height // patch, width // patch
    image = image.reshape(grid_h, grid_w, patch, patch, 3).swapaxes(1, 2).reshape(height, width, 3)
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


# --- pictures at the upload's own size -----------------------------------------------------------------------

MAX_PICTURE_SIDE = 2048  # a 40-megapixel PNG would take seconds to encode and megabytes to send
OUTSIDE_FADE = 0.5  # pixels outside the region the model saw are faded this far toward grey


def pictures_at_source_size(image: Image.Image, box: tuple[float, float, float, float], mask: np.ndarray,
                            predicted: np.ndarray, patch: int) -> dict[str, np.ndarray]:
    """The masked input, the reconstruction and the composite drawn over the upload itself (longer side at most
    MAX_PICTURE_SIDE): inside the region the model saw (`box`), hidden patches are grey / predicted (upscaled from
    the model's size), visible ones keep the upload's own pixels; outside it, the upload faded, since the model
    never saw those pixels. predicted: (H, W, 3) uint8 at the model's size, every patch as the decoder saw it."""
    image, box = capped(image, box)
    base = np.asarray(image, dtype=np.float32)
    # Outward to whole pixels, at least one: the seen region of a 1-pixel-wide upload is under a pixel across.
    left, top = min(int(box[0]), image.width - 1), min(int(box[1]), image.height - 1)
    right, bottom = max(left + 1, min(image.width, math.ceil(box[2]))), max(top + 1, min(image.height, math.ceil(box[3])))
    seen_w, seen_h = right - left, bottom - top
    upscaled = np.asarray(Image.fromarray(predicted).resize((seen_w, seen_h), Image.Resampling.BICUBIC), dtype=np.float32)
    grid_h, grid_w = predicted.shape[0] // patch, predicted.shape[1] // patch
    rows = np.minimum(np.arange(seen_h) * grid_h // seen_h, grid_h - 1)
    cols = np.minimum(np.arange(seen_w) * grid_w // seen_w, grid_w - 1)
    hidden = (mask.reshape(grid_h, grid_w)[rows[:, None], cols[None, :]] > 0.5)[..., None]  # (seen_h, seen_w, 1)
    seen = base[top:bottom, left:right]
    faded = base * (1 - OUTSIDE_FADE) + MASKED_GREY * OUTSIDE_FADE

    def over_faded(inside: np.ndarray) -> np.ndarray:
        picture = faded.copy()
        picture[top:bottom, left:right] = inside
        return np.clip(np.rint(picture), 0, 255).astype(np.uint8)

    return {"masked": over_faded(np.where(hidden, MASKED_GREY, seen)), "reconstruction": over_faded(upscaled),
            "composite": over_faded(np.where(hidden, upscaled, seen))}


def capped(image: Image.Image, box: tuple[float, float, float, float]) -> tuple[Image.Image, tuple[float, ...]]:
    factor = MAX_PICTURE_SIDE / max(image.size)
    if factor >= 1:
        return image, box
    size = (max(1, round(image.width * factor)), max(1, round(image.height * factor)))
    return image.resize(size, Image.Resampling.BILINEAR), tuple(v * factor for v in box)
