"""What tests share: a Site (vhost + buckets), photo bodies, a queue drainer."""

from __future__ import annotations

import asyncio
import base64
import os
import socket
import urllib.parse
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aio_pika
import msgpack
import orjson
import requests
from botocore.client import BaseClient

from devtools.servers import RabbitNode, S3Server, wait_until
from services.common import topology
from services.common.broker import Broker
from services.common.config import StoreSettings
from services.common.localstore import LocalStore
from services.common.s3 import ensure_bucket, s3_client
from services.common.shipping import ShippedNotice, ShippingControl, write_control
from services.common.tokens import device_token

DEVICE_SECRET = "test-device-secret-6d1f0c2a"
ADMIN_TOKEN = "test-admin-token-4b7e91"
FORMATS = ("json", "msgpack")
CONTENT_TYPES = {"json": "application/json", "msgpack": "application/msgpack"}


@dataclass
class Site:
    """An isolated slice of the session's servers: one vhost, one local and one remote bucket.

    The local store is the session's S3-protocol server, or the embedded store in a
    folder of its own when ``store_root`` is set.
    """

    name: str
    rabbit: RabbitNode
    amqp_url: str
    local: S3Server
    remote: S3Server
    store_bucket: str
    remote_bucket: str
    store_root: Path | None = None

    @property
    def store_endpoint(self) -> str:
        return f"file://{self.store_root}" if self.store_root is not None else self.local.endpoint

    def local_client(self) -> BaseClient:
        assert self.store_root is None, "the embedded store has no S3 client: use local_store()"
        return s3_client(self.local.endpoint, access_key=self.local.access_key,
                         secret_key=self.local.secret_key, region="us-east-1")

    def local_store(self, bucket: str | None = None) -> LocalStore:
        return LocalStore(store_settings(self, bucket))

    def put_local(self, key: str, body: bytes, *, content_type: str = "image/jpeg",
                  metadata: dict[str, str] | None = None, bucket: str | None = None) -> None:
        """Store an object as a gateway does (create-if-absent), whichever the store."""
        assert asyncio.run(self.local_store(bucket).create(key, body, content_type=content_type,
                                                           metadata=metadata or {}))

    def ensure_local_bucket(self, bucket: str) -> None:
        asyncio.run(self.local_store(bucket).ensure_bucket())

    def remote_client(self) -> BaseClient:
        return s3_client(self.remote.endpoint, access_key=self.remote.access_key,
                         secret_key=self.remote.secret_key, region="us-east-1")

    def create_buckets(self) -> None:
        self.ensure_local_bucket(self.store_bucket)
        ensure_bucket(self.remote_client(), self.remote_bucket)

    def env(self, **overrides: str) -> dict[str, str]:
        env = {
            **os.environ,
            "PHOTOFERRY_AMQP_URL": self.amqp_url,
            "PHOTOFERRY_STORE_ENDPOINT": self.store_endpoint,
            "PHOTOFERRY_STORE_ACCESS_KEY": self.local.access_key,
            "PHOTOFERRY_STORE_SECRET_KEY": self.local.secret_key,
            "PHOTOFERRY_STORE_BUCKET": self.store_bucket,
            "PHOTOFERRY_S3_ENDPOINT": self.remote.endpoint,
            "PHOTOFERRY_S3_BUCKET": self.remote_bucket,
            "PHOTOFERRY_S3_PREFIX": "site-test/",
            "AWS_ACCESS_KEY_ID": self.remote.access_key,
            "AWS_SECRET_ACCESS_KEY": self.remote.secret_key,
            "AWS_DEFAULT_REGION": "us-east-1",
            "PHOTOFERRY_DEVICE_SECRET": DEVICE_SECRET,
            "PHOTOFERRY_ADMIN_TOKEN": ADMIN_TOKEN,
            "PHOTOFERRY_LOG_FORMAT": "json",
            "PHOTOFERRY_LOG_LEVEL": "info",
            "OTEL_SDK_DISABLED": "false",
            # Tests send dozens of photos from one device within seconds, which a site's device never
            # does; the per-device limits' own tests (test_gateway_fairness.py) use the defaults.
            "PHOTOFERRY_DEVICE_BURST": "1000",
        }
        env.update(overrides)
        return env

    def local_keys(self, prefix: str = "photos/", bucket: str | None = None) -> list[str]:
        """Keys that start with ``prefix`` (the store lists whole path segments: its folder is listed)."""
        folder = prefix.rpartition("/")[0] + "/" if "/" in prefix else ""

        async def listing() -> list[str]:
            return [item["path"] async for page in self.local_store(bucket).list(folder) for item in page
                    if item["path"].startswith(prefix)]

        return asyncio.run(listing())

    def drain(self, *queues: str) -> list[aio_pika.abc.AbstractIncomingMessage]:
        """Take every message now on ``queues`` (both shipping queues, fresh and backlog, by default)."""
        return [message for queue in (queues or (topology.FRESH_QUEUE, topology.SHIP_QUEUE))
                for message in drain_queue(self.amqp_url, queue)]

    def queue_figure(self, queue: str, figure: str = "messages") -> int:
        """One figure of a queue (``messages``, ``messages_ready``, ...), once the broker has computed it."""
        found: dict[str, Any] = {}

        def computed() -> bool:
            found.update(self.rabbit.management("GET", f"queues/{self.name}/{queue}"))  # type: ignore[arg-type]
            return figure in found

        wait_until(computed, timeout=10, what=f"the figures of {queue}")
        return int(found[figure])

    def shipping_messages(self, figure: str = "messages") -> int:
        """Messages on both shipping queues (``messages``, ``messages_ready``, ``messages_unacknowledged``)."""
        return sum(int(self.rabbit.management("GET", f"queues/{self.name}/{queue}").get(figure, 0))  # type: ignore[union-attr]
                   for queue in (topology.FRESH_QUEUE, topology.SHIP_QUEUE))


