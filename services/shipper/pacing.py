"""This replica's part of the site-wide cap, agreed with the other replicas.

The cap is global. Every replica announces in its heartbeat whether it is busy
(has photos in hand or waiting), hears the others', and takes cap / busy
replicas: an idle replica leaves its part to the others instead of wasting it.
A replica that turns busy waits until the others have heard so (``JOIN_DELAY_S``)
before it sends, so the shares never add up to more than the cap; while photos
wait in the queue it stays busy for ``BUSY_GRACE_S`` after its last one, so a
steady stream does not pay that wait, and when none wait it turns idle at once.
A replica that has just started listening first hears a full round of the
others' heartbeats (``WARM_UP_S``): peers that turned busy before it listened
would otherwise go unheard, and both would send at the whole cap.

Within a replica, the share is split between two classes of work (``split``):
fresh photos may take up to ``fresh_share`` of it while the backlog also has
work; whatever one class does not use, the other may.

Pure bookkeeping on a clock the caller passes in: no I/O, no sleeping.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from services.common.shipping import HEARTBEAT_EVERY_S, PEER_TTL_S, Heartbeat

JOIN_DELAY_S = 0.25  # heartbeats cross the broker in milliseconds and peers re-split on receipt
BUSY_GRACE_S = 2.0
WARM_UP_S = 1.5 * HEARTBEAT_EVERY_S  # every peer's periodic heartbeat has arrived by then


class CapShare:
    def __init__(self, replica: str) -> None:
        self.replica = replica
        self.cap = 0.0  # site-wide, bytes per second
        self.share = 0.0  # this replica's part, were it busy
        self.busy_replicas = 1
        self.announced_busy = False
        # Set while this replica may send at its share (busy, and announced long enough ago).
        self.may_send = asyncio.Event()
        self._peers: dict[str, tuple[bool, float]] = {}  # replica -> (busy, when heard)
        self._busy_until = 0.0
        self._busy_since = 0.0
        self._listening_since: float | None = None  # None: not hearing the others yet

    def listening(self, now: float) -> None:
        """The replica hears the others' heartbeats from now on (again, after a reconnection)."""
        self._listening_since = now

    def hear(self, beat: Heartbeat, now: float) -> bool:
        """Note a peer's heartbeat; True when its busy state changed (re-split now)."""
        if beat.replica == self.replica:
            return False
        was_busy = self._peers.get(beat.replica, (False, 0.0))[0]
        self._peers[beat.replica] = (beat.busy, now)
        return beat.busy != was_busy

    def announce(self, now: float, *, holding: bool, waiting: int) -> bool:
        """Decide whether this replica is busy; True when that changed (tell the others at once)."""
        if holding:
            self._busy_until = now + BUSY_GRACE_S
        elif waiting == 0:
            self._busy_until = min(self._busy_until, now)  # nothing waits: leave the cap to the others now
        busy = now < self._busy_until
        changed = busy != self.announced_busy
        if changed and busy:
            self._busy_since = now
        self.announced_busy = busy
        if busy and now - self._busy_since >= JOIN_DELAY_S and self._warm(now):
            self.may_send.set()
        elif not busy:
            self.may_send.clear()
        return changed

    def split(self, cap: float, now: float) -> float:
        """This replica's share of ``cap`` among the busy replicas heard lately."""
        busy_peers = sum(1 for busy, heard in self._peers.values() if busy and now - heard < PEER_TTL_S)
        self.cap = cap
        self.busy_replicas = busy_peers + 1  # this replica's share, were it busy
        self.share = cap / self.busy_replicas if cap > 0 else 0.0
        return self.share

    def _warm(self, now: float) -> bool:
        return self._listening_since is not None and now - self._listening_since >= WARM_UP_S

    def opens_in(self, now: float) -> float | None:
        """Seconds until this replica may send, when it is waiting for its announcement to travel."""
        if self.announced_busy and not self.may_send.is_set():
            warm_at = (self._listening_since + WARM_UP_S) if self._listening_since is not None else now + 1.0
            return max(0.01, self._busy_since + JOIN_DELAY_S - now, warm_at - now)
        return None

    def leave(self) -> None:
        """Say goodbye: the next heartbeat tells the others this replica is idle."""
        self.announced_busy = False
        self.may_send.clear()


@dataclass(frozen=True)
class ClassRates:
    """Each class's rate in bytes per second; None: it may not start uploads now."""

    fresh: float | None
    backlog: float | None


def split(share: float, fresh_share: float, *, fresh_busy: bool, backlog_busy: bool) -> ClassRates:
    """Split this replica's ``share`` between fresh photos and the backlog.

    Both busy: fresh takes ``fresh_share`` of it and the backlog the rest (with a
    share of 0 fresh photos wait until the backlog is empty: strictly oldest first;
    with 1 the backlog waits). One busy: it may take the whole share.
    """
    if share <= 0:
        return ClassRates(None, None)
    if not (fresh_busy and backlog_busy):
        return ClassRates(share, share)
    fresh = share * fresh_share
    backlog = share - fresh
    return ClassRates(fresh if fresh > 0 else None, backlog if backlog > 0 else None)

