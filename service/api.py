"""The FastAPI app: routes, input parsing, and the one error envelope. Built by `create_app(settings)`."""
from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from . import schemas
from .errors import (
    BadRequest, InvalidParameter, MethodNotAllowed, NotFound, PayloadTooLarge, ServiceError, UnsupportedMediaType,
)
from .images import decode_base64_image, encode_png, prepare_image
from .metrics import Metrics
from .middleware import ApiKeyMiddleware, RequestContextMiddleware
from .runtime import RuntimeStartError, cuda_available
from .reconstruction import choose_mask, full_reconstruction, masked_input
from .settings import Settings
from .state import ServedModel, ServiceState

OPEN_PATHS = {"/healthz", "/readyz", "/metrics", "/docs", "/openapi.json", "/docs/oauth2-redirect"}
ERRORS = {"model": schemas.ErrorResponse}
ERROR_RESPONSES = {code: ERRORS for code in (400, 401, 404, 413, 415, 422, 503, 504)}


def create_app(settings: Settings) -> FastAPI:
    metrics = Metrics()
    state = ServiceState(settings, metrics)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        if settings.device == "cuda" and not cuda_available():  # refuse to start rather than serve on the wrong device
            raise RuntimeStartError("--device cuda, but this onnxruntime has no CUDA provider (install the gpu extra: onnxruntime-gpu)")
        loading = asyncio.create_task(state.load())  # /healthz answers while models load; /readyz says why not ready
        yield
        loading.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await loading
        await state.drain()

    app = FastAPI(title="vitserve", version="0.1.0", lifespan=lifespan,
                  description="Vision Transformer inference: classification, embeddings and MAE reconstruction.")
    app.state.service = state
    if settings.api_key is not None:  # added first: runs inside the request context (counted, logged, X-Request-ID)
        app.add_middleware(ApiKeyMiddleware, api_key=settings.api_key.get_secret_value(), open_paths=OPEN_PATHS)
    app.add_middleware(RequestContextMiddleware, metrics=metrics, max_body_bytes=settings.max_body_bytes)
    _install_error_handlers(app)

    @app.api_route("/healthz", methods=["GET", "HEAD"], summary="Liveness: 200 while the process serves")
    async def healthz() -> dict:
        return {"status": "alive"}

    @app.api_route("/readyz", methods=["GET", "HEAD"], summary="Readiness: 200 when every model is loaded and warmed")
    async def readyz() -> JSONResponse:
        reasons = (["the server is shutting down"] if state.draining else []) + state.problems
        body = {"status": "ready" if not reasons else "not_ready", "reasons": reasons, "models": sorted(state.models)}
        return JSONResponse(body, status_code=200 if not reasons else 503)

    @app.get("/metrics", summary="Prometheus metrics")
    async def metrics_endpoint() -> Response:
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/models", summary="Loaded models with their provider, variant and batching settings")
    async def models() -> dict:
        return {"models": [_describe(m, settings) for m in sorted(state.models.values(), key=lambda m: m.name)]}

    @app.post("/classify", response_model=schemas.ClassifyResponse, responses=ERROR_RESPONSES, summary="Top-k labels per image")
    async def classify(request: Request) -> schemas.ClassifyResponse:
        images, params = await _read_request(request, state, schemas.ClassifyParams)
        model = state.model_for("classify", params.model)
        outputs = await _infer(request, state, model, [{"images": p} for p in await _prepare(state, model, images)], params.timeout_ms)
        labels = model.labels
        results = []
        for out in outputs:
            probs = _softmax(out["logits"].astype(np.float64))
            top = np.argsort(-probs, kind="stable")[: params.top_k]
            results.append({"predictions": [{"label": labels[i], "index": int(i), "score": float(probs[i])} for i in top]})
        return _json(schemas.ClassifyResponse(model=model.name, version=model.loaded.entry.version, results=results))

    @app.post("/embed", response_model=schemas.EmbedResponse, responses=ERROR_RESPONSES, summary="One embedding vector per image")
    async def embed(request: Request) -> schemas.EmbedResponse:
        images, params = await _read_request(request, state, schemas.EmbedParams)
        model = state.model_for("embed", params.model)
        outputs = await _infer(request, state, model, [{"images": p} for p in await _prepare(state, model, images)], params.timeout_ms)
        vectors = np.stack([out["embedding"] for out in outputs]).astype(np.float32)
        if params.normalize:
            vectors /= np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
        info = model.metadata["embedding"]
        return _json(schemas.EmbedResponse(model=model.name, version=model.loaded.entry.version, dim=info["dim"],
                                           pooling=info["pooling"], normalized=params.normalize, embeddings=vectors.tolist()))

    @app.post("/reconstruct", response_model=schemas.ReconstructResponse, responses=ERROR_RESPONSES,
              summary="MAE reconstruction of masked patches (Accept: image/png for the composite of one image)")
    async def reconstruct(request: Request):
        images, params = await _read_request(request, state, schemas.ReconstructParams)
        model = state.model_for("reconstruct", params.model)
        meta = model.metadata
        noise, keep = choose_mask(len(images), meta["num_patches"], mask_ratio=params.mask_ratio, seed=params.seed,
                                  visible=params.visible, masked=params.masked)
        pixels = await _prepare(state, model, images)
        items = [{"images": p, "noise": n, "keep": keep} for p, n in zip(pixels, noise)]
        outputs = await _infer(request, state, model, items, params.timeout_ms, batch_key=keep)
        wants_png = "image/png" in request.headers.get("accept", "") and len(images) == 1
        if wants_png:
            png = await asyncio.get_running_loop().run_in_executor(state.decode_pool, encode_png, outputs[0]["reconstruction"])
            return Response(png, media_type="image/png")
        results = await asyncio.get_running_loop().run_in_executor(state.decode_pool, _reconstruction_results, pixels, outputs, meta)
        return _json(schemas.ReconstructResponse(model=model.name, version=model.loaded.entry.version, grid=meta["grid"],
                                                 patch_size=meta["patch_size"], visible_patches=keep, results=results))

    return app


