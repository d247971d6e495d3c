"""The circuit breaker: when the remote takes nothing, stop consuming and probe.

Systemic failures (credentials rejected, bucket missing, endpoint unreachable)
open it at once; so do ``trip_after`` transient failures in a row with no success
between them (a link that is down looks like timeouts). While it is open the
shipper consumes nothing, so the backlog stays queued instead of being parked,
and a cheap probe (HEAD on the bucket) runs with a growing interval; the first
probe that succeeds closes it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

log = logging.getLogger(__name__)


class Breaker:
    def __init__(
        self,
        *,
        probe: Callable[[], Awaitable[None]],
        on_change: Callable[[], None],
        trip_after: int = 5,
        first_probe_s: float = 2.0,
        max_probe_s: float = 60.0,
    ) -> None:
        self._probe = probe
        self._on_change = on_change
        self._trip_after = trip_after
        self._first_probe_s = first_probe_s
        self._max_probe_s = max_probe_s
        self._transient_in_a_row = 0
        self._probing: asyncio.Task[None] | None = None
        self.reason: str | None = None

    @property
    def open(self) -> bool:
        return self.reason is not None

    def record_success(self) -> None:
        self._transient_in_a_row = 0

    def record_transient(self, error: str) -> None:
        self._transient_in_a_row += 1
        if self._transient_in_a_row >= self._trip_after:
            self.trip(f"{self._transient_in_a_row} failures in a row, last: {error}")

    def trip(self, reason: str) -> None:
        """Open the breaker (if closed) and start probing."""
        if self.open:
            return
        self.reason = reason
        log.error("circuit breaker open: shipping stopped until the remote answers", extra={"reason": reason})
        self._probing = asyncio.create_task(self._probe_until_closed(), name="breaker-probe")
        self._on_change()

    async def _probe_until_closed(self) -> None:
        delay = self._first_probe_s
        while True:
            await asyncio.sleep(delay)
            try:
                await self._probe()
            except Exception as exc:  # every failure keeps it open; the reason says which
                self.reason = str(exc)
                log.warning("circuit breaker probe failed", extra={"reason": self.reason, "next_in_s": delay})
                delay = min(delay * 2, self._max_probe_s)
                continue
            break
        log.info("circuit breaker closed: the remote answers again")
        self.reason = None
        self._transient_in_a_row = 0
        self._probing = None
        self._on_change()

    async def close(self) -> None:
        if self._probing is not None:
            self._probing.cancel()
            await asyncio.gather(self._probing, return_exceptions=True)
