"""classify: top-k labels with softmax scores per image; on request, where the model looked (attention maps)."""
from __future__ import annotations

import base64
from typing import Any

import numpy as np
from fastapi.responses import Response

from modelrepo.names import ATTENTION, LOGITS

from .. import schemas
from ..attention import attention_overlay
from ..errors import InvalidParameter
from ..images import encode_png
from ..runtime import FETCH_ALSO
from .base import BatchWork, Item, PreparedImage, TaskHandler, json_response


class ClassifyHandler(TaskHandler):
    task = "classify"
    params_type = schemas.ClassifyParams

    def keeps_source(self, params: schemas.ClassifyParams) -> bool:
        return params.attention_png

    def batch_work(self, images: list[PreparedImage], params: schemas.ClassifyParams, model: Any) -> BatchWork:
        work = super().batch_work(images, params, model)
        if not params.wants_attention:
            return work
        if model.metadata.attention is None:
            raise InvalidParameter(f"model {model.name!r} version {model.version} was exported without attention maps, so "
                                   "it cannot answer attention=true; export its checkpoint again with this vitserve's "
                                   "vit-export (classifiers with cls or gap pooling get them)")
        # Their own batches: a batch without maps never runs the attention graph.
        return BatchWork([{**item, FETCH_ALSO: (ATTENTION,)} for item in work.items], batch_key=ATTENTION)

    def responds_off_loop(self, params: schemas.ClassifyParams) -> bool:
        return params.attention_png

    def respond(self, model: Any, params: schemas.ClassifyParams, images: list[PreparedImage], outputs: list[Item],
                media_type: str) -> Response:
        labels = model.labels
        results = []
        for image, out in zip(images, outputs):
            probs = softmax(out[LOGITS].astype(np.float64))
            top = np.argsort(-probs, kind="stable")[: params.top_k]
            result: dict[str, Any] = {"predictions": [{"label": labels[i], "index": int(i), "score": float(probs[i])} for i in top]}
            if params.wants_attention:
                result["attention"] = out[ATTENTION].tolist()
            if params.attention_png:
                overlay = attention_overlay(image.source.image, image.source.box, out[ATTENTION])
                result["attention_png"] = base64.b64encode(encode_png(overlay)).decode("ascii")
            results.append(result)
        body = schemas.ClassifyResponse(model=model.name, version=model.version, results=results)
        return json_response(body, exclude_none=True)


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max())
    return shifted / shifted.sum()
