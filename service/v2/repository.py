"""The model repository extension (Triton's shape, so that tritonclient and Triton tooling work): the index of every
version with its state and reason, and load / unload (explicit model control only). Protected by the API key when
one is set, like every route that is not a probe."""
from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..errors import BadRequest
from ..request_parsing import validation_message
from ..state import ServiceState


class IndexRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    ready: bool = Field(False, description="only the versions that are ready")


class ControlRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    parameters: dict = Field(default_factory=dict)


def add_repository_routes(router: APIRouter, state: ServiceState) -> None:
    """On the V2 router (prefix /v2)."""
    control = state.control

    @router.post("/repository/index", summary="Every model version in the repository with its state (READY, LOADING, UNLOADING, "
                                   "UNAVAILABLE) and the reason")
    async def index(request: Request) -> list[dict]:
        asked = await _body(request, IndexRequest)
        return control.index(ready_only=asked.ready)

    @router.post("/repository/models/{model_name}/load", summary="Load a model, or bring it up to date with the repository "
                                                      "(explicit model control)")
    async def load(request: Request, model_name: str) -> Response:
        _no_parameters(await _body(request, ControlRequest), "load")
        await control.load(model_name)
        return Response(status_code=200)

    @router.post("/repository/models/{model_name}/unload", summary="Unload a model once its requests in flight have their answers "
                                                        "(explicit model control)")
    async def unload(request: Request, model_name: str) -> Response:
        _no_parameters(await _body(request, ControlRequest), "unload")
        await control.unload(model_name)
        return Response(status_code=200)


async def _body(request: Request, schema: type[BaseModel]) -> BaseModel:
    """The optional JSON body (Triton's clients send `{}` or nothing)."""
    raw = await request.body()
    if not raw.strip():
        return schema()
    try:
        return schema.model_validate_json(raw)
    except ValidationError as error:
        raise BadRequest(f"malformed repository request: {validation_message(error)}") from None


def _no_parameters(request: ControlRequest, action: str) -> None:
    check_control_parameters(request.parameters, action)


def check_control_parameters(parameters, action: str) -> None:
    """Triton's load parameters (a config override, model files) would change what a version is: not taken here."""
    # unload_dependents asks to unload the models an ensemble uses: vitserve has no ensembles, so it changes nothing
    unknown = sorted(set(parameters) - {"unload_dependents"})
    if unknown:
        raise BadRequest(f"{action}: vitserve takes no parameters {', '.join(unknown)}; the repository's files "
                         f"define the model")