def drain_queue(amqp_url: str, queue: str) -> list[aio_pika.abc.AbstractIncomingMessage]:
    """Take (and ack) every message now on ``queue``; return them."""

    async def take() -> list[aio_pika.abc.AbstractIncomingMessage]:
        connection = await aio_pika.connect(amqp_url, timeout=10)
        async with connection:
            channel = await connection.channel()
            source = await channel.get_queue(queue, ensure=False)
            taken = []
            while (message := await source.get(no_ack=False, fail=False, timeout=5)) is not None:
                await message.ack()
                taken.append(message)
            return taken

    return asyncio.run(take())


def listen_shipped(site: Site) -> str:
    """A queue of the site's own that keeps every shipped notice from now on (the store keeper's
    source for the backlog and the classes); returns its name for ``shipped_classes``."""
    name = f"test-shipped-{uuid.uuid4().hex[:8]}"
    vhost = urllib.parse.quote(site.name, safe="")
    site.rabbit.management("PUT", f"queues/{vhost}/{name}", {"durable": False, "auto_delete": False})
    site.rabbit.management("POST", f"bindings/{vhost}/e/{topology.SHIPPED_EXCHANGE}/q/{name}", {"routing_key": ""})
    return name


def shipped_classes(site: Site, queue: str, found: dict[str, str] | None = None) -> dict[str, str]:
    """Which class (fresh, backlog) shipped each photo, by the shippers' notices taken from ``queue``
    (added to ``found``: the notices are taken off the queue as they are read)."""
    found = {} if found is None else found
    for message in drain_queue(site.amqp_url, queue):
        notice = ShippedNotice.from_json(message.body)
        assert notice is not None, message.body
        found.update({photo_id: kind for photo_id, _size, _lag, kind in notice.photos})
    return found


def jpeg(size: int = 4096) -> bytes:
    """Bytes that start like a JPEG (the gateway never decodes pixels); unique per call."""
    return b"\xff\xd8\xff\xe0\x00\x10JFIF\x00" + os.urandom(max(0, size - 11))


def png(size: int = 4096) -> bytes:
    return b"\x89PNG\r\n\x1a\n" + os.urandom(max(0, size - 8))


def webp(size: int = 4096) -> bytes:
    return b"RIFF" + (size - 8).to_bytes(4, "little") + b"WEBPVP8 " + os.urandom(max(0, size - 16))


def now_rfc3339() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def photo(device_id: str = "cam-001", image: bytes | None = None, **fields: Any) -> dict[str, Any]:
    """Upload fields with the image as bytes (encoded per format by ``encode``)."""
    return {"device_id": device_id, "captured_at": now_rfc3339(),
            "image": jpeg() if image is None else image, **fields}


