"""The broker's topology: exchanges, queues and bindings, with their exact arguments.

This module is the source of ``rabbitmq/definitions.json`` (``python -m
services.common.topology > rabbitmq/definitions.json``; a test keeps the two
equal). Services declare the same entities with the same arguments at start, so
they also work against a bare broker; they never delete or re-declare a queue
with other arguments (the broker would refuse, and deleting drops messages).

Arguments are explicit rather than left to broker defaults, which differ between
RabbitMQ 3.10 (Debian) and the 3.13/4.x image the k3s manifests run.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Any

import aio_pika
import orjson
from aio_pika.abc import AbstractChannel, AbstractExchange, AbstractQueue

PHOTOS_EXCHANGE = "photoferry.photos"
PARKING_EXCHANGE = "photoferry.parking"
RETRY_EXCHANGE = "photoferry.retry"
# Operator controls (rate, pause) and shipper heartbeats reach every replica
# through these; each consumer binds a temporary queue of its own.
CONTROL_EXCHANGE = "photoferry.control"
STATUS_EXCHANGE = "photoferry.status"
# Shippers say which photos they shipped, so the store keeper's backlog follows at once.
SHIPPED_EXCHANGE = "photoferry.shipped"
# Two classes of shipping work. A new photo waits in the fresh queue for at most
# PHOTOFERRY_SHIP_FRESH_WINDOW (its message's TTL); unshipped by then, it expires
# into the shipping queue (the backlog), which drains oldest first. The fresh queue
# also keeps only the newest FRESH_QUEUE_MAX_PHOTOS waiting: when photos arrive
# faster than the fresh share ships them (the site's normal day), the oldest waiting
# one joins the backlog at once, so fresh photos ship seconds after receipt rather
# than a whole window late.
SHIP_QUEUE = "photoferry.ship"
FRESH_QUEUE = "photoferry.fresh"
PARKED_QUEUE = "photoferry.parked"
SHIP_ROUTING_KEY = "ship"
FRESH_ROUTING_KEY = "fresh"
FRESH_QUEUE_MAX_PHOTOS = 100

# A failed shipment waits in one of these queues (its TTL) and then returns to the
# shipping queue: the shipper never sleeps on a message it holds. The n-th retry
# of a photo waits RETRY_DELAYS_S[min(n, len) - 1] seconds. They are quorum queues,
# like every queue that holds photos: a classic queue lives on one broker node, and
# while that node is down no service could even declare the topology. (Versions
# before this one had classic queues named photoferry.retry.<N>s: they receive
# nothing new and drain into the backlog within their TTL, after which they can
# be deleted.)
RETRY_DELAYS_S = (5, 30, 120, 600, 1800)


def retry_queue(delay_s: int) -> str:
    return f"photoferry.delay.{delay_s}s"

# A message redelivered this often without an ack (a shipper crashing on it
# every time) is dead-lettered to the parking queue instead of looping forever.
SHIP_DELIVERY_LIMIT = 10


@dataclass(frozen=True)
class Exchange:
    name: str
    type: str
    arguments: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Queue:
    name: str
    arguments: dict[str, Any]


@dataclass(frozen=True)
class Binding:
    exchange: str
    queue: str
    routing_key: str


EXCHANGES = (
    Exchange(PHOTOS_EXCHANGE, "direct"),
    Exchange(PARKING_EXCHANGE, "fanout"),
    Exchange(RETRY_EXCHANGE, "direct"),
    Exchange(CONTROL_EXCHANGE, "fanout"),
    Exchange(STATUS_EXCHANGE, "fanout"),
    Exchange(SHIPPED_EXCHANGE, "fanout"),
)

QUEUES = (
    Queue(
        SHIP_QUEUE,
        {
            "x-queue-type": "quorum",
            "x-delivery-limit": SHIP_DELIVERY_LIMIT,
            "x-dead-letter-exchange": PARKING_EXCHANGE,
            # at-least-once dead-lettering needs reject-publish overflow; it keeps
            # a dead-lettered message until the parking queue has confirmed it.
            "x-dead-letter-strategy": "at-least-once",
            "x-overflow": "reject-publish",
        },
    ),
    Queue(
        FRESH_QUEUE,
        {
            "x-queue-type": "quorum",
            "x-delivery-limit": SHIP_DELIVERY_LIMIT,
            # Expired, pushed out by newer photos, or delivered too often: into the backlog.
            "x-dead-letter-exchange": PHOTOS_EXCHANGE,
            "x-dead-letter-routing-key": SHIP_ROUTING_KEY,
            "x-max-length": FRESH_QUEUE_MAX_PHOTOS,
            "x-overflow": "drop-head",
            # drop-head rules out at-least-once dead-lettering: a photo whose move to the
            # backlog is lost (the backlog queue unavailable at that instant) is still in
            # the store, unshipped, and the keeper's sweep queues it again.
            "x-dead-letter-strategy": "at-most-once",
        },
    ),
    Queue(PARKED_QUEUE, {"x-queue-type": "quorum"}),
    *(
        Queue(
            retry_queue(delay),
            {
                "x-queue-type": "quorum",
                "x-message-ttl": delay * 1000,
                "x-dead-letter-exchange": PHOTOS_EXCHANGE,
                "x-dead-letter-routing-key": SHIP_ROUTING_KEY,
                # A photo waiting out its delay is moved to the backlog at least once.
                "x-dead-letter-strategy": "at-least-once",
                "x-overflow": "reject-publish",
            },
        )
        for delay in RETRY_DELAYS_S
    ),
)

# Every queue that holds shipping messages for photos.
PHOTO_QUEUES = (FRESH_QUEUE, SHIP_QUEUE, PARKED_QUEUE, *(retry_queue(delay) for delay in RETRY_DELAYS_S))

BINDINGS = (
    Binding(PHOTOS_EXCHANGE, SHIP_QUEUE, SHIP_ROUTING_KEY),
    Binding(PHOTOS_EXCHANGE, FRESH_QUEUE, FRESH_ROUTING_KEY),
    Binding(PARKING_EXCHANGE, PARKED_QUEUE, ""),
    *(Binding(RETRY_EXCHANGE, retry_queue(delay), retry_queue(delay)) for delay in RETRY_DELAYS_S),
)


def definitions(vhost: str = "/") -> dict[str, Any]:
    """Return the topology in RabbitMQ's definitions format (no users: those are per site)."""
    return {
        "vhosts": [{"name": vhost}],
        "exchanges": [
            {
                "name": e.name,
                "vhost": vhost,
                "type": e.type,
                "durable": True,
                "auto_delete": False,
                "internal": False,
                "arguments": e.arguments,
            }
            for e in EXCHANGES
        ],
        "queues": [
            {
                "name": q.name,
                "vhost": vhost,
                "durable": True,
                "auto_delete": False,
                "arguments": q.arguments,
            }
            for q in QUEUES
        ],
        "bindings": [
            {
                "source": b.exchange,
                "vhost": vhost,
                "destination": b.queue,
                "destination_type": "queue",
                "routing_key": b.routing_key,
                "arguments": {},
            }
            for b in BINDINGS
        ],
    }


@dataclass
class Declared:
    """References to what was declared; a robust channel restores only what is referenced."""

    exchanges: dict[str, AbstractExchange]
    queues: dict[str, AbstractQueue]


async def declare(channel: AbstractChannel) -> Declared:
    """Declare the whole topology on ``channel`` with the arguments above."""
    exchanges = {
        e.name: await channel.declare_exchange(
            e.name, aio_pika.ExchangeType(e.type), durable=True, arguments=e.arguments
        )
        for e in EXCHANGES
    }
    queues = {
        q.name: await channel.declare_queue(q.name, durable=True, arguments=q.arguments)
        for q in QUEUES
    }
    for b in BINDINGS:
        await queues[b.queue].bind(exchanges[b.exchange], routing_key=b.routing_key)
    return Declared(exchanges=exchanges, queues=queues)


if __name__ == "__main__":
    sys.stdout.write(orjson.dumps(definitions(), option=orjson.OPT_INDENT_2).decode() + "\n")
