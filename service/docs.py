"""The API's pages: /docs (Swagger UI) and /redoc (ReDoc), with their scripts and styles served by this app.

FastAPI's own pages load them from a public CDN, so they stay blank on a machine or network without internet.
The files come from the `fastapi-offline` package (in the serve extra), which ships exactly these builds.
"""
from __future__ import annotations

from importlib import resources
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
from fastapi.responses import FileResponse, HTMLResponse

from .errors import NotFound

ASSETS_URL = "/docs/assets"
ASSET_TYPES = {  # file name -> media type
    "swagger-ui-bundle.js": "text/javascript; charset=utf-8",
    "swagger-ui.css": "text/css; charset=utf-8",
    "redoc.standalone.js": "text/javascript; charset=utf-8",
    "favicon.png": "image/png",
}
DOCS_URL, REDOC_URL, OAUTH2_REDIRECT_URL = "/docs", "/redoc", "/docs/oauth2-redirect"
# What a browser needs to show the pages; open even when an API key is configured.
DOC_PATHS = frozenset({DOCS_URL, REDOC_URL, OAUTH2_REDIRECT_URL, *(f"{ASSETS_URL}/{name}" for name in ASSET_TYPES)})
# validatorUrl None: Swagger UI would otherwise send the schema to a public validator for its badge.
SWAGGER_UI_PARAMETERS = {"validatorUrl": None, "displayRequestDuration": True}


def asset_dir() -> Path:
    return Path(str(resources.files("fastapi_offline") / "static"))


def install_docs(app: FastAPI) -> None:
    """Add the pages to an app built with docs_url=None and redoc_url=None."""
    directory = asset_dir()
    missing = [name for name in ASSET_TYPES if not (directory / name).is_file()]
    if missing:  # a different fastapi-offline layout: fail at start-up, not with a blank page later
        raise RuntimeError(f"fastapi-offline no longer ships {', '.join(missing)} in {directory}")

    def url(request: Request, path: str) -> str:
        return request.scope.get("root_path", "") + path

    @app.get(DOCS_URL, include_in_schema=False)
    async def swagger_ui(request: Request) -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url=url(request, app.openapi_url), title=f"{app.title} - Swagger UI",
            swagger_js_url=url(request, f"{ASSETS_URL}/swagger-ui-bundle.js"),
            swagger_css_url=url(request, f"{ASSETS_URL}/swagger-ui.css"),
            swagger_favicon_url=url(request, f"{ASSETS_URL}/favicon.png"),
            oauth2_redirect_url=url(request, OAUTH2_REDIRECT_URL),
            swagger_ui_parameters={**(app.swagger_ui_parameters or {}), **SWAGGER_UI_PARAMETERS})

    @app.get(OAUTH2_REDIRECT_URL, include_in_schema=False)
    async def swagger_ui_oauth2_redirect() -> HTMLResponse:
        return get_swagger_ui_oauth2_redirect_html()

    @app.get(REDOC_URL, include_in_schema=False)
    async def redoc(request: Request) -> HTMLResponse:
        return get_redoc_html(openapi_url=url(request, app.openapi_url), title=f"{app.title} - ReDoc",
                              redoc_js_url=url(request, f"{ASSETS_URL}/redoc.standalone.js"),
                              redoc_favicon_url=url(request, f"{ASSETS_URL}/favicon.png"), with_google_fonts=False)

    @app.get(ASSETS_URL + "/{name}", include_in_schema=False)
    async def asset(name: str) -> FileResponse:
        if name not in ASSET_TYPES:
            raise NotFound(f"no documentation asset named {name!r}")
        return FileResponse(directory / name, media_type=ASSET_TYPES[name], headers={"Cache-Control": "public, max-age=86400"})
