"""How every service starts: configuration, logging, tracing, serving, and a clean stop."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Mapping
from typing import Protocol, TypeVar

from aiohttp import web

from services.common.config import ConfigError, LogSettings, TracingSettings
from services.common.httpserver import run
from services.common.logs import setup_logging
from services.common.telemetry import setup_tracing, shutdown_tracing


class ServiceConfig(Protocol):
    port: int
    shutdown_timeout: float
    idle_timeout: float
    logging: LogSettings
    tracing: TracingSettings


C = TypeVar("C", bound=ServiceConfig)


def run_service(
    name: str, load: Callable[[Mapping[str, str]], C], create_app: Callable[[C], web.Application]
) -> None:
    """Read the configuration once (or exit naming what is wrong), then serve until SIGTERM."""
    try:
        config = load(os.environ)
    except ConfigError as exc:
        sys.exit(f"photoferry {name}: configuration error: {exc}")
    setup_logging(config.logging)
    tracer_provider = setup_tracing(f"photoferry-{name}", config.tracing)
    try:
        try:
            app = create_app(config)
        except ConfigError as exc:  # e.g. a certificate named in the configuration that cannot be loaded
            sys.exit(f"photoferry {name}: configuration error: {exc}")
        run(app, port=config.port, shutdown_timeout=config.shutdown_timeout, idle_timeout=config.idle_timeout)
    finally:
        shutdown_tracing(tracer_provider)
