"""Errors as ``application/problem+json`` (RFC 9457), for every HTTP service.

Handlers raise ``Problem``; ``problem_middleware`` turns it, aiohttp's own HTTP
errors (unknown path, wrong method) and any unexpected exception into a problem
document with a specific ``detail``.
"""

from __future__ import annotations

import logging
from typing import Any

import orjson
from aiohttp import web

log = logging.getLogger(__name__)

PROBLEM_CONTENT_TYPE = "application/problem+json"

_TITLES = {
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    409: "Conflict",
    413: "Content Too Large",
    415: "Unsupported Media Type",
    422: "Unprocessable Content",
    429: "Too Many Requests",
    500: "Internal Server Error",
    503: "Service Unavailable",
}


class Problem(Exception):
    """An error answer: status, a human-readable detail, and optional extra members."""

    def __init__(
        self,
        status: int,
        detail: str,
        *,
        retry_after: int | None = None,
        headers: dict[str, str] | None = None,
        **extra: Any,
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.headers = dict(headers or {})
        if retry_after is not None:
            self.headers["Retry-After"] = str(retry_after)
        self.extra = extra

    def response(self) -> web.Response:
        """The problem document; with ``Connection: close``, the connection is closed after it, by the server."""
        body = {
            "type": "about:blank",
            "title": _TITLES.get(self.status, "Error"),
            "status": self.status,
            "detail": self.detail,
            **self.extra,
        }
        response = web.Response(
            status=self.status,
            body=orjson.dumps(body),
            content_type=PROBLEM_CONTENT_TYPE,
            headers=self.headers,
        )
        if self.headers.get("Connection", "").lower() == "close":
            response.force_close()
        return response


def json_response(body: Any, *, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(
        status=status, body=orjson.dumps(body), content_type="application/json", headers=headers
    )


@web.middleware
async def problem_middleware(request: web.Request, handler: Any) -> web.StreamResponse:
    try:
        return await handler(request)
    except Problem as problem:
        return problem.response()
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        headers = {k: v for k, v in exc.headers.items() if k.lower() in ("allow", "retry-after")}
        if exc.status == 404:
            detail = f"there is nothing at {request.path}"
        elif exc.status == 405:
            detail = f"{request.method} is not allowed on {request.path}; use {headers.get('Allow', '')}"
        else:
            detail = exc.text or exc.reason
        return Problem(exc.status, detail, headers=headers).response()
    except Exception:
        log.exception("unhandled error", extra={"method": request.method, "path": request.path})
        return Problem(500, "internal error; the request was not completed").response()
