"""Build and run the store keeper: sweeps, capacity, and the operator API and page."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator

from aiohttp import web

from services.common.broker import Broker
from services.common.config import StoreKeeperConfig
from services.common.httpserver import (
    SERVER_STATE,
    ServerState,
    healthz,
    metrics_handler,
    readiness_handler,
    request_middleware,
)
from services.common.localstore import LocalStore
from services.common.problems import problem_middleware
from services.common.s3 import s3_client
from services.common.service import run_service
from services.store import api
from services.store.keeper import Keeper
from services.store.metrics import KeeperMetrics
from services.store.tap import Tap


def create_app(config: StoreKeeperConfig) -> web.Application:
    metrics = KeeperMetrics()
    server_state = ServerState()
    app = web.Application(middlewares=[request_middleware(metrics.http, server_state), problem_middleware,
                                       api.operator_auth])
    app[SERVER_STATE] = server_state
    store = config.store
    broker = Broker(config.amqp_url, name=f"photoferry-store@{socket.gethostname()}")
    admin = s3_client(store.endpoint, access_key=store.access_key, secret_key=store.secret_key, region=store.region,
                      connect_timeout=min(2.0, store.timeout), read_timeout=store.timeout)
    keeper = Keeper(config, store=LocalStore(store), admin=admin, broker=broker, tap=Tap(), metrics=metrics)
    broker.on_ready = keeper.on_broker_ready
    app[api.KEEPER] = keeper
    app[api.ADMIN_TOKEN] = config.admin_token
    app.cleanup_ctx.append(_keeping)
    api.add_routes(app)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readiness_handler(lambda app: (app[api.KEEPER].broker, app[api.KEEPER].store),
                                                    retry_after=5))
    app.router.add_get("/metrics", metrics_handler(metrics.registry))
    return app


async def _keeping(app: web.Application) -> AsyncIterator[None]:
    keeper = app[api.KEEPER]
    keeper.broker.start()
    await keeper.start()
    yield
    await keeper.stop()
    await keeper.broker.close()


def main() -> None:
    run_service("store keeper", StoreKeeperConfig.from_env, create_app)
