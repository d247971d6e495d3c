"""The gateway's HTTP handlers: the device contract of DESIGN.md.

An upload is answered ``201`` only after the photo is in the local store and the
broker has confirmed a persistent, routed message asking to ship it. Whatever
fails before that answers ``503`` with ``Retry-After``; the device keeps the photo
and retries, and the retry is harmless (same id, same object).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson
from aiohttp import ClientError, web
from aiohttp.http_exceptions import HttpProcessingError

from services.common import messages, photos, tokens, topology
from services.common.broker import BrokerUnavailable
from services.common.config import GatewayConfig
from services.common.httpserver import log_fields
from services.common.localstore import StoredObject, StoreUnavailable
from services.common.problems import Problem, json_response
from services.gateway import upload
from services.gateway.fairness import DeviceSlot
from services.gateway.keys import ADMISSION, BROKER, BUDGET, CONFIG, DENY_LIST, LIMITER, METRICS, STORE

log = logging.getLogger(__name__)

_WWW_AUTHENTICATE = {"WWW-Authenticate": 'Bearer realm="photoferry"'}


async def upload_photo(request: web.Request) -> web.Response:
    """``POST /v1/photos``: store a photo locally and queue it for shipping."""
    status = 500
    try:
        response = await _upload(request)
        status = response.status
        return response
    except Problem as problem:
        status = problem.status
        log_fields(request)["problem"] = problem.detail
        raise
    finally:
        request.app[METRICS].upload_outcome(status)


@dataclass(frozen=True)
class _Admitted:
    """An upload let in before its body is read: what it may be, and what it holds."""

    token: str | None
    body_format: str
    limit: int  # the largest body worth reading
    held: int  # reserved in the in-flight budget
    slot: DeviceSlot


async def _upload(request: web.Request) -> web.Response:
    config = request.app[CONFIG]
    budget = request.app[BUDGET]
    metrics = request.app[METRICS]
    admitted = _admit(request)
    metrics.in_flight_bytes.inc(admitted.held)
    try:
        body = await _read_body(request, admitted.limit, config)
        metrics.received_bytes.inc(len(body))
        fields = upload.decode_body(admitted.body_format, body)
        del body  # what is needed is in fields now: each buffer goes as soon as the next step has its part
        device_id = upload.parse_device_id(fields)
        log_fields(request)["device_id"] = device_id
        _authorize(request, device_id, admitted.token)
        admitted.slot.identify(device_id)
        photo = upload.parse_upload(
            fields,
            body_format_=admitted.body_format,
            device_id=device_id,
            max_image_bytes=config.max_image_bytes,
        )
        del fields
        return await _store_and_queue(request, photo)
    finally:
        budget.release(admitted.held)
        metrics.in_flight_bytes.dec(admitted.held)
        admitted.slot.release()


def _admit(request: web.Request) -> _Admitted:
    """Everything decided from the request's head, cheapest first; raise the refusal with
    ``Connection: close``, or the unread body would stay buffered on the kept-alive connection
    until the device's next request (a thousand devices retrying against a full store would
    hold a thousand bodies)."""
    config = request.app[CONFIG]
    try:
        token = _bearer_token(request, config)
        if not request.app[ADMISSION].admits():
            raise _unavailable(config, f"the site's store is full ({request.app[ADMISSION].refusal()})")
        body_format = upload.body_format(request.headers.get("Content-Type"))
        limit = upload.body_limit(body_format, config.max_image_bytes)
        declared_length = request.content_length
        if declared_length is not None and declared_length > limit:
            raise Problem(
                413,
                f"body of {declared_length} bytes is larger than the {limit} bytes an image of at most "
                f"{config.max_image_bytes} bytes needs",
            )
        slot = _admit_device(request, token)
        held = upload.held_bytes(declared_length if declared_length is not None else limit)
        if not request.app[BUDGET].try_reserve(held):
            slot.refund()  # refused for the gateway's sake, not the device's
            slot.release()
            raise Problem(
                503, "the gateway is at its limit of uploads in flight; retry later", retry_after=1
            )
    except Problem as refusal:
        refusal.headers["Connection"] = "close"
        raise
    return _Admitted(token=token, body_format=body_format, limit=limit, held=held, slot=slot)


def _admit_device(request: web.Request, token: str | None) -> DeviceSlot:
    """Take a place among the device's uploads, or raise 429 (the device is past its limits)."""
    # A token authorises one device; with device auth off the client's address stands in for it.
    key = token.lower() if token is not None else f"address:{request.remote}"
    admitted = request.app[LIMITER].admit(key)
    if isinstance(admitted, DeviceSlot):
        return admitted
    request.app[METRICS].device_refusals.labels(admitted.reason).inc()
    if admitted.device_id is not None:
        log_fields(request)["device_id"] = admitted.device_id
    if admitted.warn:
        log.warning("a device sends past its limits; refusing its uploads with 429",
                    extra={"device_id": admitted.device_id or "(not yet seen authorised)",
                           "limit": admitted.reason, "refused_since_last_said": admitted.refused_since_warned})
    raise Problem(429, admitted.detail, retry_after=admitted.retry_after_s)


