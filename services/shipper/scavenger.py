"""The band above the cap: ship on what the uplink has idle, yield the moment other traffic needs it.

The operator's cap is the floor, kept whatever happens. Between it and the
ceiling (``PHOTOFERRY_SHIP_CEILING``, per schedule window, or the operator's
override) a replica sends only while it adds no queueing delay on the path to S3
beyond a small target, as LEDBAT++ does (the background transport of Windows
Update), on a rate instead of a congestion window:

- **Delay.** Round trips to the S3 endpoint are sampled continuously (a probe,
  ``delayprobe``). The *base* delay is the least sample of the last
  ``BASE_BUCKETS`` minutes (kept as one minimum a minute); the *current* delay
  is the lesser of the last ``CURRENT_SAMPLES`` (a single probe caught behind a
  burst is not a queue), unless the newest alone is ``STRONG_QUEUE`` times the
  target above the base (no burst queues that long: someone fills the link, act
  now); queueing delay is the difference. A link with
  room to spare keeps no queue; a link someone fills keeps one.
- **Up additively** while the queueing delay is under the target: from the
  floor to the ceiling in ``CLIMB_S`` on an empty queue, more slowly as the
  delay nears the target.
- **Down multiplicatively** above it, by how far above (``queueing / target - 1``),
  at most halving once a round trip (``DECREASE_EVERY_S`` at least), never below
  the floor.
- **Slowdowns.** Every ``SLOWDOWN_EVERY_S`` of the wall clock a replica above its
  floor drops to it for ``SLOWDOWN_S``, so a queue of its own drains and the base
  is measured again (it would otherwise creep up with a queue the replica keeps
  itself, and the band with it). The instants are on the wall clock, so every
  replica of a site slows down at once and none measures another's queue as its
  base. Under 2% of the band.
- **No measurement, no band.** Until ``WARM_SAMPLES`` samples have come in, and
  whenever the last one is older than ``STALE_AFTER_S``, the rate is the floor.

Several replicas share the band as they share the cap: each one's floor and
ceiling are the site's divided by the busy replicas (``CapShare``), so the sum
never exceeds the ceiling; each measures the same path and yields on its own.

Pure logic on the clocks the caller passes (monotonic for intervals, the wall
clock for the slowdowns): samples in, a rate out; no I/O.
"""

from __future__ import annotations

from collections import deque

from services.common.shipping import (
    SCAVENGING_MEASURING,
    SCAVENGING_OFF,
    SCAVENGING_UNMEASURED,
    SCAVENGING_USING,
    SCAVENGING_YIELDING,
)

BASE_BUCKET_S = 60.0
BASE_BUCKETS = 10  # the base delay is the least sample of the last 10 minutes
CURRENT_SAMPLES = 2
STRONG_QUEUE = 4.0
STALE_AFTER_S = 1.0
WARM_SAMPLES = 3
CLIMB_S = 2.5
MAX_DECREASE = 0.5
DECREASE_EVERY_S = 0.1
MAX_STEP_S = 0.5  # a longer gap between steps (a stalled loop) climbs no further than this
SLOWDOWN_EVERY_S = 30.0
SLOWDOWN_S = 0.5
USING_ABOVE = 0.1  # of the band: above the floor by this much, the replica is using idle uplink


class Scavenger:
    """One replica's rate between its floor and its ceiling, from the delay samples it is given."""

    def __init__(self, target_s: float) -> None:
        if target_s <= 0:
            raise ValueError("the target queueing delay must be above zero")
        self.target_s = target_s
        self.state = SCAVENGING_OFF
        self.queueing_delay_s: float | None = None
        self._rate = 0.0  # as the controller has it; the slowdowns do not change it
        self._recent: deque[tuple[float, float]] = deque(maxlen=CURRENT_SAMPLES)  # (when, delay)
        self._base: dict[int, float] = {}  # minute -> least delay sampled in it
        self._active = False
        self._samples_since_active = 0
        self._stepped_at: float | None = None
        self._decreased_at = float("-inf")

    def sample(self, delay_s: float, now: float) -> None:
        """A round trip to S3 measured at ``now`` (a probe that got no answer: its timeout)."""
        self._recent.append((now, delay_s))
        minute = int(now // BASE_BUCKET_S)
        self._base[minute] = min(delay_s, self._base.get(minute, delay_s))
        for old in [m for m in self._base if m <= minute - BASE_BUCKETS]:
            del self._base[old]
        if self._active:
            self._samples_since_active += 1

    def step(self, now: float, wall: float, *, floor: float, ceiling: float) -> float:
        """The rate this replica may send at now, between ``floor`` and ``ceiling`` (bytes per second)."""
        if ceiling <= floor:
            self._deactivate(SCAVENGING_OFF)
            return floor
        if not self._active:
            self._active = True
            self._samples_since_active = 0
            self._rate = floor
            self.state = SCAVENGING_MEASURING
        current = self._current(now)
        if current is not None and self._recent[-1][1] - min(self._base.values()) > STRONG_QUEUE * self.target_s:
            current = self._recent[-1][1]  # a queue no burst makes: no second sample to wait for
        if current is None:
            # Blind: the floor until samples come again, then measure afresh.
            self._samples_since_active = 0
            self._rate = floor
            self._stepped_at = None
            self.state = SCAVENGING_UNMEASURED if self.state != SCAVENGING_MEASURING else SCAVENGING_MEASURING
            self.queueing_delay_s = None
            return floor
        queueing = max(0.0, current - min(self._base.values()))
        self.queueing_delay_s = queueing
        if self._samples_since_active < WARM_SAMPLES:
            self._rate = floor
            self.state = SCAVENGING_MEASURING
            return floor
        dt = 0.0 if self._stepped_at is None else min(max(0.0, now - self._stepped_at), MAX_STEP_S)
        self._stepped_at = now
        if self._slowing_down(wall, floor):
            return floor
        band = ceiling - floor
        if queueing > self.target_s:
            self.state = SCAVENGING_YIELDING
            if now - self._decreased_at >= max(DECREASE_EVERY_S, current):
                self._decreased_at = now
                self._rate *= 1 - min(MAX_DECREASE, queueing / self.target_s - 1)
        else:
            self._rate += band / CLIMB_S * dt * (1 - queueing / self.target_s)
            if self._rate - floor > USING_ABOVE * band:
                self.state = SCAVENGING_USING
        self._rate = min(max(self._rate, floor), ceiling)
        return self._rate

    @property
    def base_delay_s(self) -> float | None:
        """The path's delay with no queue: the least sample of the last minutes."""
        return min(self._base.values()) if self._base else None

    def _current(self, now: float) -> float | None:
        """The least of the last samples that are not stale; None when none is fresh."""
        fresh = [delay for when, delay in self._recent if when >= now - STALE_AFTER_S]
        return min(fresh) if fresh else None

    def _slowing_down(self, wall: float, floor: float) -> bool:
        return self._rate > floor and wall % SLOWDOWN_EVERY_S < SLOWDOWN_S

    def _deactivate(self, state: str) -> None:
        self._active = False
        self._stepped_at = None
        self.state = state
        self.queueing_delay_s = None
