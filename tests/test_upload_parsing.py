"""Upload bodies parsed without servers: every malformed input is a Problem, never a crash."""

from __future__ import annotations

import base64

import msgpack
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.common.problems import Problem
from services.gateway import images, upload

LIMIT = 1024 * 1024


def parse(body_format: str, body: bytes) -> upload.Upload:
    fields = upload.decode_body(body_format, body)
    device_id = upload.parse_device_id(fields)
    return upload.parse_upload(fields, body_format_=body_format, device_id=device_id, max_image_bytes=LIMIT)


@settings(max_examples=400, deadline=None)
@given(body_format=st.sampled_from(["json", "msgpack"]), body=st.binary(max_size=512))
def test_arbitrary_bytes_are_a_problem_or_an_upload(body_format: str, body: bytes) -> None:
    try:
        parse(body_format, body)
    except Problem as problem:
        assert 400 <= problem.status < 500 and problem.detail


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=20,
)
fields = st.fixed_dictionaries(
    {},
    optional={
        "device_id": st.one_of(st.from_regex(r"[A-Za-z0-9._-]{1,64}", fullmatch=True), json_values),
        "captured_at": st.one_of(st.just("2026-05-01T10:00:00Z"), json_values),
        "image": st.one_of(st.just(base64.b64encode(b"\xff\xd8\xff" + b"x" * 20).decode()), json_values),
        "content_type": json_values,
        "sha256": json_values,
        "labels": json_values,
    },
)


@settings(max_examples=400, deadline=None)
@given(body_format=st.sampled_from(["json", "msgpack"]), data=fields)
def test_structured_nonsense_is_a_problem_or_an_upload(body_format: str, data: dict) -> None:
    body = orjson.dumps(data) if body_format == "json" else msgpack.packb(data)
    try:
        result = parse(body_format, body)
    except Problem as problem:
        assert 400 <= problem.status < 500 and problem.detail
    else:
        assert images.sniff(result.image) == result.content_type


def test_body_limits_leave_room_for_the_encoding() -> None:
    assert upload.body_limit("json", 3000) == 4000 + upload.FIELDS_ALLOWANCE
    assert upload.body_limit("msgpack", 3000) == 3000 + upload.FIELDS_ALLOWANCE


@pytest.mark.parametrize(
    ("captured_at", "ok"),
    [("2026-05-01T10:00:00Z", True), ("2026-05-01t10:00:00z", True), ("2026-05-01T10:00:00.123456789+05:30", True),
     ("2026-05-01T10:00:00", False), ("2026-05-01 10:00:00Z", False), ("2026-05-01", False),
     ("9999-12-31T23:59:59-01:00", False), ("0001-01-01T00:00:00+01:00", False), ("2026-13-01T10:00:00Z", False),
     ("2026-05-01T10:00:00+24:00", False), ("2026-05-01T10:00:00Z\n", False)],
)
def test_captured_at_is_rfc3339_with_an_offset(captured_at: str, ok: bool) -> None:
    body = orjson.dumps({"device_id": "cam", "captured_at": captured_at,
                         "image": base64.b64encode(b"\xff\xd8\xff" + b"x" * 8).decode()})
    if ok:
        assert parse("json", body).captured_at.tzinfo is not None
    else:
        with pytest.raises(Problem) as caught:
            parse("json", body)
        assert caught.value.status == 400 and "captured_at" in caught.value.detail


def test_labels_are_bounded() -> None:
    image = base64.b64encode(b"\xff\xd8\xff" + b"x" * 8).decode()
    base = {"device_id": "cam", "captured_at": "2026-05-01T10:00:00Z", "image": image}
    assert parse("json", orjson.dumps({**base, "labels": {f"k{i}": "v" for i in range(32)}})).labels
    for labels in ({f"k{i}": "v" for i in range(33)}, {"k": "v" * 257}, {"": "v"}, {"k" * 65: "v"},
                   {f"k{i}": "ü" * 40 for i in range(10)}):
        with pytest.raises(Problem) as caught:
            parse("json", orjson.dumps({**base, "labels": labels}))
        assert caught.value.status == 400


def test_magic_bytes() -> None:
    assert images.sniff(b"\xff\xd8\xff\xe0") == "image/jpeg"
    assert images.sniff(b"\x89PNG\r\n\x1a\n....") == "image/png"
    assert images.sniff(b"RIFF\x00\x00\x00\x00WEBPVP8 ") == "image/webp"
    assert images.sniff(b"RIFF\x00\x00\x00\x00WAVEfmt ") is None
    assert images.sniff(b"\xff\xd8") is None
    assert images.normalise("Image/JPG; q=1") == "image/jpeg"
