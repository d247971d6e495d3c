"""The device contract of DESIGN.md against a real gateway, broker and S3-protocol store."""

from __future__ import annotations

import asyncio
import base64
import hashlib
from typing import Any

import msgpack
import orjson
import pytest
import requests

from devtools.servers import ServiceProcess
from services.common import photos
from services.common.localstore import LocalStore
from services.common.parking import ParkedPhoto
from services.gateway.app import load_openapi
from tests.helpers import (
    CONTENT_TYPES,
    FORMATS,
    Site,
    assert_problem,
    auth,
    encode,
    jpeg,
    metric_value,
    now_rfc3339,
    photo,
    png,
    store_settings,
    upload,
    webp,
)

pytestmark = pytest.mark.servers


@pytest.fixture(autouse=True)
def empty_queue(site: Site) -> None:
    """Every test starts with an empty shipping queue, so counts are its own."""
    site.drain()


@pytest.mark.parametrize("fmt", FORMATS)
def test_accepted_photo_is_stored_byte_identical_and_queued_once(
    gateway: ServiceProcess, site: Site, fmt: str
) -> None:
    image = jpeg(250_000)
    fields = photo("cam-stored", image, labels={"field": "north", "row": "7"})
    response = upload(gateway.url, fields, fmt)

    assert response.status_code == 201, response.text
    body = response.json()
    assert body["status"] == "queued"
    assert body["sha256"] == hashlib.sha256(image).hexdigest()
    assert body["size"] == len(image)
    assert body["content_type"] == "image/jpeg"
    assert body["device_id"] == "cam-stored"
    assert body["labels"] == {"field": "north", "row": "7"}
    assert response.headers["Location"] == f"/v1/photos/{body['id']}"

    stored = site.local_client().get_object(Bucket=site.store_bucket, Key=photos.object_key(body["id"]))
    assert stored["Body"].read() == image
    assert stored["ContentType"] == "image/jpeg"
    metadata = {k.lower(): v for k, v in stored["Metadata"].items()}  # stores differ in case
    assert metadata["device-id"] == "cam-stored"
    assert metadata["sha256"] == body["sha256"]

    messages = site.drain()
    assert len(messages) == 1
    message = messages[0]
    assert message.delivery_mode == 2  # persistent
    assert message.message_id
    assert message.content_type == "application/json"
    shipping = photos.PhotoMessage.from_json(message.body)
    assert shipping.id == body["id"]
    assert shipping.key == photos.object_key(body["id"])
    assert (shipping.size, shipping.sha256) == (len(image), body["sha256"])
    assert shipping.device_id == "cam-stored"
    assert shipping.content_type == "image/jpeg"


@pytest.mark.parametrize("fmt", FORMATS)
def test_device_retry_gets_200_same_id_and_one_object(gateway: ServiceProcess, site: Site, fmt: str) -> None:
    fields = photo("cam-retry", jpeg(), captured_at="2026-05-01T12:00:00+02:00")
    first = upload(gateway.url, fields, fmt)
    assert first.status_code == 201, first.text
    # The same instant spelled in UTC is the same capture.
    second = upload(gateway.url, {**fields, "captured_at": "2026-05-01T10:00:00Z"}, fmt)
    assert second.status_code == 200, second.text
    assert second.json()["id"] == first.json()["id"]
    assert second.json()["received_at"] == first.json()["received_at"]
    assert site.local_keys(photos.object_key(first.json()["id"])) == [photos.object_key(first.json()["id"])]


def test_same_image_at_another_time_is_another_photo(gateway: ServiceProcess) -> None:
    image = jpeg()
    first = upload(gateway.url, photo("cam-burst", image, captured_at="2026-05-01T10:00:00Z"))
    second = upload(gateway.url, photo("cam-burst", image, captured_at="2026-05-01T10:00:00.5Z"))
    assert (first.status_code, second.status_code) == (201, 201)
    assert first.json()["id"] != second.json()["id"]


