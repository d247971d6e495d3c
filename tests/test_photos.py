"""Photo ids, object keys and the shipping message."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest

from services.common import photos

SHA = "ab" * 32


def test_same_capture_gives_the_same_id_whatever_the_offset_spelling() -> None:
    moment = datetime(2026, 5, 1, 12, 0, tzinfo=timezone(timedelta(hours=2)))
    assert photos.photo_id("cam-1", moment, SHA) == photos.photo_id("cam-1", moment.astimezone(UTC), SHA)


def test_any_difference_gives_another_id() -> None:
    moment = datetime(2026, 5, 1, 10, 0, tzinfo=UTC)
    base = photos.photo_id("cam-1", moment, SHA)
    assert photos.photo_id("cam-2", moment, SHA) != base
    assert photos.photo_id("cam-1", moment + timedelta(microseconds=1), SHA) != base
    assert photos.photo_id("cam-1", moment, "cd" * 32) != base


@pytest.mark.parametrize("moment", [datetime(1, 1, 1, 0, 1, 1, tzinfo=UTC), datetime(9999, 12, 31, tzinfo=UTC),
                                    datetime(999, 5, 4, 3, 2, 1, tzinfo=UTC)])
def test_ids_have_a_fixed_layout_in_any_year(moment: datetime) -> None:
    photo_id = photos.photo_id("cam-1", moment, SHA)
    assert photos.is_photo_id(photo_id), photo_id
    assert photos.owner_of(photo_id) == "cam-1"
    assert photos.object_key(photo_id).startswith(f"photos/{moment.year:04d}/")


@pytest.mark.parametrize("device", ["cam-1", "..", ".", "a" * 64, "A.b_c-9"])
def test_id_names_its_owner_and_key_and_no_path_segment_is_the_device(device: str) -> None:
    photo_id = photos.photo_id(device, datetime(2026, 5, 1, 10, 0, tzinfo=UTC), SHA)
    assert photos.is_photo_id(photo_id)
    assert photos.owner_of(photo_id) == device
    key = photos.object_key(photo_id)
    assert key.startswith("photos/2026/05/01/20260501T100000Z-")
    assert device not in key.split("/")[:-1]
    assert photos.id_from_key(key) == photo_id
    assert photos.id_from_key(photos.shipped_marker_key(photo_id)) == photo_id


@pytest.mark.parametrize(
    "text", ["", "x", "20260501T100000Z-0123-cam", "20260501T100000Z-" + "g" * 20 + "-cam",
             "20260501T100000Z-" + "0" * 20 + "-cam/x", "20260501T100000Z-" + "0" * 20 + "-"]
)
def test_malformed_ids_are_not_ids(text: str) -> None:
    assert not photos.is_photo_id(text)


def test_message_round_trip_and_refusals() -> None:
    photo_id = photos.photo_id("cam-1", datetime(2026, 5, 1, 10, 0, tzinfo=UTC), SHA)
    message = photos.PhotoMessage(id=photo_id, key=photos.object_key(photo_id), size=10, sha256=SHA,
                                  content_type="image/jpeg", device_id="cam-1",
                                  captured_at="2026-05-01T10:00:00.000000Z", received_at="2026-05-01T10:00:01.000000Z")
    assert photos.PhotoMessage.from_json(message.to_json()) == message
    for body in (b"nope", b"[]", b'{"v": 2}', message.to_json().replace(b'"size":10', b'"size":-1'),
                 message.to_json().replace(b'"photos/', b'"other/')):
        with pytest.raises(ValueError):
            photos.PhotoMessage.from_json(body)
