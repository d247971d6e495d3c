"""Build and run the gateway application."""

from __future__ import annotations

import logging
import socket
from collections.abc import AsyncIterator

from aiohttp import web

from services.common.admission import AdmissionView, read_admission
from services.common.broker import Broker
from services.common.config import GatewayConfig
from services.common.denylist import DenyListUnreadable, read_deny_list
from services.common.httpserver import SSL_CONTEXT, SUPERVISOR, service_app
from services.common.localstore import LocalStore
from services.common.openapi import openapi_document, openapi_handler
from services.common.service import run_service
from services.gateway import handlers
from services.gateway.budget import InflightBudget
from services.gateway.fairness import DeviceLimiter
from services.gateway.keys import (
    ADMISSION,
    BROKER,
    BUDGET,
    CONFIG,
    DENY_LIST,
    LIMITER,
    METRICS,
    STORE,
    DenyListView,
)
from services.gateway.metrics import GatewayMetrics
from services.gateway.tls import RELOAD_CHECK_S, CertificateReloader, server_context

log = logging.getLogger(__name__)

ADMISSION_REFRESH_S = 2.0
DENY_LIST_REFRESH_S = 2.0


def load_openapi() -> bytes:
    """The gateway's OpenAPI document, as JSON."""
    return openapi_document("services.gateway")


def create_app(config: GatewayConfig) -> web.Application:
    metrics = GatewayMetrics()
    app = service_app(metrics.http, dependencies=lambda app: (app[BROKER], app[STORE]),
                      retry_after=config.retry_after_s)
    app[CONFIG] = config
    app[METRICS] = metrics
    app[BUDGET] = InflightBudget(
        max_requests=config.max_inflight, max_bytes=config.max_inflight_bytes
    )
    app[LIMITER] = limiter = DeviceLimiter(config.device_limits)
    metrics.throttled_devices.set_function(limiter.throttled)
    metrics.tracked_devices.set_function(lambda: len(limiter))
    app[DENY_LIST] = DenyListView()
    if config.tls is not None:
        app[SSL_CONTEXT] = server_context(config.tls)
    app[STORE] = LocalStore(config.store)
    app[BROKER] = Broker(config.amqp_url, name=f"photoferry-gateway@{socket.gethostname()}")
    app[ADMISSION] = AdmissionView()
    app.cleanup_ctx.append(_background)

    app.router.add_post("/v1/photos", handlers.upload_photo)
    app.router.add_get("/v1/photos/{photo_id}", handlers.photo_status)
    app.router.add_get("/openapi.json", openapi_handler(load_openapi()))
    return app


async def _background(app: web.Application) -> AsyncIterator[None]:
    """The broker connection, the admission and deny-list watches, the certificate's renewal, supervised."""
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
    supervisor.start("deny-list-watch", lambda: _watch_deny_list(app), every=DENY_LIST_REFRESH_S)
    config = app[CONFIG]
    if config.tls is not None:
        supervisor.start("tls-reload", CertificateReloader(app[SSL_CONTEXT], config.tls).check, every=RELOAD_CHECK_S)
    yield
    await supervisor.stop()
    await app[BROKER].close()


async def _watch_deny_list(app: web.Application) -> None:
    """Re-read the operator's deny list; keep the last one read while the object is unreadable."""
    view = app[DENY_LIST]
    try:
        deny_list = await read_deny_list(app[STORE])
    except DenyListUnreadable as exc:
        # Not a failure a restart fixes, so the loop goes on; said once, not every round.
        if view.unreadable != str(exc):
            log.error("the deny list is unreadable; the devices denied before stay denied",
                      extra={"error": str(exc), "denied": len(view.current.devices)})
        view.unreadable = str(exc)
        return
    view.unreadable = None
    if deny_list.devices.keys() != view.current.devices.keys():
        log.warning("deny list changed", extra={"denied": sorted(deny_list.devices)[:50],
                                                "count": len(deny_list.devices)})
    view.current = deny_list
    app[METRICS].denied_devices.set(len(deny_list.devices))


def main() -> None:
    run_service("gateway", GatewayConfig.from_env, create_app)
