"""The band above the cap, as pure logic on a clock: delay samples in, a rate out."""

from __future__ import annotations

import itertools
from collections.abc import Callable

import pytest

from services.common.shipping import (
    SCAVENGING_MEASURING,
    SCAVENGING_OFF,
    SCAVENGING_UNMEASURED,
    SCAVENGING_USING,
    SCAVENGING_YIELDING,
)
from services.shipper import scavenger
from services.shipper.scavenger import Scavenger

MB = 1_000_000
FLOOR, CEILING = 1 * MB, 4.5 * MB
BASE = 0.020  # the path's own round trip
TARGET = 0.005
PROBE_EVERY = 0.1
WALL = 40_000_000 * scavenger.SLOWDOWN_EVERY_S + 1  # 1 s past a slowdown: the next comes 29 s later


class Path:
    """A scavenger probed every 100 ms; ``delay(t)`` is the round trip at t."""

    def __init__(self, ctl: Scavenger | None = None) -> None:
        self.ctl = ctl or Scavenger(TARGET)
        self.now = 0.0
        self.rates: list[tuple[float, float]] = []

    def run(self, seconds: float, delay: Callable[[float], float | None], *, floor: float = FLOOR,
            ceiling: float = CEILING) -> float:
        end = self.now + seconds
        rate = 0.0
        while self.now < end - 1e-9:
            self.now = round(self.now + PROBE_EVERY, 6)
            sample = delay(self.now)
            if sample is not None:
                self.ctl.sample(sample, self.now)
            rate = self.ctl.step(self.now, WALL + self.now, floor=floor, ceiling=ceiling)
            self.rates.append((self.now, rate))
        return rate

    def first_time(self, after: float, condition: Callable[[float], bool]) -> float | None:
        return next((t - after for t, rate in self.rates if t > after and condition(rate)), None)


def idle(_t: float) -> float:
    return BASE


def queue(ms: float) -> Callable[[float], float]:
    return lambda _t: BASE + ms / 1000


def test_without_a_band_the_rate_is_the_floor() -> None:
    path = Path()
    assert path.run(5, idle, ceiling=FLOOR) == FLOOR
    assert path.ctl.state == SCAVENGING_OFF
    assert path.run(5, idle, ceiling=0.0) == FLOOR


def test_it_measures_first_then_climbs_to_the_ceiling_on_an_idle_path() -> None:
    path = Path()
    assert path.run(0.2, idle) == FLOOR
    assert path.ctl.state == SCAVENGING_MEASURING
    path.run(scavenger.CLIMB_S + 1, idle)
    assert path.rates[-1][1] == CEILING
    assert path.ctl.state == SCAVENGING_USING
    assert path.ctl.base_delay_s == pytest.approx(BASE)
    assert path.ctl.queueing_delay_s == 0
    reached = path.first_time(0, lambda rate: rate >= 0.85 * CEILING)
    assert reached is not None and reached <= scavenger.CLIMB_S + 0.5


def test_a_queue_above_the_target_brings_it_down_to_the_floor_within_a_second() -> None:
    path = Path()
    path.run(4, idle)
    assert path.rates[-1][1] == CEILING
    started = path.now
    path.run(2, queue(30))
    assert path.ctl.state == SCAVENGING_YIELDING
    assert path.first_time(started, lambda rate: rate <= FLOOR) is not None
    assert path.first_time(started, lambda rate: rate <= FLOOR) <= 1.0
    assert min(rate for _, rate in path.rates) == FLOOR  # never below
    assert path.ctl.queueing_delay_s == pytest.approx(0.030)


def test_it_decreases_by_how_far_above_the_target_and_at_most_halves_a_step() -> None:
    path = Path()
    path.run(4, idle)
    before = path.rates[-1][1]
    path.run(PROBE_EVERY * 3, queue(6))  # 20% above the target: the filter sees it after its span
    slight = path.rates[-1][1]
    assert before * 0.5 < slight < before
    path = Path()
    path.run(4, idle)
    path.run(PROBE_EVERY * 4, queue(80))  # 16 times the target: as much as it may, and no more
    steps = [rate for _, rate in path.rates[-5:]]
    assert steps[-1] < steps[0]
    assert all(later >= earlier * 0.5 for earlier, later in itertools.pairwise(steps))


