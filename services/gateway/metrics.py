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

    def upload_outcome(self, status: int) -> None:
        self.uploads.labels(OUTCOMES.get(status, "error")).inc()
