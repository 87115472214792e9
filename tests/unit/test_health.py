"""Health never queues behind the model thread, and a stuck model thread is unhealthy.

A real in-process gRPC server over a unix socket; the engine is a double whose Decode blocks on an event
the test holds, and the model thread's clock is a counter the test advances, so nothing here depends on
how fast the machine is (except the 100 ms answer bound itself, taken as the best of a few calls).
"""

from __future__ import annotations

import tempfile
import threading
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from shard_server.pb.generate.v1 import generate_pb2 as pb
from shard_server.pb.generate.v1 import generate_pb2_grpc
from shard_server.server.grpc_server import SERVICE_NAME, build_server
from shard_server.server.workers import EngineWorkers
from shard_server.types import CachedBatchInfo, ShardInfo, StepResult

STUCK_AFTER_S = 30.0
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class HeldEngine:
    """Decode waits until the test releases it; health() is the device probe (counted, may fail)."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.decoding = threading.Event()
        self.probes: list[str] = []
        self.probe_error: Exception | None = None

    def info(self):
        return ShardInfo("float32", "cpu", None, 16, False, False)

    def health(self):
        self.probes.append(threading.current_thread().name)
        if self.probe_error is not None:
            raise self.probe_error

    def decode(self, batch_ids, still_wanted=None):
        self.decoding.set()
        assert self.release.wait(60)
        return StepResult((), CachedBatchInfo(batch_ids[0], (1,), 1, 1))


@pytest.fixture
def shard():
    engine, clock = HeldEngine(), Clock()
    workers = EngineWorkers(clock=clock)
    with tempfile.TemporaryDirectory(prefix="health-", dir="/tmp") as d:
        built = build_server(
            engine, str(Path(d) / "s"), 0, 1, workers=workers, health_stuck_seconds=STUCK_AFTER_S
        )
        built.server.start()
        channel = grpc.insecure_channel(built.address)
        try:
            yield (
                engine,
                clock,
                generate_pb2_grpc.LoraxServiceStub(channel),
                health_pb2_grpc.HealthStub(channel),
            )
        finally:
            engine.release.set()
            channel.close()
            built.server.stop(0).wait()
            workers.close()


def grpc_health(stub, service: str = SERVICE_NAME) -> int:
    return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status


def best_latency(call, n: int = 5) -> float:
    best = float("inf")
    for _ in range(n):
        t0 = time.perf_counter()
        call()
        best = min(best, time.perf_counter() - t0)
    return best


DECODE = pb.DecodeRequest(batches=[pb.CachedBatch(id=5, request_ids=[1])])


def test_idle_health_runs_the_device_probe_on_the_model_thread(shard):
    engine, _, stub, hc = shard
    stub.Health(pb.HealthRequest(), timeout=5)
    assert engine.probes and all(t.startswith("shard-model") for t in engine.probes)
    assert grpc_health(hc) == SERVING and grpc_health(hc, "") == SERVING
    engine.probe_error = RuntimeError("CUDA error: an illegal memory access was encountered")
    with pytest.raises(grpc.RpcError) as e:
        stub.Health(pb.HealthRequest(), timeout=5)
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE and "illegal memory access" in e.value.details()
    assert grpc_health(hc) == NOT_SERVING
    engine.probe_error = None
    stub.Health(pb.HealthRequest(), timeout=5)
    assert grpc_health(hc) == SERVING


def test_health_answers_while_a_decode_holds_the_model_thread_and_flags_it_once_stuck(shard):
    engine, clock, stub, hc = shard
    decode = stub.Decode.future(DECODE, timeout=60)
    assert engine.decoding.wait(10)  # the model thread is inside Decode until the test releases it
    probes = len(engine.probes)
    # Each call below would block until `release` if Health queued behind the model thread.
    assert best_latency(lambda: stub.Health(pb.HealthRequest(), timeout=5)) < 0.1
    assert best_latency(lambda: grpc_health(hc)) < 0.1
    assert grpc_health(hc) == SERVING
    assert len(engine.probes) == probes  # no device op queued behind the running call
    clock.now += STUCK_AFTER_S + 1  # the Decode has now run longer than the stuck threshold
    with pytest.raises(grpc.RpcError) as e:
        stub.Health(pb.HealthRequest(), timeout=5)
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "running decode for 31.0 s" in e.value.details()
    assert grpc_health(hc) == NOT_SERVING and grpc_health(hc, "") == NOT_SERVING
    engine.release.set()
    assert decode.result().batch.id == 5
    stub.Health(pb.HealthRequest(), timeout=5)  # the thread is idle again: the probe runs and passes
    assert grpc_health(hc) == SERVING


def test_grpc_health_check_alone_sees_a_stuck_model_thread(shard):
    """Nobody calls LoRAX Health (a Kubernetes probe only speaks grpc.health.v1): Check still checks."""
    engine, clock, stub, hc = shard
    decode = stub.Decode.future(DECODE, timeout=60)
    assert engine.decoding.wait(10)
    assert grpc_health(hc) == SERVING
    clock.now += STUCK_AFTER_S + 1
    assert grpc_health(hc) == NOT_SERVING
    engine.release.set()
    decode.result()
    assert grpc_health(hc) == SERVING
