"""classify: top-k labels with softmax scores per image."""
from __future__ import annotations

from typing import Any

import numpy as np
from fastapi.responses import Response

from modelrepo.names import LOGITS

from .. import schemas
from .base import Item, PreparedImage, TaskHandler, json_response


class ClassifyHandler(TaskHandler):
    task = "classify"
    params_type = schemas.ClassifyParams

    def respond(self, model: Any, params: schemas.ClassifyParams, images: list[PreparedImage], outputs: list[Item],
                media_type: str) -> Response:
        labels = model.labels
        results = []
        for out in outputs:
            probs = softmax(out[LOGITS].astype(np.float64))
            top = np.argsort(-probs, kind="stable")[: params.top_k]
            results.append({"predictions": [{"label": labels[i], "index": int(i), "score": float(probs[i])} for i in top]})
        return json_response(schemas.ClassifyResponse(model=model.name, version=model.version, results=results))


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max())
    return shifted / shifted.sum()
