"""One lock per photo: copies of one photo's message ship one after another.

A device retrying a photo that is still queued queues it again, and the copies
can arrive in one prefetch window; shipped one after the other, the later ones
find the photo marked shipped instead of uploading it again.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator


class PhotoLocks:
    """One lock per photo id, kept only while a message holds or waits for it."""

    def __init__(self) -> None:
        self._locks: dict[str, tuple[asyncio.Lock, int]] = {}

    @contextlib.asynccontextmanager
    async def hold(self, photo_id: str) -> AsyncIterator[None]:
        lock, users = self._locks.get(photo_id, (asyncio.Lock(), 0))
        self._locks[photo_id] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._locks[photo_id]
            if users == 1:
                del self._locks[photo_id]
            else:
                self._locks[photo_id] = (lock, users - 1)

    def __len__(self) -> int:
        return len(self._locks)
