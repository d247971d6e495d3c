"""Build and run the gateway application."""

from __future__ import annotations

import os
import socket
import sys
from collections.abc import AsyncIterator
from importlib import resources

import orjson
import yaml
from aiohttp import web

from services.common.broker import Broker
from services.common.config import ConfigError, GatewayConfig
from services.common.httpserver import (
    SERVER_STATE,
    ServerState,
    metrics_handler,
    request_middleware,
    run,
)
from services.common.localstore import LocalStore
from services.common.logs import setup_logging
from services.common.problems import problem_middleware
from services.common.telemetry import setup_tracing, shutdown_tracing
from services.gateway import handlers
from services.gateway.budget import InflightBudget
from services.gateway.keys import BROKER, BUDGET, CONFIG, METRICS, OPENAPI, STORE
from services.gateway.metrics import GatewayMetrics


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
    app.cleanup_ctx.append(_broker_connection)

    app.router.add_post("/v1/photos", handlers.upload_photo)
    app.router.add_get("/v1/photos/{photo_id}", handlers.photo_status)
    app.router.add_get("/healthz", handlers.healthz)
    app.router.add_get("/readyz", handlers.readyz)
    app.router.add_get("/metrics", metrics_handler(metrics.registry))
    app.router.add_get("/openapi.json", handlers.openapi)
    return app


async def _broker_connection(app: web.Application) -> AsyncIterator[None]:
    broker = app[BROKER]
    broker.start()
    yield
    await broker.close()


def main() -> None:
    try:
        config = GatewayConfig.from_env(os.environ)
    except ConfigError as exc:
        sys.exit(f"photoferry gateway: configuration error: {exc}")
    setup_logging(config.logging)
    tracer_provider = setup_tracing("photoferry-gateway", config.tracing)
    try:
        run(create_app(config), port=config.port, shutdown_timeout=config.shutdown_timeout)
    finally:
        shutdown_tracing(tracer_provider)
