"""Build and run the gateway application."""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import AsyncIterator
from importlib import resources

import orjson
import yaml
from aiohttp import web

from services.common.admission import read_admission
from services.common.broker import Broker
from services.common.config import GatewayConfig
from services.common.httpserver import (
    SERVER_STATE,
    ServerState,
    healthz,
    metrics_handler,
    readiness_handler,
    request_middleware,
)
from services.common.localstore import LocalStore, StoreUnavailable
from services.common.problems import problem_middleware
from services.common.service import run_service
from services.gateway import handlers
from services.gateway.budget import InflightBudget
from services.gateway.keys import ADMISSION, BROKER, BUDGET, CONFIG, METRICS, OPENAPI, STORE, AdmissionView
from services.gateway.metrics import GatewayMetrics

log = logging.getLogger(__name__)

ADMISSION_REFRESH_S = 2.0


def load_openapi() -> bytes:
    """The OpenAPI document, as JSON, from the YAML kept beside the code."""
    text = resources.files("services.gateway").joinpath("openapi.yaml").read_text()
    return orjson.dumps(yaml.safe_load(text))


def create_app(config: GatewayConfig) -> web.Application:
    metrics = GatewayMetrics()
    server_state = ServerState()
    app = web.Application(
        middlewares=[request_middleware(metrics.http, server_state), problem_middleware]
    )
    app[SERVER_STATE] = server_state
    app[CONFIG] = config
    app[METRICS] = metrics
    app[BUDGET] = InflightBudget(
        max_requests=config.max_inflight, max_bytes=config.max_inflight_bytes
    )
    app[STORE] = LocalStore(config.store)
    app[BROKER] = Broker(config.amqp_url, name=f"photoferry-gateway@{socket.gethostname()}")
    app[OPENAPI] = load_openapi()
    app[ADMISSION] = AdmissionView()
    app.cleanup_ctx.append(_broker_connection)
    app.cleanup_ctx.append(_admission_watch)

    app.router.add_post("/v1/photos", handlers.upload_photo)
    app.router.add_get("/v1/photos/{photo_id}", handlers.photo_status)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readiness_handler(lambda app: (app[BROKER], app[STORE]),
                                                    retry_after=config.retry_after_s))
    app.router.add_get("/metrics", metrics_handler(metrics.registry))
    app.router.add_get("/openapi.json", handlers.openapi)
    return app


async def _broker_connection(app: web.Application) -> AsyncIterator[None]:
    broker = app[BROKER]
    broker.start()
    yield
    await broker.close()


async def _admission_watch(app: web.Application) -> AsyncIterator[None]:
    """Re-read the store keeper's admission decision every few seconds."""

    async def watch() -> None:
        while True:
            try:
                decision = await read_admission(app[STORE])
            except StoreUnavailable as exc:
                log.warning("could not read the admission decision; keeping the last one", extra={"error": str(exc)})
            else:
                if decision.open != app[ADMISSION].current.open:
                    log.warning("admission %s", "opened" if decision.open else "closed",
                                extra={"reason": decision.reason, "used_bytes": decision.used_bytes})
                app[ADMISSION].current = decision
            await asyncio.sleep(ADMISSION_REFRESH_S)

    task = asyncio.create_task(watch(), name="admission-watch")
    yield
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


def main() -> None:
    run_service("gateway", GatewayConfig.from_env, create_app)
