"""Harness: real shard processes (`python -m shard_server serve|launch`) on real unix sockets.

Processes are started in their own session and always stopped (SIGTERM, then SIGKILL) when a fixture or
`running_shard` block ends, whatever the test did. Socket paths live in a short /tmp directory because
unix socket paths are limited to 107 bytes and pytest's tmp_path can be longer.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from shard_server.pb.generate.v1 import generate_pb2 as pb
from shard_server.pb.generate.v1 import generate_pb2_grpc
from shard_server.testing.fake_router import FakeRouter, RouterLimits

REPO = Path(__file__).resolve().parents[2]
# Large enough for the 64-request test (the tiny model needs 512 bytes of KV per token).
DEFAULT_KV_BYTES = 8 << 20
LIMITS = RouterLimits(max_input_length=48, max_total_tokens=96, max_prefill_tokens=192)


@dataclass
class ShardProcess:
    proc: subprocess.Popen
    uds_path: str
    log_path: Path
    tmp_dir: Path | None = None  # made by start_shard; removed by running_shard
    _channels: list[grpc.Channel] = field(default_factory=list)

    def socket(self, rank: int = 0) -> Path:
        return Path(f"{self.uds_path}-{rank}")

    def url(self, rank: int = 0) -> str:
        return f"unix://{self.socket(rank)}"

    def channel(self, rank: int = 0) -> grpc.Channel:
        ch = grpc.insecure_channel(self.url(rank))
        self._channels.append(ch)
        return ch

    def stub(self, rank: int = 0) -> generate_pb2_grpc.LoraxServiceStub:
        return generate_pb2_grpc.LoraxServiceStub(self.channel(rank))

    def router(self, limits: RouterLimits = LIMITS, tokenize=None) -> FakeRouter:
        return FakeRouter(self.url(), limits, timeout=120.0, tokenize=tokenize)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def wait_ready(self, ranks: int = 1, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        pending = list(range(ranks))
        while pending:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"shard exited with {self.proc.returncode} while starting:\n{self.log()[-4000:]}"
                )
            if time.monotonic() > deadline:
                raise TimeoutError(f"shard not ready after {timeout}s:\n{self.log()[-4000:]}")
            rank = pending[0]
            if self.socket(rank).exists() and _health_serving(self.url(rank)):
                pending.pop(0)
            else:
                time.sleep(0.1)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        for ch in self._channels:
            ch.close()
        self._channels.clear()
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)  # the launcher's session: every child with it
                self.proc.wait()
        return self.proc.returncode


def _health_serving(url: str) -> bool:
    with grpc.insecure_channel(url) as ch:
        try:
            resp = health_pb2_grpc.HealthStub(ch).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=2.0
            )
        except grpc.RpcError:
            return False
    return resp.status == health_pb2.HealthCheckResponse.SERVING


def start_shard(
    model_dir: Path,
    *args: str,
    command: str = "serve",
    num_shard: int = 1,
    wait: bool = True,
    uds_path: str | None = None,
    env: dict[str, str] | None = None,
) -> ShardProcess:
    """Start `python -m shard_server serve MODEL_DIR --uds-path ... --device cpu ARGS` (or launch);
    `env`: variables added to this process's environment for it."""
    tmp_dir = None if uds_path else Path(tempfile.mkdtemp(prefix="shard-", dir="/tmp"))
    uds = uds_path or str(tmp_dir / "s")
    # One log per process, even when two processes are pointed at the same socket path.
    fd, log_name = tempfile.mkstemp(prefix=f"{Path(uds).name}.", suffix=".log", dir=Path(uds).parent)
    os.close(fd)
    log_path = Path(log_name)
    cmd = [sys.executable, "-m", "shard_server", command]
    if command == "launch":
        cmd += ["--num-shard", str(num_shard)]
    cmd += [str(model_dir), "--uds-path", uds, "--device", "cpu", *args]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                env=None if env is None else {**os.environ, **env})  # fmt: skip
    sp = ShardProcess(proc, uds, log_path, tmp_dir)
    if wait:
        try:
            sp.wait_ready(num_shard)
        except BaseException:
            sp.stop(signal.SIGKILL)
            raise
    return sp


