"""The FastAPI app: wiring of routes to the task handlers, and the one error envelope. Built by `create_app(settings)`."""
from __future__ import annotations

import asyncio
import contextlib

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from . import schemas
from .docs import DOC_PATHS, install_docs
from .errors import BadRequest, InvalidParameter, MethodNotAllowed, NotFound, ServiceError
from .inference import serve_task
from .metrics import Metrics
from .middleware import ApiKeyMiddleware, RequestContextMiddleware
from .openapi import METRICS_RESPONSE, PNG_RESPONSE, install_openapi, task_operation
from .runtime import RuntimeStartError, cuda_available
from .settings import Settings
from .shedding import EarlyRefusals
from .state import ServedModel, ServiceState
from .task_routes import TaskRouteShortcut
from .tasks import HANDLERS
from .v2 import HEALTH_PATHS as V2_HEALTH_PATHS, v2_router
from .v2.errors import is_v2_path, v2_error_response
from .web_page import PAGE_PATHS, install_web_page

OPEN_PATHS = {"/healthz", "/readyz", "/metrics", "/openapi.json", *DOC_PATHS, *V2_HEALTH_PATHS, *PAGE_PATHS}
ERRORS = {"model": schemas.ErrorResponse}
ERROR_RESPONSES = {code: ERRORS for code in (400, 401, 404, 406, 413, 415, 422, 503, 504)}


def create_app(settings: Settings) -> FastAPI:
    metrics = Metrics()
    state = ServiceState(settings, metrics)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        if settings.device == "cuda" and not cuda_available():  # refuse to start rather than serve on the wrong device
            raise RuntimeStartError("--device cuda, but this onnxruntime has no CUDA provider (install the gpu extra: onnxruntime-gpu)")
        grpc_server = None
        if settings.grpc_port:  # imported only then: without the port, grpc need not be installed
            from .v2.grpc_service import start_grpc_server
            grpc_server = await start_grpc_server(state)
        loading = asyncio.create_task(state.load())  # /healthz answers while models load; /readyz says why not ready
        yield
        if grpc_server is not None:  # its calls in flight finish before the batchers drain
            await grpc_server.stop(settings.drain_timeout_s)
        loading.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await loading
        await state.drain()

    app = FastAPI(title="vitserve", version="0.1.0", lifespan=lifespan, docs_url=None, redoc_url=None,
                  description="Vision Transformer inference: classification, embeddings and MAE reconstruction.")
    app.state.service = state
    metrics.ready.set_function(lambda: 1.0 if state.ready else 0.0)  # read at each scrape
    # Requests refused before their body is read never reach the app: the server's protocol asks this first.
    app.state.refuse_early = EarlyRefusals(state, metrics, tasks=list(HANDLERS), api_key=(
        settings.api_key.get_secret_value() if settings.api_key is not None else None))
    # Added first, so innermost: task requests are still counted, logged and key-checked (service.task_routes).
    app.add_middleware(TaskRouteShortcut, router=app.router, paths={f"/{task}" for task in HANDLERS},
                       respond_to_error=_error_response)
    if settings.api_key is not None:  # added before the request context: runs inside it (counted, logged, X-Request-ID)
        app.add_middleware(ApiKeyMiddleware, api_key=settings.api_key.get_secret_value(), open_paths=OPEN_PATHS)
    app.add_middleware(RequestContextMiddleware, metrics=metrics, max_body_bytes=settings.max_body_bytes)
    _install_error_handlers(app)
    install_docs(app)  # /docs and /redoc with their assets served from the package, not a CDN
    install_openapi(app, OPEN_PATHS, api_key=settings.api_key is not None)
    install_web_page(app)  # /ui/: try the models in a browser, through the same endpoints as any client

    @app.api_route("/healthz", methods=["GET", "HEAD"], summary="Liveness: 200 while the process serves")
    async def healthz() -> dict:
        return {"status": "alive"}

    @app.api_route("/readyz", methods=["GET", "HEAD"], summary="Readiness: 200 when every model is loaded and warmed",
                   responses={503: {"description": "Not ready: loading, a model failed to load, or draining (see `reasons`)"}})
    async def readyz() -> JSONResponse:
        reasons = state.not_ready_reasons
        body = {"status": "ready" if not reasons else "not_ready", "reasons": reasons, "models": sorted(state.models)}
        return JSONResponse(body, status_code=200 if not reasons else 503)

    @app.get("/metrics", summary="Prometheus metrics", response_class=PlainTextResponse, responses={200: METRICS_RESPONSE})
    async def metrics_endpoint() -> Response:
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/models", summary="Served models (newest served version of each) with their labels, provider, variant, "
                                "batching settings and the state of every version; models that serve nothing, with why")
    async def models() -> dict:
        index = state.control.index()
        served = state.models
        return {"models": [describe_model(m, settings, _versions_of(index, m.name)) for m in served.values()],
                "unavailable": [{"name": name, "reason": state.control.slots[name].problem or "not loaded",
                                 "versions": _versions_of(index, name)}
                                for name in sorted(state.control.slots) if name not in served]}

    @app.post("/classify", response_model=schemas.ClassifyResponse, responses=ERROR_RESPONSES, summary="Top-k labels per image",
              openapi_extra=task_operation(HANDLERS["classify"], settings.max_images_per_request))
    async def classify(request: Request) -> Response:
        return await serve_task(request, state, HANDLERS["classify"])

    @app.post("/embed", response_model=schemas.EmbedResponse, responses=ERROR_RESPONSES, summary="One embedding vector per image",
              openapi_extra=task_operation(HANDLERS["embed"], settings.max_images_per_request))
    async def embed(request: Request) -> Response:
        return await serve_task(request, state, HANDLERS["embed"])

    @app.post("/reconstruct", response_model=schemas.ReconstructResponse, responses={**ERROR_RESPONSES, 200: PNG_RESPONSE},
              summary="MAE reconstruction of masked patches (Accept: image/png for the composite of one image)",
              openapi_extra=task_operation(HANDLERS["reconstruct"], settings.max_images_per_request))
    async def reconstruct(request: Request) -> Response:
        return await serve_task(request, state, HANDLERS["reconstruct"])

    app.include_router(v2_router(state))  # the Open Inference Protocol (KServe V2) on the same models
    return app


