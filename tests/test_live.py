"""The live backlog: the last sweep's count plus what was queued since, minus what shipped since."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from services.common.units import format_duration
from services.store.live import LiveBacklog
from services.store.tap import id_hash

T0 = datetime(2026, 5, 1, 12, tzinfo=UTC)


def test_uploads_and_shipments_between_sweeps_move_the_figures() -> None:
    live = LiveBacklog()
    live.swept(photos=2, bytes_=300, oldest=T0, unshipped_ids={id_hash("a"), id_hash("b")})
    live.queued("c", 50, T0.timestamp() + 60)
    assert (live.now().photos, live.now().bytes, live.now().oldest) == (3, 350, T0)
    live.shipped("a", 100)
    live.shipped("b", 200)
    now = live.now()
    # The swept ones are gone: the oldest waiting is the one queued since.
    assert (now.photos, now.bytes) == (1, 50)
    assert now.oldest is not None and now.oldest.timestamp() == T0.timestamp() + 60
    live.shipped("c", 50)
    assert (live.now().photos, live.now().bytes, live.now().oldest) == (0, 0, None)


def test_a_sweep_does_not_count_twice_what_it_saw_itself() -> None:
    live = LiveBacklog()
    live.queued("new", 10, 1.0)  # queued while the sweep ran; the sweep listed it too
    live.queued("later", 20, 2.0)  # queued after the sweep passed its key
    live.shipped("old", 30)  # shipped after the sweep listed it as unshipped
    live.shipped("gone", 40)  # shipped before the sweep reached it: the sweep saw its marker
    live.swept(photos=2, bytes_=40, oldest=T0, unshipped_ids={id_hash("new"), id_hash("old")})
    now = live.now()
    assert (now.photos, now.bytes) == (2, 30)  # "new" (in the count) and "later"


def test_a_shipment_the_keeper_never_saw_queued_changes_nothing() -> None:
    live = LiveBacklog()
    live.shipped("before-the-keeper-started", 10)
    assert live.now().photos == 0 and live.now().bytes == 0


@pytest.mark.parametrize(("seconds", "text"), [
    (0, "0 s"), (45.4, "45 s"), (90, "2 min"), (3599, "1 h"), (86399, "1 d"), (3600, "1 h"), (12000, "3 h 20 min"),
    (86400 + 4 * 3600, "1 d 4 h"), (3 * 86400, "3 d"), (223725.7 * 86400, "more than a year")])
def test_durations_read_as_a_person_writes_them(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text
