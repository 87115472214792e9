"""What the servicer reports about each RPC and engine step: Prometheus metrics and OpenTelemetry spans,
each optional (`Telemetry()` with neither costs a few attribute reads per RPC).

The servicer calls, per RPC, `start(method, request, context)` -> RpcCall, `call.finish(code, message,
response)`; on the model thread after every engine call `engine_sampled(engine.stats())` (gauges, and
counters as deltas of the engine's cumulative ones); after Prefill/Decode `step(kind, size, seconds,
result)`; after adapter RPCs `adapter_loaded/offloaded`.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from shard_server.pb.generate.v1 import generate_pb2 as pb
from shard_server.server.metrics import ShardMetrics, finish_reason_label
from shard_server.server.tracing import RpcTracer
from shard_server.types import AdapterSpec, EngineStats, StepResult

log = logging.getLogger(__name__)


@dataclass
class RpcCall:
    telemetry: Telemetry
    method: str
    span: Any
    started: float
    attributes: dict = field(default_factory=dict)

    def finish(self, code: Any, message: str | None = None, response: Any = None) -> None:
        """`code`: a grpc.StatusCode (value[0] is its integer, name its name)."""
        t = self.telemetry
        seconds = time.perf_counter() - self.started
        if response is not None:
            self.attributes.update(_response_attributes(response))
        if t.metrics is not None:
            t.metrics.rpc_duration.labels(self.method).observe(seconds)
            t.metrics.rpc_requests.labels(self.method, code.name).inc()
            if code.name != "OK":
                t.metrics.rpc_errors.labels(self.method, code.name).inc()
        if self.span is not None:
            try:
                t.tracer.end(self.span, code.value[0], code.name, message, self.attributes)
            except Exception:  # noqa: BLE001 - telemetry must never fail an RPC
                log.exception("ending the span of %s failed", self.method)


class Telemetry:
    def __init__(self, metrics: ShardMetrics | None = None, tracer: RpcTracer | None = None) -> None:
        self.metrics = metrics
        self.tracer = tracer
        self._ids: dict[int, str] = {0: "base"}  # adapter index -> label
        self._lock = threading.Lock()
        self._last: EngineStats | None = None
        self._hits = self._queries = 0  # prefix-cache tokens since start (the hit-rate gauge)

    # ---- per RPC ------------------------------------------------------------------------------------

    def start(self, method: str, request: Any, context: Any) -> RpcCall:
        span = None
        if self.tracer is not None:
            try:
                span = self.tracer.start(method, context.invocation_metadata() if context else None)
            except Exception:  # noqa: BLE001
                log.exception("starting the span of %s failed", method)
        attributes = _request_attributes(request) if span is not None else {}
        return RpcCall(self, method, span, time.perf_counter(), attributes)

    # ---- engine ---------------------------------------------------------------------------------------

    def engine_sampled(self, stats: EngineStats) -> None:
        """Gauges from `stats`; counters advance by the growth of the engine's totals since last time
        (a total that went down, e.g. the prefix cache's after Warmup's resize, counts from zero)."""
        m = self.metrics
        if m is None:
            return
        last, self._last = self._last, stats
        m.blocks_free.set(stats.free_blocks)
        m.blocks_usable.set(stats.usable_blocks)
        m.blocks_used.set(stats.usable_blocks - stats.free_blocks)
        m.cached_batches.set(stats.cached_batches)
        m.adapters_resident.set(len(stats.resident_adapters))
        computed = _growth(last and last.computed_prefill_tokens, stats.computed_prefill_tokens)
        reused = _growth(last and last.reused_prefill_tokens, stats.reused_prefill_tokens)
        m.computed_tokens.inc(computed)
        m.prefix_hits.inc(reused)
        m.prefix_queries.inc(computed + reused)
        self._hits += reused
        self._queries += computed + reused
        m.prefix_hit_rate.set(self._hits / self._queries if self._queries else 0.0)
        for name in ("spec_steps", "spec_lookahead_steps", "spec_drafted", "spec_accepted"):  # same names
            getattr(m, name).inc(_growth(last and getattr(last, name), getattr(stats, name)))
        before = set(last.resident_adapters) if last is not None else set()
        now = set(stats.resident_adapters)
        for index in now - before:
            m.device_loads.labels(self._label(index)).inc()
        with self._lock:
            loaded = set(self._ids) - {0}
        for index in (before - now) & loaded:  # still registered, no longer on the device: evicted
            m.evictions.labels(self._label(index)).inc()

    def step(self, kind: str, size: int, seconds: float, result: StepResult) -> None:
        m = self.metrics
        if m is None:
            return
        m.batch_size.labels(kind).observe(size)
        (m.prefill_step if kind == "prefill" else m.decode_step).observe(seconds)
        for g in result.generations:
            label = self._label(g.adapter_index)
            m.generated_tokens.labels(label).inc(len(g.next_tokens.ids))
            if g.prefill_tokens_length:
                m.prompt_tokens.labels(label).inc(g.prefill_tokens_length)
            if g.generated_text is not None:
                m.finished.labels(label, finish_reason_label(g.generated_text.finish_reason)).inc()

    # ---- adapters -------------------------------------------------------------------------------------

    def adapter_registered(self, index: int, spec: AdapterSpec | None) -> str | None:
        """Label `index` with `spec`'s ids (None: forget it) -> the previous label, for a rollback."""
        return self.adapter_relabelled(index, None if spec is None else "+".join(spec.adapter_ids))

    def adapter_relabelled(self, index: int, adapter_id: str | None) -> str | None:
        with self._lock:
            previous = self._ids.get(index)
            if adapter_id is None:
                self._ids.pop(index, None)
            else:
                self._ids[index] = adapter_id
            self._ids.setdefault(0, "base")
            loaded = len(self._ids) - 1
        if self.metrics is not None:
            self.metrics.adapters_loaded.set(loaded)
        return previous

    def adapter_loaded(self, index: int, spec: AdapterSpec, seconds: float) -> None:
        self.adapter_registered(index, spec)
        if self.metrics is not None:
            label = self._label(index)
            self.metrics.adapter_loads.labels(label).inc()
            self.metrics.adapter_load_seconds.labels(label).observe(seconds)

    def adapter_offloaded(self, index: int) -> None:
        if self.metrics is not None:
            self.metrics.adapter_offloads.labels(self._label(index)).inc()
        self.adapter_registered(index, None)

    def _label(self, index: int) -> str:
        with self._lock:
            adapter_id = self._ids.get(index)
        if self.metrics is None:
            return ""
        return self.metrics.adapter_label(adapter_id if adapter_id is not None else f"index-{index}")

    def close(self) -> None:
        if self.tracer is not None:
            self.tracer.close()
        if self.metrics is not None:
            self.metrics.close()


