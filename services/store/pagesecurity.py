"""The operator page's assets and the headers a security review expects of the keeper's answers.

The page is plain HTML with its script and style in files of their own, so the
Content-Security-Policy allows nothing inline: an injected ``<script>`` or
``style=`` does nothing, and the page writes every figure with ``textContent``.
"""

from __future__ import annotations

from importlib import resources
from typing import Any

from aiohttp import web

CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
_ALWAYS = {
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
}
_ASSETS = {"/page.js": "text/javascript", "/page.css": "text/css"}


@web.middleware
async def security_headers(request: web.Request, handler: Any) -> web.StreamResponse:
    """Every answer: no sniffing, no framing, no referrer; the API's are never cached, the page has its CSP."""
    try:
        response = await handler(request)
    except web.HTTPException as exc:
        exc.headers.update(_ALWAYS)
        raise
    response.headers.update(_ALWAYS)
    if request.path.startswith("/api/"):
        response.headers["Cache-Control"] = "no-store"
    elif request.path == "/" or request.path in _ASSETS:
        response.headers["Content-Security-Policy"] = CONTENT_SECURITY_POLICY
        response.headers["Cache-Control"] = "no-cache"
    return response


async def asset(request: web.Request) -> web.Response:
    name = request.path.lstrip("/")
    text = resources.files("services.store").joinpath(name).read_text()
    return web.Response(text=text, content_type=_ASSETS[request.path])


def add_asset_routes(app: web.Application) -> None:
    for path in _ASSETS:
        app.router.add_get(path, asset)