async def _read_body(request: web.Request, limit: int, config: GatewayConfig) -> bytearray:
    """Read the body; refuse it (413) as soon as it passes ``limit`` bytes, and cut it (408)
    when it stalls for ``body_timeout`` or falls behind ``body_min_rate`` on average
    (counted from ``body_timeout`` after it began): a slow client holds its slot that long, no longer.

    The body goes into one buffer of its declared length (no list of chunks joined into a copy).
    """
    loop = asyncio.get_running_loop()
    started = loop.time()
    declared = request.content_length
    body = bytearray(declared) if declared is not None else bytearray()
    received = 0
    try:
        while True:
            behind_at = started + config.body_timeout + received / config.body_min_rate
            wait = min(config.body_timeout, behind_at - loop.time())
            try:
                if wait <= 0:
                    raise TimeoutError
                async with asyncio.timeout(wait):
                    chunk = await request.content.readany()
            except TimeoutError:
                raise _too_slow(config, received, stalled=wait >= config.body_timeout) from None
            if not chunk:
                break
            end = received + len(chunk)
            if end > limit:
                raise Problem(413, f"body is larger than the {limit} bytes an upload may take")
            if declared is None:
                body += chunk
            else:
                body[received:end] = chunk
            received = end
    except (ConnectionError, ClientError, HttpProcessingError, asyncio.IncompleteReadError) as exc:
        raise Problem(400, f"the body could not be read completely: {exc}") from None
    if declared is not None and received != declared:
        raise Problem(400, f"the body ended after {received} of the {declared} bytes its Content-Length says")
    return body


def _too_slow(config: GatewayConfig, received: int, *, stalled: bool) -> Problem:
    why = (f"no bytes arrived for {config.body_timeout:g} s" if stalled else
           f"it arrived slower than {config.body_min_rate:g} bytes/s on average")
    # Connection: close, so the rest of a stalled body is not waited for on this connection.
    return Problem(408, f"the body was cut after {received} bytes: {why}; send it again",
                   headers={"Connection": "close"})


async def _store_and_queue(request: web.Request, photo: upload.Upload) -> web.Response:
    config = request.app[CONFIG]
    store = request.app[STORE]
    broker = request.app[BROKER]
    if not broker.is_ready:
        # Checked before writing, so an outage does not leave objects behind.
        raise _unavailable(config, f"the message broker is unavailable ({broker.readiness()})")
    if broker.blocked:
        # Likewise while a resource alarm on the broker blocks new messages: nothing would be queued.
        raise _unavailable(config, "the message broker takes no new message now (a resource alarm on the broker)")

    photo_id = photos.photo_id(photo.device_id, photo.captured_at, photo.sha256)
    key = photos.object_key(photo_id)
    log_fields(request).update(photo_id=photo_id, size=len(photo.image))
    metadata = photos.photo_metadata(
        device_id=photo.device_id, captured_at=photo.captured_at, received_at=datetime.now(UTC),
        sha256=photo.sha256, labels=upload.encode_labels(photo.labels) if photo.labels else None)

    admission = request.app[ADMISSION]
    if not admission.reserve(len(photo.image)):
        raise _unavailable(config, f"the site's store is full ({admission.refusal()})")
    created = False
    try:
        try:
            created = await store.create(key, photo.image, content_type=photo.content_type, metadata=metadata)
        finally:
            if not created:
                admission.release(len(photo.image))
        if created:
            await _queue(request, photo_id, len(photo.image), photo.content_type, metadata, origin=messages.UPLOAD)
            request.app[METRICS].stored_bytes.inc(len(photo.image))
            body = _description(photo_id, len(photo.image), photo.content_type, metadata, "queued")
            return json_response(body, status=201, headers={"Location": f"/v1/photos/{photo_id}"})

        # A retry of a photo already stored: answer as for the first attempt.
        stored = await store.stat(key)
        shipped = await store.stat(photos.shipped_marker_key(photo_id))
        parked = False
        if shipped is None:
            if stored is None:
                raise _unavailable(config, "the photo changed in the store while it was being stored")
            # A parked photo waits for an operator with its message on the parking queue: queueing
            # it again would only park it again. It is answered as GET /v1/photos/{id} has it.
            parked = await store.exists(photos.parked_marker_key(photo_id))
            if not parked:
                # The first attempt may have stopped between storing and queueing; a
                # second message is harmless (an object is shipped once) and closes that gap.
                await _queue(request, photo_id, stored.size, stored.content_type, stored.metadata,
                             origin=messages.DEVICE_RETRY)
        body = _describe(photo_id, stored, shipped, parked=parked)
        return json_response(body, status=200, headers={"Location": f"/v1/photos/{photo_id}"})
    except StoreUnavailable as exc:
        log.warning("local store unavailable", extra={"error": str(exc), "photo_id": photo_id})
        raise _unavailable(config, "the local store is unavailable") from None


