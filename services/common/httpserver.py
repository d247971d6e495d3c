"""What every HTTP service shares: a server span, HTTP metrics, one log line per request,
and a graceful stop.

A caller's ``traceparent`` is untrusted input (a device can send anything), so
each request starts a new trace and keeps the caller's context only as a link.
Handlers add fields to the request's log line through ``log_fields(request)``.

On SIGTERM the server stops listening and lets requests in flight finish before
aiohttp's own shutdown runs: aiohttp stops reading from every connection as soon
as its shutdown begins (aio-libs/aiohttp#2298), which would cut an upload whose
body is still arriving.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import ssl
import time
from collections.abc import Callable
from typing import Any, Protocol

from aiohttp import web
from opentelemetry import propagate, trace
from opentelemetry.context import Context
from opentelemetry.trace import Link, SpanKind, Status, StatusCode
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from services.common.localstore import LocalStore, StoreUnavailable
from services.common.problems import Problem, json_response, problem_middleware
from services.common.supervise import Supervisor

log = logging.getLogger(__name__)
request_log = logging.getLogger("photoferry.request")
tracer = trace.get_tracer("photoferry.http")

_LOG_FIELDS = web.RequestKey("log_fields", dict)
READY_CHECK_TIMEOUT_S = 3.0
LINGERING_S = 2.0


class ServerState:
    """Requests in flight, and whether the server is draining before a stop."""

    def __init__(self) -> None:
        self.in_flight = 0
        self.draining = False
        self.idle = asyncio.Event()
        self.idle.set()

    def begin(self) -> None:
        self.in_flight += 1
        self.idle.clear()

    def end(self) -> None:
        self.in_flight -= 1
        if not self.in_flight:
            self.idle.set()


SERVER_STATE = web.AppKey("server_state", ServerState)
SUPERVISOR = web.AppKey("supervisor", Supervisor)
# Set by a service that serves HTTPS (the gateway, given a certificate).
SSL_CONTEXT = web.AppKey("ssl_context", ssl.SSLContext)


class HttpMetrics:
    """Request counts, durations and in-flight requests of one HTTP service."""

    def __init__(self, registry: CollectorRegistry, service: str) -> None:
        self.registry = registry
        self.requests = Counter(
            f"photoferry_{service}_http_requests",
            "HTTP requests answered, by route and status",
            ["method", "route", "status"],
            registry=registry,
        )
        self.duration = Histogram(
            f"photoferry_{service}_http_request_duration_seconds",
            "Time to answer an HTTP request, by route",
            ["method", "route"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=registry,
        )
        self.in_flight = Gauge(
            f"photoferry_{service}_http_requests_in_flight",
            "HTTP requests being handled now",
            registry=registry,
        )


def log_fields(request: web.Request) -> dict[str, Any]:
    """The fields of this request's log line; handlers add to it."""
    return request.setdefault(_LOG_FIELDS, {})  # type: ignore[no-any-return]


def _route_of(request: web.Request) -> str:
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else "unmatched"


def request_middleware(metrics: HttpMetrics, state: ServerState) -> Any:
    @web.middleware
    async def middleware(request: web.Request, handler: Any) -> web.StreamResponse:
        if state.draining:
            # A request that arrives on an open connection during the stop.
            return Problem(
                503, "the service is stopping; retry on another instance", retry_after=1,
                headers={"Connection": "close"},
            ).response()
        state.begin()
        try:
            return await _traced(request, handler, metrics)
        finally:
            state.end()

    return middleware


async def _traced(request: web.Request, handler: Any, metrics: HttpMetrics) -> web.StreamResponse:
    route = _route_of(request)
    caller = trace.get_current_span(propagate.extract(request.headers)).get_span_context()
    started = time.perf_counter()
    status = 500
    metrics.in_flight.inc()
    with tracer.start_as_current_span(
        f"{request.method} {route}",
        context=Context(),
        kind=SpanKind.SERVER,
        links=[Link(caller)] if caller.is_valid else None,
        attributes={
            "http.request.method": request.method,
            "http.route": route,
            "url.path": request.path,
        },
    ) as span:
        try:
            response = await handler(request)
            status = response.status
            return response
        finally:
            elapsed = time.perf_counter() - started
            metrics.in_flight.dec()
            metrics.requests.labels(request.method, route, str(status)).inc()
            metrics.duration.labels(request.method, route).observe(elapsed)
            span.set_attribute("http.response.status_code", status)
            if status >= 500:
                span.set_status(Status(StatusCode.ERROR))
            if route not in ("/healthz", "/readyz", "/metrics"):
                request_log.info(
                    "%s %s %d",
                    request.method,
                    request.path,
                    status,
                    extra={"duration_ms": round(elapsed * 1000, 2), **log_fields(request)},
                )


