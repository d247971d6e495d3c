"""The floors the gateway is measured against: a bare aiohttp handler that only reads,
parses, base64-decodes and hashes an upload body, with the same libraries; with
``--store``, one that also writes the image to the local store as the gateway does
(the part of the gateway's cost any gateway that keeps the photo pays).

    python -m bench.floor PORT [--store]   (the store from the PHOTOFERRY_STORE_* variables)
"""

from __future__ import annotations

import argparse
import hashlib
import os
import uuid

import msgpack
import orjson
import pybase64
from aiohttp import web

from services.common.config import StoreSettings
from services.common.localstore import LocalStore

STORE = web.AppKey("store", LocalStore)


async def upload(request: web.Request) -> web.Response:
    body = await request.read()
    if request.content_type == "application/json":
        fields = orjson.loads(body)
        image = pybase64.b64decode(fields["image"], validate=True)
    else:
        fields = msgpack.unpackb(body, raw=False)
        image = fields["image"]
    digest = hashlib.sha256(image).hexdigest()
    if STORE in request.app:
        await request.app[STORE].create(f"floor/{uuid.uuid4().hex}", image, content_type="image/jpeg",
                                        metadata={"sha256": digest})
    return web.json_response({"sha256": digest, "size": len(image)}, status=201)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("port", type=int)
    parser.add_argument("--store", action="store_true", help="also write each image to the local store")
    args = parser.parse_args()
    app = web.Application(client_max_size=64 * 2**20)
    if args.store:
        app[STORE] = LocalStore(StoreSettings.from_env(os.environ))
    app.router.add_post("/v1/photos", upload)
    web.run_app(app, host="127.0.0.1", port=args.port, access_log=None, print=None)


if __name__ == "__main__":
    main()
