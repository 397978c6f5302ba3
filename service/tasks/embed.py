"""embed: one pooled embedding per image, L2-normalised on request."""
from __future__ import annotations

from typing import Any

import numpy as np
from fastapi.responses import Response

from modelrepo.names import EMBEDDING

from .. import schemas
from .base import Item, PreparedImage, TaskHandler, json_response


class EmbedHandler(TaskHandler):
    task = "embed"
    params_type = schemas.EmbedParams

    def respond(self, model: Any, params: schemas.EmbedParams, images: list[PreparedImage], outputs: list[Item],
                media_type: str) -> Response:
        vectors = np.stack([out[EMBEDDING] for out in outputs]).astype(np.float32)
        if params.normalize:
            vectors /= np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
        info = model.metadata.embedding
        return json_response(schemas.EmbedResponse(model=model.name, version=model.version, dim=info.dim, pooling=info.pooling,
                                                   normalized=params.normalize, embeddings=vectors.tolist()))