def _growth(before: int | None, now: int) -> int:
    if before is None or now < before:
        return max(now, 0) if before is not None else 0
    return now - before


def _ids(values, limit: int = 32) -> str:
    values = list(values)
    text = ",".join(str(v) for v in values[:limit])
    return text + (f",... ({len(values)})" if len(values) > limit else "")


def _request_attributes(request: Any) -> dict:
    """Span attributes of a request message: batch ids and sizes, adapter index and ids (bounded)."""
    a: dict = {}
    if isinstance(request, (pb.PrefillRequest, pb.EmbedRequest, pb.ClassifyRequest, pb.WarmupRequest)):
        a["lorax.batch.id"] = request.batch.id
        a["lorax.batch.size"] = len(request.batch.requests)
        a["lorax.batch.input_tokens"] = sum(len(r.tokenized_inputs.ids) for r in request.batch.requests)
        a["lorax.adapter.indices"] = _ids(sorted({r.adapter_index for r in request.batch.requests}))
        if isinstance(request, pb.PrefillRequest) and request.HasField("cached_batch"):
            a["lorax.cached_batch.id"] = request.cached_batch.id
            a["lorax.cached_batch.size"] = len(request.cached_batch.request_ids)
        if isinstance(request, pb.WarmupRequest):
            a["lorax.warmup.max_input_length"] = request.max_input_length
            a["lorax.warmup.max_prefill_tokens"] = request.max_prefill_tokens
    elif isinstance(request, pb.DecodeRequest):
        a["lorax.batch.ids"] = _ids(b.id for b in request.batches)
        a["lorax.batch.size"] = sum(len(b.request_ids) for b in request.batches)
    elif isinstance(request, pb.FilterBatchRequest):
        a["lorax.batch.id"] = request.batch_id
        a["lorax.batch.kept"] = len(request.request_ids)
    elif isinstance(request, pb.ClearCacheRequest):
        a["lorax.batch.id"] = request.id if request.HasField("id") else -1
    elif isinstance(request, (pb.LoadAdapterRequest, pb.OffloadAdapterRequest, pb.DownloadAdapterRequest)):
        if not isinstance(request, pb.DownloadAdapterRequest):
            a["lorax.adapter.index"] = request.adapter_index
        a["lorax.adapter.ids"] = _ids((i[:200] for i in request.adapter_parameters.adapter_ids), 8)
        source = request.adapter_source
        known = source in pb.AdapterSource.values()
        a["lorax.adapter.source"] = pb.AdapterSource.Name(source) if known else str(source)
    return a


def _response_attributes(response: Any) -> dict:
    a: dict = {}
    if isinstance(response, (pb.PrefillResponse, pb.DecodeResponse)):
        a["lorax.generations"] = len(response.generations)
        a["lorax.finished"] = sum(g.HasField("generated_text") for g in response.generations)
        if response.HasField("batch"):
            a["lorax.next_batch.id"] = response.batch.id
            a["lorax.next_batch.size"] = response.batch.size
    elif isinstance(response, pb.FilterBatchResponse):
        a["lorax.next_batch.size"] = response.batch.size
    elif isinstance(response, pb.EmbedResponse):
        a["lorax.embeddings"] = len(response.embeddings)
    elif isinstance(response, pb.WarmupResponse) and response.HasField("max_supported_total_tokens"):
        a["lorax.warmup.max_supported_total_tokens"] = response.max_supported_total_tokens
    return a
