"""The web page at /ui/: try the served models in a browser (classify, attention maps, MAE in-painting with a
clickable mask, embedding similarity). Plain HTML, CSS and JavaScript shipped inside this package (service/ui/): no
build step, no CDN, so it works offline. The page is an ordinary client of the public API: every request it makes
passes the same validation and limits as any other.
"""
from __future__ import annotations

from importlib import resources
from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse, RedirectResponse

from .errors import NotFound

PAGE_URL = "/ui/"
FILES = {  # file name -> media type; the page is index.html
    "index.html": "text/html; charset=utf-8",
    "app.js": "text/javascript; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
}
# What a browser needs to show the page: open even when an API key is configured (the page asks for the key).
PAGE_PATHS = frozenset({"/", "/ui", PAGE_URL, *(f"{PAGE_URL}{name}" for name in FILES)})
# The page's own files, and the images it makes from the user's files (blob:) and the API's PNGs (data:), nothing
# else: a script that found its way into the page could neither run inline nor load from elsewhere.
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
                               "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-cache",  # a new version of the server serves its own page at once
}


def page_dir() -> Path:
    return Path(str(resources.files("service") / "ui"))


def install_web_page(app: FastAPI) -> None:
    """Serve the page at /ui/; / and /ui redirect there (relative redirects, so the page also works under a prefix)."""
    directory = page_dir()
    missing = [name for name in FILES if not (directory / name).is_file()]
    if missing:  # an install without the package data: fail at start-up, not with a blank page later
        raise RuntimeError(f"the web page's files {', '.join(missing)} are missing from {directory}")

    @app.get("/", include_in_schema=False)
    async def root() -> RedirectResponse:
        return RedirectResponse("ui/", status_code=307)

    @app.get("/ui", include_in_schema=False)
    async def page_without_slash() -> RedirectResponse:
        return RedirectResponse("ui/", status_code=307)

    @app.get(PAGE_URL, include_in_schema=False)
    async def page() -> FileResponse:
        return _file(directory, "index.html")

    @app.get(PAGE_URL + "{name}", include_in_schema=False)
    async def page_file(name: str) -> FileResponse:
        if name not in FILES:
            raise NotFound(f"the web page has no file named {name!r}")
        return _file(directory, name)


def _file(directory: Path, name: str) -> FileResponse:
    return FileResponse(directory / name, media_type=FILES[name], headers=SECURITY_HEADERS)
