"""The operator API (``Authorization: Bearer $PHOTOFERRY_ADMIN_TOKEN``) and the operator page.

    GET  /api/status            the figures (backlog, ages, rates, ETA, store, shipping, devices)
    GET  /api/history           samples of backlog, ingest, egress and cap, for charts
    POST /api/shipping/pause    optional {"until": RFC 3339}
    POST /api/shipping/resume
    PUT  /api/shipping/rate     {"rate": "40Mbit"} (or bytes per second), {"fresh_share": 0.3} and/or
                                {"ceiling": "160Mbit"} (the band above the cap; "off": none);
                                null returns each to the schedule
    GET  /api/parked            parked photos with their reasons
    POST /api/parked/replay     send parked photos back to shipping
    POST /api/sweep             sweep (reconcile, retention, capacity) now
    GET  /api/devices/denied    the devices every gateway refuses (403), with the reasons
    PUT  /api/devices/denied/{device_id}     {"reason": "stolen"}: refuse this device from now on
    DELETE /api/devices/denied/{device_id}   take it off the list
    GET  /                      the operator page (it asks for the token; the API checks it)
    GET  /openapi.json          the contract of this API (services/store/openapi.yaml)

The operator token is rotated without a flag day: ``PHOTOFERRY_ADMIN_TOKEN_PREVIOUS``
is accepted alongside ``PHOTOFERRY_ADMIN_TOKEN`` until the operator removes it, and
the requests that still use it are counted.
"""

from __future__ import annotations

import asyncio
import hmac
from dataclasses import replace
from datetime import UTC, datetime
from importlib import resources
from typing import Any

import orjson
from aiohttp import web
from prometheus_client import CollectorRegistry, Counter

from services.common import parking
from services.common.broker import BrokerUnavailable
from services.common.denylist import (
    MAX_DENIED,
    MAX_REASON,
    DenyList,
    DenyListUnreadable,
    read_deny_list,
    write_deny_list,
)
from services.common.localstore import StoreUnavailable
from services.common.openapi import openapi_document, openapi_handler
from services.common.photos import DEVICE_ID_PATTERN
from services.common.problems import Problem, json_response
from services.common.shipping import ShippingControl, read_control, write_control
from services.common.units import format_bytes, parse_fraction, parse_rate
from services.store.keeper import Keeper

KEEPER = web.AppKey("keeper", Keeper)
_WWW_AUTHENTICATE = {"WWW-Authenticate": 'Bearer realm="photoferry operator"'}


class OperatorAuth:
    """The operator's token, and the previous one while a rotation is under way."""

    def __init__(self, token: str, previous: str | None, registry: CollectorRegistry) -> None:
        self._tokens = [token.encode()] + ([previous.encode()] if previous else [])
        self.previous_used = Counter(
            "photoferry_store_previous_admin_token_requests",
            "Operator API requests made with the previous operator token (PHOTOFERRY_ADMIN_TOKEN_PREVIOUS): "
            "clients still to move to the current one",
            registry=registry,
        )

    def check(self, authorization: str) -> None:
        """Raise 401 unless ``authorization`` carries the current or the previous token."""
        scheme, _, given = authorization.partition(" ")
        if scheme.lower() != "bearer" or not given:
            raise Problem(401, "the operator token is required: Authorization: Bearer <token>",
                          headers=_WWW_AUTHENTICATE)
        # surrogateescape: a header with bytes that are not UTF-8 is a wrong token, not an error.
        offered = given.strip().encode(errors="surrogateescape")
        # Every token is compared (in constant time), so timing does not tell which one matched.
        matches = [hmac.compare_digest(offered, token) for token in self._tokens]
        if not any(matches):
            raise Problem(401, "the operator token is not valid", headers=_WWW_AUTHENTICATE)
        if not matches[0]:
            self.previous_used.inc()


OPERATOR_AUTH = web.AppKey("operator_auth", OperatorAuth)
DENY_LIST_LOCK = web.AppKey("deny_list_lock", asyncio.Lock)


@web.middleware
async def operator_auth(request: web.Request, handler: Any) -> web.StreamResponse:
    """Every /api/ route needs the operator's token."""
    if request.path.startswith("/api/"):
        request.app[OPERATOR_AUTH].check(request.headers.get("Authorization", ""))
    return await handler(request)


async def status(request: web.Request) -> web.Response:
    return json_response(request.app[KEEPER].status())


async def history(request: web.Request) -> web.Response:
    return json_response(list(request.app[KEEPER].history))


async def pause(request: web.Request) -> web.Response:
    body = await _json_object(request, allow_empty=True)
    if set(body) - {"until"}:
        raise Problem(400, 'the body may say {"until": "2026-05-01T06:00:00+02:00"} (or null), and nothing else')
    until = body.get("until")
    if until is not None:
        until = _future_time(until)
    return await _change(request, lambda c: replace(c, paused=True, paused_until=until))


async def resume(request: web.Request) -> web.Response:
    return await _change(request, lambda c: replace(c, paused=False, paused_until=None))


