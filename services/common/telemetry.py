"""Tracing with OpenTelemetry, configured by the standard ``OTEL_*`` variables.

Spans are exported over OTLP/HTTP when ``OTEL_EXPORTER_OTLP_ENDPOINT`` (or the
traces-specific variable) is set, as in the k3s manifests, where it points at
Jaeger; otherwise tracing still runs (trace ids appear in logs) but nothing is
exported. ``OTEL_SDK_DISABLED=true`` switches it off.
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

from services.common.config import TracingSettings

log = logging.getLogger(__name__)

SHUTDOWN_FLUSH_S = 3.0


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
    provider = TracerProvider(resource=resource, shutdown_on_exit=False)
    if settings.export_configured:
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
        log.info("exporting traces over OTLP")
    trace.set_tracer_provider(provider)
    AioPikaInstrumentor().instrument()
    BotocoreInstrumentor().instrument()
    return provider


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
