"""The gateway's Prometheus metrics, in a registry of its own (one per app)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge

from services.common.httpserver import HttpMetrics

# Upload outcomes, by the status they answer with.
OUTCOMES = {
    200: "duplicate",
    201: "created",
    400: "bad_request",
    401: "unauthenticated",
    403: "forbidden",
    408: "timed_out",
    413: "too_large",
    415: "unsupported",
    422: "unprocessable",
    429: "throttled",
    503: "unavailable",
}


class GatewayMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.http = HttpMetrics(self.registry, "gateway")
        self.uploads = Counter(
            "photoferry_gateway_uploads",
            "Upload requests by outcome (created, duplicate, or why they were refused)",
            ["outcome"],
            registry=self.registry,
        )
        self.received_bytes = Counter(
            "photoferry_gateway_received_body_bytes",
            "Bytes of upload bodies read from devices",
            registry=self.registry,
        )
        self.stored_bytes = Counter(
            "photoferry_gateway_stored_image_bytes",
            "Bytes of images stored and queued (new photos only)",
            registry=self.registry,
        )
        self.in_flight_bytes = Gauge(
            "photoferry_gateway_upload_bytes_in_flight",
            "Bytes reserved by uploads being handled now",
            registry=self.registry,
        )

        # Per-device figures with no label per device: a site has a thousand, a hostile client any number.
        self.device_refusals = Counter(
            "photoferry_gateway_device_refusals",
            "Uploads refused with 429 because their device was past its limits, by which limit "
            "(rate: photos a minute and burst; in_flight: uploads at once)",
            ["reason"],
            registry=self.registry,
        )
        self.throttled_devices = Gauge(
            "photoferry_gateway_throttled_devices",
            "Devices refused with 429 within the last minute",
            registry=self.registry,
        )
        self.tracked_devices = Gauge(
            "photoferry_gateway_tracked_devices",
            "Devices whose per-device limits this gateway keeps now (idle ones are forgotten)",
            registry=self.registry,
        )
        self.previous_secret_requests = Counter(
            "photoferry_gateway_previous_secret_requests",
            "Requests authorised by the previous device secret (PHOTOFERRY_DEVICE_SECRET_PREVIOUS): "
            "devices still to move to the current one",
            registry=self.registry,
        )
        self.denied_devices = Gauge(
            "photoferry_gateway_denied_devices",
            "Devices on the operator's deny list, as this gateway last read it",
            registry=self.registry,
        )
        self.denied_requests = Counter(
            "photoferry_gateway_denied_requests",
            "Requests refused with 403 because their device is on the deny list",
            registry=self.registry,
        )

    def upload_outcome(self, status: int) -> None:
        self.uploads.labels(OUTCOMES.get(status, "error")).inc()
