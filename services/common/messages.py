"""The shipping message: one builder for everyone who asks for a photo to be shipped.

The gateway (a first upload, and a device's retry of a photo not yet shipped),
the shipper (a delayed retry, parking), the replay of parked photos and the
store keeper's reconciler all publish the same thing: the photo's
``PhotoMessage`` as JSON, persistent, with a unique ``message_id``, and headers
that say where this copy comes from and how often shipping it failed.

Headers the broker owns (``x-delivery-count``, ``x-death`` and the
``x-first-``/``x-last-death-*`` family) describe one message's life in one queue
and are never carried into a new message: a replayed photo starts with a clean
delivery count.
"""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

import aio_pika

ORIGIN_HEADER = "x-photoferry-origin"
ATTEMPT_HEADER = "x-photoferry-attempt"
LAST_ERROR_HEADER = "x-photoferry-last-error"
PARK_REASON_HEADER = "x-photoferry-park-reason"
# Which process published a copy, and (a gateway's) bytes it had stored by then: the store
# keeper shares the room under the high watermark among the gateways, and each gateway
# knows which of its photos the keeper's figure already counts (services/common/admission.py).
PUBLISHER_HEADER = "x-photoferry-publisher"
PUBLISHER_BYTES_HEADER = "x-photoferry-publisher-bytes"
PUBLISHER = f"{socket.gethostname()}-{os.getpid()}"
# Before the origin header: replays and the reconciler marked their copies so.
_LEGACY_NOT_FIRST = ("x-photoferry-replayed", "x-photoferry-reconciled")

# Where a copy of a shipping message comes from.
UPLOAD = "upload"  # the gateway stored a new photo
DEVICE_RETRY = "device-retry"  # a device sent a photo again that is stored but not shipped
RETRY = "retry"  # the shipper failed and asked for a delayed retry
PARKED = "parked"  # the shipper gave up on it (the parking queue)
REPLAY = "replay"  # an operator sent parked photos back
RECONCILE = "reconcile"  # the store keeper found a stored photo without a message
DEMOTED = "demoted"  # a shipper held a fresh photo past its window and moved it to the backlog
GIVEN_BACK = "given-back"  # a shipper gave back a delivery it had not started (a stop, a pause, a gated lane)
REDELIVERED = "redelivered"  # likewise, but an earlier delivery may have shipped it (check S3 first)

MAX_ERROR_CHARS = 500


def shipping_message(
    body: bytes,
    *,
    origin: str,
    attempt: int = 0,
    last_error: str | None = None,
    park_reason: str | None = None,
    expires_in: float | None = None,
    publisher_bytes: int | None = None,
) -> aio_pika.Message:
    """A persistent shipping message for a ``PhotoMessage`` body, with our headers only.

    ``expires_in`` (seconds) is the message's TTL: a fresh photo's message expires into
    the backlog queue when it is not shipped in time.
    """
    headers: dict[str, Any] = {ORIGIN_HEADER: origin, PUBLISHER_HEADER: PUBLISHER}
    if publisher_bytes is not None:
        headers[PUBLISHER_BYTES_HEADER] = publisher_bytes
    if attempt:
        headers[ATTEMPT_HEADER] = attempt
    if last_error:
        headers[LAST_ERROR_HEADER] = last_error[:MAX_ERROR_CHARS]
    if park_reason:
        headers[PARK_REASON_HEADER] = park_reason[:MAX_ERROR_CHARS]
    return aio_pika.Message(
        body,
        content_type="application/json",
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        message_id=uuid.uuid4().hex,
        timestamp=datetime.now(UTC),
        headers=headers,
        expiration=expires_in,
    )


def attempt_of(headers: Mapping[str, Any] | None) -> int:
    """How many times shipping this photo failed so far (0 for a header that is not a count)."""
    value = (headers or {}).get(ATTEMPT_HEADER, 0)
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0


def delivery_count(headers: Mapping[str, Any] | None) -> int:
    """The broker's count of earlier deliveries of this message (quorum queues)."""
    value = (headers or {}).get("x-delivery-count", 0)
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0


def is_first_publish(headers: Mapping[str, Any] | None) -> bool:
    """True for the copy published when a photo was stored: new ingest, not a retry of any kind."""
    headers = headers or {}
    if "x-death" in headers:
        return False  # the broker moved it between queues (a fresh photo joining the backlog)
    if ORIGIN_HEADER in headers:
        return headers[ORIGIN_HEADER] == UPLOAD
    return not any(h in headers for h in (ATTEMPT_HEADER, *_LEGACY_NOT_FIRST))
