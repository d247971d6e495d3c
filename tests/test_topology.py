"""The broker definitions file is the topology the services declare."""

from __future__ import annotations

import json
from pathlib import Path

from services.common import topology

DEFINITIONS = Path(__file__).resolve().parent.parent / "rabbitmq" / "definitions.json"


def test_definitions_file_matches_the_code() -> None:
    assert json.loads(DEFINITIONS.read_text()) == topology.definitions(), (
        "rabbitmq/definitions.json is stale: run `make definitions`"
    )


def test_shipping_queue_is_a_quorum_queue_with_explicit_limits() -> None:
    ship = next(q for q in topology.QUEUES if q.name == topology.SHIP_QUEUE)
    assert ship.arguments["x-queue-type"] == "quorum"
    assert ship.arguments["x-delivery-limit"] > 0
    assert ship.arguments["x-dead-letter-exchange"] == topology.PARKING_EXCHANGE
    parked_bindings = [b for b in topology.BINDINGS if b.exchange == topology.PARKING_EXCHANGE]
    assert [b.queue for b in parked_bindings] == [topology.PARKED_QUEUE]
