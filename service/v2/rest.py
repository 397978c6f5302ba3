"""The Open Inference Protocol (KServe V2) over REST, as one router: health, server and model metadata, model
readiness and inference, beside the vitserve API and on the same models. Every failure answers `{"error": ...}`
(see errors.py); paths under /v2 that are no endpoint answer 404 (405 for a known path with another method)."""
from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response
from starlette.routing import Match

from ..errors import MethodNotAllowed, NotFound, NotReady
from ..state import ServiceState
from .errors import PREFIX
from .infer import serve_infer, served_model
from .metadata import model_metadata, server_metadata
from .repository import add_repository_routes

MODEL = "/models/{model_name}"
VERSIONED = MODEL + "/versions/{model_version}"
HEALTH_PATHS = {f"{PREFIX}/health/live", f"{PREFIX}/health/ready"}  # probes: open without an API key
TAG = "Open Inference Protocol (V2)"


def v2_router(state: ServiceState) -> APIRouter:
    router = APIRouter(prefix=PREFIX, tags=[TAG])

    @router.api_route("/health/live", methods=["GET", "HEAD"], summary="V2 liveness: 200 while the process serves")
    async def live() -> dict:
        return {"live": True}

    @router.api_route("/health/ready", methods=["GET", "HEAD"], summary="V2 readiness: 200 when every model is loaded")
    async def ready() -> dict:
        if state.not_ready_reasons:
            raise NotReady("; ".join(state.not_ready_reasons))
        return {"ready": True}

    @router.get("", summary="V2 server metadata: name, version, supported extensions")
    async def server() -> dict:
        return server_metadata()

    async def model(request: Request) -> dict:
        model = served_model(state, *_model_of(request))
        return model_metadata(model, state.control.served_versions(model.name))

    async def model_ready(request: Request) -> dict:
        name, version = _model_of(request)
        served_model(state, name, version)  # 404 when unknown, 503 while shutting down
        return {"name": name, "ready": True}

    async def infer(request: Request) -> Response:
        return await serve_infer(request, state, *_model_of(request))

    for path in (MODEL, VERSIONED):
        router.add_api_route(path, model, methods=["GET"], summary="V2 model metadata: versions, platform, inputs, outputs")
        router.add_api_route(path + "/ready", model_ready, methods=["GET"], summary="V2 model readiness")
        router.add_api_route(path + "/infer", infer, methods=["POST"],
                             summary="V2 inference: JSON tensors, or binary tensors after the JSON header "
                                     "(Inference-Header-Content-Length)")

    add_repository_routes(router, state)
    endpoints = list(router.routes)

    @router.api_route("/{path:path}", methods=["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"],
                      include_in_schema=False)
    async def no_endpoint(request: Request, path: str) -> Response:
        allowed = sorted({method for route in endpoints if route.matches(request.scope)[0] == Match.PARTIAL
                          for method in route.methods})
        if allowed:
            raise MethodNotAllowed(f"{request.method} is not allowed on {request.url.path} (allowed: {', '.join(allowed)})",
                                   headers={"Allow": ", ".join(allowed)})
        raise NotFound(f"no V2 endpoint at {request.url.path}")

    return router


def _model_of(request: Request) -> tuple[str, str | None]:
    return request.path_params["model_name"], request.path_params.get("model_version")