def encode(fields: dict[str, Any], fmt: str) -> bytes:
    """Encode upload fields: JSON carries bytes as base64 text, msgpack as bin."""
    if fmt == "json":
        return orjson.dumps({k: base64.b64encode(v).decode() if isinstance(v, bytes) else v
                             for k, v in fields.items()})
    return msgpack.packb(fields, use_bin_type=True)


def auth(device_id: str, secret: str = DEVICE_SECRET) -> dict[str, str]:
    return {"Authorization": f"Bearer {device_token(secret, device_id)}"}


def upload(url: str, fields: dict[str, Any], fmt: str = "json", *, token_for: str | None = None,
           headers: dict[str, str] | None = None, body: bytes | None = None) -> requests.Response:
    """POST an upload as a device would; the token is the device_id's unless told otherwise."""
    device = token_for if token_for is not None else str(fields.get("device_id", "cam-001"))
    sent_headers = {"Content-Type": CONTENT_TYPES[fmt], **auth(device), **(headers or {})}
    return requests.post(f"{url}/v1/photos", data=encode(fields, fmt) if body is None else body,
                         headers=sent_headers, timeout=30)


def assert_problem(response: requests.Response, status: int, *words: str) -> dict[str, Any]:
    """Check an error answer: its status, problem+json, and words its detail must contain."""
    assert response.status_code == status, (response.status_code, response.text)
    assert response.headers["Content-Type"].startswith("application/problem+json"), response.headers
    problem = response.json()
    assert problem["status"] == status
    assert problem["detail"]
    for word in words:
        assert word.lower() in problem["detail"].lower(), (word, problem["detail"])
    return problem


def raw_request_start(port: int, head: str, body_part: bytes = b"") -> socket.socket:
    """Send a request's head (and some body) and keep the socket open, as a slow device would."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    sock.sendall(head.encode() + body_part)
    return sock


def read_status(sock: socket.socket) -> int:
    """Read an HTTP response's status code from a raw socket."""
    data = b""
    while b"\r\n" not in data:
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
    return int(data.split(b" ", 2)[1])


def metric_value(url: str, name: str, **labels: str) -> float:
    """Read one sample from a service's /metrics (0 when absent)."""
    text = requests.get(f"{url}/metrics", timeout=10).text
    for line in text.splitlines():
        if line.startswith("#") or not line.startswith(name):
            continue
        series, _, value = line.rpartition(" ")
        if series.split("{", 1)[0] != name:
            continue
        if all(f'{k}="{v}"' in series for k, v in labels.items()):
            return float(value)
    return 0.0


def store_settings(site: Site, bucket: str | None = None) -> StoreSettings:
    return StoreSettings(endpoint=site.store_endpoint, access_key=site.local.access_key,
                         secret_key=site.local.secret_key, bucket=bucket or site.store_bucket, region="us-east-1",
                         timeout=10)


def set_control(site: Site, control: ShippingControl) -> None:
    """Change the operator's shipping settings as the store keeper does (store, then broadcast)."""

    async def change() -> None:
        broker = Broker(site.amqp_url, name="test-control")
        broker.start()
        try:
            await asyncio.wait_for(broker.connected(), 20)
            await write_control(LocalStore(store_settings(site)), broker, control)
        finally:
            await broker.close()

    asyncio.run(change())


def remote_keys(site: Site, prefix: str = "site-test/") -> list[str]:
    client = site.remote_client()
    keys: list[str] = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=site.remote_bucket, Prefix=prefix):
        keys.extend(item["Key"] for item in page.get("Contents", []))
    return keys


def upload_many(url: str, count: int, *, device: str, size: int | list[int] = 50_000) -> dict[str, str]:
    """Upload ``count`` photos through the gateway; return {photo id: sha256}."""
    sizes = size if isinstance(size, list) else [size] * count
    uploaded: dict[str, str] = {}
    for i in range(count):
        response = upload(url, photo(device, jpeg(sizes[i % len(sizes)])))
        assert response.status_code == 201, response.text
        uploaded[response.json()["id"]] = response.json()["sha256"]
    return uploaded
