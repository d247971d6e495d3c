"""The local store's contract, against both stores: the S3-protocol server and the embedded one."""

from __future__ import annotations

import asyncio
import hashlib
import multiprocessing
import os
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from devtools.servers import S3Server
from services.common import photos
from services.common.config import StoreSettings
from services.common.localstore import LocalStore, StoreUnavailable

pytestmark = pytest.mark.servers


@pytest.fixture(params=["s3", "file"])
def settings(request: pytest.FixtureRequest, local_s3: S3Server, tmp_path: Path) -> Iterator[StoreSettings]:
    bucket = f"contract-{uuid.uuid4().hex[:8]}"
    if request.param == "s3":
        yield StoreSettings(local_s3.endpoint, local_s3.access_key, local_s3.secret_key, bucket, "us-east-1", 10)
    else:
        yield StoreSettings(f"file://{tmp_path}", "", "", bucket, "us-east-1", 10)


def run(coroutine):  # type: ignore[no-untyped-def]
    return asyncio.run(coroutine)


def photo_key(hour: int, device: str = "cam-1") -> str:
    digest = hashlib.sha256(f"{hour}{device}".encode()).hexdigest()
    return photos.object_key(photos.photo_id(device, datetime(2026, 5, 1, hour, tzinfo=UTC), digest))


def _create_once(settings: StoreSettings, key: str, marker: str, results: multiprocessing.Queue) -> None:  # type: ignore[type-arg]
    store = LocalStore(settings)
    results.put((marker, asyncio.run(store.create(key, marker.encode(), content_type="image/jpeg",
                                                  metadata={"received-at": marker}))))


def test_create_if_absent_is_atomic_between_processes(settings: StoreSettings) -> None:
    store = LocalStore(settings)
    assert run(store.ensure_bucket()) is True
    assert run(store.ensure_bucket()) is False
    key = photo_key(10)
    results: multiprocessing.Queue = multiprocessing.get_context("spawn").Queue()  # type: ignore[type-arg]
    spawn = multiprocessing.get_context("spawn")
    racers = [spawn.Process(target=_create_once, args=(settings, key, f"gw-{i}", results)) for i in range(4)]
    for racer in racers:
        racer.start()
    outcomes = dict(results.get(timeout=60) for _ in racers)
    for racer in racers:
        racer.join(timeout=30)
    winners = [marker for marker, created in outcomes.items() if created]
    assert len(winners) == 1, outcomes
    data, stored = LocalStore(settings).read_with_metadata(key)  # type: ignore[misc]
    # The object and its metadata are the winner's, together.
    assert data == winners[0].encode() and stored.metadata["received-at"] == winners[0]


def test_metadata_markers_listings_and_deletes(settings: StoreSettings) -> None:
    store = LocalStore(settings)
    with pytest.raises(StoreUnavailable, match="bucket"):
        run(store.create(photo_key(1), b"x", content_type="image/jpeg", metadata={}))
    run(store.ensure_bucket())
    run(store.ping())
    metadata = {"sha256": "ab" * 32, "device-id": "cam-1", "captured-at": "2026-05-01T01:00:00.000000Z"}
    keys = [photo_key(hour) for hour in (23, 1, 10)]
    for key in keys:
        assert run(store.create(key, b"photo " + key.encode(), content_type="image/jpeg", metadata=metadata))
        assert not run(store.create(key, b"other", content_type="image/png", metadata={"sha256": "00"}))
    stored = run(store.stat(keys[0]))
    assert stored is not None and stored.size == len(b"photo " + keys[0].encode())
    assert stored.content_type == "image/jpeg" and stored.metadata == metadata
    assert run(store.stat(photo_key(5))) is None and run(store.read(photo_key(5))) is None
    marker = photos.shipped_marker_key(photos.id_from_key(keys[0]))
    run(store.put(marker, b"", metadata={"Content-Type": "image/jpeg", "shipped-at": "then"}))
    run(store.put(marker, b"", metadata={"Content-Type": "image/jpeg", "shipped-at": "now"}))
    assert run(store.stat(marker)).metadata == {"shipped-at": "now"}  # type: ignore[union-attr]

    async def listed(prefix: str, chunk_size: int = 1000) -> list[str]:
        return [item["path"] async for page in store.list(prefix, chunk_size=chunk_size) for item in page]

    everything = run(listed("", chunk_size=2))
    assert everything == sorted(everything) and set(keys) | {marker} <= set(everything)
    assert run(listed(photos.PHOTOS_PREFIX)) == sorted(keys)
    day = keys[1].rsplit("/", 1)[0] + "/"
    assert run(listed(day)) == sorted(keys)
    run(store.delete_many([keys[0], photo_key(7)]))  # a missing one is no error
    run(store.delete(photo_key(8)))
    assert run(listed(photos.PHOTOS_PREFIX)) == sorted(keys[1:])


def test_the_embedded_store_keeps_metadata_first_and_cleans_up_after_interrupted_writes(tmp_path: Path) -> None:
    store = LocalStore(StoreSettings(f"file://{tmp_path}", "", "", "b", "us-east-1", 10))
    run(store.ensure_bucket())
    key = photo_key(3)
    path = tmp_path / "b" / key.rsplit("/", 1)[0] / "20260501T03" / key.rsplit("/", 1)[1]
    # An attempt that stopped between its metadata and its object: the retry keeps that metadata.
    path.parent.mkdir(parents=True)
    path.with_name(f".{path.name}.meta").write_text('{"content_type": "image/jpeg", "metadata": {"sha256": "first"}}')
    (path.parent / ".tmp-leftover").write_bytes(b"half a photo")
    assert run(store.create(key, b"photo", content_type="image/jpeg", metadata={"sha256": "second"}))
    assert path.read_bytes() == b"photo" and run(store.stat(key)).metadata == {"sha256": "first"}  # type: ignore[union-attr]
    orphan = path.with_name(".20260501T030000Z-0000-cam-9.meta")
    orphan.write_text("{}")
    old = (datetime.now() - timedelta(days=2)).timestamp()
    for leftover in (orphan, path.parent / ".tmp-leftover"):
        os.utime(leftover, (old, old))
    assert run(store.clean_leftovers(timedelta(hours=24))) == 2
    assert sorted(p.name for p in path.parent.iterdir()) == sorted([path.name, f".{path.name}.meta"])
    for bad in ("../escape", "photos/./x", "photos/.hidden", "photos//x", "photos/20260501T03/x"):
        with pytest.raises(ValueError, match=r"not a key|hour"):
            run(store.put(bad, b"", metadata={}))
    figures = run(store.disk())
    stat = os.statvfs(tmp_path)
    assert figures.total_bytes == stat.f_blocks * stat.f_frsize and 0 < figures.free_bytes <= figures.total_bytes
