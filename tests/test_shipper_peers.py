"""A replica re-splits the cap the moment it hears another turn busy, not at its next round."""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace

from services.common.config import ShipperConfig
from services.common.shipping import Heartbeat
from services.shipper.app import build_shipper
from services.shipper.metrics import ShipperMetrics
from services.shipper.pacing import WARM_UP_S

CAP = 4_000_000
ENV = {
    "PHOTOFERRY_AMQP_URL": "amqp://guest:guest@127.0.0.1:1/",
    "PHOTOFERRY_STORE_ENDPOINT": "http://127.0.0.1:1",
    "PHOTOFERRY_STORE_ACCESS_KEY": "k",
    "PHOTOFERRY_STORE_SECRET_KEY": "s",
    "PHOTOFERRY_STORE_BUCKET": "photos",
    "PHOTOFERRY_S3_ENDPOINT": "http://127.0.0.1:1",
    "PHOTOFERRY_S3_BUCKET": "remote",
    "PHOTOFERRY_SHIP_RATE": str(CAP),
}


def beat(replica: str, *, busy: bool) -> SimpleNamespace:
    heartbeat = Heartbeat(replica=replica, state="running", busy=busy, cap_bytes_per_s=CAP, share_bytes_per_s=0,
                          egress_bytes_per_s=0, fresh_egress_bytes_per_s=0, sent_bytes_total=0,
                          shipped_objects_total=0, in_flight=0, concurrency=1, link_limited=False)
    return SimpleNamespace(body=heartbeat.to_json())


def test_a_peer_turning_busy_halves_this_replicas_share_at_once() -> None:
    async def scenario() -> tuple[float, float, float]:
        shipper = build_shipper(ShipperConfig.from_env(ENV), ShipperMetrics())
        now = time.monotonic()
        shipper.pacing.listening(now - WARM_UP_S)
        await shipper.peers.on_heartbeat(beat("b", busy=False))  # type: ignore[arg-type]
        shipper.pacing.announce(now, holding=True, waiting=1)
        shipper.pacing.confirmed(now - 1, busy=True)
        shipper._resplit()
        alone = shipper.limiter.rate
        # No pace loop runs here: hearing the heartbeat is all it takes.
        await shipper.peers.on_heartbeat(beat("b", busy=True))  # type: ignore[arg-type]
        together = shipper.limiter.rate
        await shipper.peers.on_heartbeat(beat("b", busy=False))  # type: ignore[arg-type]
        return alone, together, shipper.limiter.rate

    alone, together, after = asyncio.run(scenario())
    assert (alone, together, after) == (CAP, CAP / 2, CAP)