async def set_rate(request: web.Request) -> web.Response:
    """``{"rate": "40Mbit"}``, ``{"fresh_share": 0.3}`` and/or ``{"ceiling": "160Mbit"}``; ``null`` returns
    each to the schedule. A ceiling given is checked against a rate override (given or in force); where
    a cap is at or above the ceiling (a schedule window, a later override) there is simply no band."""
    body = await _json_object(request, allow_empty=False)
    fields = {"rate", "fresh_share", "ceiling"}
    if not fields & set(body) or set(body) - fields:
        raise Problem(400, 'the body must say {"rate": "40Mbit"} (or a number of bytes per second, or null), '
                           '{"fresh_share": 0.3} (a fraction of the cap, or null) and/or {"ceiling": "160Mbit"} '
                           '(the band above the cap: a rate, "off", or null), and nothing else')
    changes: dict[str, Any] = {}
    if "rate" in body:
        changes["rate_override"] = _rate(body["rate"])
    if "fresh_share" in body:
        changes["fresh_share_override"] = _share(body["fresh_share"])
    if "ceiling" in body:
        changes["ceiling_override"] = _ceiling(body["ceiling"])

    def change(current: ShippingControl) -> ShippingControl:
        new = replace(current, **changes)
        if ("ceiling" in body and new.ceiling_override and new.rate_override is not None
                and new.ceiling_override <= new.rate_override):
            raise Problem(400, f"the ceiling ({format_bytes(new.ceiling_override)}/s) must be above the rate "
                               f"({format_bytes(new.rate_override)}/s), or \"off\"")
        return new

    return await _change(request, change)


async def list_parked(request: web.Request) -> web.Response:
    keeper = request.app[KEEPER]
    try:
        parked = await parking.list_parked(keeper.store)
    except StoreUnavailable as exc:
        raise Problem(503, f"the local store is unavailable: {exc}", retry_after=5) from None
    return json_response({
        "parked": [p.__dict__ for p in parked],
        "messages_on_parking_queue": keeper.parked_messages,
    })


async def replay_parked(request: web.Request) -> web.Response:
    keeper = request.app[KEEPER]
    try:
        replayed = await parking.replay(keeper.broker, keeper.store)
    except (BrokerUnavailable, StoreUnavailable) as exc:
        raise Problem(503, f"could not replay parked photos now: {exc}", retry_after=5) from None
    keeper.request_sweep()  # photos whose marker was left without a message are queued by the next sweep
    return json_response({"replayed": replayed})


async def sweep_now(request: web.Request) -> web.Response:
    try:
        result = await request.app[KEEPER].run_sweep()
    except StoreUnavailable as exc:
        raise Problem(503, f"the local store is unavailable: {exc}", retry_after=5) from None
    return json_response({
        "photos": result.photos, "unshipped": result.unshipped, "deleted": result.deleted,
        "evicted_bytes": result.evicted_bytes, "parked": result.parked,
        "duration_s": round(result.duration_s, 3),
    })


async def denied_devices(request: web.Request) -> web.Response:
    deny_list = await _deny_list(request)
    return json_response({"denied": [vars(d) for d in sorted(deny_list.devices.values(), key=lambda d: d.device_id)],
                          "updated_at": deny_list.updated_at})


async def deny_device(request: web.Request) -> web.Response:
    """``{"reason": "stolen"}``: every gateway refuses the device within seconds."""
    device_id = _device_id(request)
    body = await _json_object(request, allow_empty=False)
    reason = body.get("reason")
    if set(body) != {"reason"} or not isinstance(reason, str) or not 1 <= len(reason) <= MAX_REASON:
        raise Problem(400, f'the body must be {{"reason": "..."}}: why the device is denied, 1 to {MAX_REASON} '
                           "characters, and nothing else")
    async with request.app[DENY_LIST_LOCK]:
        deny_list = await _deny_list(request)
        if device_id not in deny_list.devices and len(deny_list.devices) >= MAX_DENIED:
            raise Problem(409, f"the deny list already holds {MAX_DENIED} devices, the most it may; "
                               "rotate the device secret instead")
        await _save(request, deny_list.deny(device_id, reason))
    return json_response({"device_id": device_id, "denied": True, "reason": reason})


async def allow_device(request: web.Request) -> web.Response:
    device_id = _device_id(request)
    async with request.app[DENY_LIST_LOCK]:
        deny_list = await _deny_list(request)
        if device_id not in deny_list.devices:
            raise Problem(404, f"device {device_id!r} is not on the deny list")
        await _save(request, deny_list.allow(device_id))
    return json_response({"device_id": device_id, "denied": False})


def _device_id(request: web.Request) -> str:
    device_id = request.match_info["device_id"]
    if not DEVICE_ID_PATTERN.fullmatch(device_id):
        raise Problem(400, f"{device_id!r} is not a device id (1 to 64 characters of A-Z a-z 0-9 . _ -)")
    return device_id


