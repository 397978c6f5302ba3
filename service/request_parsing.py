"""Image bytes and validated parameters from a REST request: multipart/form-data (`file` parts) or JSON
(`images`: base64), parameters from the query string and the form or JSON fields."""
from __future__ import annotations

from typing import Any

from fastapi import Request
from pydantic import BaseModel, ValidationError

from . import schemas
from .errors import BadRequest, InvalidParameter, PayloadTooLarge, UnsupportedMediaType
from .multipart import MalformedMultipart, TooManyFiles, read_multipart

IMAGE_FIELD = "file"  # the multipart part name that carries an image
LIST_FIELDS = {"visible", "masked"}  # may be repeated: visible=0&visible=3


async def read_request(request: Request, max_images: int, params_type: type[BaseModel]) -> tuple[list[bytes | str], Any]:
    """(images: bytes, or base64 text still to decode, in request order; validated parameters)."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    fields: dict[str, Any] = {}
    for key, value in request.query_params.multi_items():
        add_field(fields, key, value)
    if content_type == "multipart/form-data":
        images = await _multipart_images(request, max_images, fields)
    elif content_type == "application/json":
        try:
            body = schemas.JsonImages.model_validate_json(await request.body())
        except ValidationError as error:
            raise InvalidParameter(validation_message(error)) from None
        images = list(body.images)  # still base64: decoded in the decode threads, off the event loop
        for key, value in (body.model_extra or {}).items():
            add_field(fields, key, value)
        if not images:
            raise InvalidParameter("the request holds no images: 'images' is an empty list")
    else:
        raise UnsupportedMediaType(f"send images as multipart/form-data ('{IMAGE_FIELD}' parts) or application/json "
                                   f"('images': base64); got {content_type or 'no content type'}")
    if len(images) > max_images:
        raise PayloadTooLarge(f"{len(images)} images in one request; the limit is {max_images}")
    try:
        params = params_type.model_validate(fields)
    except ValidationError as error:
        raise InvalidParameter(validation_message(error, params_type)) from None
    return images, params


async def _multipart_images(request: Request, max_images: int, fields: dict[str, Any]) -> list[bytes]:
    try:
        parts = await read_multipart(request, max_files=max_images, max_fields=64)
    except TooManyFiles:
        raise PayloadTooLarge(f"more than {max_images} images in one request; the limit is {max_images}") from None
    except MalformedMultipart as error:
        raise BadRequest(f"malformed multipart body: {error}") from None
    images, other_files = [], []
    for part in parts:
        if part.name == IMAGE_FIELD and part.is_file:
            images.append(part.value)
        elif part.name == IMAGE_FIELD:
            raise BadRequest(f"the '{IMAGE_FIELD}' part must be a file upload")
        elif part.is_file:
            other_files.append(part.name)
        else:
            add_field(fields, part.name, part.value)
    if not images:
        hint = f"; it has file parts named {', '.join(repr(k) for k in other_files)}" if other_files else ""
        raise InvalidParameter(f"the request holds no images: send each image as a file part named '{IMAGE_FIELD}'{hint}")
    if other_files:
        raise InvalidParameter(f"unexpected file parts {', '.join(repr(k) for k in other_files)}: images go in parts named '{IMAGE_FIELD}'")
    return images


def add_field(fields: dict[str, Any], key: str, value: Any) -> None:
    """Repeated list fields accumulate; any other field given twice is an error, not a silent pick."""
    if key not in fields:
        fields[key] = value
    elif key in LIST_FIELDS:  # from the query string, form fields and JSON alike: "0,1" or [0, 1]
        fields[key] = [*_as_list(fields[key]), *_as_list(value)]
    else:
        raise InvalidParameter(f"parameter {key!r} is given more than once")


def _as_list(value: Any) -> list:
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return list(value) if isinstance(value, list) else [value]


def validation_message(error: ValidationError, params_type: type[BaseModel] | None = None) -> str:
    parts = []
    for item in error.errors():
        where = ".".join(str(p) for p in item["loc"]) or "body"
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "extra_forbidden" and params_type is not None:
            message = f"unknown parameter; this endpoint takes {', '.join(sorted(params_type.model_fields))}"
        parts.append(f"{where}: {message}" if where != "body" else message)
    return "; ".join(parts)
