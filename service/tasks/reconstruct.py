"""reconstruct: the MAE's in-painting of masked patches, as pictures (JSON with base64 PNGs, or one PNG)."""
from __future__ import annotations

import base64
from typing import Any

import numpy as np
from fastapi.responses import Response

from modelrepo.names import IMAGES, KEEP, LOSS, MASK, NOISE, PATCHES, RECONSTRUCTION

from .. import schemas
from ..errors import NotAcceptable
from ..images import encode_png
from ..reconstruction import choose_mask, full_reconstruction, masked_input, pictures_at_source_size
from .base import JSON, BatchWork, Item, PreparedImage, TaskHandler, json_response

PNG = "image/png"
_JSON_OK = (JSON, "application/*", "*/*")


class ReconstructHandler(TaskHandler):
    task = "reconstruct"
    params_type = schemas.ReconstructParams

    def responds_off_loop(self, params: schemas.ReconstructParams) -> bool:
        return True

    def keeps_source(self, params: schemas.ReconstructParams) -> bool:
        return params.size == "input"

    def media_type(self, accept: str, images: int) -> str:
        """Accept: image/png answers the composite of ONE image as a PNG; several images need JSON."""
        accepted = {part.split(";")[0].strip().lower() for part in accept.split(",") if part.strip()}
        if PNG not in accepted:
            return JSON
        if images == 1:
            return PNG
        if accepted & set(_JSON_OK):
            return JSON
        raise NotAcceptable(f"Accept: {PNG} answers one image; this request has {images}. "
                            f"Send one image, or accept {JSON} for all of them")

    def batch_work(self, images: list[PreparedImage], params: schemas.ReconstructParams, model: Any) -> BatchWork:
        noise, keep = choose_mask(len(images), model.metadata.num_patches, mask_ratio=params.mask_ratio, seed=params.seed,
                                  visible=params.visible, masked=params.masked)
        return self.masked_work(images, noise, keep)

    @staticmethod
    def masked_work(images: list[PreparedImage], noise: np.ndarray, keep: int) -> BatchWork:
        """The graph's inputs for a chosen mask (noise (N, L), keep); also for protocols that send the mask itself."""
        # one `keep` per batch: it is the batch key, so only requests with the same visible count share a batch
        items = [{IMAGES: image.pixels, NOISE: n, KEEP: np.asarray(keep, dtype=np.int64)} for image, n in zip(images, noise)]
        return BatchWork(items, batch_key=keep)

    def respond(self, model: Any, params: schemas.ReconstructParams, images: list[PreparedImage], outputs: list[Item],
                media_type: str) -> Response:
        meta = model.metadata
        if media_type == PNG:  # one image: its composite only
            image, out = images[0], outputs[0]
            composite = out[RECONSTRUCTION] if image.source is None else self._pictures(image, out, meta)["composite"]
            return Response(encode_png(composite), media_type=PNG)
        pictures = [self._pictures(image, out, meta) for image, out in zip(images, outputs)]
        results = [{"masked_png": _png64(p["masked"]), "reconstruction_png": _png64(p["reconstruction"]),
                    "composite_png": _png64(p["composite"]), "mask": [int(v > 0.5) for v in out[MASK]], "mse": float(out[LOSS])}
                   for p, out in zip(pictures, outputs)]
        visible = int(outputs[0][MASK].size - outputs[0][MASK].sum())
        return json_response(schemas.ReconstructResponse(model=model.name, version=model.version, grid=list(meta.grid),
                                                         patch_size=meta.patch_size, visible_patches=visible, results=results))

    @staticmethod
    def _pictures(image: PreparedImage, out: Item, meta: Any) -> dict[str, np.ndarray]:
        """masked / reconstruction / composite, at the model's size, or drawn over the upload when it was kept."""
        norm, patch = meta.normalization, meta.patch_size
        full = full_reconstruction(image.pixels, out[PATCHES], patch, norm.mean, norm.std, meta.reconstruction.norm_pix_loss)
        if image.source is not None:
            return pictures_at_source_size(image.source.image, image.source.box, out[MASK], full, patch)
        return {"masked": masked_input(image.pixels, out[MASK], patch), "reconstruction": full, "composite": out[RECONSTRUCTION]}


def _png64(pixels: np.ndarray) -> str:
    return base64.b64encode(encode_png(pixels)).decode("ascii")
