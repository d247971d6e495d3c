"""Build and run the store keeper: sweeps, capacity, and the operator API and page."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator

from aiohttp import web

from services.common.broker import BrokerLinks
from services.common.config import StoreKeeperConfig
from services.common.httpserver import SUPERVISOR, service_app
from services.common.localstore import LocalStore
from services.common.service import run_service
from services.store import api, pagesecurity
from services.store.keeper import Keeper
from services.store.metrics import KeeperMetrics
from services.store.tap import Tap


def create_app(config: StoreKeeperConfig) -> web.Application:
    metrics = KeeperMetrics()
    app = service_app(metrics.http, dependencies=lambda app: (app[api.KEEPER].links, app[api.KEEPER].store),
                      retry_after=5, middlewares=(pagesecurity.security_headers, api.operator_auth))
    store = config.store
    # The tap listens on a connection of its own: a resource alarm blocks only the one that publishes.
    links = BrokerLinks(config.amqp_url, name=f"photoferry-store@{socket.gethostname()}")
    keeper = Keeper(config, store=LocalStore(store), links=links, tap=Tap(), metrics=metrics)
    links.consuming.on_ready = keeper.on_listener_ready
    app[api.KEEPER] = keeper
    app[api.OPERATOR_AUTH] = api.OperatorAuth(config.admin_token, config.admin_token_previous, metrics.registry)
    app.cleanup_ctx.append(_keeping)
    api.add_routes(app)
    pagesecurity.add_asset_routes(app)
    return app


async def _keeping(app: web.Application) -> AsyncIterator[None]:
    keeper = app[api.KEEPER]
    supervisor = app[SUPERVISOR]
    keeper.links.start(supervisor)
    keeper.start(supervisor)
    yield
    await supervisor.stop()
    await keeper.stop()
    await keeper.links.close()


def main() -> None:
    run_service("store keeper", StoreKeeperConfig.from_env, create_app)
