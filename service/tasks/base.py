"""What every task handler provides, and the JSON answer they share."""
from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
from fastapi.responses import Response
from pydantic import BaseModel

from modelrepo import Task

from ..schemas import CommonParams

if TYPE_CHECKING:
    from ..state import ServedModel

JSON = "application/json"
Item = dict[str, np.ndarray]  # one image's inputs or outputs, by tensor name


@dataclass
class BatchWork:
    """A request's images as batch items; only items with the same `batch_key` may share a batch."""
    items: list[Item]
    batch_key: Hashable = None


class TaskHandler:
    task: ClassVar[Task]
    params_type: ClassVar[type[CommonParams]]
    # Responses that take real CPU (PNG encoding) are built in the decode threads, off the event loop.
    respond_off_loop: ClassVar[bool] = False

    def media_type(self, accept: str, images: int) -> str:
        """The answer's media type for this Accept header, decided before any work (raises NotAcceptable)."""
        return JSON

    def batch_work(self, pixels: list[np.ndarray], params: Any, model: ServedModel) -> BatchWork:
        return BatchWork([{model.metadata.inputs[0].name: p} for p in pixels])

    def respond(self, model: ServedModel, params: Any, pixels: list[np.ndarray], outputs: list[Item],
                media_type: str) -> Response:
        raise NotImplementedError


def json_response(body: BaseModel) -> Response:
    """The response, serialised once: FastAPI would validate a returned model against `response_model` again
    (the declared models still document the endpoints)."""
    return Response(body.model_dump_json(), media_type=JSON)
