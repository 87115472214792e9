"""Info, Health, ServiceDiscovery, grpc.health.v1, reflection, the socket file, Warmup."""

from __future__ import annotations

import os
import stat

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from shard_harness import LIMITS, batch, request, start_shard

from shard_server.pb.generate.v1 import generate_pb2 as pb
from shard_server.server.convert import adapter_to_pb
from shard_server.testing.wire import warmup_request
from shard_server.types import AdapterSpec


def test_info_health_service_discovery(shared_shard, tiny_model_dir):
    stub = shared_shard.stub()
    info = stub.Info(pb.InfoRequest(), timeout=10)
    assert info.dtype == "float32" and info.device_type == "cpu"
    assert info.block_size > 0
    assert info.supports_generation and not info.supports_classification
    assert not info.requires_block_allocator  # default --block-allocator shard
    assert not info.requires_padding and info.speculate == 0
    assert not info.HasField("window_size")  # the default tiny model has full attention
    stub.Health(pb.HealthRequest(), timeout=10)
    urls = stub.ServiceDiscovery(pb.ServiceDiscoveryRequest(), timeout=10).urls
    assert list(urls) == [shared_shard.process.url(0)]


def test_standard_grpc_health_service(shared_shard):
    health = health_pb2_grpc.HealthStub(shared_shard.process.channel())
    for service in ("", "generate.v1.LoraxService"):
        resp = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
        assert resp.status == health_pb2.HealthCheckResponse.SERVING
    with pytest.raises(grpc.RpcError) as e:
        health.Check(health_pb2.HealthCheckRequest(service="no.such.Service"), timeout=10)
    assert e.value.code() == grpc.StatusCode.NOT_FOUND


def test_reflection_lists_the_service(shared_shard):
    stub = reflection_pb2_grpc.ServerReflectionStub(shared_shard.process.channel())
    reqs = [
        reflection_pb2.ServerReflectionRequest(list_services=""),
        reflection_pb2.ServerReflectionRequest(file_containing_symbol="generate.v1.LoraxService"),
    ]
    listed, described = list(stub.ServerReflectionInfo(iter(reqs), timeout=10))
    names = {s.name for s in listed.list_services_response.service}
    assert {"generate.v1.LoraxService", "grpc.health.v1.Health"} <= names
    assert described.file_descriptor_response.file_descriptor_proto  # the .proto is served too


def test_socket_is_private(shared_shard):
    st = os.stat(shared_shard.process.socket(0))
    assert stat.S_ISSOCK(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o600


def test_a_live_socket_is_never_taken_over(shared_shard, tiny_model_dir):
    # A second shard on the path of a live one must refuse (fast, before loading a model), not steal it.
    other = start_shard(tiny_model_dir, uds_path=shared_shard.process.uds_path, wait=False)
    assert other.proc.wait(120) != 0
    assert "already serving" in other.log()
    shared_shard.stub().Health(pb.HealthRequest(), timeout=10)
    assert shared_shard.process.socket(0).exists()


def test_warmup_with_the_routers_batch(shared_shard):
    req = warmup_request(LIMITS.max_input_length, LIMITS.max_prefill_tokens, LIMITS.max_total_tokens)
    # The router's batch (PROTOCOL.md): ids 0, "_test " text, truncate, an image first, all processors.
    assert len(req.batch.requests) == LIMITS.max_prefill_tokens // LIMITS.max_input_length
    first = req.batch.requests[0]
    assert [c.WhichOneof("chunk") for c in first.tokenized_inputs.input_chunks] == ["text", "image"]
    for r in req.batch.requests:
        assert r.id == 0 and r.inputs.startswith("_test _test ") and r.truncate == LIMITS.max_input_length
        assert r.stopping_parameters.max_new_tokens == LIMITS.max_total_tokens - r.truncate
        p = r.parameters
        assert (p.top_k, p.watermark, r.prefill_logprobs) == (10, True, True)
        assert p.repetition_penalty == pytest.approx(1.2) and p.frequency_penalty == pytest.approx(0.5)
    resp = shared_shard.warmup
    assert resp.HasField("max_supported_total_tokens")
    assert resp.max_supported_total_tokens >= LIMITS.max_total_tokens
    # Warmup leaves nothing cached: its batch id 0 is unknown afterwards.
    with pytest.raises(grpc.RpcError) as e:
        shared_shard.stub().Decode(
            pb.DecodeRequest(batches=[pb.CachedBatch(id=0, request_ids=[0])]), timeout=30
        )
    assert e.value.code() == grpc.StatusCode.NOT_FOUND


def test_embed_returns_one_vector_per_request(shared_shard):
    resp = shared_shard.stub().Embed(
        pb.EmbedRequest(batch=batch(300, request(1, (1, 5, 9)), request(2, text="hello world"))), timeout=60
    )
    assert resp.errorMsg == ""
    assert [e.request_id for e in resp.embeddings] == [1, 2]
    assert len(resp.embeddings[0].values) == len(resp.embeddings[1].values) > 0


def test_download_offload_and_reload_an_adapter(shared_shard):
    stub = shared_shard.stub()
    params, source = adapter_to_pb(AdapterSpec(adapter_ids=(str(shared_shard.adapters[3]),), source="local"))
    down = stub.DownloadAdapter(
        pb.DownloadAdapterRequest(adapter_parameters=params, adapter_source=source), timeout=60
    )
    assert down.downloaded and 0.0 <= down.memory_fraction <= 1.0
    off = pb.OffloadAdapterRequest(adapter_parameters=params, adapter_source=source, adapter_index=3)
    assert stub.OffloadAdapter(off, timeout=60).offloaded
    try:
        with pytest.raises(grpc.RpcError) as e:  # never silently served by the base model
            stub.Prefill(pb.PrefillRequest(batch=batch(301, request(1, (1, 5), adapter_index=3))), timeout=60)
        assert e.value.code() == grpc.StatusCode.NOT_FOUND
    finally:
        load = pb.LoadAdapterRequest(adapter_parameters=params, adapter_source=source, adapter_index=3)
        assert stub.LoadAdapter(load, timeout=60).loaded
