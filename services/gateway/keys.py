"""Typed keys of the gateway application's state, in one place."""

from __future__ import annotations

from aiohttp import web

from services.common.admission import AdmissionView
from services.common.broker import Broker
from services.common.config import GatewayConfig
from services.common.denylist import DenyList
from services.common.localstore import LocalStore
from services.gateway.budget import InflightBudget
from services.gateway.fairness import DeviceLimiter
from services.gateway.metrics import GatewayMetrics

CONFIG = web.AppKey("config", GatewayConfig)
STORE = web.AppKey("store", LocalStore)
BROKER = web.AppKey("broker", Broker)
METRICS = web.AppKey("metrics", GatewayMetrics)
BUDGET = web.AppKey("budget", InflightBudget)
LIMITER = web.AppKey("limiter", DeviceLimiter)


ADMISSION = web.AppKey("admission", AdmissionView)


class DenyListView:
    """The operator's deny list, as this gateway last read it (kept while the object is unreadable)."""

    def __init__(self) -> None:
        self.current = DenyList()
        self.unreadable: str | None = None  # why the last read failed, so it is logged once


DENY_LIST = web.AppKey("deny_list", DenyListView)