@pytest.mark.parametrize(("image", "content_type"), [(png(), "image/png"), (webp(), "image/webp")])
def test_png_and_webp_are_accepted(gateway: ServiceProcess, image: bytes, content_type: str) -> None:
    response = upload(gateway.url, photo("cam-formats", image, content_type=content_type))
    assert response.status_code == 201, response.text
    assert response.json()["content_type"] == content_type


def test_declared_sha256_and_content_type_that_agree_are_accepted(gateway: ServiceProcess) -> None:
    image = jpeg()
    fields = photo("cam-declared", image, sha256=hashlib.sha256(image).hexdigest().upper(),
                   content_type="image/jpeg")
    assert upload(gateway.url, fields, "msgpack").status_code == 201


# Bodies that must be refused with 400, for each format: (fields, words the detail names).
BAD_FIELDS: list[tuple[str, dict[str, Any], str]] = [
    ("missing device_id", {"captured_at": "2026-05-01T10:00:00Z", "image": b"\xff\xd8\xff1"}, "device_id"),
    ("device_id with a slash", photo("cam/1"), "device_id"),
    ("device_id too long", photo("c" * 65), "device_id"),
    ("device_id not a string", {**photo(), "device_id": 7}, "device_id"),
    ("missing captured_at", {k: v for k, v in photo().items() if k != "captured_at"}, "captured_at"),
    ("captured_at without offset", photo(captured_at="2026-05-01T10:00:00"), "captured_at"),
    ("captured_at not a time", photo(captured_at="yesterday"), "captured_at"),
    ("captured_at impossible date", photo(captured_at="2026-02-30T10:00:00Z"), "captured_at"),
    ("captured_at a number", photo(captured_at=1714557600), "captured_at"),
    ("missing image", {k: v for k, v in photo().items() if k != "image"}, "image"),
    ("image a number", {**photo(), "image": 12}, "image"),
    ("empty image", photo(image=b""), "image"),
    ("unknown field", photo(colour="red"), "unknown"),
    ("labels not a map", photo(labels=["a"]), "labels"),
    ("label value not a string", photo(labels={"row": 7}), "label"),
    ("sha256 malformed", photo(sha256="abc"), "sha256"),
    ("content_type not a string", photo(content_type=5), "content_type"),
    ("sha256 null", photo(sha256=None), "sha256"),
    ("labels null", photo(labels=None), "labels"),
]


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize(("case", "fields", "word"), BAD_FIELDS, ids=[c[0] for c in BAD_FIELDS])
def test_bad_fields_get_400_and_change_nothing(
    gateway: ServiceProcess, site: Site, fmt: str, case: str, fields: dict[str, Any], word: str
) -> None:
    keys_before = site.local_keys()
    response = upload(gateway.url, fields, fmt, token_for="cam-001")
    assert_problem(response, 400, word)
    assert site.local_keys() == keys_before
    assert site.drain() == []


@pytest.mark.parametrize(
    ("fmt", "body", "word"),
    [
        ("json", b'{"device_id": "cam-001", ', "JSON"),
        ("json", b"[1, 2, 3]", "object"),
        ("json", b"[" * 5000 + b"]" * 5000, "JSON"),
        ("msgpack", b"\xc1\xc1", "msgpack"),
        ("msgpack", msgpack.packb([1, 2]), "map"),
        ("msgpack", msgpack.packb({"device_id": "cam-001"}) + b"\x00", "msgpack"),
        ("msgpack", b"\xdd\xff\xff\xff\xff", "msgpack"),  # claims a 4-billion-item array
    ],
)
def test_malformed_bodies_get_400(gateway: ServiceProcess, fmt: str, body: bytes, word: str) -> None:
    assert_problem(upload(gateway.url, {}, fmt, token_for="cam-001", body=body), 400, word)