@contextmanager
def running_shard(model_dir: Path, *args: str, **kwargs) -> Iterator[ShardProcess]:
    sp = start_shard(model_dir, *args, **kwargs)
    try:
        yield sp
    finally:
        sp.stop()
        if sp.tmp_dir is not None:
            shutil.rmtree(sp.tmp_dir, ignore_errors=True)


@dataclass
class SharedShard:
    """One warmed-up shard process shared by every test of the session that can share it."""

    process: ShardProcess
    warmup: pb.WarmupResponse
    adapters: dict[int, Path]  # adapter_index -> PEFT directory, loaded as LOCAL

    def stub(self) -> generate_pb2_grpc.LoraxServiceStub:
        return self.process.stub()

    def router(self, limits: RouterLimits = LIMITS, tokenize=None) -> FakeRouter:
        return self.process.router(limits, tokenize)


def request(
    rid: int,
    ids: tuple[int, ...] = (),
    *,
    text: str = "",
    max_new_tokens: int = 8,
    adapter_index: int = 0,
    ignore_eos: bool = True,
    chunks: tuple = (),
    **sampling,
) -> pb.Request:
    """A protobuf Request from a few fields (greedy unless sampling fields say otherwise)."""
    from shard_server.testing.wire import request_to_pb
    from shard_server.types import RequestSpec, SamplingParams, StoppingParams

    return request_to_pb(
        RequestSpec(
            id=rid,
            inputs=text,
            input_ids=tuple(ids),
            input_chunks=tuple(chunks),
            sampling=SamplingParams(**sampling),
            stopping=StoppingParams(max_new_tokens=max_new_tokens, ignore_eos_token=ignore_eos),
            adapter_index=adapter_index,
        )
    )


def batch(bid: int, *requests: pb.Request) -> pb.Batch:
    return pb.Batch(id=bid, requests=requests, size=len(requests))


class Bystander:
    """A cached batch that must survive other requests' errors untouched.

    Prefilled once; `step()` decodes it one token and checks it still lists the same requests, so a
    test can interleave it with failing RPCs and finally compare its tokens with an undisturbed run.
    """

    def __init__(self, stub, bid: int, prompts: dict[int, tuple[int, ...]], max_new_tokens: int = 40):
        self.stub = stub
        resp = stub.Prefill(
            pb.PrefillRequest(
                batch=batch(
                    bid, *(request(rid, ids, max_new_tokens=max_new_tokens) for rid, ids in prompts.items())
                )
            ),
            timeout=60,
        )
        self.tokens = {g.request_id: list(g.next_tokens.ids) for g in resp.generations}
        self.cached = resp.batch
        assert set(self.cached.request_ids) == set(prompts)

    def step(self) -> None:
        resp = self.stub.Decode(pb.DecodeRequest(batches=[self.cached]), timeout=60)
        for g in resp.generations:
            self.tokens[g.request_id].extend(g.next_tokens.ids)
        assert set(resp.batch.request_ids) == set(self.cached.request_ids), "the bystander batch changed"
        self.cached = resp.batch

    def clear(self) -> None:
        self.stub.ClearCache(pb.ClearCacheRequest(id=self.cached.id), timeout=30)


def assert_sharded_equals_single(
    sp: ShardProcess, shared_shard: SharedShard, requests, limits: RouterLimits, ranks: int
) -> list:
    """Drive a shard group with the fan-out router (warmup, then the requests) and check every request's
    tokens equal the shared single shard's; -> the group's results."""
    with sp.router(limits) as router:
        assert router.urls == [sp.url(r) for r in range(ranks)]
        router.warmup()
        sharded = router.generate(requests)
    with shared_shard.router(limits) as single:
        alone = single.generate(requests, clear_at_end=False)
    assert [r.token_ids for r in sharded] == [r.token_ids for r in alone]
    return sharded
