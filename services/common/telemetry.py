"""Tracing with OpenTelemetry, configured by the standard ``OTEL_*`` variables.

Spans are exported over OTLP/HTTP when ``OTEL_EXPORTER_OTLP_ENDPOINT`` (or the
traces-specific variable) is set, as in the k3s manifests, where it points at
Jaeger; otherwise tracing still runs (trace ids appear in logs) but nothing is
exported. ``OTEL_SDK_DISABLED=true`` switches it off.

A photo's trace is the upload, the local store write, the publish, the shipper's
consumption, its local read and its remote upload, and the shipped marker.
What is not about a photo (probes and scrapes, heartbeats and control notices
between the services, every second) starts no trace: ``QuietSampler`` drops it.
"""

from __future__ import annotations

import logging
import threading

from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.instrumentation.aio_pika import AioPikaInstrumentor
from opentelemetry.instrumentation.botocore import BotocoreInstrumentor
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.trace.sampling import Decision, ParentBased, Sampler, SamplingResult

from services.common import topology
from services.common.config import TracingSettings

log = logging.getLogger(__name__)

SHUTDOWN_FLUSH_S = 3.0
# Root spans that are not about a photo: probes, scrapes, and the services' own notices
# (aio-pika names its spans "<exchange>,<routing key> send" and "<exchange> receive").
QUIET_SPANS = frozenset({"GET /healthz", "GET /readyz", "GET /metrics"})
QUIET_PREFIXES = (topology.STATUS_EXCHANGE, topology.SHIPPED_EXCHANGE, topology.CONTROL_EXCHANGE)


class QuietSampler(Sampler):
    """Record every trace but those rooted in probes, scrapes and the services' own chatter."""

    def should_sample(self, parent_context, trace_id, name, kind=None, attributes=None, links=None,  # type: ignore[no-untyped-def]
                      trace_state=None) -> SamplingResult:
        if name in QUIET_SPANS or name.startswith(QUIET_PREFIXES):
            return SamplingResult(Decision.DROP)
        return SamplingResult(Decision.RECORD_AND_SAMPLE, attributes)

    def get_description(self) -> str:
        return "QuietSampler"


def setup_tracing(service_name: str, settings: TracingSettings) -> TracerProvider | None:
    """Install a tracer provider, instrument aio-pika and botocore; return the provider to shut down."""
    if settings.disabled:
        return None
    resource = Resource.create()
    if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
        # OTEL_SERVICE_NAME, when set, names the service; this is the fallback.
        resource = resource.merge(Resource({SERVICE_NAME: service_name}))
    # Shut down by shutdown_tracing (bounded), not by an exit handler that could wait
    # 30 s for an unreachable collector.
    provider = TracerProvider(resource=resource, shutdown_on_exit=False, sampler=ParentBased(QuietSampler()))
    if settings.export_configured:
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
        log.info("exporting traces over OTLP")
    trace.set_tracer_provider(provider)
    AioPikaInstrumentor().instrument()
    BotocoreInstrumentor().instrument(request_hook=_s3_attributes)
    return provider


def _s3_attributes(span, service_name: str, operation_name: str, api_params: dict) -> None:  # type: ignore[no-untyped-def,type-arg]
    """Bucket and key on boto3's S3 spans, as the local store's spans have them."""
    if span is not None and span.is_recording() and service_name == "s3":
        for param, attribute in (("Bucket", "aws.s3.bucket"), ("Key", "aws.s3.key")):
            if isinstance(api_params.get(param), str):
                span.set_attribute(attribute, api_params[param])


def shutdown_tracing(provider: TracerProvider | None) -> None:
    """Flush spans still buffered, so the last requests before a stop are not lost;
    give up after SHUTDOWN_FLUSH_S when the collector does not take them."""
    if provider is None:
        return
    flush = threading.Thread(target=provider.shutdown, name="trace-flush", daemon=True)
    flush.start()
    flush.join(SHUTDOWN_FLUSH_S)
    if flush.is_alive():
        log.warning("trace export did not finish in time; the last spans may be lost",
                    extra={"waited_s": SHUTDOWN_FLUSH_S})
