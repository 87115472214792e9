"""protobuf <-> domain conversions, both sides of the wire, and the servicer's status mapping.

The router side (shard_server/testing/wire.py) and the shard side (shard_server/server/convert.py) are
written separately; a round trip through both must return the original dataclass. The servicer tests
use an engine double over a real in-process gRPC server (no torch, milliseconds).
"""

from __future__ import annotations

import tempfile
import threading
from pathlib import Path

import grpc
import pytest

from model import errors
from shard_server.pb.generate.v1 import generate_pb2 as pb
from shard_server.pb.generate.v1 import generate_pb2_grpc
from shard_server.server.convert import (
    ADAPTER_SOURCES,
    MERGE_STRATEGIES,
    adapter_from_pb,
    adapter_to_pb,
    cached_batch_to_pb,
    generation_to_pb,
    info_to_pb,
    request_from_pb,
    step_to_pb,
)
from shard_server.server.grpc_server import create_server
from shard_server.testing.wire import generation_from_pb, request_to_pb, tiny_png
from shard_server.types import (
    AdapterSpec,
    AlternativeTokensOut,
    CachedBatchInfo,
    FinishReason,
    GeneratedTextOut,
    GenerationOut,
    ImageChunk,
    RequestSpec,
    SamplingParams,
    ShardInfo,
    StepResult,
    StoppingParams,
    TextChunk,
    TokensOut,
)

# Float fields travel as float32: these values are exact there.
FULL_REQUEST = RequestSpec(
    id=2**63 + 5,
    inputs="hello",
    input_ids=(1, 2, 511),
    input_chunks=(TextChunk("hello"), ImageChunk(tiny_png(), "image/png")),
    truncate=7,
    sampling=SamplingParams(
        temperature=0.5,
        top_k=10,
        top_p=0.75,
        typical_p=0.25,
        do_sample=True,
        seed=2**64 - 1,
        repetition_penalty=1.25,
        frequency_penalty=-0.5,
        presence_penalty=1.5,
        watermark=True,
        return_k_alternatives=3,
        schema='{"type": "object"}',
    ),
    stopping=StoppingParams(max_new_tokens=9, stop_sequences=("\n", "END"), ignore_eos_token=True),
    prefill_logprobs=True,
    adapter_index=3,
    blocks=(1, 4),
    slots=(16, 17, 64),
    cache_len=2,
    chunk_len=0,  # set to 0 is not unset
)


@pytest.mark.parametrize(
    "spec", [FULL_REQUEST, RequestSpec(id=0), RequestSpec(id=1, inputs="x", chunk_len=None)]
)
def test_request_round_trip(spec):
    assert request_from_pb(request_to_pb(spec)) == spec


def test_request_without_parameters_gets_defaults_not_zeros():
    spec = request_from_pb(pb.Request(id=1, inputs="hi"))
    assert spec.sampling == SamplingParams() and spec.stopping == StoppingParams()
    assert spec.sampling.schema is None and spec.chunk_len is None


def test_empty_input_chunk_is_invalid_argument():
    with pytest.raises(errors.InvalidArgument, match="input_chunks\\[0\\]"):
        request_from_pb(pb.Request(id=1, tokenized_inputs=pb.TokenizedInputs(input_chunks=[pb.InputChunk()])))


TOKENS = TokensOut(
    ids=(5, 6),
    logprobs=(-0.5, -1.25),
    texts=("a", "é"),
    is_special=(False, True),
    alternatives=(
        AlternativeTokensOut((5, 9), (-0.5, -2.0), ("a", "b")),
        AlternativeTokensOut((6,), (-1.25,), ("é",)),
    ),
)


@pytest.mark.parametrize(
    "gen",
    [
        GenerationOut(request_id=3, next_tokens=TOKENS),
        GenerationOut(
            request_id=2**64 - 1,
            next_tokens=TokensOut((7,), (-0.25,), ("x",), (False,)),
            prefill_tokens=TOKENS,
            prefill_tokens_length=2,
            generated_text=GeneratedTextOut("a x", 2, FinishReason.STOP_SEQUENCE, seed=2**64 - 1),
        ),
        GenerationOut(
            request_id=4,
            next_tokens=TokensOut((2,), (-0.125,), ("",), (True,)),
            generated_text=GeneratedTextOut("", 1, FinishReason.EOS_TOKEN, seed=None),
        ),
    ],
)
def test_generation_round_trip(gen):
    msg = generation_to_pb(gen)
    assert generation_from_pb(pb.Generation.FromString(msg.SerializeToString())) == gen
    if gen.generated_text is not None:
        assert msg.generated_text.HasField("seed") == (gen.generated_text.seed is not None)


