"""Metrics and traces of a live shard process: /metrics is scraped before and after real traffic and the
numbers move; every RPC's span reaches an OTLP/gRPC receiver this test runs on loopback.

One shard process serves both (--metrics-port and --otlp-endpoint); spans are checked after SIGTERM,
which flushes the exporter.
"""

from __future__ import annotations

import socket
import threading
import urllib.request
from concurrent import futures

import grpc
import pytest
from shard_harness import LIMITS, batch, request, running_shard

from shard_server.pb.generate.v1 import generate_pb2 as pb
from shard_server.types import AdapterSpec

otlp_grpc = pytest.importorskip("opentelemetry.proto.collector.trace.v1.trace_service_pb2_grpc")
otlp_pb = pytest.importorskip("opentelemetry.proto.collector.trace.v1.trace_service_pb2")
parser = pytest.importorskip("prometheus_client.parser")

TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
PARENT_SPAN = "b7ad6b7169203331"


class Receiver(otlp_grpc.TraceServiceServicer):
    """A minimal OTLP trace collector: keeps every span it is sent."""

    def __init__(self) -> None:
        self.spans: list = []
        self.lock = threading.Lock()

    def Export(self, request, context):
        with self.lock:
            for resource_spans in request.resource_spans:
                attrs = {a.key: a.value for a in resource_spans.resource.attributes}
                for scope in resource_spans.scope_spans:
                    self.spans.extend((attrs, span) for span in scope.spans)
        return otlp_pb.ExportTraceServiceResponse()


@pytest.fixture(scope="module")
def receiver():
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    rec = Receiver()
    otlp_grpc.add_TraceServiceServicer_to_server(rec, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield rec, port
    server.stop(0)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scrape(port: int) -> dict[tuple[str, tuple], float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    out = {}
    for family in parser.text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(samples, name: str, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def attr(span, key):
    for a in span.attributes:
        if a.key == key:
            v = a.value
            return getattr(v, v.WhichOneof("value"))
    return None


@pytest.fixture(scope="module")
def observed(tiny_model_dir, adapter_dirs, receiver):
    """Traffic through a shard with metrics and tracing on -> (before, during, after scrapes, spans)."""
    rec, otlp_port = receiver
    port = free_port()
    adapter = str(adapter_dirs[1])
    with running_shard(tiny_model_dir, "--max-kv-cache-bytes", str(2 << 20), "--metrics-port", str(port),
                       "--otlp-endpoint", f"127.0.0.1:{otlp_port}") as sp:  # fmt: skip
        before = scrape(port)
        with sp.router(LIMITS) as router:
            router.warmup()
            assert router.load_adapter(1, AdapterSpec(adapter_ids=(adapter,), source="local"))
        stub = sp.stub()
        parent = (("traceparent", f"00-{TRACE_ID}-{PARENT_SPAN}-01"),)
        resp = stub.Prefill(
            pb.PrefillRequest(batch=batch(7, request(1, (1, 5, 6, 7), max_new_tokens=4),
                                          request(2, (1, 9, 10), adapter_index=1, max_new_tokens=4))),
            timeout=60, metadata=parent,
        )  # fmt: skip
        for _ in range(2):
            resp = stub.Decode(pb.DecodeRequest(batches=[resp.batch]), timeout=60)
        during = scrape(port)
        with pytest.raises(grpc.RpcError):
            stub.Prefill(pb.PrefillRequest(batch=batch(8, request(3, (1, 5), adapter_index=6))), timeout=60)
        while resp.HasField("batch"):
            resp = stub.Decode(pb.DecodeRequest(batches=[resp.batch]), timeout=60)
        stub.ClearCache(pb.ClearCacheRequest(), timeout=30)
        after = scrape(port)
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
        assert sp.stop() == 0  # SIGTERM: the tracer flushes its last spans
    return before, during, after, adapter, text, list(rec.spans)


def test_metrics_move_with_traffic(observed):
    before, during, after, adapter, text, _ = observed
    assert value(before, "lorax_shard_rpc_requests_total", method="Decode", code="OK") == 0
    assert value(after, "lorax_shard_rpc_requests_total", method="Decode", code="OK") == 3
    assert value(after, "lorax_shard_rpc_errors_total", method="Prefill", code="NOT_FOUND") == 1
    assert value(after, "lorax_shard_rpc_duration_seconds_count", method="Prefill") >= 2
    assert value(after, "lorax_shard_generated_tokens_total", adapter="base") == 4
    assert value(after, "lorax_shard_generated_tokens_total", adapter=adapter) == 4
    assert value(after, "lorax_shard_prompt_tokens_total", adapter=adapter) == 3
    assert value(after, "lorax_shard_requests_finished_total", adapter="base", reason="length") == 1
    assert value(after, "lorax_shard_decode_step_seconds_count") == 3
    assert value(after, "lorax_shard_batch_size_sum", step="decode") == 6
    assert value(after, "lorax_shard_prefill_computed_tokens_total") >= 7
    assert value(after, "lorax_shard_prefix_cache_query_tokens_total") >= 7
    # KV blocks: held while the batch lived, all free again after ClearCache
    assert value(during, "lorax_shard_kv_cache_blocks_used") > 0
    assert value(after, "lorax_shard_kv_cache_blocks_used") == 0
    free = value(after, "lorax_shard_kv_cache_blocks_free")
    assert free == value(after, "lorax_shard_kv_cache_blocks_usable") > 0
    # adapters
    assert value(after, "lorax_shard_adapter_loads_total", adapter=adapter) == 1
    assert value(after, "lorax_shard_adapter_load_seconds_count", adapter=adapter) == 1
    assert value(after, "lorax_shard_adapter_device_loads_total", adapter=adapter) == 1
    assert value(after, "lorax_shard_adapters_resident") == 1
    assert value(after, "lorax_shard_adapters_loaded") == 1
    assert "# TYPE lorax_shard_rpc_duration_seconds histogram" in text


def test_every_rpc_has_a_span_with_batch_and_status(observed):
    *_, spans = observed
    by_name: dict[str, list] = {}
    for resource, span in spans:
        assert resource["service.name"].string_value == "lorax-shard"
        by_name.setdefault(span.name, []).append(span)
    for method in ("Warmup", "LoadAdapter", "Prefill", "Decode", "ClearCache"):
        assert f"generate.v1.LoraxService/{method}" in by_name, sorted(by_name)
    prefills = {attr(s, "lorax.batch.id"): s for s in by_name["generate.v1.LoraxService/Prefill"]}
    ok, failed = prefills[7], prefills[8]
    assert attr(ok, "lorax.batch.size") == 2 and attr(ok, "lorax.generations") == 2
    assert attr(ok, "rpc.grpc.status_code") == 0 and ok.status.code != 2  # not ERROR
    assert ok.trace_id.hex() == TRACE_ID and ok.parent_span_id.hex() == PARENT_SPAN  # the router's trace
    assert attr(failed, "rpc.grpc.status_code") == grpc.StatusCode.NOT_FOUND.value[0]
    assert failed.status.code == 2 and "adapter_index 6" in failed.status.message
    decode = by_name["generate.v1.LoraxService/Decode"][0]
    assert attr(decode, "lorax.batch.ids") == "7" and attr(decode, "lorax.batch.size") == 2
    assert decode.end_time_unix_nano > decode.start_time_unix_nano