async def _queue(
    request: web.Request, photo_id: str, size: int, content_type: str, metadata: dict[str, str], *, origin: str
) -> None:
    config = request.app[CONFIG]
    shipping = photos.PhotoMessage.from_metadata(photo_id, size=size, content_type=content_type, metadata=metadata)
    # A new photo goes to the fresh queue; unshipped within the window, it expires into the backlog.
    message = messages.shipping_message(shipping.to_json(), origin=origin, expires_in=config.fresh_window,
                                        publisher_bytes=request.app[ADMISSION].stored_bytes)
    try:
        await request.app[BROKER].publish(
            topology.PHOTOS_EXCHANGE,
            topology.FRESH_ROUTING_KEY,
            message,
            timeout=config.publish_timeout,
        )
    except BrokerUnavailable as exc:
        # The object stays in the store: the device's retry queues it again
        # (answered 200), and the store keeper's reconciler would find it too.
        log.warning("could not queue a stored photo", extra={"error": str(exc), "photo_id": photo_id})
        raise _unavailable(config, f"the message broker did not take the photo ({exc})") from None


def _describe(
    photo_id: str, stored: StoredObject | None, shipped: StoredObject | None, *, parked: bool
) -> dict[str, Any]:
    """Describe a photo from its object or, once retention removed that, its shipped marker."""
    state = "shipped" if shipped else "parked" if parked else "queued"
    if stored is not None:
        body = _description(photo_id, stored.size, stored.content_type, stored.metadata, state)
    else:
        assert shipped is not None, "a photo is described from its object or its shipped marker"
        size = shipped.metadata.get("size", "")
        body = _description(
            photo_id, int(size) if size.isdigit() else None, shipped.content_type, shipped.metadata, state
        )
    if shipped is not None:
        body["shipped_at"] = shipped.metadata.get("shipped-at")
    return body


def _description(
    photo_id: str, size: int | None, content_type: str, metadata: dict[str, str], state: str
) -> dict[str, Any]:
    labels = metadata.get("labels")
    return {
        "id": photo_id,
        "status": state,
        "device_id": photos.owner_of(photo_id),
        "captured_at": metadata.get("captured-at"),
        "received_at": metadata.get("received-at"),
        "size": size,
        "sha256": metadata.get("sha256"),
        "content_type": content_type,
        "labels": orjson.loads(labels) if labels else {},
    }


async def photo_status(request: web.Request) -> web.Response:
    """``GET /v1/photos/{id}``: the state of a photo, for the device that owns it."""
    config = request.app[CONFIG]
    store = request.app[STORE]
    token = _bearer_token(request, config)
    photo_id = request.match_info["photo_id"]
    if not photos.is_photo_id(photo_id):
        raise Problem(404, f"{photo_id!r} is not a photo id")
    _authorize(request, photos.owner_of(photo_id), token)
    try:
        stored = await store.stat(photos.object_key(photo_id))
        shipped = await store.stat(photos.shipped_marker_key(photo_id))
        parked = shipped is None and await store.exists(photos.parked_marker_key(photo_id))
    except StoreUnavailable as exc:
        log.warning("local store unavailable", extra={"error": str(exc), "photo_id": photo_id})
        raise _unavailable(config, "the local store is unavailable") from None
    if stored is None and shipped is None:
        raise Problem(404, f"no photo {photo_id!r} is known here")
    return json_response(_describe(photo_id, stored, shipped, parked=parked))


def _bearer_token(request: web.Request, config: GatewayConfig) -> str | None:
    """Return the device token of a request, or raise 401; None when auth is off."""
    if config.device_secret is None:
        return None
    token = tokens.bearer_token(request.headers.get("Authorization"))
    if token is None:
        raise Problem(
            401, "a device token is required: Authorization: Bearer <token>", headers=_WWW_AUTHENTICATE
        )
    if not tokens.is_well_formed(token):
        raise Problem(
            401, "the device token is malformed (a token is 64 hex digits)", headers=_WWW_AUTHENTICATE
        )
    return token


def _authorize(request: web.Request, device_id: str, token: str | None) -> None:
    """Raise 403 unless ``token`` is the token of ``device_id`` (by the current or the previous
    secret) and the device is not on the operator's deny list."""
    config = request.app[CONFIG]
    if config.device_secret is None:
        return
    secrets = [config.device_secret]
    if config.device_secret_previous is not None:
        secrets.append(config.device_secret_previous)
    matched = None if token is None else tokens.matching_secret(secrets, device_id, token)
    if matched is None:
        raise Problem(403, f"the token does not authorise device {device_id!r}")
    if matched == 1:
        request.app[METRICS].previous_secret_requests.inc()
        log_fields(request)["secret"] = "previous"
    reason = request.app[DENY_LIST].current.reason(device_id)
    if reason is not None:
        request.app[METRICS].denied_requests.inc()
        raise Problem(403, f"device {device_id!r} is denied by the site's operator ({reason}); "
                           "it may not upload until the operator allows it again")


def _unavailable(config: GatewayConfig, reason: str) -> Problem:
    return Problem(503, f"{reason}; retry later", retry_after=config.retry_after_s)
