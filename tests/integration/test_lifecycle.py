"""Process lifecycle: SIGTERM drains the RPCs in flight; `launch` starts, stops and supervises ranks."""

from __future__ import annotations

import math
import os
import re
import signal
import socket
import stat
import tempfile
import time
from pathlib import Path

import pytest
from shard_harness import Bystander, assert_sharded_equals_single, batch, request, running_shard, start_shard

from shard_server.pb.generate.v1 import generate_pb2 as pb
from shard_server.testing.fake_router import RouterLimits
from shard_server.types import RequestSpec, StoppingParams

SMALL = RouterLimits(max_input_length=16, max_total_tokens=32, max_prefill_tokens=32)
PROMPT = 480  # tokens per request of the slow Prefill


@pytest.fixture(scope="module")
def slower_model_dir(tiny_model_factory):
    # Big enough that a Prefill of a few dozen long prompts takes seconds on CPU.
    return tiny_model_factory(layers=4, hidden=256, heads=4, kv_heads=2)


def _prefill_batch(bid: int, n: int) -> pb.PrefillRequest:
    reqs = [
        request(bid * 1000 + i, (1, *((7 * i + k) % 500 + 3 for k in range(PROMPT - 1))), max_new_tokens=1)
        for i in range(n)
    ]
    return pb.PrefillRequest(batch=batch(bid, *reqs))


def test_sigterm_mid_decode_completes_the_rpc_and_exits_0(slower_model_dir):
    with running_shard(slower_model_dir, "--max-kv-cache-bytes", str(512 << 20)) as sp:
        with sp.router(SMALL) as router:
            router.warmup()
        stub = sp.stub()
        by = Bystander(stub, 1, {1: (1, 5, 6, 7), 2: (1, 9, 10)}, max_new_tokens=16)
        # Calibrate so that the model thread is busy for ~2 s when the signal arrives.
        t0 = time.monotonic()
        stub.Prefill(_prefill_batch(2, 4), timeout=120)
        per_request = (time.monotonic() - t0) / 4
        n = max(4, min(120, math.ceil(2.0 / per_request)))
        finished_at: dict[str, float] = {}

        def mark(name):
            return lambda _future: finished_at.setdefault(name, time.monotonic())

        slow = stub.Prefill.future(_prefill_batch(3, n), timeout=300)
        slow.add_done_callback(mark("prefill"))
        time.sleep(0.3)
        decode = stub.Decode.future(pb.DecodeRequest(batches=[by.cached]), timeout=300)  # queued behind it
        decode.add_done_callback(mark("decode"))
        time.sleep(0.3)
        assert not decode.done(), "calibration failed: the Decode finished before the signal"
        signalled_at = time.monotonic()
        sp.proc.send_signal(signal.SIGTERM)
        resp = decode.result()  # the RPC in flight completes normally
        assert {g.request_id for g in resp.generations} == {1, 2}
        assert len(slow.result().generations) == n
        assert finished_at["decode"] > signalled_at
        assert sp.proc.wait(60) == 0
        assert not sp.socket(0).exists()
        assert "draining" in sp.log()


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
