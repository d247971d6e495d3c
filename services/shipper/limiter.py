"""A byte-level rate limiter shared by every upload of one shipper replica.

Uploads read their bodies through it in small pieces as the HTTP client sends
them, so the cap holds on the wire, not as an average per file. It is a token
bucket that may go into debt: a reader takes what it needs and then sleeps off
the debt, so concurrent readers share the rate and none can run ahead of it. The
bucket holds at most ``burst_s`` seconds of the rate, which bounds the burst after
an idle moment; a reader sleeps only once its debt passes ``debt_s`` of the rate,
and then sleeps it all off, so it wakes up once per few pieces rather than once per
piece (each wake-up costs a thread switch and the GIL). Together they let a reader
run at most ``burst_s + debt_s`` ahead (20 ms: at most 2% over the cap in any second).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable


class RateLimiter:
    def __init__(
        self,
        rate: float,
        *,
        burst_s: float = 0.01,
        debt_s: float = 0.01,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if rate <= 0:
            raise ValueError("a rate limiter needs a positive rate")
        self._lock = threading.Lock()
        self._rate = rate
        self._burst_s = burst_s
        self._debt_s = debt_s
        self._tokens = 0.0  # start empty: no burst at start
        self._clock = clock
        self._sleep = sleep
        self._updated = clock()
        self.granted = 0  # bytes let through since start
        self._running = threading.Event()  # cleared while readers must hold still
        self._running.set()

    @property
    def rate(self) -> float:
        return self._rate

    def set_rate(self, rate: float) -> None:
        """Change the rate from now on (debt taken at the old rate stays)."""
        if rate <= 0:
            raise ValueError("a rate limiter needs a positive rate")
        with self._lock:
            self._refill()
            self._rate = rate

    def piece(self) -> int:
        """How many bytes a reader should take at once: about 10 ms of the rate, 1-64 KiB."""
        return int(min(65536, max(1024, self._rate * 0.01)))

    def suspend(self) -> None:
        """Hold every reader still (at its next piece) until ``resume``."""
        self._running.clear()

    def resume(self) -> None:
        self._running.set()

    def acquire(self, nbytes: int) -> None:
        """Block until ``nbytes`` may be sent."""
        self._running.wait()
        wait = self._take(nbytes)
        if wait > 0:
            self._sleep(wait)

    def charge(self, nbytes: int) -> None:
        """Count ``nbytes`` sent outside the readers (a delay probe) without waiting: the
        readers pay the debt, so the sum stays within the rate."""
        self._take(nbytes)

    def _take(self, nbytes: int) -> float:
        """Take ``nbytes`` of tokens; how long to sleep off the debt (0: not yet)."""
        with self._lock:
            self._refill()
            self._tokens -= nbytes
            self.granted += nbytes
            return -self._tokens / self._rate if self._tokens < -self._rate * self._debt_s else 0.0

    def _refill(self) -> None:
        now = self._clock()
        self._tokens = min(self._rate * self._burst_s, self._tokens + (now - self._updated) * self._rate)
        self._updated = now


class Pace:
    """What one upload's bytes pass: its class's limiter while the classes compete, then the replica's.

    The replica's limiter holds the cap whatever the classes do. While the classes
    compete (``competing`` says so, as the pace loop last decided) a class's limiter
    holds it to its part; fresh photos' bytes are also charged to the backlog's
    limiter (``charge``), which runs at the whole share: so the backlog gets what
    fresh photos leave unused, never less than its own part, and fresh photos never
    more than theirs.
    """

    def __init__(self, replica: RateLimiter, share: RateLimiter | None = None,
                 competing: Callable[[], bool] = lambda: False, *, charge: RateLimiter | None = None) -> None:
        self._replica = replica
        self._share = share
        self._competing = competing
        self._charge = charge

    def piece(self) -> int:
        if self._share is not None and self._competing():
            return min(self._share.piece(), self._replica.piece())
        return self._replica.piece()

    def acquire(self, nbytes: int) -> None:
        if self._share is not None and self._competing():
            self._share.acquire(nbytes)
            if self._charge is not None:
                self._charge.charge(nbytes)
        self._replica.acquire(nbytes)