def _versions_of(index: list[dict], name: str) -> list[dict]:
    return [{"version": int(row["version"]), "state": row["state"], "reason": row["reason"]}
            for row in index if row["name"] == name]


def describe_model(model: ServedModel, settings: Settings, versions: list[dict]) -> dict:
    meta, loaded = model.metadata, model.loaded
    return {
        "name": model.name, "version": model.version, "versions": versions, "task": meta.task,
        "inputs": [t.to_json() for t in meta.inputs], "outputs": [t.to_json() for t in meta.outputs],
        "image_size": list(meta.image.size),
        "labels": list(meta.classification.labels) if meta.classification else None,
        "attention": meta.attention is not None,  # answers /classify?attention=true
        "runtime": loaded.runtime, "provider": loaded.provider, "variant": loaded.variant, "precision": loaded.precision,
        "batching": {"max_batch_size": model.max_batch_size, "max_delay_ms": settings.max_delay_ms,
                     "max_queue_images": settings.max_queue_images,
                     "max_queue_delay_ms": settings.max_queue_delay_ms, "instances": model.batcher.instances,
                     "queue_delay_bound_ms": model.batcher.queue_delay_bound_ms},  # in force now (auto follows batches)
    }


# --- errors ------------------------------------------------------------------------------------------------

def _error_response(request: Request, error: ServiceError) -> JSONResponse:
    """Each protocol's error shape: the V2 body under /v2, the vitserve envelope elsewhere."""
    if is_v2_path(request.url.path):
        return v2_error_response(error)
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers)


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ServiceError)
    async def service_error(request: Request, error: ServiceError) -> JSONResponse:
        return _error_response(request, error)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
        return _error_response(request, InvalidParameter(str(error.errors())))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        kind = {404: NotFound, 405: MethodNotAllowed}.get(error.status_code, BadRequest)
        wrapped = kind(str(error.detail), headers=dict(error.headers or {}))
        wrapped.status = error.status_code
        return _error_response(request, wrapped)
