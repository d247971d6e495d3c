"""Typed keys of the gateway application's state, in one place."""

from __future__ import annotations

from aiohttp import web

from services.common.admission import AdmissionView
from services.common.broker import Broker
from services.common.config import GatewayConfig
from services.common.localstore import LocalStore
from services.gateway.budget import InflightBudget
from services.gateway.metrics import GatewayMetrics

CONFIG = web.AppKey("config", GatewayConfig)
STORE = web.AppKey("store", LocalStore)
BROKER = web.AppKey("broker", Broker)
METRICS = web.AppKey("metrics", GatewayMetrics)
BUDGET = web.AppKey("budget", InflightBudget)
OPENAPI = web.AppKey("openapi", bytes)


ADMISSION = web.AppKey("admission", AdmissionView)
