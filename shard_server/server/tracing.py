"""OpenTelemetry tracing: one span per RPC, exported over OTLP/gRPC when `--otlp-endpoint` is given.

The tracer provider is an object of this shard (never installed as OpenTelemetry's global provider), with
a batch span processor that exports in the background and flushes at shutdown. A router that sends W3C
`traceparent` metadata gets the shard's spans as children of its own.

Span: name `generate.v1.LoraxService/<Method>`, kind SERVER, attributes `rpc.system=grpc`, `rpc.service`,
`rpc.method`, `rpc.grpc.status_code` (int), and what the servicer adds per RPC (`lorax.batch.id`,
`lorax.batch.size`, `lorax.batch.ids`, `lorax.generations`, `lorax.adapter.index`, `lorax.adapter.ids`, ...).
A failed RPC's span has status ERROR with the (truncated) status message.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

SERVICE = "generate.v1.LoraxService"


@dataclass(frozen=True)
class TracingConfig:
    endpoint: str  # host:port or http(s)://host:port of an OTLP/gRPC receiver
    service_name: str = "lorax-shard"
    export_delay_seconds: float = 1.0  # batch processor: how long spans may wait before export


class RpcTracer:
    def __init__(self, config: TracingConfig, rank: int = 0, world_size: int = 1) -> None:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        resource = Resource.create(
            {"service.name": config.service_name, "shard.rank": rank, "shard.world_size": world_size}
        )
        self._provider = TracerProvider(resource=resource)
        insecure = not config.endpoint.startswith("https://")
        exporter = OTLPSpanExporter(endpoint=config.endpoint, insecure=insecure)
        self._provider.add_span_processor(
            BatchSpanProcessor(exporter, schedule_delay_millis=int(config.export_delay_seconds * 1000))
        )
        self._tracer = self._provider.get_tracer("lorax_shard")
        self._propagator = TraceContextTextMapPropagator()
        log.info("tracing: OTLP/gRPC spans to %s as service %s", config.endpoint, config.service_name)

    def start(self, method: str, metadata: Iterable[tuple[str, Any]] | None) -> Any:
        """A started SERVER span for one RPC; the router's trace context (if sent) is its parent."""
        from opentelemetry.trace import SpanKind

        carrier = {k: v for k, v in metadata or () if isinstance(v, str)}
        parent = self._propagator.extract(carrier) if carrier else None
        span = self._tracer.start_span(f"{SERVICE}/{method}", context=parent, kind=SpanKind.SERVER)
        span.set_attribute("rpc.system", "grpc")
        span.set_attribute("rpc.service", SERVICE)
        span.set_attribute("rpc.method", method)
        return span

    @staticmethod
    def end(span: Any, code: int, code_name: str, message: str | None, attributes: dict) -> None:
        from opentelemetry.trace import Status, StatusCode

        for key, value in attributes.items():
            span.set_attribute(key, value)
        span.set_attribute("rpc.grpc.status_code", code)
        if code_name != "OK":
            span.set_status(Status(StatusCode.ERROR, f"{code_name}: {message or ''}"))
        span.end()

    def close(self) -> None:
        """Flush the spans not yet exported and stop the exporter (at shutdown)."""
        self._provider.shutdown()