def health_handler(supervisor: Supervisor) -> Any:
    """``GET /healthz``: the process is alive and none of its background loops is failing.

    No dependency is consulted (that is ``/readyz``): restarting a pod does not
    bring a broker back. A loop failing again and again is what a restart can fix.
    """

    async def healthz(request: web.Request) -> web.Response:
        failing = supervisor.failing()
        if failing:
            raise Problem(503, f"background loop(s) failing: {', '.join(sorted(failing))}", loops=failing)
        return json_response({"status": "ok"})

    return healthz


class BrokerLink(Protocol):
    """A connection (or connections) to the broker that can say whether it is usable now."""

    def readiness(self) -> str: ...


def readiness_handler(dependencies: Callable[[web.Application], tuple[BrokerLink, LocalStore]], *,
                      retry_after: int) -> Any:
    """``GET /readyz``: the broker and the local store can be used now; says which cannot."""

    async def readyz(request: web.Request) -> web.Response:
        broker, store = dependencies(request.app)
        checks = {"broker": broker.readiness(), "store": "ok"}
        try:
            await asyncio.wait_for(store.ping(), READY_CHECK_TIMEOUT_S)
        except StoreUnavailable as exc:
            checks["store"] = str(exc)
        except TimeoutError:
            checks["store"] = f"no answer within {READY_CHECK_TIMEOUT_S:g}s"
        failing = sorted(name for name, state in checks.items() if state != "ok")
        if failing:
            raise Problem(503, f"not ready: {', '.join(failing)} unavailable", retry_after=retry_after,
                          checks=checks)
        return json_response({"status": "ready", "checks": checks})

    return readyz


def metrics_handler(registry: CollectorRegistry) -> Any:
    async def handler(request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

    return handler


def service_app(
    http: HttpMetrics,
    *,
    dependencies: Callable[[web.Application], tuple[BrokerLink, LocalStore]],
    retry_after: int,
    middlewares: tuple[Any, ...] = (),
) -> web.Application:
    """An application with what every service has: request middleware, problems, a supervisor
    for its background loops, ``/healthz``, ``/readyz`` and ``/metrics``."""
    state = ServerState()
    supervisor = Supervisor(http.registry)
    app = web.Application(middlewares=[request_middleware(http, state), problem_middleware, *middlewares])
    app[SERVER_STATE] = state
    app[SUPERVISOR] = supervisor
    app.router.add_get("/healthz", health_handler(supervisor))
    app.router.add_get("/readyz", readiness_handler(dependencies, retry_after=retry_after))
    app.router.add_get("/metrics", metrics_handler(http.registry))
    return app


def run(app: web.Application, *, port: int, shutdown_timeout: float, idle_timeout: float) -> None:
    """Serve until SIGTERM/SIGINT; then stop accepting, let requests finish, clean up."""
    asyncio.run(_serve(app, app[SERVER_STATE], port=port, shutdown_timeout=shutdown_timeout,
                       idle_timeout=idle_timeout))


async def _serve(app: web.Application, state: ServerState, *, port: int, shutdown_timeout: float,
                 idle_timeout: float) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    # keepalive_timeout also closes a connection that has not finished sending its request
    # head (aiohttp times it from the connection's start): slow headers hold nothing for long.
    # lingering_time bounds how long the rest of a refused body is read and thrown away.
    runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=shutdown_timeout,
                           keepalive_timeout=idle_timeout, lingering_time=LINGERING_S)
    await runner.setup()
    try:
        tls = app.get(SSL_CONTEXT)
        site = web.TCPSite(runner, port=port, ssl_context=tls)
        await site.start()
        log.info("listening", extra={"port": port, "tls": tls is not None})
        await stop.wait()

        log.info("stopping: finishing requests in flight", extra={"in_flight": state.in_flight})
        state.draining = True
        await site.stop()
        try:
            await asyncio.wait_for(state.idle.wait(), shutdown_timeout)
        except TimeoutError:
            log.warning("stopping with requests still in flight", extra={"in_flight": state.in_flight})
    finally:
        await runner.cleanup()
