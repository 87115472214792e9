"""The adversarial-client findings over the wire: each answered with the right status, bounded in time and
message size, and no other tenant (a cached bystander batch, base-model rows) affected.

Most cases run against the session's shared shard process; the ones that need to hold the model thread
(deadlines, cancellation, file work off the model thread) use a server built in this process around a
real engine, as test_kv_blocks.py does."""

from __future__ import annotations

import json
import math
import shutil
import struct
import tempfile
import threading
import time
from pathlib import Path

import grpc
import pytest
from safetensors.torch import load_file, save_file
from shard_harness import Bystander, batch, request

from shard_server.config import ShardConfig
from shard_server.pb.generate.v1 import generate_pb2 as pb
from shard_server.pb.generate.v1 import generate_pb2_grpc
from shard_server.server.convert import adapter_to_pb
from shard_server.server.grpc_server import build_server
from shard_server.server.service import EngineWorkers
from shard_server.types import AdapterSpec

INVALID = grpc.StatusCode.INVALID_ARGUMENT


def expect(code, call, *args, timeout=60, **kwargs) -> str:
    with pytest.raises(grpc.RpcError) as e:
        call(*args, timeout=timeout, **kwargs)
    assert e.value.code() == code, (e.value.code(), e.value.details())
    return e.value.details()


def load_request(index: int, *ids: str, weights=()) -> pb.LoadAdapterRequest:
    params, src = adapter_to_pb(AdapterSpec(adapter_ids=ids, weights=tuple(weights), source="local"))
    return pb.LoadAdapterRequest(adapter_parameters=params, adapter_source=src, adapter_index=index)


def broken_copy(good: Path, out: Path) -> Path:
    shutil.copytree(good, out)
    return out


@pytest.fixture(scope="module")
def bystander(shared_shard):
    prompts = {95_001: (1, 17, 99, 250, 3, 42), 95_002: (1, 400, 401, 402)}
    by = Bystander(shared_shard.stub(), 95_000, prompts, max_new_tokens=60)
    yield by
    by.clear()


# ---------------------------------------------------------------- 1, 2, 6, 12: adapter files


def test_non_finite_adapters_are_refused_and_rows_stay_finite(shared_shard, bystander, tmp_path):
    stub = shared_shard.stub()
    bad = broken_copy(shared_shard.adapters[1], tmp_path / "nan")
    tensors = load_file(str(bad / "adapter_model.safetensors"))
    key = next(k for k in tensors if "lora_B" in k)
    tensors[key][0, 0] = float("nan")
    save_file(tensors, str(bad / "adapter_model.safetensors"))
    assert "non-finite" in expect(INVALID, stub.LoadAdapter, load_request(9, str(bad)))
    good = str(shared_shard.adapters[1])
    expect(INVALID, stub.LoadAdapter, load_request(9, good, good, weights=(float("nan"), 1.0)))
    expect(INVALID, stub.LoadAdapter, load_request(9, good, good, weights=(float("inf"), 1.0)))
    # rows of the base model and of another adapter, decoded together, stay finite
    resp = stub.Prefill(
        pb.PrefillRequest(batch=batch(950, request(1, (1, 5, 6)), request(2, (1, 7, 8), adapter_index=1))),
        timeout=60,
    )
    resp = stub.Decode(pb.DecodeRequest(batches=[resp.batch]), timeout=60)
    assert all(math.isfinite(lp) for g in resp.generations for lp in g.next_tokens.logprobs)
    stub.ClearCache(pb.ClearCacheRequest(id=950), timeout=30)
    bystander.step()


def test_catastrophic_pattern_neither_hangs_nor_stalls_the_shard(shared_shard, bystander, tmp_path):
    stub = shared_shard.stub()
    bad = broken_copy(shared_shard.adapters[1], tmp_path / "redos")
    cfg = json.loads((bad / "adapter_config.json").read_text())
    cfg["rank_pattern"] = {"(.*.*)*Z" + "a" * 40: 8}
    (bad / "adapter_config.json").write_text(json.dumps(cfg))
    t0 = time.monotonic()
    assert "rank_pattern" in expect(INVALID, stub.LoadAdapter, load_request(9, str(bad)), timeout=20)
    assert time.monotonic() - t0 < 5
    stub.Health(pb.HealthRequest(), timeout=5)
    bystander.step()


