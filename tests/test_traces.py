"""One photo, one trace: the upload, the local write, the publish, the shipper's consumption,
its local reads, the remote upload and the shipped marker, parent by parent."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from devtools.servers import ServiceProcess, wait_until
from services.common import photos, topology
from tests.conftest import start_service, stop_cleanly
from tests.helpers import CONTENT_TYPES, Site, auth, encode, jpeg, photo
from tests.otlp import Receiver, Span

pytestmark = pytest.mark.servers

DEVICE_TRACE = "0af7651916cd43dd8448eb211c80319c"  # the device's own traceparent: untrusted, only a link


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    receiver = Receiver().start()
    yield receiver
    receiver.stop()


@pytest.fixture(scope="module")
def services(site: Site, logs: Path, receiver: Receiver) -> Iterator[dict[str, ServiceProcess]]:
    env = site.env(OTEL_EXPORTER_OTLP_ENDPOINT=receiver.endpoint, OTEL_BSP_SCHEDULE_DELAY="100")
    started = {name: start_service(name, env, logs) for name in ("gateway", "shipper")}
    yield started
    for service in started.values():
        stop_cleanly(service)


def one(spans: list[Span], **match: object) -> Span:
    found = [s for s in spans if all(getattr(s, k) == v for k, v in match.items())]
    assert len(found) == 1, (match, [(s.service, s.name, s.kind) for s in spans])
    return found[0]


def test_one_photo_is_one_connected_trace(services: dict[str, ServiceProcess], site: Site,
                                          receiver: Receiver) -> None:
    fields = photo("cam-trace", jpeg(30_000))
    answer = requests.post(f"{services['gateway'].url}/v1/photos", data=encode(fields, "json"), timeout=30,
                           headers={"Content-Type": CONTENT_TYPES["json"], **auth("cam-trace"),
                                    "traceparent": f"00-{DEVICE_TRACE}-b7ad6b7169203331-01"})
    assert answer.status_code == 201
    photo_id = answer.json()["id"]
    key = photos.object_key(photo_id)

    def upload_span() -> Span | None:
        return next((s for s in receiver.spans if s.name == "POST /v1/photos" and s.kind == "SERVER"), None)

    wait_until(lambda: upload_span() is not None, timeout=20, what="the upload's span")
    root = upload_span()
    assert root is not None
    # A new trace, not the device's: its context is only a link.
    assert root.trace_id != DEVICE_TRACE and root.parent_id == "" and root.links == (DEVICE_TRACE,)
    assert root.service == "photoferry-gateway" and root.attributes["http.route"] == "/v1/photos"

    def marker_written() -> bool:
        return any(s.service == "photoferry-shipper" and s.name == "S3.PutObject"
                   and s.attributes.get("aws.s3.key") == photos.shipped_marker_key(photo_id)
                   for s in receiver.trace(root.trace_id))

    wait_until(marker_written, timeout=30, what="the shipper's spans in the photo's trace")
    spans = receiver.trace(root.trace_id)
    gateway = [s for s in spans if s.service == "photoferry-gateway"]
    shipper = [s for s in spans if s.service == "photoferry-shipper"]

    stored = one(gateway, name="S3.PutObject", kind="CLIENT")
    assert stored.parent_id == root.span_id
    assert stored.attributes["aws.s3.bucket"] == site.store_bucket and stored.attributes["aws.s3.key"] == key
    # aio-pika's instrumentation names it "<exchange>,<routing key> send".
    published = one(gateway, name=f"{topology.PHOTOS_EXCHANGE},{topology.FRESH_ROUTING_KEY} send", kind="PRODUCER")
    assert published.parent_id == root.span_id and published.attributes["messaging.system"] == "rabbitmq"

    consumed = one(shipper, name=f"{topology.PHOTOS_EXCHANGE} receive", kind="CONSUMER")
    assert consumed.parent_id == published.span_id
    below = {s.span_id for s in shipper}
    for span in shipper:
        if span is not consumed:
            assert span.parent_id in below, f"{span.name} hangs outside the shipper's part of the trace"
    local = [s for s in shipper if s.attributes.get("aws.s3.bucket") == site.store_bucket]
    remote = [s for s in shipper if s.attributes.get("aws.s3.bucket") == site.remote_bucket]
    checked = one(local, name="S3.HeadObject")  # the shipped marker, before anything else
    assert checked.attributes["aws.s3.key"] == photos.shipped_marker_key(photo_id)
    assert [s.name for s in local if s.name == "S3.GetObject"] == ["S3.GetObject"]
    marked = one(local, name="S3.PutObject")
    assert marked.attributes["aws.s3.key"] == photos.shipped_marker_key(photo_id)
    remote = [s for s in remote if s.name == "S3.PutObject"]
    assert len(remote) == 1 and remote[0].kind == "CLIENT" and remote[0].attributes["aws.s3.key"].endswith(key)
    # Span names say what happened, never to which photo (ids are attributes).
    assert not [s.name for s in spans if photo_id in s.name or "cam-trace" in s.name]


def test_probes_scrapes_and_heartbeats_start_no_traces(services: dict[str, ServiceProcess],
                                                       receiver: Receiver) -> None:
    for service in services.values():
        for path in ("/healthz", "/readyz", "/metrics"):
            requests.get(f"{service.url}{path}", timeout=10)
    marker = requests.get(f"{services['gateway'].url}/v1/photos/not-an-id", headers=auth("cam-trace"), timeout=10)
    assert marker.status_code == 404
    wait_until(lambda: any(s.name == "GET /v1/photos/{photo_id}" for s in receiver.spans), timeout=20,
               what="the last request's span exported")
    names = {s.name for s in receiver.spans}
    assert not names & {"GET /healthz", "GET /readyz", "GET /metrics"}
    assert not [n for n in names if n.startswith((topology.STATUS_EXCHANGE, topology.SHIPPED_EXCHANGE))]
