"""Property-based fuzzing of a real shard process over its unix socket (strategies: fuzz_strategies.py).

Every example is one RPC: a protobuf message of any of the 13 RPCs (valid, edge-valued or invalid), a
valid message's bytes mutated, or random bytes. Properties:

- the shard answers every call (no hang: each has a deadline) and its process never dies;
- the status is one the protocol allows; INTERNAL (a bug) only as grpc's own answer to bytes that do not
  decode ("Exception deserializing request!"), never from the shard; never UNKNOWN;
- a bystander batch (base-model and adapter rows, never named by the fuzzer) decodes every few calls
  and its tokens equal a run of the same batch without the fuzzer, token for token;
- no KV block leaks: whenever the bystander finishes, ClearCache of everything must bring the shard's
  free blocks (its /metrics gauge) back to all usable blocks; then a new bystander starts.

Case count: FUZZ_EXAMPLES examples (default 1000, ~1,700 calls, ~60 s: the CI run, derandomized so it is the
same every time); `make fuzz` runs 100,000 with fresh randomness (FUZZ_RANDOM=1). FUZZ_SPECULATIVE=N
serves with `--speculative-tokens N --overlap` (speculative steps run ahead of the host wherever n-gram
drafts exist: the tiny model's outputs repeat themselves), as `make fuzz-speculative` does.
"""

from __future__ import annotations

import collections
import json
import os
import shutil
import socket
import struct
import time
import urllib.request
from pathlib import Path

import grpc
import pytest
from safetensors.torch import load_file, save_file
from shard_harness import LIMITS, running_shard

from shard_server.pb.generate.v1 import generate_pb2 as pb
from shard_server.types import AdapterSpec

pytest.importorskip("hypothesis")  # a dev dependency; the GPU machine may lack it
from fuzz_strategies import Call, calls  # noqa: E402
from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402

pytestmark = pytest.mark.slow

BYSTANDER_ID = 2**62 + 12_345  # outside every pool the strategies draw batch ids from
# The bystander's adapter row uses its own index, outside the pools the fuzzer loads and offloads: with
# speculation its rows end at different steps, and once that row is done the fuzzer may legally offload
# or replace whatever adapter it used.
BYSTANDER_ADAPTER = 7
BYSTANDER = {2**62 + 1: ((1, 17, 99, 250, 3, 42), 0), 2**62 + 2: ((1, 400, 401, 402), BYSTANDER_ADAPTER)}
BYSTANDER_TOKENS = 24
STEP_EVERY = 8  # fuzz calls between two bystander steps
ALLOWED = {"OK", "INVALID_ARGUMENT", "NOT_FOUND", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION",
           "UNIMPLEMENTED"}  # fmt: skip
UNDECODABLE = "Exception deserializing request!"


def bystander_batch(bid: int) -> pb.Batch:
    reqs = [
        pb.Request(id=rid, tokenized_inputs=pb.TokenizedInputs(ids=ids), adapter_index=adapter,
                   stopping_parameters=pb.StoppingCriteriaParameters(max_new_tokens=BYSTANDER_TOKENS,
                                                                     ignore_eos_token=True))
        for rid, (ids, adapter) in BYSTANDER.items()
    ]  # fmt: skip
    return pb.Batch(id=bid, requests=reqs, size=len(reqs))