# --- input -------------------------------------------------------------------------------------------------

async def _read_request(request: Request, state: ServiceState, params_type: type[BaseModel]) -> tuple[list[bytes], Any]:
    """Image bytes and validated parameters from multipart/form-data (`file` parts) or JSON (`images`: base64)."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    limit = state.settings.max_images_per_request
    fields: dict[str, Any] = {}
    for key, value in request.query_params.multi_items():
        _add_field(fields, key, value)
    if content_type == "multipart/form-data":
        try:
            form = await request.form(max_files=limit, max_fields=64)
        except StarletteHTTPException as error:
            if "Too many files" in str(error.detail):
                raise PayloadTooLarge(f"more than {limit} images in one request; the limit is {limit}") from None
            raise BadRequest(f"malformed multipart body: {error.detail}") from None
        images = []
        for key, value in form.multi_items():
            if key == "file" and hasattr(value, "read"):
                images.append(await value.read())
            elif key == "file":
                raise BadRequest("the 'file' part must be a file upload")
            else:
                _add_field(fields, key, value)
    elif content_type == "application/json":
        try:
            body = schemas.JsonImages.model_validate_json(await request.body())
        except ValidationError as error:
            raise InvalidParameter(_validation_message(error)) from None
        images = list(body.images)  # still base64: decoded in the decode threads, off the event loop
        for key, value in (body.model_extra or {}).items():
            _add_field(fields, key, value)
    else:
        raise UnsupportedMediaType(f"send images as multipart/form-data ('file' parts) or application/json ('images': base64); got {content_type or 'no content type'}")
    if not images:
        raise InvalidParameter("the request holds no images ('file' parts or 'images' list)")
    if len(images) > limit:
        raise PayloadTooLarge(f"{len(images)} images in one request; the limit is {limit}")
    try:
        params = params_type.model_validate(fields)
    except ValidationError as error:
        raise InvalidParameter(_validation_message(error)) from None
    return images, params


LIST_FIELDS = {"visible", "masked"}


def _add_field(fields: dict[str, Any], key: str, value: Any) -> None:
    """Repeated list fields (visible=0&visible=3) accumulate; any other field given twice is an error, not a silent pick."""
    if key not in fields:
        fields[key] = value
    elif key in LIST_FIELDS:
        fields[key] = f"{fields[key]},{value}" if isinstance(value, str) and isinstance(fields[key], str) else value
    else:
        raise InvalidParameter(f"parameter {key!r} is given more than once")


def _validation_message(error: ValidationError) -> str:
    parts = []
    for item in error.errors():
        where = ".".join(str(p) for p in item["loc"]) or "body"
        parts.append(f"{where}: {item['msg']}")
    return "; ".join(parts)


def _decode_and_prepare(data: bytes | str, model: ServedModel, limits, index: int) -> np.ndarray:
    raw = decode_base64_image(data, index=index) if isinstance(data, str) else data
    return prepare_image(raw, model.resize, limits, index=index)


async def _prepare(state: ServiceState, model: ServedModel, images: list[bytes | str]) -> list[np.ndarray]:
    """Decode and resize every image in the decode threads; the lowest-index failure is reported and nothing is inferred.

    Refuses at once, before any decoding, when the model's queue cannot take this many images now."""
    model.batcher.check_capacity(len(images))
    loop = asyncio.get_running_loop()
    jobs = [loop.run_in_executor(state.decode_pool, functools.partial(_decode_and_prepare, data, model, state.limits, i))
            for i, data in enumerate(images)]
    results = await asyncio.gather(*jobs, return_exceptions=True)
    for result in results:
        if isinstance(result, BaseException):
            raise result
    return results


