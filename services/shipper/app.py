"""Build and run the shipper: the shipping loop, plus health, readiness, metrics and status over HTTP."""

from __future__ import annotations

import os
import socket
from collections.abc import AsyncIterator

from aiohttp import web

from services.common.broker import BrokerLinks
from services.common.config import ShipperConfig
from services.common.httpserver import SUPERVISOR, service_app
from services.common.localstore import LocalStore
from services.common.s3 import s3_client
from services.common.service import run_service
from services.shipper.delayprobe import DelayProbe, endpoint_address
from services.shipper.limiter import RateLimiter
from services.shipper.metrics import ShipperMetrics
from services.shipper.shipper import Shipper
from services.shipper.transfer import Transfer

SHIPPER = web.AppKey("shipper", Shipper)


def build_shipper(config: ShipperConfig, metrics: ShipperMetrics) -> Shipper:
    local = LocalStore(config.store)
    # No botocore retries: a failed shipment goes back through the broker instead,
    # and a streamed body cannot be sent twice.
    remote = s3_client(config.remote.endpoint, max_pool_connections=2 * config.max_concurrency + 2,
                       connect_timeout=5.0, read_timeout=config.remote.timeout, max_attempts=1,
                       sign_payload=False)
    limiter = RateLimiter(config.schedule.default)
    transfer = Transfer(local=local, remote=remote,
                        remote_bucket=config.remote.bucket, prefix=config.remote.prefix, limiter=limiter,
                        multipart_threshold=config.multipart_threshold, part_size=config.part_size)
    replica = f"{socket.gethostname()}-{os.getpid()}"
    links = BrokerLinks(config.amqp_url, name=f"photoferry-shipper@{replica}")
    # The band above the cap watches the round trip to where the uploads go (AWS: the client's own endpoint).
    probe = DelayProbe(*endpoint_address(remote.meta.endpoint_url))
    shipper = Shipper(config, links=links, store=local, transfer=transfer, metrics=metrics, replica=replica,
                      delay_probe=probe)
    links.consuming.on_ready = shipper.on_consumer_ready
    return shipper


def create_app(config: ShipperConfig) -> web.Application:
    metrics = ShipperMetrics()
    app = service_app(metrics.http, dependencies=lambda app: (app[SHIPPER].links, app[SHIPPER].store),
                      retry_after=5)
    app[SHIPPER] = build_shipper(config, metrics)
    app.cleanup_ctx.append(_shipping)
    app.router.add_get("/status", status)
    return app


async def _shipping(app: web.Application) -> AsyncIterator[None]:
    shipper = app[SHIPPER]
    supervisor = app[SUPERVISOR]
    shipper.links.start(supervisor)
    shipper.start(supervisor)
    yield
    await shipper.stop()
    await supervisor.stop()
    await shipper.links.close()


async def status(request: web.Request) -> web.Response:
    """This replica's shipping state: cap, share, egress, concurrency, breaker."""
    return web.Response(body=request.app[SHIPPER].heartbeat().to_json(), content_type="application/json")


def main() -> None:
    run_service("shipper", ShipperConfig.from_env, create_app)
