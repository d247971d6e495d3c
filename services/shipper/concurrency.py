"""How many uploads a replica runs at once, adapted to the link.

Small photos leave gaps between uploads (request round trips), so one upload at a
time rarely fills the cap; too many uploads on a slow or congested link only
cause timeouts. Every window the controller compares what was sent with this
replica's share of the cap: with a backlog and under 97% of the share it adds an
upload, unless the last one added did not help (the link, not the count, is the
limit); throttling or timeouts halve the count. When the link stays the limit it
says so (``link_limited``), for operators.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

log = logging.getLogger(__name__)

TARGET_UTILISATION = 0.97  # the drain target: 97% of the cap
PLATEAU_RETRY_WINDOWS = 6  # after this many windows on a plateau, try one more upload again


class ConcurrencyController:
    def __init__(self, *, initial: int, maximum: int) -> None:
        self.maximum = maximum
        self.limit = max(1, min(initial, maximum))
        self.link_limited = False
        self._sent = 0
        self._throttled = False
        self._grew_from: float | None = None  # throughput before the last increase
        self._plateau_windows = 0

    def record_sent(self, nbytes: int) -> None:
        self._sent += nbytes

    def record_throttled(self) -> None:
        self._throttled = True

    def evaluate(self, *, window_s: float, share: float, backlog: bool) -> int:
        """Close a window and return the new limit."""
        achieved = self._sent / window_s if window_s > 0 else 0.0
        under = backlog and share > 0 and achieved < TARGET_UTILISATION * share
        previous = self.limit
        if self._throttled:
            self.limit = max(1, self.limit // 2)
            self._grew_from = None
            self._plateau_windows = 0
        elif not under:
            self._grew_from = None
            self._plateau_windows = 0
        elif self._grew_from is not None and achieved <= self._grew_from * 1.05:
            self.limit = max(1, self.limit - 1)  # more uploads did not help: the link is the limit
            self._grew_from = None
            self._plateau_windows = 1
        elif self._plateau_windows and self._plateau_windows < PLATEAU_RETRY_WINDOWS:
            self._plateau_windows += 1
        elif self.limit < self.maximum:
            self._grew_from = achieved
            self._plateau_windows = 0
            self.limit += 1
        else:
            self._plateau_windows = max(1, self._plateau_windows)
        self.link_limited = under and (self._plateau_windows > 0 or self.limit == self.maximum)
        if self.limit != previous:
            log.info("upload concurrency changed",
                     extra={"from": previous, "to": self.limit, "achieved_bytes_per_s": round(achieved),
                            "share_bytes_per_s": round(share)})
        self._sent = 0
        self._throttled = False
        return self.limit


class Slots:
    """At most ``limit`` uploads at once; the limit may change while uploads wait or run."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.taken = 0
        self._changed = asyncio.Condition()

    async def resize(self, limit: int) -> None:
        async with self._changed:
            self.limit = limit
            self._changed.notify_all()

    @contextlib.asynccontextmanager
    async def hold(self) -> AsyncIterator[None]:
        async with self._changed:
            await self._changed.wait_for(lambda: self.taken < self.limit)
            self.taken += 1
        try:
            yield
        finally:
            async with self._changed:
                self.taken -= 1
                self._changed.notify_all()

