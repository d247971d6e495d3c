"""Build and run the gateway application."""

from __future__ import annotations

import logging
import socket
from collections.abc import AsyncIterator
from importlib import resources

import orjson
import yaml
from aiohttp import web

from services.common.admission import AdmissionView, read_admission
from services.common.broker import Broker
from services.common.config import GatewayConfig
from services.common.httpserver import SUPERVISOR, service_app
from services.common.localstore import LocalStore
from services.common.service import run_service
from services.gateway import handlers
from services.gateway.budget import InflightBudget
from services.gateway.keys import ADMISSION, BROKER, BUDGET, CONFIG, METRICS, OPENAPI, STORE
from services.gateway.metrics import GatewayMetrics

log = logging.getLogger(__name__)

ADMISSION_REFRESH_S = 2.0


def load_openapi() -> bytes:
    """The OpenAPI document, as JSON, from the YAML kept beside the code."""
    text = resources.files("services.gateway").joinpath("openapi.yaml").read_text()
    return orjson.dumps(yaml.safe_load(text))


def create_app(config: GatewayConfig) -> web.Application:
    metrics = GatewayMetrics()
    app = service_app(metrics.http, dependencies=lambda app: (app[BROKER], app[STORE]),
                      retry_after=config.retry_after_s)
    app[CONFIG] = config
    app[METRICS] = metrics
    app[BUDGET] = InflightBudget(
        max_requests=config.max_inflight, max_bytes=config.max_inflight_bytes
    )
    app[STORE] = LocalStore(config.store)
    app[BROKER] = Broker(config.amqp_url, name=f"photoferry-gateway@{socket.gethostname()}")
    app[OPENAPI] = load_openapi()
    app[ADMISSION] = AdmissionView()
    app.cleanup_ctx.append(_background)

    app.router.add_post("/v1/photos", handlers.upload_photo)
    app.router.add_get("/v1/photos/{photo_id}", handlers.photo_status)
    app.router.add_get("/openapi.json", handlers.openapi)
    return app


async def _background(app: web.Application) -> AsyncIterator[None]:
    """The broker connection and the admission watch, under the app's supervisor."""
    supervisor = app[SUPERVISOR]
    app[BROKER].start(supervisor)

    async def watch_admission() -> None:
        """Re-read the store keeper's admission decision."""
        decision = await read_admission(app[STORE])
        if decision.open != app[ADMISSION].current.open:
            log.warning("admission %s", "opened" if decision.open else "closed",
                        extra={"reason": decision.reason, "used_bytes": decision.used_bytes})
        app[ADMISSION].update(decision)

    supervisor.start("admission-watch", watch_admission, every=ADMISSION_REFRESH_S)
    yield
    await supervisor.stop()
    await app[BROKER].close()


def main() -> None:
    run_service("gateway", GatewayConfig.from_env, create_app)
