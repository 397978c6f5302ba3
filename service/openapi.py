"""The OpenAPI description of the REST API beyond what FastAPI infers: the task endpoints' request bodies and
parameters, their other answers (/reconstruct's PNG), /metrics' text, and the API key.

Documentation only: a task route still reads its request itself (request_parsing.py), so declaring it here costs
nothing per request. The parameters are declared from the same pydantic models that validate them
(schemas.py), so each one has one definition.
"""
from __future__ import annotations

import base64
import functools
import warnings
from typing import Any

import numpy as np
from fastapi import FastAPI
from PIL import Image
from pydantic import BaseModel

from imageprep import SUPPORTED_FORMATS

from .images import encode_png
from .request_parsing import IMAGE_FIELD
from .tasks import TaskHandler

# A model name of the demo repository (`make models`) per task, for the `model` parameter's example.
EXAMPLE_MODELS = {"classify": "demo-classifier", "embed": "demo-mae-embed", "reconstruct": "demo-mae-reconstruct"}
IMAGE_MEDIA_TYPES = ", ".join(Image.MIME[name] for name in SUPPORTED_FORMATS)
PNG_RESPONSE = {"description": "JSON with base64 PNGs; or, with `Accept: image/png` and one image, the composite as a PNG file",
                "content": {"image/png": {"schema": {"type": "string", "contentMediaType": "image/png"}}}}
METRICS_RESPONSE = {"description": "Prometheus text exposition format",
                    "content": {"text/plain": {"schema": {"type": "string"},
                                               "example": "vitserve_requests_total{method=\"POST\",route=\"/classify\","
                                                          "status=\"200\"} 42.0\n"}}}
UNAUTHORIZED = {"description": "missing or wrong API key",
                "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}}
_WHERE_PARAMETERS_GO = ("Each parameter goes in the query string or in the body (a JSON field, or a form field next "
                        "to the `file` parts), not in both.")


def task_operation(handler: TaskHandler, max_images: int) -> dict[str, Any]:
    """The `openapi_extra` of a task route: its query parameters and its two request bodies."""
    fields = parameter_schemas(handler.params_type, EXAMPLE_MODELS[handler.task])
    parameters = [_query_parameter(name, schema) for name, schema in fields.items()]
    images_limit = {"minItems": 1, "maxItems": max_images}
    multipart = {
        "schema": {"type": "object", "required": [IMAGE_FIELD], "properties": {IMAGE_FIELD: {
            "type": "array", **images_limit, "description": f"the images: one `{IMAGE_FIELD}` part per image file",
            # format binary: OpenAPI 3.0's spelling, which Swagger UI needs to offer a file picker per item
            "items": {"type": "string", "format": "binary", "contentMediaType": "application/octet-stream"}}}},
        "encoding": {IMAGE_FIELD: {"contentType": IMAGE_MEDIA_TYPES}},
    }
    json_body = {
        "schema": {"type": "object", "required": ["images"], "additionalProperties": False, "properties": {
            "images": {"type": "array", **images_limit, "description": "the images, each an image file in base64 "
                       "(standard or URL-safe alphabet) or a data: URL",
                       "items": {"type": "string", "format": "byte", "contentEncoding": "base64"}},
            **fields}},
        "examples": {
            "one image": {"summary": "one image; parameters from the query string", "value": {"images": [example_image()]}},
            "with parameters": {"summary": "parameters in the body (leave them out of the query string then)",
                                "value": {"images": [example_image()], **_examples(fields)}},
        },
    }
    return {
        "description": f"Images go as `multipart/form-data` (one `{IMAGE_FIELD}` part per image) or as JSON "
                       f"(`images`: base64), up to {max_images} per request. Formats: {IMAGE_MEDIA_TYPES}. "
                       + _WHERE_PARAMETERS_GO,
        "parameters": parameters,
        "requestBody": {"required": True, "content": {"multipart/form-data": multipart, "application/json": json_body}},
    }


def parameter_schemas(params_type: type[BaseModel], example_model: str) -> dict[str, dict[str, Any]]:
    """The params model's fields as plain JSON schemas: an optional field's `null` branch means "leave it out",
    which a query string or a form cannot say, so only the value's own schema is declared."""
    fields = {}
    for name, schema in params_type.model_json_schema()["properties"].items():
        schema = {key: value for key, value in schema.items() if key != "title"}
        for branch in schema.pop("anyOf", []):
            if branch.get("type") != "null":
                schema.update(branch)
        if schema.get("default", "") is None:
            del schema["default"]
        fields[name] = schema
    fields["model"]["examples"] = [example_model]
    return fields


def _query_parameter(name: str, schema: dict[str, Any]) -> dict[str, Any]:
    """No parameter-level `example`: Swagger UI would fill it in and send it (the demo's model name, `visible` next
    to the default `mask_ratio`); the schema's `examples` document them without that."""
    schema = dict(schema)
    return {"name": name, "in": "query", "required": False, "description": schema.pop("description", ""), "schema": schema}


def _examples(fields: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """A body showing the parameters, one example each; `visible`/`masked` would contradict `mask_ratio`."""
    chosen = {name: schema["examples"][0] for name, schema in fields.items() if "examples" in schema}
    for alternative in ("visible", "masked"):
        chosen.pop(alternative, None)
    chosen.pop("model", None)  # the demo's name would be a 404 on any other repository
    return chosen


@functools.cache
def example_image() -> str:
    """A 32x32 PNG in base64: a yellow disc on blue, what the demo classifier calls a circle."""
    yy, xx = np.mgrid[:32, :32]
    disc = (yy - 15.5) ** 2 + (xx - 15.5) ** 2 < 10 ** 2
    pixels = np.where(disc[..., None], np.uint8([250, 210, 40]), np.uint8([30, 60, 140])).astype(np.uint8)
    return base64.b64encode(encode_png(pixels)).decode("ascii")


def install_openapi(app: FastAPI, open_paths: set[str], api_key: bool) -> None:
    """Finish the schema FastAPI builds: one operation id per method, and the API key when one is configured."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            with warnings.catch_warnings():  # FastAPI warns about the ids that _unique_operation_ids then fixes
                warnings.filterwarnings("ignore", message="Duplicate Operation ID")
                schema = build()
            _unique_operation_ids(schema)
            if api_key:
                _declare_api_key(schema, open_paths)
        return app.openapi_schema

    app.openapi = openapi


def _unique_operation_ids(schema: dict[str, Any]) -> None:
    """A route with several methods (GET and HEAD) gets one id from FastAPI, ending in whichever method its set
    listed first; each operation gets that id ending in its own method."""
    for operations in schema["paths"].values():
        for method, operation in operations.items():
            stem, _, last = operation.get("operationId", "").rpartition("_")
            if last != method and last in operations:
                operation["operationId"] = f"{stem}_{method}"


def _declare_api_key(schema: dict[str, Any], open_paths: set[str]) -> None:
    """Every operation but the open ones needs the key: Swagger UI's "Authorize" sends it."""
    schema.setdefault("components", {})["securitySchemes"] = {
        "bearer": {"type": "http", "scheme": "bearer", "description": "Authorization: Bearer <key>"},
        "apiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"}}
    for path, operations in schema["paths"].items():
        if path not in open_paths:
            for operation in operations.values():
                operation["security"] = [{"bearer": []}, {"apiKey": []}]
                operation["responses"].setdefault("401", UNAUTHORIZED)