def test_wrong_typed_configs_and_odd_ids_are_invalid_argument(shared_shard, bystander, tmp_path):
    stub = shared_shard.stub()
    for i, text in enumerate(["[1, 2]", "null", '"x"', "[" * 100_000 + "]" * 100_000]):
        bad = broken_copy(shared_shard.adapters[1], tmp_path / f"cfg{i}")
        (bad / "adapter_config.json").write_text(text)
        expect(INVALID, stub.LoadAdapter, load_request(9, str(bad)))
    bad = broken_copy(shared_shard.adapters[1], tmp_path / "targets")
    cfg = json.loads((bad / "adapter_config.json").read_text())
    cfg.update(target_modules=[1, 2], lora_alpha="8")
    (bad / "adapter_config.json").write_text(json.dumps(cfg))
    expect(INVALID, stub.LoadAdapter, load_request(9, str(bad)))
    expect(INVALID, stub.LoadAdapter, load_request(9, "a\x00b"))
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    expect(INVALID, stub.LoadAdapter, load_request(9, str(tmp_path / "loop")))
    expect(INVALID, stub.LoadAdapter, load_request(9, "/tmp/" + "x" * 300))
    bystander.step()


def test_oversized_safetensors_header_is_refused_quickly(shared_shard, bystander, tmp_path):
    bad = broken_copy(shared_shard.adapters[1], tmp_path / "header")
    header = {f"base_model.model.model.layers.0.self_attn.q_proj.x{i}.lora_A.weight":
              {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]} for i in range(200_000)}  # fmt: skip
    raw = json.dumps(header).encode()
    (bad / "adapter_model.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw)
    t0 = time.monotonic()
    assert "header" in expect(INVALID, shared_shard.stub().LoadAdapter, load_request(9, str(bad)))
    assert time.monotonic() - t0 < 3
    bystander.step()


# ---------------------------------------------------------------- 3: Embed


def test_embed_is_validated_like_prefill_and_applies_the_adapter(shared_shard, bystander):
    stub = shared_shard.stub()
    prompt = (1, 5, 9, 33, 70)
    unloaded = pb.EmbedRequest(batch=batch(960, request(1, prompt, adapter_index=7)))
    expect(grpc.StatusCode.NOT_FOUND, stub.Embed, unloaded)
    both = batch(961, request(1, prompt), request(2, prompt, adapter_index=2))
    resp = stub.Embed(pb.EmbedRequest(batch=both), timeout=60)
    base, adapted = (list(e.values) for e in resp.embeddings)
    assert base != adapted
    long = tuple(3 + i % 500 for i in range(3000))
    assert "positions" in expect(INVALID, stub.Embed, pb.EmbedRequest(batch=batch(962, request(1, long))))
    many = [request(i, tuple(3 + (i + k) % 500 for k in range(2000))) for i in range(50)]  # 100k tokens
    t0 = time.monotonic()
    expect(grpc.StatusCode.RESOURCE_EXHAUSTED, stub.Embed, pb.EmbedRequest(batch=batch(963, *many)))
    assert time.monotonic() - t0 < 10  # refused before any forward
    bystander.step()


# ---------------------------------------------------------------- 7: bounded status messages


def test_echoed_values_are_truncated_in_status_messages(shared_shard, bystander):
    stub = shared_shard.stub()
    details = expect(INVALID, stub.LoadAdapter, load_request(9, "x" * 50_000))
    assert len(details.encode()) < 2048
    png = pb.InputChunk(image=pb.Image(data=b"\x89PNG", mimetype="é" * 50_000))
    odd = pb.Request(id=1, tokenized_inputs=pb.TokenizedInputs(input_chunks=[png]),
                     stopping_parameters=pb.StoppingCriteriaParameters(max_new_tokens=2))  # fmt: skip
    details = expect(INVALID, stub.Prefill, pb.PrefillRequest(batch=batch(970, odd)))
    assert len(details.encode()) < 2048
    bystander.step()


# ---------------------------------------------------------------- 9, 10, 11


def test_request_ids_must_be_unique_across_concatenated_batches(shared_shard, bystander):
    stub = shared_shard.stub()
    a = stub.Prefill(pb.PrefillRequest(batch=batch(980, request(1, (1, 5, 6)), request(2, (1, 9)))),
                     timeout=60)  # fmt: skip
    b = stub.Prefill(pb.PrefillRequest(batch=batch(981, request(2, (1, 7, 8)))), timeout=60)
    assert "request id 2" in expect(INVALID, stub.Decode, pb.DecodeRequest(batches=[a.batch, b.batch]))
    joined = pb.PrefillRequest(batch=batch(982, request(1, (1, 3))), cached_batch=a.batch)
    expect(INVALID, stub.Prefill, joined)
    assert len(stub.Decode(pb.DecodeRequest(batches=[a.batch]), timeout=60).generations) == 2
    assert len(stub.Decode(pb.DecodeRequest(batches=[b.batch]), timeout=60).generations) == 1
    for bid in (980, 981):
        stub.ClearCache(pb.ClearCacheRequest(id=bid), timeout=30)
    bystander.step()


@pytest.mark.parametrize("field", ["temperature", "repetition_penalty"])
def test_parameters_that_make_the_distribution_non_finite_are_refused(shared_shard, bystander, field):
    bad = request(1, (1, 5, 6), do_sample=True, **{field: 1e-45})
    assert field in expect(INVALID, shared_shard.stub().Prefill, pb.PrefillRequest(batch=batch(990, bad)))
    bystander.step()


def test_offload_checks_the_adapter_id(shared_shard, bystander):
    stub = shared_shard.stub()
    params, src = adapter_to_pb(AdapterSpec(adapter_ids=(str(shared_shard.adapters[2]),), source="local"))
    wrong = pb.OffloadAdapterRequest(adapter_parameters=params, adapter_source=src, adapter_index=1)
    expect(grpc.StatusCode.FAILED_PRECONDITION, stub.OffloadAdapter, wrong)
    resp = stub.Prefill(pb.PrefillRequest(batch=batch(991, request(1, (1, 5), adapter_index=1))), timeout=60)
    assert resp.generations  # index 1 still serves its adapter
    stub.ClearCache(pb.ClearCacheRequest(id=991), timeout=30)
    bystander.step()


# ---------------------------------------------------------------- 8 and LoadAdapter's file work: in process


@pytest.fixture(scope="module")
def in_process(tiny_model_dir, adapter_dirs):
    from shard_server.engine.engine import ShardEngine

    workers = EngineWorkers()
    engine = workers.model(ShardEngine, ShardConfig(model_dir=tiny_model_dir, max_kv_cache_bytes=1 << 20))
    with tempfile.TemporaryDirectory(prefix="hard-", dir="/tmp") as d:
        built = build_server(engine, str(Path(d) / "s"), 0, 1, workers=workers)
        built.server.start()
        channel = grpc.insecure_channel(built.address)
        try:
            yield engine, workers, generate_pb2_grpc.LoraxServiceStub(channel)
        finally:
            channel.close()
            built.server.stop(0).wait()
            workers.close()


def _hold_model_thread(workers):
    gate = threading.Event()
    holder = threading.Thread(target=workers.model, args=(gate.wait,))
    holder.start()
    time.sleep(0.1)
    return gate, holder


def test_prefill_past_its_deadline_creates_no_batch(in_process):
    engine, workers, stub = in_process
    free = workers.model(engine.free_blocks)
    gate, holder = _hold_model_thread(workers)
    try:
        prefill = pb.PrefillRequest(batch=batch(400, request(1, (1, 5, 6, 7))))
        expect(grpc.StatusCode.DEADLINE_EXCEEDED, stub.Prefill, prefill, timeout=0.3)
    finally:
        gate.set()
        holder.join()
    assert workers.model(lambda: 400 not in engine.batches)
    assert workers.model(engine.free_blocks) == free
    assert stub.Prefill(prefill, timeout=60).generations  # the router's retry with the same id works
    stub.ClearCache(pb.ClearCacheRequest(id=400), timeout=30)


def test_cancelled_decode_does_not_advance_the_batch(in_process):
    engine, workers, stub = in_process
    prefill = pb.PrefillRequest(batch=batch(401, request(1, (1, 5, 6, 7), max_new_tokens=20)))
    resp = stub.Prefill(prefill, timeout=60)

    def lengths():
        return [r.length for r in engine.batches[401].requests]

    before = workers.model(lengths)
    gate, holder = _hold_model_thread(workers)
    try:
        future = stub.Decode.future(pb.DecodeRequest(batches=[resp.batch]), timeout=60)
        time.sleep(0.2)
        assert future.cancel()
        time.sleep(0.2)
    finally:
        gate.set()
        holder.join()
    assert workers.model(lengths) == before
    stub.ClearCache(pb.ClearCacheRequest(id=401), timeout=30)


def test_load_adapter_reads_files_off_the_model_thread(in_process, adapter_dirs):
    engine, workers, stub = in_process
    reading, release, seen = threading.Event(), threading.Event(), []
    original = engine.adapters._host_weights

    def slow_read(spec):  # the store's real file reading, held until the test has checked the shard
        seen.append(threading.current_thread().name)
        reading.set()
        release.wait(30)
        return original(spec)

    engine.adapters._host_weights = slow_read
    try:
        load = stub.LoadAdapter.future(load_request(4, str(adapter_dirs[2])), timeout=60)
        assert reading.wait(10)
        stub.Health(pb.HealthRequest(), timeout=5)  # the model thread is free while files are read
        resp = stub.Prefill(pb.PrefillRequest(batch=batch(402, request(1, (1, 5, 6)))), timeout=5)
        assert resp.generations
        release.set()
        assert load.result().loaded
    finally:
        release.set()
        engine.adapters._host_weights = original
    assert seen and all(name.startswith("shard-adapter-io") for name in seen)
    stub.ClearCache(pb.ClearCacheRequest(), timeout=30)