def test_a_step_response_is_the_generations_built_one_by_one():
    """step_to_pb fills the response in place; the wire bytes are those of messages built field by field,
    empty token lists and default generated texts stay present, the batch only when there is one."""
    empty = TokensOut((), (), (), ())
    gens = (
        GenerationOut(request_id=3, next_tokens=TOKENS),
        GenerationOut(request_id=4, next_tokens=empty, prefill_tokens=empty,
                      generated_text=GeneratedTextOut("", 0, FinishReason(0), seed=None)),  # fmt: skip
        GenerationOut(request_id=5, next_tokens=TOKENS, prefill_tokens=TOKENS, prefill_tokens_length=2,
                      generated_text=GeneratedTextOut("a é", 2, FinishReason.LENGTH, seed=7)),  # fmt: skip
    )

    def built(t: TokensOut) -> pb.NextTokens:
        alts = [pb.AlternativeTokens(ids=a.ids, logprobs=a.logprobs, texts=a.texts) for a in t.alternatives]
        return pb.NextTokens(ids=t.ids, logprobs=t.logprobs, texts=t.texts, is_special=t.is_special,
                             alternative_tokens=alts)  # fmt: skip

    expected = []
    for g in gens:
        m = pb.Generation(request_id=g.request_id, next_tokens=built(g.next_tokens),
                          prefill_tokens_length=g.prefill_tokens_length)  # fmt: skip
        if g.prefill_tokens is not None:
            m.prefill_tokens.CopyFrom(built(g.prefill_tokens))
        if (gt := g.generated_text) is not None:
            text = pb.GeneratedText(text=gt.text, generated_tokens=gt.generated_tokens,
                                    finish_reason=int(gt.finish_reason), seed=gt.seed)  # fmt: skip
            m.generated_text.CopyFrom(text)
        expected.append(m)
    for batch in (None, CachedBatchInfo(7, (3, 5), 100, 3)):
        msg = step_to_pb(StepResult(gens, batch), pb.DecodeResponse)
        assert list(msg.generations) == expected
        assert msg.HasField("batch") == (batch is not None)
        back = pb.DecodeResponse.FromString(msg.SerializeToString())
        assert [generation_from_pb(g) for g in back.generations] == list(gens)
        second = back.generations[1]
        assert second.HasField("prefill_tokens") and second.HasField("generated_text")


def test_nan_prefill_logprob_survives():
    nan_tokens = TokensOut((1, 5), (float("nan"), -1.0), ("<s>", "a"), (True, False))
    back = generation_from_pb(generation_to_pb(GenerationOut(1, TOKENS, prefill_tokens=nan_tokens)))
    assert back.prefill_tokens.logprobs[0] != back.prefill_tokens.logprobs[0]  # NaN


def test_finish_reason_values_are_the_wire_enums():
    for r in FinishReason:
        assert pb.FinishReason.Value(f"FINISH_REASON_{r.name}") == r.value


@pytest.mark.parametrize("source", list(ADAPTER_SOURCES.values()))
@pytest.mark.parametrize("strategy", list(MERGE_STRATEGIES.values()))
def test_adapter_round_trip(source, strategy):
    spec = AdapterSpec(
        adapter_ids=("a", "b"),
        weights=(0.5, 0.25),
        merge_strategy=strategy,
        density=0.75,
        majority_sign_method="frequency",
        source=source,
        api_token="tok",
    )
    params, src = adapter_to_pb(spec)
    assert pb.AdapterSource.Name(src).lower() == source
    assert adapter_from_pb(params, src, "tok") == spec


def test_unknown_enum_values_are_invalid_argument():
    with pytest.raises(errors.InvalidArgument, match="adapter_source=9"):
        adapter_from_pb(pb.AdapterParameters(adapter_ids=["a"]), 9)
    with pytest.raises(errors.InvalidArgument, match="merge_strategy"):
        adapter_from_pb(pb.AdapterParameters(adapter_ids=["a"], merge_strategy=17), 0)


def test_info_and_cached_batch():
    spec = AdapterSpec(adapter_ids=("/x",), source="local")
    info = ShardInfo("bfloat16", "cuda", None, 256, True, False, preloaded_adapters=((1, spec),))
    msg = info_to_pb(info)
    assert not msg.HasField("window_size") and msg.block_size == 256 and msg.requires_block_allocator
    assert msg.preloaded_adapters[0].adapter_index == 1
    assert msg.preloaded_adapters[0].adapter_source == pb.LOCAL
    assert info_to_pb(ShardInfo("float32", "cpu", 4096, 16, False, False)).window_size == 4096
    cb = cached_batch_to_pb(CachedBatchInfo(7, (1, 2, 3), 100, 3))
    assert (cb.id, list(cb.request_ids), cb.size, cb.max_tokens, cb.current_tokens) == (
        7,
        [1, 2, 3],
        3,
        100,
        3,
    )


# ---------------------------------------------------------------- servicer over a real socket


