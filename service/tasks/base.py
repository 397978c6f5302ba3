"""What every task handler provides, and the JSON answer they share."""
from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
from fastapi.responses import Response
from pydantic import BaseModel

from modelrepo import Task

from ..images import SourceImage
from ..runtime import Item
from ..schemas import CommonParams

if TYPE_CHECKING:
    from ..state import ServedModel

JSON = "application/json"


@dataclass(frozen=True)
class PreparedImage:
    """One uploaded image, decoded and resized for the model; the decoded upload too when the handler asked for it."""
    pixels: np.ndarray  # (H, W, 3) uint8 at the model's input size
    source: SourceImage | None = None


@dataclass
class BatchWork:
    """A request's images as batch items; only items with the same `batch_key` may share a batch."""
    items: list[Item]
    batch_key: Hashable = None


class TaskHandler:
    task: ClassVar[Task]
    params_type: ClassVar[type[CommonParams]]
    def responds_off_loop(self, params: Any) -> bool:
        """Whether the answer takes real CPU (PNG encoding): then it is built in the decode threads, off the event loop."""
        return False

    def keeps_source(self, params: Any) -> bool:
        """Whether the answer needs the decoded uploads themselves, not only the model's pixels."""
        return False

    def media_type(self, accept: str, images: int) -> str:
        """The answer's media type for this Accept header, decided before any work (raises NotAcceptable)."""
        return JSON

    def batch_work(self, images: list[PreparedImage], params: Any, model: ServedModel) -> BatchWork:
        return BatchWork([{model.metadata.inputs[0].name: image.pixels} for image in images])

    def respond(self, model: ServedModel, params: Any, images: list[PreparedImage], outputs: list[Item],
                media_type: str) -> Response:
        raise NotImplementedError


def json_response(body: BaseModel, exclude_none: bool = False) -> Response:
    """The response, serialised once: FastAPI would validate a returned model against `response_model` again
    (the declared models still document the endpoints). `exclude_none` leaves out the optional parts not asked for."""
    return Response(body.model_dump_json(exclude_none=exclude_none), media_type=JSON)
