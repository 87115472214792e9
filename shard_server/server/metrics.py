"""Prometheus metrics of one shard, served over HTTP at /metrics when `--metrics-port` is given.

Every metric lives in a `CollectorRegistry` owned by `ShardMetrics` (no module-global registry), so
several shards in one process (tests) never share counters. Names follow vLLM/TGI conventions with the
`lorax_shard_` prefix: `_seconds` histograms, `_total` counters, plain gauges.

    lorax_shard_rpc_duration_seconds{method}              histogram, every RPC (errors too)
    lorax_shard_rpc_requests_total{method,code}           counter, by gRPC status code (OK included)
    lorax_shard_rpc_errors_total{method,code}             counter, non-OK only
    lorax_shard_batch_size{step}                          histogram of requests per Prefill / Decode
    lorax_shard_prefill_step_seconds / _decode_step_seconds   model-thread time of one step
    lorax_shard_prompt_tokens_total{adapter}              prompt tokens of requests that finished prefill
    lorax_shard_prefill_computed_tokens_total             prompt tokens run through the model
    lorax_shard_generated_tokens_total{adapter}           tokens emitted
    lorax_shard_requests_finished_total{adapter,reason}   requests that stopped (length, eos_token, stop)
    lorax_shard_kv_cache_blocks_used / _free / _usable    gauges after every engine call
    lorax_shard_prefix_cache_hit_tokens_total / _query_tokens_total, lorax_shard_prefix_cache_hit_rate
    lorax_shard_cached_batches                            gauge
    lorax_shard_adapters_loaded / lorax_shard_adapters_resident     gauges (registered / on the device)
    lorax_shard_adapter_loads_total{adapter}, lorax_shard_adapter_load_seconds{adapter}   LoadAdapter
    lorax_shard_adapter_offloads_total{adapter}
    lorax_shard_adapter_device_loads_total{adapter}       host -> device placements (first load, reloads)
    lorax_shard_adapter_evictions_total{adapter}          device -> host evictions (LRU, budget)
    lorax_shard_speculative_verify_steps_total            speculative Decode steps (verify forwards)
    lorax_shard_speculative_lookahead_steps_total         of those, forwards enqueued by the Decode before
    lorax_shard_speculative_draft_tokens_total / _accepted_tokens_total   drafts verified / accepted

`adapter` is the adapter id ("+"-joined for merges, cut to 120 characters), "base" for index 0; ids are
chosen by the router, so at most MAX_ADAPTER_LABELS distinct values are used and later ones are counted
under "other" (a registry must not grow without bound).
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass

log = logging.getLogger(__name__)

MAX_ADAPTER_LABELS = 256
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_STEP_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
_FINISH_REASONS = {0: "length", 1: "eos_token", 2: "stop_sequence"}


@dataclass(frozen=True)
class MetricsConfig:
    port: int  # 0: any free port (logged)
    host: str = "127.0.0.1"


class ShardMetrics:
    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry(auto_describe=True)
        r, p = self.registry, "lorax_shard_"

        def counter(name, doc, labels=()):
            return Counter(p + name, doc, labels, registry=r)

        def gauge(name, doc, labels=()):
            return Gauge(p + name, doc, labels, registry=r)

        def histogram(name, doc, labels=(), buckets=_LATENCY_BUCKETS):
            return Histogram(p + name, doc, labels, registry=r, buckets=buckets)

        self.rpc_duration = histogram("rpc_duration_seconds", "Latency of each RPC", ("method",))
        self.rpc_requests = counter("rpc_requests", "RPCs by method and status code", ("method", "code"))
        self.rpc_errors = counter("rpc_errors", "Failed RPCs by method and status code", ("method", "code"))
        self.batch_size = histogram("batch_size", "Requests per step", ("step",), _BATCH_BUCKETS)
        self.prefill_step = histogram("prefill_step_seconds", "Model time of a Prefill", (), _STEP_BUCKETS)
        self.decode_step = histogram("decode_step_seconds", "Model time of a Decode", (), _STEP_BUCKETS)
        self.prompt_tokens = counter("prompt_tokens", "Prompt tokens of prefilled requests", ("adapter",))
        self.computed_tokens = counter("prefill_computed_tokens", "Prompt tokens run through the model")
        self.generated_tokens = counter("generated_tokens", "Generated tokens", ("adapter",))
        self.finished = counter("requests_finished", "Finished requests", ("adapter", "reason"))
        self.blocks_used = gauge("kv_cache_blocks_used", "KV cache blocks held by requests")
        self.blocks_free = gauge("kv_cache_blocks_free", "Free KV cache blocks")
        self.blocks_usable = gauge("kv_cache_blocks_usable", "KV cache blocks requests may use")
        self.prefix_hits = counter("prefix_cache_hit_tokens", "Prompt tokens served by the prefix cache")
        self.prefix_queries = counter("prefix_cache_query_tokens", "Prompt tokens looked up in the cache")
        self.prefix_hit_rate = gauge("prefix_cache_hit_rate", "hit tokens / query tokens since start")
        self.cached_batches = gauge("cached_batches", "Batches the shard holds for the router")
        self.adapters_loaded = gauge("adapters_loaded", "Adapters registered under an index")
        self.adapters_resident = gauge("adapters_resident", "Adapters in device memory")
        self.adapter_loads = counter("adapter_loads", "Successful LoadAdapter calls", ("adapter",))
        self.adapter_load_seconds = histogram("adapter_load_seconds", "LoadAdapter latency", ("adapter",))
        self.adapter_offloads = counter("adapter_offloads", "Successful OffloadAdapter calls", ("adapter",))
        self.device_loads = counter("adapter_device_loads", "Host -> device placements", ("adapter",))
        self.evictions = counter("adapter_evictions", "Device -> host evictions", ("adapter",))
        self.spec_steps = counter("speculative_verify_steps", "Speculative Decode steps")
        self.spec_lookahead_steps = counter("speculative_lookahead_steps",
                                            "Speculative steps whose verify forward ran ahead")  # fmt: skip
        self.spec_drafted = counter("speculative_draft_tokens", "Draft tokens verified")
        self.spec_accepted = counter("speculative_accepted_tokens", "Draft tokens accepted")
        self._labels: set[str] = set()
        self._lock = threading.Lock()
        self._server = None

    def adapter_label(self, adapter_id: str) -> str:
        label = adapter_id[:120]
        with self._lock:
            if label in self._labels:
                return label
            if len(self._labels) >= MAX_ADAPTER_LABELS:
                return "other"
            self._labels.add(label)
            return label

    def serve(self, config: MetricsConfig) -> int:
        """Start the /metrics HTTP server (a daemon thread); -> the port it listens on."""
        from prometheus_client import start_http_server

        self._server, _ = start_http_server(config.port, addr=config.host, registry=self.registry)
        port = self._server.server_port
        log.info("metrics: http://%s:%d/metrics", config.host, port)
        return port

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


def finish_reason_label(reason: int) -> str:
    return _FINISH_REASONS.get(int(reason), str(int(reason)))
