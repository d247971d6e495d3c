"""The operator's figures as a newcomer reads them: what stopped is said to have stopped, each class
of egress is credited to itself, and the link is blamed only when it is slower than the cap."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from services.common.broker import Broker
from services.common.config import StoreKeeperConfig
from services.common.localstore import LocalStore
from services.common.shipping import Heartbeat, ShippingControl
from services.common.units import format_duration
from services.store.capacity import Capacity
from services.store.figures import Figures
from services.store.metrics import KeeperMetrics
from services.store.tap import Tap


@pytest.fixture
def figures(tmp_path: Path) -> Figures:
    config = StoreKeeperConfig.from_env({
        "PHOTOFERRY_AMQP_URL": "amqp://u:p@127.0.0.1:1/", "PHOTOFERRY_STORE_ENDPOINT": f"file://{tmp_path}",
        "PHOTOFERRY_ADMIN_TOKEN": "t", "PHOTOFERRY_SHIP_RATE": "10KB"})
    store, tap = LocalStore(config.store), Tap()
    capacity = Capacity(config, store=store, tap=tap, metrics=KeeperMetrics())
    figures = Figures(config, store=store, broker=Broker(config.amqp_url, name="test"), tap=tap, capacity=capacity,
                      parked_messages=lambda: 0)
    tap.on_queued, tap.on_shipped = figures.heard_queued, figures.heard_shipped
    return figures


def beat(egress: float, *, link_limited: bool) -> Heartbeat:
    return Heartbeat(replica="r1", state="running", busy=True, cap_bytes_per_s=10_000, share_bytes_per_s=10_000,
                     egress_bytes_per_s=egress, fresh_egress_bytes_per_s=0.0, sent_bytes_total=0,
                     shipped_objects_total=0, in_flight=1, concurrency=1, link_limited=link_limited)


def test_ingest_is_zero_once_devices_stop_not_a_minute_later(figures: Figures) -> None:
    figures.tap.ingest_bytes.add(600_000)
    figures.heard_queued("20260101T000000Z-0123456789abcdef0123-cam", 600_000, time.time())
    assert figures.status()["ingest_bytes_per_s"] == pytest.approx(10_000)
    figures._last_ingest -= 11  # nothing heard for 11 s
    status = figures.status()
    assert status["ingest_bytes_per_s"] == 0 and status["text"]["eta_drain"] != "never at current rates"


def test_egress_is_credited_to_the_class_that_shipped(figures: Figures) -> None:
    figures.tap._shippers["r1"] = (beat(9_000, link_limited=False), time.monotonic())
    figures.heard_shipped("20260101T000000Z-0123456789abcdef0123-cam", 60_000, 1.0, "fresh")
    status = figures.status()
    assert status["fresh"]["egress_bytes_per_s"] == 9_000 and status["backlog_class"]["egress_bytes_per_s"] == 0


@pytest.mark.parametrize(("egress", "blamed"), [(9_400, False), (10_000, False), (5_000, True)])
def test_the_link_is_blamed_only_when_it_is_slower_than_the_cap(figures: Figures, egress: float,
                                                                 blamed: bool) -> None:
    figures.tap._shippers["r1"] = (beat(egress, link_limited=True), time.monotonic())
    assert figures.status()["link_limited"] is blamed


def test_short_durations_keep_their_decimal() -> None:
    assert format_duration(0.27) == "0.3 s" and format_duration(0) == "0 s" and format_duration(45) == "45 s"


def band_beat(replica: str, state: str, *, egress: float, delay: float | None) -> Heartbeat:
    return Heartbeat(replica=replica, state="running", busy=True, cap_bytes_per_s=10_000, share_bytes_per_s=5_000,
                     egress_bytes_per_s=egress, fresh_egress_bytes_per_s=0.0, sent_bytes_total=0,
                     shipped_objects_total=0, in_flight=1, concurrency=1, link_limited=False,
                     ceiling_bytes_per_s=40_000, allowed_bytes_per_s=egress, scavenging=state,
                     queueing_delay_s=delay, base_delay_s=0.02, delay_target_s=0.005)


def test_the_band_above_the_cap_says_what_it_carries_and_the_most_telling_state(figures: Figures) -> None:
    assert figures.status()["scavenging"]["state"] == "off"
    figures.control = ShippingControl(ceiling_override=40_000)
    figures.tap._shippers["r1"] = (band_beat("r1", "using_idle_uplink", egress=15_000, delay=0.001),
                                   time.monotonic())
    band = figures.status()["scavenging"]
    assert band["state"] == "using_idle_uplink" and band["floor_bytes_per_s"] == 10_000
    assert band["ceiling_bytes_per_s"] == 40_000 and band["above_floor_bytes_per_s"] == 5_000
    assert band["allowed_bytes_per_s"] == 15_000 and band["queueing_delay_s"] == 0.001
    assert figures.status()["text"]["scavenging"].startswith("using idle uplink: 5.0 KB/s above the 10.0 KB/s floor")
    figures.tap._shippers["r2"] = (band_beat("r2", "yielding", egress=5_000, delay=0.012), time.monotonic())
    band = figures.status()["scavenging"]
    assert band["state"] == "yielding" and band["queueing_delay_s"] == 0.012  # the worst any replica sees
    assert "12.0 ms, above the 5.0 ms target" in figures.status()["text"]["scavenging"]
    figures.control = ShippingControl(ceiling_override=0.0)  # turned off: whatever the replicas last said
    assert figures.status()["scavenging"]["state"] == "off"