async def _deny_list(request: web.Request) -> DenyList:
    try:
        return await read_deny_list(request.app[KEEPER].store)
    except StoreUnavailable as exc:
        raise Problem(503, f"the local store is unavailable: {exc}", retry_after=5) from None
    except DenyListUnreadable as exc:
        # Written by hand or by another version: overwriting it would lose who is denied.
        raise Problem(409, f"{exc}; fix or delete it in the local store, nothing changed") from None


async def _save(request: web.Request, deny_list: DenyList) -> None:
    try:
        await write_deny_list(request.app[KEEPER].store, deny_list)
    except StoreUnavailable as exc:
        raise Problem(503, f"the local store is unavailable; nothing changed: {exc}", retry_after=5) from None


def load_openapi() -> bytes:
    """The operator API's OpenAPI document, as JSON."""
    return openapi_document("services.store")


async def page(request: web.Request) -> web.Response:
    html = resources.files("services.store").joinpath("page.html").read_text()
    return web.Response(text=html, content_type="text/html")


async def _change(request: web.Request, new: Any) -> web.Response:
    keeper = request.app[KEEPER]
    try:
        current = await read_control(keeper.store)
        keeper.control = await write_control(keeper.store, keeper.broker, new(current))
    except StoreUnavailable as exc:
        raise Problem(503, f"the local store is unavailable; nothing changed: {exc}", retry_after=5) from None
    figures = keeper.status()
    return json_response(figures["control"] | {"cap_bytes_per_s": figures["cap_bytes_per_s"],
                                               "fresh_share": figures["fresh"]["share"],
                                               "ceiling_bytes_per_s": figures["scavenging"]["ceiling_bytes_per_s"]})


async def _json_object(request: web.Request, *, allow_empty: bool) -> dict[str, Any]:
    raw = await request.read()
    if not raw.strip():
        if allow_empty:
            return {}
        raise Problem(400, "a JSON body is required")
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise Problem(400, f"the body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise Problem(400, "the body must be a JSON object")
    return body


def _future_time(value: Any) -> str:
    if not isinstance(value, str):
        raise Problem(400, "until must be an RFC 3339 time with an offset, e.g. 2026-05-01T06:00:00+02:00")
    try:
        moment = datetime.fromisoformat(value.upper().replace("Z", "+00:00"))
    except ValueError:
        raise Problem(400, f"until {value!r} is not an RFC 3339 time") from None
    if moment.tzinfo is None:
        raise Problem(400, "until needs an offset (Z or +hh:mm)")
    try:
        in_utc = moment.astimezone(UTC)
    except OverflowError:  # an offset that takes it past year 1 or 9999
        raise Problem(400, f"until {value!r} is out of the range of times") from None
    if in_utc <= datetime.now(UTC):
        raise Problem(400, f"until {value!r} is not in the future")
    return in_utc.isoformat()


def _rate(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool):
        raise Problem(400, "rate must be a rate such as \"40Mbit\", a number of bytes per second, or null")
    if isinstance(value, int | float):
        if not value > 0 or value != value or value == float("inf"):
            raise Problem(400, "rate must be above zero (pause shipping to stop it)")
        return float(value)
    if isinstance(value, str):
        try:
            return parse_rate(value)
        except ValueError as exc:
            raise Problem(400, f"rate: {exc}") from None
    raise Problem(400, "rate must be a rate such as \"40Mbit\", a number of bytes per second, or null")


def _ceiling(value: Any) -> float | None:
    """A ceiling for the band above the cap: a rate, ``"off"`` (0: no band), or None (the schedule's)."""
    if isinstance(value, str) and value.strip().lower() == "off":
        return 0.0
    try:
        return _rate(value)
    except Problem as problem:
        raise Problem(400, "ceiling must be a rate such as \"160Mbit\", a number of bytes per second, "
                           f"\"off\" (no band above the cap), or null ({problem.detail})") from None


def _share(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise Problem(400, "fresh_share must be a fraction of the cap such as 0.3 or \"30%\", or null")
    try:
        return parse_fraction(str(value))
    except ValueError as exc:
        raise Problem(400, f"fresh_share: {exc}") from None


def add_routes(app: web.Application) -> None:
    app[DENY_LIST_LOCK] = asyncio.Lock()  # one change of the deny list at a time (one keeper per site)
    app.router.add_get("/", page)
    app.router.add_get("/openapi.json", openapi_handler(load_openapi()))
    app.router.add_get("/api/status", status)
    app.router.add_get("/api/history", history)
    app.router.add_post("/api/shipping/pause", pause)
    app.router.add_post("/api/shipping/resume", resume)
    app.router.add_put("/api/shipping/rate", set_rate)
    app.router.add_get("/api/parked", list_parked)
    app.router.add_post("/api/parked/replay", replay_parked)
    app.router.add_post("/api/sweep", sweep_now)
    app.router.add_get("/api/devices/denied", denied_devices)
    app.router.add_put("/api/devices/denied/{device_id}", deny_device)
    app.router.add_delete("/api/devices/denied/{device_id}", allow_device)