@pytest.mark.parametrize(
    "image_field",
    ["not base64!", "/9j/4AA", "/9j/4A==AAAA", " /9j/4AAQSkZJRgABAQ==", "/9j/4AAQSkZJRgABAQ==\n"],
)
def test_bad_base64_gets_400(gateway: ServiceProcess, image_field: str) -> None:
    body = orjson.dumps({"device_id": "cam-001", "captured_at": "2026-05-01T10:00:00Z", "image": image_field})
    assert_problem(upload(gateway.url, {}, "json", token_for="cam-001", body=body), 400, "base64")


def test_msgpack_image_as_text_gets_400(gateway: ServiceProcess) -> None:
    fields = {**photo(), "image": base64.b64encode(jpeg()).decode()}
    assert_problem(upload(gateway.url, fields, "msgpack"), 400, "bin")


@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": "Basic Y2FtOnB3"}, {"Authorization": "Bearer"},
     {"Authorization": "Bearer not-a-token"}, {"Authorization": "Bearer " + "g" * 64}],
    ids=["none", "basic", "empty bearer", "short", "not hex"],
)
@pytest.mark.parametrize("fmt", FORMATS)
def test_missing_or_malformed_token_gets_401(gateway: ServiceProcess, site: Site, fmt: str,
                                             headers: dict[str, str]) -> None:
    body = photo("cam-auth")
    sent = {"Content-Type": CONTENT_TYPES[fmt], **headers}
    response = requests.post(f"{gateway.url}/v1/photos", data=encode(body, fmt), headers=sent, timeout=10)
    assert_problem(response, 401, "token")
    assert response.headers["WWW-Authenticate"].startswith("Bearer")
    assert site.drain() == []


@pytest.mark.parametrize("fmt", FORMATS)
def test_token_of_another_device_gets_403(gateway: ServiceProcess, site: Site, fmt: str) -> None:
    response = upload(gateway.url, photo("cam-victim"), fmt, token_for="cam-intruder")
    assert_problem(response, 403, "cam-victim")
    assert site.drain() == []


def test_token_made_with_another_secret_is_refused(gateway: ServiceProcess) -> None:
    fields = photo("cam-forged")
    response = upload(gateway.url, fields, headers=auth("cam-forged", secret="guessed"))
    assert response.status_code in (401, 403)
    assert response.headers["Content-Type"].startswith("application/problem+json")


@pytest.mark.parametrize("content_type", ["text/plain", "image/jpeg", "multipart/form-data; boundary=x", ""])
def test_unsupported_content_type_gets_415(gateway: ServiceProcess, content_type: str) -> None:
    response = upload(gateway.url, photo(), headers={"Content-Type": content_type})
    assert_problem(response, 415, "Content-Type")


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("image", [b"GIF89a" + b"\x00" * 64, b"%PDF-1.7 hello", b"\x00" * 128],
                         ids=["gif", "pdf", "zeros"])
def test_bytes_that_are_not_a_supported_image_get_415(gateway: ServiceProcess, site: Site, fmt: str,
                                                      image: bytes) -> None:
    assert_problem(upload(gateway.url, photo("cam-415", image), fmt), 415, "image")
    assert site.drain() == []


@pytest.mark.parametrize("fmt", FORMATS)
def test_sha256_that_disagrees_gets_422(gateway: ServiceProcess, site: Site, fmt: str) -> None:
    keys_before = site.local_keys()
    response = upload(gateway.url, photo("cam-422", jpeg(), sha256="0" * 64), fmt)
    assert_problem(response, 422, "sha256")
    assert site.local_keys() == keys_before
    assert site.drain() == []


@pytest.mark.parametrize("fmt", FORMATS)
def test_content_type_that_disagrees_gets_422(gateway: ServiceProcess, fmt: str) -> None:
    response = upload(gateway.url, photo("cam-422", jpeg(), content_type="image/png"), fmt)
    assert_problem(response, 422, "content_type")


