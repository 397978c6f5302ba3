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
from ..reconstruction import choose_mask, full_reconstruction, masked_input
from .base import JSON, BatchWork, Item, TaskHandler, json_response

PNG = "image/png"
_JSON_OK = (JSON, "application/*", "*/*")


class ReconstructHandler(TaskHandler):
    task = "reconstruct"
    params_type = schemas.ReconstructParams
    respond_off_loop = True

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

    def batch_work(self, pixels: list[np.ndarray], params: schemas.ReconstructParams, model: Any) -> BatchWork:
        noise, keep = choose_mask(len(pixels), model.metadata.num_patches, mask_ratio=params.mask_ratio, seed=params.seed,
                                  visible=params.visible, masked=params.masked)
        # one `keep` per batch: it is the batch key, so only requests with the same visible count share a batch
        items = [{IMAGES: p, NOISE: n, KEEP: np.asarray(keep, dtype=np.int64)} for p, n in zip(pixels, noise)]
        return BatchWork(items, batch_key=keep)

    def respond(self, model: Any, params: schemas.ReconstructParams, pixels: list[np.ndarray], outputs: list[Item],
                media_type: str) -> Response:
        if media_type == PNG:
            return Response(encode_png(outputs[0][RECONSTRUCTION]), media_type=PNG)
        meta = model.metadata
        results = [self._result(image, out, meta) for image, out in zip(pixels, outputs)]
        visible = int(outputs[0][MASK].size - outputs[0][MASK].sum()) if outputs else 0
        return json_response(schemas.ReconstructResponse(model=model.name, version=model.version, grid=list(meta.grid),
                                                         patch_size=meta.patch_size, visible_patches=visible, results=results))

    @staticmethod
    def _result(image: np.ndarray, out: Item, meta: Any) -> dict:
        mask, norm = out[MASK], meta.normalization
        full = full_reconstruction(image, out[PATCHES], meta.patch_size, norm.mean, norm.std, meta.reconstruction.norm_pix_loss)
        return {
            "masked_png": _b64(encode_png(masked_input(image, mask, meta.patch_size))),
            "reconstruction_png": _b64(encode_png(full)),
            "composite_png": _b64(encode_png(out[RECONSTRUCTION])),
            "mask": [int(v > 0.5) for v in mask],
            "mse": float(out[LOSS]),
        }


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")