async def _infer(request: Request, state: ServiceState, model: ServedModel, items: list[dict], timeout_ms: int | None,
                 batch_key: Any = None) -> list[dict[str, np.ndarray]]:
    budget_ms = min(timeout_ms or state.settings.timeout_ms, state.settings.timeout_ms)
    deadline = request.scope["state"]["arrived"] + budget_ms / 1000
    return await model.batcher.submit(items, deadline=deadline, is_disconnected=request.is_disconnected, batch_key=batch_key)


# --- output ------------------------------------------------------------------------------------------------

def _json(body: BaseModel) -> Response:
    """The response, serialised once: FastAPI would validate a returned model against `response_model` again
    (the declared models still document the endpoints)."""
    return Response(body.model_dump_json(), media_type="application/json")


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max())
    return shifted / shifted.sum()


def _reconstruction_results(pixels: list[np.ndarray], outputs: list[dict], meta: dict) -> list[dict]:
    patch, norm = meta["patch_size"], meta["normalization"]
    norm_pix = meta["reconstruction"]["norm_pix_loss"]
    results = []
    for image, out in zip(pixels, outputs):
        mask = out["mask"]
        full = full_reconstruction(image, out["patches"], patch, norm["mean"], norm["std"], norm_pix)
        results.append({
            "masked_png": _b64(encode_png(masked_input(image, mask, patch))),
            "reconstruction_png": _b64(encode_png(full)),
            "composite_png": _b64(encode_png(out["reconstruction"])),
            "mask": [int(v > 0.5) for v in mask],
            "mse": float(out["loss"]),
        })
    return results


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _describe(model: ServedModel, settings: Settings) -> dict:
    meta, loaded = model.metadata, model.loaded
    return {
        "name": model.name, "version": loaded.entry.version, "task": meta["task"],
        "inputs": meta["inputs"], "outputs": meta["outputs"], "image_size": meta["image"]["size"],
        "labels": len(meta.get("labels") or []), "provider": loaded.provider, "variant": loaded.variant,
        "batching": {"max_batch_size": model.max_batch_size, "max_delay_ms": settings.max_delay_ms,
                     "max_queue_images": settings.max_queue_images, "instances": model.batcher.instances},
    }


# --- errors ------------------------------------------------------------------------------------------------

def _error_response(error: ServiceError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers)


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ServiceError)
    async def service_error(request: Request, error: ServiceError) -> JSONResponse:
        return _error_response(error)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
        return _error_response(InvalidParameter(str(error.errors())))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        kind = {404: NotFound, 405: MethodNotAllowed}.get(error.status_code, BadRequest)
        wrapped = kind(str(error.detail), headers=dict(error.headers or {}))
        wrapped.status = error.status_code
        return _error_response(wrapped)
