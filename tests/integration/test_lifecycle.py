"""Process lifecycle: SIGTERM drains the RPCs in flight; `launch` starts, stops and supervises ranks."""

from __future__ import annotations

import os
import re
import signal
import socket
import stat
import tempfile
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from shard_harness import Bystander, assert_sharded_equals_single, running_shard, start_shard

from shard_server.pb.generate.v1 import generate_pb2 as pb
from shard_server.testing.fake_router import RouterLimits
from shard_server.testing.hold import held_marker
from shard_server.types import RequestSpec, StoppingParams

SMALL = RouterLimits(max_input_length=16, max_total_tokens=32, max_prefill_tokens=32)


def _wait_for(what: str, cond, sp, timeout: float = 120.0) -> None:
    """Poll for an event the test caused; the bound only turns a hang into a failure."""
    deadline = time.monotonic() + timeout
    while not cond():
        assert sp.proc.poll() is None, f"the shard exited waiting for {what}:\n{sp.log()[-4000:]}"
        assert time.monotonic() < deadline, f"no {what} after {timeout:.0f}s:\n{sp.log()[-4000:]}"
        time.sleep(0.02)


def _refused(sp) -> bool:
    with grpc.insecure_channel(sp.url()) as ch:
        try:
            health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=10)
        except grpc.RpcError:
            return True
    return False


def test_sigterm_mid_decode_completes_the_rpc_and_exits_0(tiny_model_dir, tmp_path):
    # The shard holds every Decode on its model thread until `release` exists: the signal certainly
    # arrives while the RPC is in flight, however fast or busy the machine is.
    release = tmp_path / "release"
    with running_shard(
        tiny_model_dir, "--max-kv-cache-bytes", str(1 << 20), "--test-hold-decode-file", str(release)
    ) as sp:
        with sp.router(SMALL) as router:
            router.warmup()
        stub = sp.stub()
        by = Bystander(stub, 1, {1: (1, 5, 6, 7), 2: (1, 9, 10)}, max_new_tokens=16)
        decode = stub.Decode.future(pb.DecodeRequest(batches=[by.cached]), timeout=300)
        _wait_for("Decode on the model thread", held_marker(release).exists, sp)
        assert not _refused(sp)  # serving other RPCs while the Decode is held
        sp.proc.send_signal(signal.SIGTERM)
        _wait_for("new RPCs refused (the server is stopping)", lambda: _refused(sp), sp)
        assert "draining" in sp.log()
        assert not decode.done()  # still held: the server began stopping while the RPC was in flight
        release.touch()
        resp = decode.result()  # the RPC in flight completes normally
        assert {g.request_id for g in resp.generations} == {1, 2}
        assert all(len(g.next_tokens.ids) == 1 for g in resp.generations)
        assert sp.proc.wait(60) == 0
        assert not sp.socket(0).exists()


def _pids(log: str) -> list[int]:
    m = re.search(r"pids \[([\d, ]+)\]", log)
    assert m, log
    return [int(p) for p in m.group(1).split(",")]


def test_launch_one_shard_replaces_a_stale_socket_serves_and_stops_cleanly(tiny_model_dir):
    with tempfile.TemporaryDirectory(prefix="shard-", dir="/tmp") as d:
        uds = str(Path(d) / "s")
        stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        stale.bind(f"{uds}-0")  # a socket file nobody listens on, as a killed shard leaves it
        stale.close()
        sp = start_shard(
            tiny_model_dir, "--max-kv-cache-bytes", str(1 << 20), command="launch", num_shard=1, uds_path=uds
        )
        try:
            assert stat.S_IMODE(os.stat(sp.socket(0)).st_mode) == 0o600  # a new socket, not the stale file
            reqs = [
                RequestSpec(id=0, input_ids=(1, 2 + k, 40), stopping=StoppingParams(5, ignore_eos_token=True))
                for k in range(3)
            ]
            with sp.router(SMALL) as router:
                assert router.urls == [sp.url(0)]
                router.warmup()
                assert [len(r.token_ids) for r in router.generate(reqs)] == [5, 5, 5]
            (child,) = _pids(sp.log())
            assert sp.stop(signal.SIGTERM) == 0
            assert not sp.socket(0).exists()
            with pytest.raises(ProcessLookupError):
                os.kill(child, 0)
        finally:
            sp.stop(signal.SIGKILL)


def test_launch_two_ranks_fan_out_then_a_dead_rank_stops_all(tiny_model_dir, shared_shard):
    num_shard = 2
    sp = start_shard(tiny_model_dir, "--grace-seconds", "5", command="launch", num_shard=num_shard)
    try:
        pids = _pids(sp.log())
        assert len(pids) == num_shard
        # Fan-out as the router does: every RPC to both ranks, generations merged; the fake router
        # raises ProtocolViolation if a request is answered twice or not at all.
        reqs = [
            RequestSpec(
                id=0, input_ids=(1, 7 + k, 30, 31 + k), stopping=StoppingParams(6, ignore_eos_token=True)
            )
            for k in range(5)
        ]
        assert_sharded_equals_single(sp, shared_shard, reqs, SMALL, num_shard)
        os.kill(pids[-1], signal.SIGKILL)  # a rank dies without warning (OOM killer, segfault, ...)
        code = sp.proc.wait(60)
        assert code != 0
        assert f"rank {num_shard - 1} exited (killed by SIGKILL)" in sp.log()
        for pid in pids[:-1]:
            with pytest.raises(ProcessLookupError):
                os.kill(pid, 0)
    finally:
        sp.stop(signal.SIGKILL)
