"""What one sweep of the store keeper costs, up to a million objects.

Two measurements:

- the sweep's own CPU and memory at N photos (default 1,000,000): the listing is
  synthetic (pages of 1,000 keys from memory, in key order, as S3 returns them),
  so only the merge, the bookkeeping and the candidate heaps are timed; a third
  of the photos are shipped, a sixth retention-expired, a hundredth parked;
- a real sweep against an S3-protocol server (moto here, MinIO on a site) at a
  smaller M (default 20,000), for the wall time a real listing adds, and the
  requests it takes (one list request per 1,000 keys and prefix).

    python -m bench.keeper_sweep [--objects 1000000] [--real 20000]
"""

from __future__ import annotations

import argparse
import asyncio
import random
import resource
import tempfile
import time
import tracemalloc
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from devtools.servers import S3Server
from services.common import photos
from services.common.config import StoreSettings
from services.common.localstore import LocalStore
from services.common.s3 import ensure_bucket, s3_client
from services.store.sweep import sweep

NOW = datetime(2026, 6, 1, tzinfo=UTC)
RETAIN = timedelta(days=7)


def synthetic_ids(count: int) -> list[str]:
    start = NOW - timedelta(days=10)
    step = timedelta(days=10) / count
    return [photos.photo_id(f"cam-{i % 1000:04d}", start + i * step, f"{i:064x}") for i in range(count)]


class MemoryListing:
    """Just enough of LocalStore for a sweep: sorted pages of 1,000, deletes counted."""

    def __init__(self, ids: list[str], seed: int = 3) -> None:
        rng = random.Random(seed)
        self.objects: dict[str, list[dict[str, Any]]] = {photos.PHOTOS_PREFIX: [], photos.SHIPPED_PREFIX: [],
                                                         photos.PARKED_PREFIX: []}
        for i, photo_id in enumerate(ids):
            stored = NOW - timedelta(days=10) + timedelta(days=10) * i / len(ids)
            self.objects[photos.PHOTOS_PREFIX].append(
                {"path": photos.object_key(photo_id), "size": 250_000, "last_modified": stored})
            roll = rng.random()
            if roll < 0.33:
                self.objects[photos.SHIPPED_PREFIX].append(
                    {"path": photos.shipped_marker_key(photo_id), "size": 0, "last_modified": stored})
            elif roll < 0.34:
                self.objects[photos.PARKED_PREFIX].append(
                    {"path": photos.parked_marker_key(photo_id), "size": 80, "last_modified": stored})
        for entries in self.objects.values():
            entries.sort(key=lambda item: item["path"])
        self.deleted = 0
        self.list_requests = 0

    async def list(self, prefix: str, *, chunk_size: int = 1000) -> AsyncIterator[list[dict[str, Any]]]:
        entries = self.objects[prefix]
        for start in range(0, max(1, len(entries)), chunk_size):
            self.list_requests += 1
            yield entries[start:start + chunk_size]

    async def delete_many(self, keys: list[str]) -> None:
        self.deleted += len(keys)


async def synthetic(count: int) -> None:
    print(f"building a listing of {count:,} photos ...", flush=True)
    listing = MemoryListing(synthetic_ids(count))
    cpu = time.process_time()
    result = await sweep(listing, now=NOW, retain=RETAIN)  # type: ignore[arg-type]
    cpu = time.process_time() - cpu
    # Memory in a second pass: tracemalloc slows every allocation, so it stays out of the timing.
    requests = listing.list_requests
    tracemalloc.start()
    await sweep(listing, now=NOW, retain=RETAIN)  # type: ignore[arg-type]
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    print(f"synthetic: {count:,} photos swept in {cpu:.2f} s CPU ({cpu / count * 1e6:.1f} µs a photo), "
          f"peak memory of the sweep {peak / 1e6:.1f} MB (the unshipped-id set is {len(result.unshipped_ids):,} "
          f"ids); {requests:,} list requests; {result.deleted:,} deletions, "
          f"{len(result.orphans):,} candidates kept")


async def real(count: int) -> None:
    workdir = Path(tempfile.mkdtemp(prefix="photoferry-bench-"))
    server = S3Server(workdir / "store")
    server.start()
    try:
        ensure_bucket(s3_client(server.endpoint, access_key=server.access_key, secret_key=server.secret_key,
                                region="us-east-1"), "sweep")
        store = LocalStore(StoreSettings(server.endpoint, server.access_key, server.secret_key, "sweep",
                                         "us-east-1", 30))
        print(f"storing {count:,} small photo objects (and a shipped marker for a third) ...", flush=True)
        ids = synthetic_ids(count)
        semaphore = asyncio.Semaphore(32)

        async def put(i: int, photo_id: str) -> None:
            async with semaphore:
                await store.put(photos.object_key(photo_id), b"x" * 64, metadata={})
                if i % 3 == 0:
                    await store.put(photos.shipped_marker_key(photo_id), b"", metadata={})

        await asyncio.gather(*(put(i, photo_id) for i, photo_id in enumerate(ids)))
        started = time.perf_counter()
        cpu = time.process_time()
        result = await sweep(store, now=datetime.now(UTC), retain=timedelta(days=365))
        wall, cpu = time.perf_counter() - started, time.process_time() - cpu
        print(f"real ({server.kind}): {result.photos:,} photos swept in {wall:.1f} s "
              f"({wall / result.photos * 1e6:.0f} µs a photo; this process's CPU {cpu:.1f} s), "
              f"{-(-result.photos // 1000) + -(-count // 3000):,} list requests")
    finally:
        server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--objects", type=int, default=1_000_000)
    parser.add_argument("--real", type=int, default=20_000)
    args = parser.parse_args()
    asyncio.run(synthetic(args.objects))
    if args.real:
        asyncio.run(real(args.real))
    # ru_maxrss is in KiB on Linux; the synthetic listing itself is most of it.
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"max resident memory of the benchmark process: {peak_mib:.0f} MiB")


if __name__ == "__main__":
    main()