def test_near_the_target_it_climbs_more_slowly_than_on_an_empty_queue() -> None:
    empty, near = Path(), Path()
    for path in (empty, near):
        path.run(0.3, idle)  # the base
    empty.run(1.2, idle)
    near.run(1.2, queue(4))
    assert FLOOR < near.rates[-1][1] < empty.rates[-1][1]


def test_a_probe_caught_behind_a_burst_is_not_a_queue() -> None:
    path = Path()
    path.run(4, idle)
    burst = TARGET * scavenger.STRONG_QUEUE  # as long as a burst of a few dozen KB keeps a link busy
    path.run(1, lambda t: BASE + (burst if round(t * 10) % 3 == 0 else 0))  # one sample in three
    assert path.rates[-1][1] == CEILING
    assert path.ctl.state == SCAVENGING_USING


def test_a_single_probe_far_above_the_target_is_a_queue_at_once() -> None:
    path = Path()
    path.run(4, idle)
    path.run(PROBE_EVERY, queue(80))
    assert path.rates[-1][1] == CEILING / 2
    assert path.ctl.state == SCAVENGING_YIELDING


def test_when_the_queue_goes_it_climbs_back_within_a_few_seconds() -> None:
    path = Path()
    path.run(4, idle)
    path.run(5, queue(30))
    assert path.rates[-1][1] == FLOOR
    stopped = path.now
    path.run(6, idle)
    back = path.first_time(stopped, lambda rate: rate >= 0.85 * CEILING)
    assert back is not None and back <= 4.0
    assert path.ctl.state == SCAVENGING_USING


def test_without_samples_it_stays_at_the_floor_and_measures_afresh() -> None:
    path = Path()
    path.run(4, idle)
    path.run(scavenger.STALE_AFTER_S + 0.2, lambda _t: None)
    assert path.rates[-1][1] == FLOOR
    assert path.ctl.state == SCAVENGING_UNMEASURED
    assert path.ctl.queueing_delay_s is None
    path.run(0.2, idle)
    assert path.rates[-1][1] == FLOOR
    assert path.ctl.state == SCAVENGING_MEASURING
    path.run(4, idle)
    assert path.rates[-1][1] == CEILING


def test_it_slows_down_to_the_floor_every_so_often_on_the_wall_clock() -> None:
    path = Path()
    path.run(scavenger.SLOWDOWN_EVERY_S + 5, idle)
    slowed = [t for t, rate in path.rates if rate == FLOOR and t > 5]
    # One slowdown, where the wall clock passes a multiple of SLOWDOWN_EVERY_S (29 s in).
    assert slowed and min(slowed) == pytest.approx(scavenger.SLOWDOWN_EVERY_S - 1 + PROBE_EVERY, abs=0.11)
    assert max(slowed) - min(slowed) < scavenger.SLOWDOWN_S
    assert path.rates[-1][1] == CEILING
    assert path.ctl.state == SCAVENGING_USING  # a slowdown is not news for operators


def test_the_base_is_the_least_delay_of_the_last_minutes_and_forgets_older_ones() -> None:
    path = Path()
    path.run(2, queue(0))
    path.run(60 * scavenger.BASE_BUCKETS, queue(10), ceiling=FLOOR)  # a longer path now (no band meanwhile)
    assert path.ctl.base_delay_s == pytest.approx(BASE + 0.010)
    path.run(4, queue(10))
    assert path.rates[-1][1] == CEILING


def test_the_rate_stays_within_a_floor_and_ceiling_that_change() -> None:
    path = Path()
    path.run(4, idle)
    assert path.run(0.3, idle, floor=FLOOR / 2, ceiling=CEILING / 2) == CEILING / 2  # a second replica joined
    path.run(1, queue(50), floor=FLOOR / 2, ceiling=CEILING / 2)
    assert path.rates[-1][1] == FLOOR / 2


def test_a_target_must_be_positive() -> None:
    with pytest.raises(ValueError):
        Scavenger(0)
