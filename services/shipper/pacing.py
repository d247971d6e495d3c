"""This replica's part of the site-wide cap, agreed with the other replicas.

The cap is global. Every replica announces in its heartbeat whether it is busy
(has photos in hand or waiting), hears the others', and takes cap / busy
replicas: an idle replica leaves its part to the others instead of wasting it.

The rules that keep the sum of the shares under the cap:

- **Joining.** A replica that turns busy while others are busy sends only once
  the broker has confirmed its busy heartbeat and ``JOIN_DELAY_S`` has passed,
  so the others have heard it and re-split. When no other replica is busy it
  starts at once, at cap / (live replicas): every idle one could be joining at the
  same instant, and none takes more than that until it has joined.
- **Warming up.** A replica that has just started listening first hears a full
  round of the others' heartbeats (``WARM_UP_S``).
- **Being heard.** The others forget a replica not heard for ``PEER_TTL_S`` and
  take its part; so a replica whose heartbeats have not been confirmed for
  ``SELF_TTL_S`` is *cut off* and sends nothing until they are again.
- **A resource alarm.** While the broker blocks publishing, no replica's
  heartbeat gets through, for all of them at once (an alarm is cluster-wide):
  each keeps its view of the others as it was when the alarm began, and is not
  cut off, so shipping carries on at the shares agreed before it.

While photos wait in the queue a replica stays busy for ``BUSY_GRACE_S`` after
its last one, so a steady stream does not pay the join each time; when none wait
it turns idle at once.

The ceiling of the band above the cap, where only idle uplink is used, is split
the same way (``part``): each replica's band lies between its part of the cap and
its part of the ceiling, so the sum never exceeds the ceiling either.

Within a replica, the share is split between two classes of work (``split``):
fresh photos may take up to ``fresh_share`` of it while the backlog also has
work, and the backlog takes the rest and whatever fresh photos leave unused.

Pure bookkeeping on a clock the caller passes in: no I/O, no sleeping.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from services.common.shipping import HEARTBEAT_EVERY_S, PEER_TTL_S, Heartbeat

JOIN_DELAY_S = 0.25  # heartbeats cross the broker in milliseconds and peers re-split on receipt
BUSY_GRACE_S = 2.0
WARM_UP_S = 1.5 * HEARTBEAT_EVERY_S  # every peer's periodic heartbeat has arrived by then
SELF_TTL_S = PEER_TTL_S - HEARTBEAT_EVERY_S  # a beat of margin before the others forget this replica
FORGET_AFTER_S = 10 * PEER_TTL_S  # a peer gone this long is dropped from the table altogether


class CapShare:
    def __init__(self, replica: str) -> None:
        self.replica = replica
        self.cap = 0.0  # site-wide, bytes per second
        self.share = 0.0  # this replica's part, were it busy
        self.busy_replicas = 1
        self.announced_busy = False
        self.cut_off = True  # until a first heartbeat is confirmed
        self.blocked = False
        # Set while this replica may start uploads at its share.
        self.may_send = asyncio.Event()
        self._peers: dict[str, tuple[bool, float]] = {}  # replica -> (busy, when heard)
        self._busy_until = 0.0
        self._joined_at: float | None = None  # when the broker confirmed this replica's busy heartbeat
        self._confirmed_at: float | None = None  # its last heartbeat the broker confirmed
        self._listening_since: float | None = None  # None: not hearing the others yet
        self._frozen_at: float | None = None  # a resource alarm began: peers are judged as of then

    def listening(self, now: float) -> None:
        """The replica hears the others' heartbeats from now on (again, after a reconnection)."""
        self._listening_since = now

    def hear(self, beat: Heartbeat, now: float) -> bool:
        """Note a peer's heartbeat; True when the split changes (re-split now)."""
        if beat.replica == self.replica:
            return False
        before = self._peers.get(beat.replica)
        self._peers[beat.replica] = (beat.busy, now)
        return before is None or before[0] != beat.busy or not self._live(before[1], now)

    def confirmed(self, now: float, *, busy: bool) -> None:
        """The broker confirmed a heartbeat of this replica, sent saying ``busy``."""
        self._confirmed_at = now
        if busy and self.announced_busy and self._joined_at is None:
            self._joined_at = now

    def set_blocked(self, blocked: bool, now: float) -> None:
        """The broker blocks publishing (a resource alarm), or no longer does."""
        if blocked and self._frozen_at is None:
            self._frozen_at = now
        elif not blocked and self._frozen_at is not None:
            # Everyone was silent for the same reason: judge peers (and this replica) as if
            # heard when it ended, so each has a round to be heard again.
            shift = now - self._frozen_at
            self._peers = {r: (busy, heard + shift) for r, (busy, heard) in self._peers.items()}
            if self._confirmed_at is not None:
                self._confirmed_at += shift
            self._frozen_at = None
        self.blocked = blocked

    def announce(self, now: float, *, holding: bool, waiting: int) -> bool:
        """Decide whether this replica is busy; True when that changed (tell the others at once)."""
        if holding:
            self._busy_until = now + BUSY_GRACE_S
        elif waiting == 0:
            self._busy_until = min(self._busy_until, now)  # nothing waits: leave the cap to the others now
        busy = now < self._busy_until
        changed = busy != self.announced_busy
        if changed:
            self._joined_at = None  # a busy announcement has to be confirmed again
        self.announced_busy = busy
        return changed

    def split(self, cap: float, now: float) -> float:
        """Decide whether this replica may send, and its share of ``cap`` were it busy."""
        self.cap = cap
        at = self._frozen_at if self._frozen_at is not None else now
        live = [busy for busy, heard in self._peers.values() if self._live(heard, at)]
        self.cut_off = self._confirmed_at is None or at - self._confirmed_at > SELF_TTL_S
        joined = self._joined_at is not None and now - self._joined_at >= JOIN_DELAY_S
        if not self.announced_busy or self.cut_off or not self._warm(now):
            self.may_send.clear()
            self.busy_replicas = sum(live) + 1
        elif joined:
            self.may_send.set()
            self.busy_replicas = sum(live) + 1
        elif not any(live):
            # Nobody else is busy: start now, at a part every live replica could take at once.
            self.may_send.set()
            self.busy_replicas = len(live) + 1
        else:
            self.may_send.clear()  # the busy ones must hear this one first
            self.busy_replicas = sum(live) + 1
        self.share = cap / self.busy_replicas if cap > 0 else 0.0
        return self.share

    def part(self, rate: float) -> float:
        """This replica's part of another site-wide rate (the band's ceiling), as the last ``split``
        divided the cap."""
        return rate / self.busy_replicas if rate > 0 else 0.0

    def opens_in(self, now: float) -> float | None:
        """Seconds until this replica may send, when that is a matter of time (warming up, or its
        confirmed announcement travelling); None when it waits for something else."""
        if not self.announced_busy or self.may_send.is_set():
            return None
        waits = []
        if self._listening_since is not None:
            waits.append(self._listening_since + WARM_UP_S - now)
        if self._joined_at is not None:
            waits.append(self._joined_at + JOIN_DELAY_S - now)
        return max(0.01, *waits) if waits else None

    def leave(self) -> None:
        """Say goodbye: the next heartbeat tells the others this replica is idle."""
        self.announced_busy = False
        self._joined_at = None
        self.may_send.clear()

    def forget_gone(self, now: float) -> None:
        """Drop peers not heard for ``FORGET_AFTER_S`` (replicas come and go with every restart)."""
        if self._frozen_at is None:
            self._peers = {r: p for r, p in self._peers.items() if now - p[1] < FORGET_AFTER_S}

    @property
    def known_peers(self) -> int:
        return len(self._peers)

    def _live(self, heard: float, at: float) -> bool:
        return at - heard < PEER_TTL_S

    def _warm(self, now: float) -> bool:
        return self._listening_since is not None and now - self._listening_since >= WARM_UP_S


@dataclass(frozen=True)
class ClassRates:
    """Each class's rate in bytes per second; None: it may not start uploads now."""

    fresh: float | None
    backlog: float | None


def split(share: float, fresh_share: float, *, fresh_busy: bool, backlog_busy: bool) -> ClassRates:
    """Split this replica's ``share`` between fresh photos and the backlog.

    Both busy: fresh takes up to ``fresh_share`` of it; the backlog's limiter runs at
    the whole share and is charged with the fresh photos' bytes too (``Pace``), so it
    gets the rest and whatever fresh photos leave unused. With a share of 0 fresh
    photos wait until the backlog is empty (strictly oldest first); with 1 the backlog
    waits. One busy: it may take the whole share.
    """
    if share <= 0:
        return ClassRates(None, None)
    if not (fresh_busy and backlog_busy):
        return ClassRates(share, share)
    fresh = share * fresh_share
    return ClassRates(fresh if fresh > 0 else None, share if fresh_share < 1 else None)

