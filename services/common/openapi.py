"""The contract a service serves at ``GET /openapi.json``, kept as ``openapi.yaml`` beside its code.

The tests fuzz each service against the very document it serves (schemathesis).
"""

from __future__ import annotations

from importlib import resources
from typing import Any

import orjson
import yaml
from aiohttp import web


def openapi_document(package: str) -> bytes:
    """The ``openapi.yaml`` of ``package``, as the JSON the service serves."""
    return orjson.dumps(yaml.safe_load(resources.files(package).joinpath("openapi.yaml").read_text()))


def openapi_handler(document: bytes) -> Any:
    """``GET /openapi.json``: the contract the service implements."""

    async def handler(request: web.Request) -> web.Response:
        return web.Response(body=document, content_type="application/json")

    return handler
