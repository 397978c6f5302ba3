"""The JSON of a V2 inference request (`$inference_request`, `$request_input`, `$request_output`) and typed
reading of its `parameters`. Fields the protocol does not define are ignored, as the protocol allows."""
from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..errors import BadRequest
from ..request_parsing import validation_message
from .binary import HEADER_LENGTH

Dim = Annotated[int, Field(ge=0, strict=True)]
Parameters = dict[str, Any]


class RequestInput(BaseModel):
    model_config = ConfigDict(extra="ignore")
    name: str
    shape: list[Dim]
    datatype: str
    parameters: Parameters = Field(default_factory=dict)
    data: Any = None


class RequestOutput(BaseModel):
    model_config = ConfigDict(extra="ignore")
    name: str
    parameters: Parameters = Field(default_factory=dict)


class InferenceRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    id: str | None = None
    parameters: Parameters = Field(default_factory=dict)
    inputs: list[RequestInput] = Field(min_length=1)
    outputs: list[RequestOutput] | None = None


def parse_request(header: bytes, has_header_length: bool) -> InferenceRequest:
    try:
        return InferenceRequest.model_validate_json(header)
    except ValidationError as error:
        message = f"malformed inference request: {validation_message(error)}"
        if not has_header_length and any(e["type"] == "json_invalid" for e in error.errors()):
            message += f" (a body with binary tensor data needs the {HEADER_LENGTH} header)"
        raise BadRequest(message) from None


# --- parameters --------------------------------------------------------------------------------------------

def bool_parameter(parameters: Parameters, key: str, default: bool, where: str) -> bool:
    value = parameters.get(key, default)
    if not isinstance(value, bool):
        raise BadRequest(f"{where}: parameter '{key}' must be true or false, got {value!r}")
    return value


def int_parameter(parameters: Parameters, key: str, where: str, minimum: int = 0) -> int | None:
    """The parameter as a whole number >= minimum, or None when absent."""
    value = parameters.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise BadRequest(f"{where}: parameter '{key}' must be a whole number >= {minimum}, got {value!r}")
    return value