class EngineDouble:
    """Records the thread of every call; raises what a test asks for."""

    def __init__(self):
        self.threads: set[str] = set()
        self.raise_on_decode: BaseException | None = None
        # Gates the test controls: a call sets `*_entered`, then waits for `*_release` (set by default).
        self.decode_entered, self.decode_release = threading.Event(), threading.Event()
        self.download_entered, self.download_release = threading.Event(), threading.Event()
        self.decode_release.set()
        self.download_release.set()

    def _seen(self):
        self.threads.add(threading.current_thread().name)

    def info(self):
        self._seen()
        return ShardInfo("float32", "cpu", None, 16, False, False)

    def health(self):
        self._seen()

    def decode(self, batch_ids, still_wanted=None):
        self._seen()
        self.decode_entered.set()
        assert self.decode_release.wait(60)
        if self.raise_on_decode is not None:
            raise self.raise_on_decode
        return StepResult(
            (GenerationOut(1, TokensOut((4,), (-0.5,), ("a",), (False,))),),
            CachedBatchInfo(batch_ids[0], (1,), 9, 1),
        )

    def download_adapter(self, spec):
        self.download_entered.set()
        assert self.download_release.wait(60)
        return 0.25


@pytest.fixture
def served():
    engine = EngineDouble()
    with tempfile.TemporaryDirectory(prefix="svc-", dir="/tmp") as d:
        server, address = create_server(engine, str(Path(d) / "s"), 0, 1)
        server.start()
        channel = grpc.insecure_channel(address)
        try:
            yield engine, generate_pb2_grpc.LoraxServiceStub(channel)
        finally:
            channel.close()
            server.stop(0).wait()


DECODE = pb.DecodeRequest(batches=[pb.CachedBatch(id=5, request_ids=[1])])


@pytest.mark.parametrize(
    "exc, code",
    [
        (errors.NotFound("batch 5 not found"), grpc.StatusCode.NOT_FOUND),
        (errors.ResourceExhausted("lower --max-kv-cache-bytes"), grpc.StatusCode.RESOURCE_EXHAUSTED),
        (errors.FailedPrecondition("busy"), grpc.StatusCode.FAILED_PRECONDITION),
        (errors.PermissionDenied("outside the adapter root"), grpc.StatusCode.PERMISSION_DENIED),
        (errors.Unavailable("device lost"), grpc.StatusCode.UNAVAILABLE),
        (KeyError("oops"), grpc.StatusCode.INTERNAL),
        (MemoryError(), grpc.StatusCode.RESOURCE_EXHAUSTED),
    ],
)
def test_errors_become_status_codes_and_the_server_serves_on(served, exc, code):
    engine, stub = served
    engine.raise_on_decode = exc
    with pytest.raises(grpc.RpcError) as e:
        stub.Decode(DECODE, timeout=10)
    assert e.value.code() == code
    if code == grpc.StatusCode.INTERNAL:
        assert "KeyError" in e.value.details()
    engine.raise_on_decode = None
    assert stub.Decode(DECODE, timeout=10).batch.id == 5


def test_every_status_has_the_grpc_code_of_its_name():
    from shard_server.server.service import GRPC_STATUS

    assert all(GRPC_STATUS[s].name == s.name for s in errors.Status)
    classes = errors.ShardError.__subclasses__()
    assert len({c.status for c in classes}) == len(classes)  # one class per status, no synonyms


def test_wire_shape_and_classify(served):
    _, stub = served
    with pytest.raises(grpc.RpcError) as e:
        stub.Decode(pb.DecodeRequest(), timeout=10)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.RpcError) as e:
        stub.Classify(pb.ClassifyRequest(batch=pb.Batch(id=1, requests=[pb.Request(id=1)])), timeout=10)
    assert e.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_engine_runs_on_one_thread_and_slow_calls_stall_nothing(served):
    engine, stub = served
    engine.decode_release.clear()
    slow = stub.Decode.future(DECODE, timeout=30)
    assert engine.decode_entered.wait(30)  # the model thread is in decode until released
    stub.Info(pb.InfoRequest(), timeout=30)
    stub.ServiceDiscovery(pb.ServiceDiscoveryRequest(), timeout=30)
    assert not slow.done()  # both answered while the model thread was busy
    engine.decode_release.set()
    slow.result()
    engine.download_release.clear()
    req = pb.DownloadAdapterRequest(adapter_parameters=pb.AdapterParameters(adapter_ids=["a"]))
    download = stub.DownloadAdapter.future(req, timeout=30)
    assert engine.download_entered.wait(30)
    stub.Decode(DECODE, timeout=30)
    assert not download.done()  # a download in progress does not hold the model thread
    engine.download_release.set()
    assert download.result().memory_fraction == 0.25
    stub.Health(pb.HealthRequest(), timeout=10)
    assert len(engine.threads) == 1 and next(iter(engine.threads)).startswith("shard-model")

