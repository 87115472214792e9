"""Hypothesis strategies for every RPC of generate.v1.LoraxService: valid, invalid and raw bytes.

Messages are built field by field with values biased to what matters: ids from small pools (so batches
collide, get decoded, filtered and cleared across examples), token ids around the vocabulary's edge,
floats including NaN/Inf/subnormals/huge values, lengths around the model's limits, adapter ids naming
good and crafted-bad PEFT directories as well as odd strings. Raw bytes are random or a valid message's
encoding mutated (truncated, bit-flipped, spliced).

Protected: the fuzzer never names the bystander batch (its id is outside every pool) and never sends
ClearCache without an id, so a bystander's survival is a property of the shard, not of luck.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from hypothesis import strategies as st

from shard_server.pb.generate.v1 import generate_pb2 as pb

BATCH_IDS = st.one_of(st.integers(1, 4), st.integers(1, 4), st.sampled_from([0, 2**63, 2**64 - 1]))
REQUEST_IDS = st.one_of(st.integers(1, 12), st.sampled_from([0, 2**64 - 1]))
U32_EDGES = st.sampled_from([0, 1, 2, 15, 16, 17, 47, 48, 511, 512, 2047, 2048, 2049, 2**31, 2**32 - 1])
U32 = st.one_of(U32_EDGES, st.integers(0, 2**32 - 1))
F32_EDGES = st.sampled_from(
    [0.0, -0.0, 1.0, 0.5, 0.9, 1.2, 2.0, -1.0, 1e-45, 1e-38, 1e-5, 1e4, 1e30, 3.4e38, -3.4e38,
     float("nan"), float("inf"), float("-inf")]
)  # fmt: skip
F32 = st.one_of(F32_EDGES, st.floats(width=32))
TEXT = st.one_of(
    st.text(max_size=40), st.sampled_from(["", "hello world", "_test " * 8, "\x00", "é" * 30, "\ufffd"])
)
ENUM = st.sampled_from([-1, 4, 99, 2**31 - 1, -(2**31)])  # enum fields are int32 on the wire
VOCAB = 512


@dataclass(frozen=True)
class Call:
    method: str
    message: Any = None  # a protobuf message, or None for raw
    raw: bytes | None = None
    steps: tuple[Call, ...] = ()  # method "Sequence": these calls in order

    def __repr__(self) -> str:  # what hypothesis prints for a failing example
        if self.steps:
            return "Sequence(" + ", ".join(repr(s) for s in self.steps) + ")"
        body = repr(self.raw[:200]) if self.raw is not None else str(self.message)[:2000]
        return f"Call({self.method}, {body})"


def token_ids(max_len: int = 48):
    small = st.lists(st.integers(0, VOCAB + 8), max_size=max_len)
    edge = st.lists(st.one_of(st.integers(0, VOCAB - 1), U32), max_size=8)
    return st.one_of(small, small, small, edge)


@st.composite
def parameters(draw, sane: bool | None = None) -> pb.NextTokenChooserParameters:
    sane = draw(st.booleans()) if sane is None else sane
    p = pb.NextTokenChooserParameters(
        temperature=draw(st.sampled_from([0.0, 0.7, 1.0]) if sane else F32),
        top_k=draw(st.sampled_from([0, 5, 10]) if sane else U32),
        top_p=draw(st.sampled_from([1.0, 0.9]) if sane else F32),
        typical_p=draw(st.sampled_from([1.0, 0.9]) if sane else F32),
        do_sample=draw(st.booleans()),
        seed=draw(st.integers(0, 2**64 - 1)),
        repetition_penalty=draw(st.sampled_from([1.0, 1.2]) if sane else F32),
        frequency_penalty=draw(st.sampled_from([0.0, 0.5]) if sane else F32),
        presence_penalty=draw(st.sampled_from([0.0, 0.5]) if sane else F32),
        watermark=draw(st.booleans()),
        adapter_id=draw(TEXT),
        return_k_alternatives=draw(st.sampled_from([0, 0, 2]) if sane else U32),
    )
    if not sane and draw(st.integers(0, 20)) == 0:
        # Schemas are supported: a valid one is served, a bad one is INVALID_ARGUMENT.
        p.schema = draw(st.sampled_from(['{"type": "object"}', "not json", "", '{"type": "nonsense"}',
                                         '{"type": "string", "pattern": "(a*)*b"}',
                                         '{"items": ' * 2_000 + "{}" + "}" * 2_000]))  # fmt: skip
    return p


@st.composite
def sane_requests(draw, rid: int) -> pb.Request:
    """A request the shard should serve: the traffic that moves batches through their lifecycle."""
    r = pb.Request(id=rid, adapter_index=draw(st.sampled_from([0, 0, 1, 2])))
    r.tokenized_inputs.ids.extend(draw(st.lists(st.integers(3, VOCAB - 1), min_size=1, max_size=40)))
    r.stopping_parameters.max_new_tokens = draw(st.integers(1, 16))
    r.stopping_parameters.ignore_eos_token = draw(st.booleans())
    if draw(st.booleans()):
        r.parameters.CopyFrom(draw(parameters(sane=True)))
    r.prefill_logprobs = draw(st.integers(0, 4)) == 0
    return r


@st.composite
def requests(draw) -> pb.Request:
    r = pb.Request(id=draw(REQUEST_IDS))
    kind = draw(st.integers(0, 9))
    if kind <= 5:
        r.tokenized_inputs.ids.extend(draw(token_ids()))
    elif kind == 6:
        r.inputs = draw(TEXT)
    elif kind == 7:
        for c in draw(st.lists(st.integers(0, 2), max_size=3)):
            chunk = r.tokenized_inputs.input_chunks.add()
            if c == 0:
                chunk.text = draw(TEXT)
            elif c == 1:
                chunk.image.data = draw(st.binary(max_size=32))
                chunk.image.mimetype = draw(st.sampled_from(["image/png", "", "x" * 300]))
            # c == 2: an empty chunk (neither text nor image)
    elif kind == 8:
        r.tokenized_inputs.ids.extend([3 + i % 500 for i in range(draw(st.sampled_from([2000, 2040, 2100])))])
    r.truncate = draw(st.sampled_from([0, 0, 0, 4, 100]) | U32)
    if draw(st.integers(0, 5)):
        r.parameters.CopyFrom(draw(parameters()))
    if draw(st.integers(0, 5)):
        r.stopping_parameters.max_new_tokens = draw(st.one_of(st.integers(0, 24), st.integers(0, 24), U32))
        r.stopping_parameters.stop_sequences.extend(draw(st.lists(TEXT, max_size=2)))
        r.stopping_parameters.ignore_eos_token = draw(st.booleans())
    r.prefill_logprobs = draw(st.booleans())
    r.adapter_index = draw(st.one_of(st.integers(0, 4), st.integers(0, 4), U32))
    if draw(st.integers(0, 12)) == 0:  # router-allocation fields: refused in shard-allocation mode
        r.blocks.extend(draw(st.lists(U32, max_size=4)))
        r.slots.extend(draw(st.lists(U32, max_size=4)))
        r.cache_len = draw(U32)
    if draw(st.integers(0, 8)) == 0:
        r.chunk_len = draw(st.one_of(st.integers(0, 32), U32))
    return r


@st.composite
def sane_batch(draw, bid: int, rids: tuple[int, int] = (1, 12), max_requests: int = 4) -> pb.Batch:
    ids = draw(st.lists(st.integers(*rids), min_size=1, max_size=max_requests, unique=True))
    reqs = [draw(sane_requests(rid)) for rid in ids]
    return pb.Batch(id=bid, requests=reqs, size=len(reqs))


@st.composite
def lifecycle(draw) -> Call:
    """A batch's life in one example: Prefill, Decodes (alone or with another pool batch), maybe a
    FilterBatch and a Prefill that joins new requests to it, then ClearCache. Steps may still fail
    (another example left a batch under that id, an adapter was offloaded): that is fine too."""
    bid = draw(st.integers(1, 4))
    batch = draw(sane_batch(bid, (1, 6)))
    cached = pb.CachedBatch(id=bid, request_ids=[r.id for r in batch.requests])
    # ClearCache first: frees the id if an earlier example left a batch under it
    steps = [Call("ClearCache", pb.ClearCacheRequest(id=bid))]
    steps.append(Call("Prefill", pb.PrefillRequest(batch=batch)))
    for _ in range(draw(st.integers(1, 4))):
        others = draw(st.lists(st.builds(lambda i: pb.CachedBatch(id=i), st.integers(1, 4)), max_size=1))
        steps.append(Call("Decode", pb.DecodeRequest(batches=[cached, *others])))
    if draw(st.booleans()):
        keep = draw(st.lists(st.sampled_from(list(cached.request_ids)), max_size=3))
        steps.append(Call("FilterBatch", pb.FilterBatchRequest(batch_id=bid, request_ids=keep)))
    if draw(st.booleans()):
        joined = draw(sane_batch(draw(st.integers(1, 4)), (7, 12)))
        steps.append(Call("Prefill", pb.PrefillRequest(batch=joined, cached_batch=cached)))
        steps.append(Call("Decode", pb.DecodeRequest(batches=[cached])))
    steps.append(Call("ClearCache", pb.ClearCacheRequest(id=bid)))
    return Call("Sequence", steps=tuple(steps))


@st.composite
def batches(draw, max_requests: int = 4) -> pb.Batch:
    if draw(st.booleans()):
        return draw(sane_batch(draw(st.integers(1, 4)), max_requests=max_requests))
    reqs = draw(st.lists(requests(), max_size=max_requests))
    return pb.Batch(id=draw(BATCH_IDS), requests=reqs, size=draw(st.sampled_from([len(reqs)]) | U32),
                    max_tokens=draw(U32), max_blocks=draw(U32))  # fmt: skip


@st.composite
def cached_batches(draw) -> pb.CachedBatch:
    return pb.CachedBatch(
        id=draw(st.one_of(st.integers(1, 4), BATCH_IDS)),
        request_ids=draw(st.lists(REQUEST_IDS, max_size=5)),
        size=draw(U32),
        max_tokens=draw(U32),
        current_tokens=draw(U32),
    )


@st.composite
def adapter_parameters(draw, adapter_ids: list[str], good_ids: list[str]) -> pb.AdapterParameters:
    if draw(st.booleans()):  # one good adapter, or a LINEAR merge of good ones
        ids = draw(st.lists(st.sampled_from(good_ids), min_size=1, max_size=2))
        weights = draw(st.sampled_from([[], [1.0] * len(ids), [0.5] * len(ids)]))
        return pb.AdapterParameters(adapter_ids=ids, weights=weights)
    ids = st.one_of(
        st.sampled_from(adapter_ids),
        st.sampled_from(adapter_ids),
        TEXT,
        st.sampled_from(["org/name", "org/name@main", "s3://b/x", "../../etc", "/etc", "a\x00b", "x" * 5000]),
    )
    return pb.AdapterParameters(
        adapter_ids=draw(st.lists(ids, min_size=0, max_size=3)),
        weights=draw(st.lists(F32, max_size=3)),
        merge_strategy=draw(st.one_of(st.integers(0, 3), st.integers(0, 3), ENUM)),
        density=draw(F32),
        majority_sign_method=draw(st.one_of(st.integers(0, 1), ENUM)),
    )


# S3 (1) is left out: a shard with an S3 implementation would reach for the network.
SOURCES = st.sampled_from([pb.HUB, pb.LOCAL, pb.LOCAL, pb.LOCAL, pb.PBASE, 4, -1, 2**31 - 1])
INDICES = st.one_of(st.integers(0, 6), st.integers(0, 6), U32)


def messages(adapter_ids: list[str], good_ids: list[str]):
    """(method, message) for every RPC; batch traffic (Prefill, Decode, ClearCache) weighs most."""
    ap = adapter_parameters(adapter_ids, good_ids)
    token = st.one_of(st.none(), TEXT)

    def opt_token(msg, t):
        if t is not None:
            msg.api_token = t
        return msg

    named = st.one_of(st.lists(cached_batches(), min_size=1, max_size=1),
                      st.lists(cached_batches(), max_size=3))  # fmt: skip
    decode = st.builds(lambda bs: Call("Decode", pb.DecodeRequest(batches=bs)), named)
    prefill = st.builds(lambda b: Call("Prefill", pb.PrefillRequest(batch=b)), batches())
    clear = BATCH_IDS.map(lambda i: Call("ClearCache", pb.ClearCacheRequest(id=i)))
    return st.one_of(
        prefill,
        decode,
        prefill,
        decode,
        clear,
        decode,
        st.just(Call("Info", pb.InfoRequest())),
        st.just(Call("Health", pb.HealthRequest())),
        st.just(Call("ServiceDiscovery", pb.ServiceDiscoveryRequest())),
        BATCH_IDS.map(lambda i: Call("ClearCache", pb.ClearCacheRequest(id=i))),
        st.builds(lambda b, ids: Call("FilterBatch", pb.FilterBatchRequest(batch_id=b, request_ids=ids)),
                  BATCH_IDS, st.lists(REQUEST_IDS, max_size=5)),
        st.builds(lambda b, a, c, d: Call("Warmup", pb.WarmupRequest(
            batch=b, max_input_length=a, max_prefill_tokens=c, max_new_tokens=d)), batches(), U32, U32, U32),
        st.builds(lambda b: Call("Prefill", pb.PrefillRequest(batch=b)), batches()),
        st.builds(lambda b, c: Call("Prefill", pb.PrefillRequest(batch=b, cached_batch=c)),
                  batches(), cached_batches()),
        st.builds(lambda b: Call("Embed", pb.EmbedRequest(batch=b)), batches()),
        st.builds(lambda b: Call("Classify", pb.ClassifyRequest(batch=b)), batches()),
        st.builds(lambda p, s, t: Call("DownloadAdapter", opt_token(pb.DownloadAdapterRequest(
            adapter_parameters=p, adapter_source=s), t)), ap, SOURCES, token),
        st.builds(lambda p, s, i, t: Call("LoadAdapter", opt_token(pb.LoadAdapterRequest(
            adapter_parameters=p, adapter_source=s, adapter_index=i), t)), ap, SOURCES, INDICES, token),
        st.builds(lambda p, s, i: Call("OffloadAdapter", pb.OffloadAdapterRequest(
            adapter_parameters=p, adapter_source=s, adapter_index=i)), ap, SOURCES, INDICES),
    )  # fmt: skip


RAW_METHODS = ["Info", "Health", "ServiceDiscovery", "FilterBatch", "Warmup", "Prefill", "Decode", "Embed",
               "Classify", "DownloadAdapter", "LoadAdapter", "OffloadAdapter"]  # fmt: skip


@st.composite
def mutated(draw, adapter_ids: list[str], good_ids: list[str]) -> Call:
    call = draw(messages(adapter_ids, good_ids).filter(lambda c: c.method in RAW_METHODS))
    data = bytearray(call.message.SerializeToString())
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.integers(0, 3))
        if op == 0 and data:
            data = data[: draw(st.integers(0, len(data) - 1))]
        elif op == 1 and data:
            i = draw(st.integers(0, len(data) - 1))
            data[i] ^= 1 << draw(st.integers(0, 7))
        elif op == 2:
            i = draw(st.integers(0, len(data)))
            data[i:i] = draw(st.binary(min_size=1, max_size=16))
        else:
            data += draw(st.binary(max_size=16))
    return Call(call.method, raw=bytes(data))


def calls(adapter_ids: list[str], good_ids: list[str]):
    """Any call: `adapter_ids` (good and crafted-bad directories) for the wild cases, `good_ids` for the
    loads that should succeed."""
    raw = st.builds(lambda m, b: Call(m, raw=b), st.sampled_from(RAW_METHODS), st.binary(max_size=128))
    valid = messages(adapter_ids, good_ids)
    return st.one_of(lifecycle(), valid, valid, valid, mutated(adapter_ids, good_ids), raw)
