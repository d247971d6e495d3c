"""The floor the gateway is measured against: a bare aiohttp handler that only reads,
parses, base64-decodes and hashes an upload body, with the same libraries."""

from __future__ import annotations

import hashlib
import sys

import msgpack
import orjson
import pybase64
from aiohttp import web


async def upload(request: web.Request) -> web.Response:
    body = await request.read()
    if request.content_type == "application/json":
        fields = orjson.loads(body)
        image = pybase64.b64decode(fields["image"], validate=True)
    else:
        fields = msgpack.unpackb(body, raw=False)
        image = fields["image"]
    digest = hashlib.sha256(image).hexdigest()
    return web.json_response({"sha256": digest, "size": len(image)}, status=201)


def main() -> None:
    app = web.Application(client_max_size=64 * 2**20)
    app.router.add_post("/v1/photos", upload)
    web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), access_log=None, print=None)


if __name__ == "__main__":
    main()