def bad_adapters(good: Path, root: Path) -> list[Path]:
    """Crafted adapter directories, one way of breaking each."""
    out = []

    def copy(name: str) -> Path:
        d = root / name
        shutil.copytree(good, d)
        out.append(d)
        return d

    d = copy("nan")
    t = load_file(str(d / "adapter_model.safetensors"))
    next(iter(t.values()))[0, 0] = float("nan")
    save_file(t, str(d / "adapter_model.safetensors"))
    for name, change in [("redos", {"rank_pattern": {"(.*.*)*Z" + "a" * 30: 4}}),
                         ("alpha-str", {"lora_alpha": "8"}), ("targets-int", {"target_modules": [1, 2]}),
                         ("alpha-inf", {"lora_alpha": 1e999})]:  # fmt: skip
        d = copy(name)
        cfg = json.loads((d / "adapter_config.json").read_text())
        cfg.update(change)
        (d / "adapter_config.json").write_text(json.dumps(cfg))
    for name, text in [("list", "[1]"), ("deep", "[" * 50_000 + "]" * 50_000)]:
        (copy(name) / "adapter_config.json").write_text(text)
    d = copy("header")
    raw = json.dumps({f"k{i}": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]} for i in range(20_000)})
    (d / "adapter_model.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw.encode())
    d = copy("no-weights")
    (d / "adapter_model.safetensors").unlink()
    (root / "loop").symlink_to(root / "loop")
    out.append(root / "loop")
    return out


class Fuzzer:
    def __init__(self, sp, stub, metrics_port: int, expected: dict[int, list[int]]):
        self.sp, self.stub, self.port, self.expected = sp, stub, metrics_port, expected
        self.channel = sp.channel()
        self.codes: collections.Counter = collections.Counter()
        self.calls = 0
        self.cycles = 0
        self.rpc_seconds = 0.0  # time in the fuzzed calls themselves (the rest: generation, bystander)
        self.method_seconds: collections.Counter = collections.Counter()
        self.recent: collections.deque = collections.deque(maxlen=24)  # (call, code): told on a failure
        self.start_bystander()

    def start_bystander(self) -> None:
        resp = self.stub.Prefill(pb.PrefillRequest(batch=bystander_batch(BYSTANDER_ID)), timeout=60)
        self.tokens = {g.request_id: list(g.next_tokens.ids) for g in resp.generations}
        self.cached = resp.batch

    def step_bystander(self) -> None:
        try:
            resp = self.stub.Decode(pb.DecodeRequest(batches=[self.cached]), timeout=60)
        except grpc.RpcError as e:
            raise AssertionError(f"the bystander's Decode failed ({e.code().name}: {e.details()}) after "
                                 f"{self.calls} calls{self.last_calls()}") from None  # fmt: skip
        for g in resp.generations:
            self.tokens[g.request_id].extend(g.next_tokens.ids)
        for rid, got in self.tokens.items():
            assert got == self.expected[rid][: len(got)], (
                f"bystander {rid} diverged after {self.calls} calls{self.last_calls()}"
            )
        if resp.HasField("batch"):
            self.cached = resp.batch
            return
        assert all(len(t) == BYSTANDER_TOKENS for t in self.tokens.values())
        self.stub.ClearCache(pb.ClearCacheRequest(), timeout=60)  # every fuzz batch too
        free, usable = self.blocks()
        assert free == usable, f"{usable - free} KV blocks leaked after {self.calls} calls{self.last_calls()}"
        self.cycles += 1
        self.start_bystander()

    def last_calls(self) -> str:
        return "; the last calls:\n" + "\n".join(f"  {code}: {call!r}"[:400] for call, code in self.recent)

    def blocks(self) -> tuple[float, float]:
        text = urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=10).read().decode()
        values = dict(line.rsplit(" ", 1) for line in text.splitlines() if line.startswith("lorax_shard_kv"))
        blocks = "lorax_shard_kv_cache_blocks_"
        return float(values[blocks + "free"]), float(values[blocks + "usable"])

    def run(self, call: Call) -> None:
        if call.steps:
            for step in call.steps:
                self.run(step)
            return
        path = f"/generate.v1.LoraxService/{call.method}"
        if call.raw is not None:
            fn = self.channel.unary_unary(path, request_serializer=None, response_deserializer=None)
            payload = call.raw
        else:
            fn = self.channel.unary_unary(path, request_serializer=lambda m: m.SerializeToString(),
                                          response_deserializer=None)  # fmt: skip
            payload = call.message
        t0 = time.monotonic()
        try:
            fn(payload, timeout=120)
            code, details = "OK", ""
        except grpc.RpcError as e:
            code, details = e.code().name, e.details() or ""
        self.rpc_seconds += time.monotonic() - t0
        self.method_seconds[call.method] += time.monotonic() - t0
        assert self.sp.proc.poll() is None, f"the shard died on {call!r}:\n{self.sp.log()[-3000:]}"
        self.codes[(call.method, "raw" if call.raw is not None else "msg", code)] += 1
        self.recent.append((call, code))
        if code == "INTERNAL":
            assert call.raw is not None and details == UNDECODABLE, f"INTERNAL on {call!r}: {details}"
        else:
            assert code in ALLOWED, f"{code} on {call!r}: {details}"
            assert code == "OK" or details, f"{code} without a message on {call!r}"
        self.calls += 1
        if self.calls % STEP_EVERY == 0:
            self.step_bystander()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_fuzz_every_rpc(tiny_model_dir, adapter_dirs, tmp_path, monkeypatch):
    examples = int(os.environ.get("FUZZ_EXAMPLES", "1000"))
    fresh = os.environ.get("FUZZ_RANDOM", "") not in ("", "0")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # HUB ids resolve in the local cache only: no network
    good = [str(p) for p in adapter_dirs.values()]
    bad = [str(p) for p in bad_adapters(adapter_dirs[1], tmp_path)]
    port = free_port()
    args = ("--max-kv-cache-bytes", str(2 << 20), "--metrics-port", str(port))
    speculative = int(os.environ.get("FUZZ_SPECULATIVE", "0"))
    if speculative:
        args += ("--speculative-tokens", str(speculative), "--overlap")
    with running_shard(tiny_model_dir, *args) as sp:
        with sp.router(LIMITS) as router:
            router.warmup()
            for index, path in ((1, good[0]), (2, good[1]), (BYSTANDER_ADAPTER, good[0])):
                assert router.load_adapter(index, AdapterSpec(adapter_ids=(path,), source="local"))
        stub = sp.stub()
        expected = {rid: [] for rid in BYSTANDER}  # the bystander's tokens without the fuzzer
        resp = stub.Prefill(pb.PrefillRequest(batch=bystander_batch(99)), timeout=60)
        while True:
            for g in resp.generations:
                expected[g.request_id].extend(g.next_tokens.ids)
            if not resp.HasField("batch"):
                break
            resp = stub.Decode(pb.DecodeRequest(batches=[resp.batch]), timeout=60)
        fuzzer = Fuzzer(sp, stub, port, expected)

        # No shrinking: the shard's state carries over from call to call, so replaying smaller examples
        # would not reproduce a failure; the first one is reported as it happened (with the calls before).
        @settings(max_examples=examples, deadline=None, database=None, derandomize=not fresh,
                  phases=(Phase.explicit, Phase.reuse, Phase.generate),
                  suppress_health_check=list(HealthCheck), print_blob=True)  # fmt: skip
        @given(call=calls(good + bad, good))
        def one_call(call: Call) -> None:
            fuzzer.run(call)

        t0 = time.monotonic()
        one_call()
        # the end: the bystander finishes, every block comes back
        while fuzzer.cycles == 0 or len(next(iter(fuzzer.tokens.values()))) > 1:
            fuzzer.step_bystander()
        seconds = time.monotonic() - t0
        by_code = collections.Counter()
        for (_, _, code), n in fuzzer.codes.items():
            by_code[code] += n
        by_method = collections.defaultdict(collections.Counter)
        for (method, kind, code), n in sorted(fuzzer.codes.items()):
            by_method[f"{method}/{kind}"][code] += n
        print(f"\nfuzz: {examples} examples, {fuzzer.calls} calls in {seconds:.1f} s "
              f"({fuzzer.rpc_seconds:.1f} s in the calls), {fuzzer.cycles} bystander cycles, "
              f"status codes {dict(by_code)}")  # fmt: skip
        for key, counts in sorted(by_method.items()):
            print(f"  {key}: {dict(counts)}")
        print("  seconds by method:", {m: round(s, 1) for m, s in fuzzer.method_seconds.most_common()})
        assert fuzzer.calls >= examples
        if speculative:
            text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
            spec = {line.split(" ")[0].removeprefix("lorax_shard_speculative_"): float(line.split(" ")[1])
                    for line in text.splitlines() if line.startswith("lorax_shard_speculative_")
                    and line.split(" ")[0].endswith("_total")}  # fmt: skip
            print("  speculative:", spec)
            assert spec["verify_steps_total"] > 0 and spec["lookahead_steps_total"] > 0
