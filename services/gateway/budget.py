"""The gateway's in-flight budget: past it, uploads are refused at once with 503.

Bounding requests and the bytes they may hold keeps memory bounded under a burst
(1,000 devices reconnecting at once) instead of buffering without limit; the
devices keep their photos and retry after ``Retry-After``.
"""

from __future__ import annotations


class InflightBudget:
    def __init__(self, *, max_requests: int, max_bytes: int) -> None:
        self.max_requests = max_requests
        self.max_bytes = max_bytes
        self.requests = 0
        self.bytes = 0

    def try_reserve(self, nbytes: int) -> bool:
        """Reserve room for one upload of ``nbytes``; False when the budget is spent.

        A single upload larger than the whole byte budget is still let through when
        nothing else is in flight, so the size limit (413), not the budget, decides it.
        """
        if self.requests >= self.max_requests:
            return False
        if self.requests and self.bytes + nbytes > self.max_bytes:
            return False
        self.requests += 1
        self.bytes += nbytes
        return True

    def release(self, nbytes: int) -> None:
        self.requests -= 1
        self.bytes -= nbytes
