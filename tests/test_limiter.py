"""The byte-level limiter, on a simulated clock and on real threads."""

from __future__ import annotations

import threading
import time

import pytest

from services.shipper.limiter import Pace, RateLimiter


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def test_a_reader_is_held_to_the_rate() -> None:
    clock = FakeClock()
    limiter = RateLimiter(1000, clock=clock, sleep=clock.sleep)
    for _ in range(100):
        limiter.acquire(100)
    # Never further ahead than the debt it may run up before it sleeps (10 ms of the rate).
    assert clock.now == pytest.approx(10.0, abs=0.011)
    assert limiter.granted == 10_000


def test_a_reader_sleeps_once_per_few_pieces_not_for_each() -> None:
    clock = FakeClock()
    sleeps: list[float] = []

    def sleep(seconds: float) -> None:
        sleeps.append(seconds)
        clock.sleep(seconds)

    limiter = RateLimiter(1_000_000, burst_s=0.01, debt_s=0.01, clock=clock, sleep=sleep)
    for _ in range(100):
        limiter.acquire(2_000)  # 2 ms of the rate each
    assert clock.now == pytest.approx(0.2, abs=0.011)
    assert len(sleeps) <= 20  # a sleep per 5 pieces or so, not 100


def test_idle_time_buys_at_most_the_burst() -> None:
    clock = FakeClock()
    limiter = RateLimiter(1000, burst_s=0.05, debt_s=0, clock=clock, sleep=clock.sleep)
    clock.now = 100.0  # long idle
    limiter.acquire(50)  # the burst: 50 ms worth, no wait
    assert clock.now == 100.0
    limiter.acquire(1000)
    assert clock.now == pytest.approx(101.0)


def test_rate_changes_apply_from_then_on() -> None:
    clock = FakeClock()
    limiter = RateLimiter(1000, debt_s=0, clock=clock, sleep=clock.sleep)
    limiter.acquire(1000)
    limiter.set_rate(4000)
    limiter.acquire(4000)
    assert clock.now == pytest.approx(2.0)


def test_concurrent_readers_share_the_rate() -> None:
    limiter = RateLimiter(200_000)
    started = time.monotonic()

    def reader() -> None:
        for _ in range(20):
            limiter.acquire(2000)

    threads = [threading.Thread(target=reader) for _ in range(5)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.monotonic() - started
    # 200 KB at 200 KB/s: about a second, never much less.
    assert elapsed >= 0.95


def test_pieces_are_small_at_low_rates() -> None:
    assert RateLimiter(10_000).piece() == 1024
    assert RateLimiter(5_000_000).piece() == 50_000
    assert RateLimiter(100_000_000).piece() == 65536
    with pytest.raises(ValueError):
        RateLimiter(0)


def test_bytes_charged_without_waiting_are_paid_for_by_the_readers() -> None:
    clock = FakeClock()
    limiter = RateLimiter(1000, clock=clock, sleep=clock.sleep)
    for _ in range(10):
        limiter.charge(100)  # a probe's bytes: counted, never waited for
    assert clock.now == 0
    for _ in range(90):
        limiter.acquire(100)
    # Together they keep to the rate: 10,000 bytes take the readers 10 s, as if they sent them all.
    assert clock.now == pytest.approx(10.0, abs=0.011)
    assert limiter.granted == 10_000


def test_fresh_photos_bytes_are_charged_to_the_backlog_while_the_classes_compete() -> None:
    clock = FakeClock()
    replica, fresh, backlog = (RateLimiter(rate, clock=clock, sleep=clock.sleep) for rate in (4e6, 1e6, 4e6))
    competing = True
    pace = Pace(replica, fresh, lambda: competing, charge=backlog)
    pace.acquire(100_000)
    assert (fresh.granted, backlog.granted, replica.granted) == (100_000, 100_000, 100_000)
    competing = False  # alone, fresh photos take the whole share and owe the backlog nothing
    pace.acquire(50_000)
    assert (fresh.granted, backlog.granted, replica.granted) == (100_000, 100_000, 150_000)
