"""The shipper's Prometheus metrics, in a registry of its own."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from services.common.httpserver import HttpMetrics


class ShipperMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.http = HttpMetrics(r, "shipper")
        self.shipped_objects = Counter("photoferry_shipper_shipped_objects", "Photos shipped to S3", registry=r)
        self.shipped_bytes = Counter("photoferry_shipper_shipped_bytes", "Photo bytes uploaded to S3", registry=r)
        self.duplicates = Counter(
            "photoferry_shipper_duplicates",
            "Messages for photos already shipped or already in S3 (acknowledged without an upload)",
            registry=r,
        )
        self.sent_bytes = Counter(
            "photoferry_shipper_sent_bytes",
            "Bytes sent towards S3 through the rate limiter (bodies and request overhead)",
            registry=r,
        )
        self.cap = Gauge("photoferry_shipper_cap_bytes_per_second", "Site-wide egress cap in force", registry=r)
        self.share = Gauge(
            "photoferry_shipper_share_bytes_per_second", "This replica's part of the cap", registry=r
        )
        self.ceiling = Gauge(
            "photoferry_shipper_ceiling_bytes_per_second",
            "Site-wide ceiling of the band above the cap, where only idle uplink is used (0: no band)", registry=r,
        )
        self.allowed = Gauge(
            "photoferry_shipper_allowed_bytes_per_second",
            "The rate this replica may send at now: its share of the cap, and what the band above it adds",
            registry=r,
        )
        self.scavenging = Gauge(
            "photoferry_shipper_scavenging",
            "1 for the state of the band above the cap (off, idle, measuring, using_idle_uplink, yielding, "
            "unmeasured), 0 for the others", ["state"], registry=r,
        )
        self.queueing_delay = Gauge(
            "photoferry_shipper_queueing_delay_seconds",
            "Queueing delay on the path to S3, as last measured while the band is in use (NaN otherwise)",
            registry=r,
        )
        self.base_delay = Gauge(
            "photoferry_shipper_base_delay_seconds", "The path's round trip to S3 with no queue (NaN: not measured)",
            registry=r,
        )
        self.delay_probes = Counter(
            "photoferry_shipper_delay_probes", "Delay probes to the S3 endpoint, by outcome (answered, timed_out, "
            "failed)", ["outcome"], registry=r,
        )
        self.egress = Gauge(
            "photoferry_shipper_egress_bytes_per_second", "Egress achieved over the last seconds", registry=r
        )
        self.lag = Histogram(
            "photoferry_shipper_lag_seconds",
            "Time from the gateway's receipt of a photo to its arrival in S3, by class (fresh, backlog)",
            ["class"],
            buckets=(1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 3600, 4 * 3600, 12 * 3600, 86400, 3 * 86400,
                     7 * 86400),
            registry=r,
        )
        self.class_sent_bytes = Counter(
            "photoferry_shipper_class_sent_bytes", "Bytes sent towards S3 by class (fresh, backlog)", ["class"],
            registry=r,
        )
        self.lane_egress = Gauge(
            "photoferry_shipper_class_egress_bytes_per_second", "Egress achieved by class (fresh, backlog)",
            ["class"], registry=r,
        )
        self.fresh_share = Gauge(
            "photoferry_shipper_fresh_share_ratio", "Share of the cap fresh photos may take while a backlog waits",
            registry=r,
        )
        self.retries = Counter(
            "photoferry_shipper_retries", "Shipments sent back for a delayed retry, by kind", ["kind"], registry=r
        )
        self.parked = Counter("photoferry_shipper_parked", "Photos parked for an operator", registry=r)
        self.breaker_open = Gauge(
            "photoferry_shipper_breaker_open", "1 while the circuit breaker stops shipping", registry=r
        )
        self.link_limited = Gauge(
            "photoferry_shipper_link_limited", "1 while the link, not the cap, limits egress", registry=r
        )
        self.publishing_blocked = Gauge(
            "photoferry_shipper_publishing_blocked",
            "1 while the broker blocks this replica's publishing (a resource alarm); shipping goes on",
            registry=r,
        )
        self.concurrency = Gauge("photoferry_shipper_concurrency", "Uploads allowed at once", registry=r)
        self.in_flight = Gauge("photoferry_shipper_in_flight", "Shipments being handled now", registry=r)