def test_photo_state_for_its_device(gateway: ServiceProcess) -> None:
    created = upload(gateway.url, photo("cam-state")).json()
    response = requests.get(f"{gateway.url}/v1/photos/{created['id']}", headers=auth("cam-state"), timeout=10)
    assert response.status_code == 200
    assert response.json()["status"] == "queued"
    assert response.json()["sha256"] == created["sha256"]


def test_a_retry_of_a_parked_photo_is_answered_parked_and_not_queued_again(gateway: ServiceProcess,
                                                                         site: Site) -> None:
    fields = photo("cam-parked")
    created = upload(gateway.url, fields).json()
    site.drain()
    # Parked as a shipper parks it: a marker with the reason (its message waits on the parking queue).
    marker = ParkedPhoto(id=created["id"], reason="S3 refused the object", parked_at=now_rfc3339(), attempts=8)
    asyncio.run(LocalStore(store_settings(site)).put(photos.parked_marker_key(created["id"]),
                                                     orjson.dumps(vars(marker)), metadata={}))
    retried = upload(gateway.url, fields)
    state = requests.get(f"{gateway.url}/v1/photos/{created['id']}", headers=auth("cam-parked"), timeout=10)
    assert (retried.status_code, retried.json()["id"]) == (200, created["id"])
    assert retried.json()["status"] == state.json()["status"] == "parked"
    assert site.drain() == [], "a parked photo waits for an operator: a retry does not queue it again"


def test_photo_state_is_the_owners_only(gateway: ServiceProcess) -> None:
    created = upload(gateway.url, photo("cam-owner")).json()
    url = f"{gateway.url}/v1/photos/{created['id']}"
    assert_problem(requests.get(url, headers=auth("cam-other"), timeout=10), 403)
    assert_problem(requests.get(url, timeout=10), 401)


@pytest.mark.parametrize("photo_id", ["nope", "20260501T100000Z-0123456789abcdef0123-cam-001", "..%2F..%2Fx"])
def test_unknown_photo_gets_404(gateway: ServiceProcess, photo_id: str) -> None:
    response = requests.get(f"{gateway.url}/v1/photos/{photo_id}", headers=auth("cam-001"), timeout=10)
    assert_problem(response, 404)


def test_unknown_path_and_method_are_problems(gateway: ServiceProcess) -> None:
    assert_problem(requests.get(f"{gateway.url}/v2/photos", timeout=10), 404)
    response = requests.put(f"{gateway.url}/v1/photos", timeout=10)
    assert_problem(response, 405)
    assert "POST" in response.headers["Allow"]


def test_health_readiness_and_spec(gateway: ServiceProcess) -> None:
    assert requests.get(f"{gateway.url}/healthz", timeout=10).json() == {"status": "ok"}
    ready = requests.get(f"{gateway.url}/readyz", timeout=10).json()
    assert ready["checks"] == {"store": "ok", "broker": "ok"}
    spec = requests.get(f"{gateway.url}/openapi.json", timeout=10).json()
    assert spec == orjson.loads(load_openapi())
    assert "/v1/photos" in spec["paths"]


def test_metrics_count_outcomes_and_bytes(gateway: ServiceProcess) -> None:
    created_before = metric_value(gateway.url, "photoferry_gateway_uploads_total", outcome="created")
    refused_before = metric_value(gateway.url, "photoferry_gateway_uploads_total", outcome="unprocessable")
    image = jpeg(10_000)
    assert upload(gateway.url, photo("cam-metrics", image)).status_code == 201
    assert upload(gateway.url, photo("cam-metrics", jpeg(), sha256="1" * 64)).status_code == 422
    assert metric_value(gateway.url, "photoferry_gateway_uploads_total", outcome="created") == created_before + 1
    assert metric_value(gateway.url, "photoferry_gateway_uploads_total", outcome="unprocessable") == (
        refused_before + 1
    )
    assert metric_value(gateway.url, "photoferry_gateway_stored_image_bytes_total") >= len(image)
    assert metric_value(gateway.url, "photoferry_gateway_http_request_duration_seconds_count",
                        route="/v1/photos") > 0
