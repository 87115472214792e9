"""The router's side of the wire: domain requests -> protobuf, protobuf generations -> domain.

Written independently of shard_server/server/convert.py (the shard's side), so that the round-trip tests
(tests/unit/test_service_mapping.py) compare two implementations of PROTOCOL.md, not one with itself.
"""

from __future__ import annotations

import struct
import zlib

from shard_server.pb.generate.v1 import generate_pb2 as pb
from shard_server.types import (
    AlternativeTokensOut,
    FinishReason,
    GeneratedTextOut,
    GenerationOut,
    ImageChunk,
    RequestSpec,
    SamplingParams,
    StoppingParams,
    TextChunk,
    TokensOut,
)


def request_to_pb(r: RequestSpec) -> pb.Request:
    s, st = r.sampling, r.stopping
    chunks = [
        pb.InputChunk(text=c.text)
        if isinstance(c, TextChunk)
        else pb.InputChunk(image=pb.Image(data=c.data, mimetype=c.mimetype))
        for c in r.input_chunks
    ]
    return pb.Request(
        id=r.id,
        inputs=r.inputs,
        tokenized_inputs=pb.TokenizedInputs(ids=r.input_ids, input_chunks=chunks),
        truncate=r.truncate,
        parameters=pb.NextTokenChooserParameters(
            temperature=s.temperature,
            top_k=s.top_k,
            top_p=s.top_p,
            typical_p=s.typical_p,
            do_sample=s.do_sample,
            seed=s.seed,
            repetition_penalty=s.repetition_penalty,
            frequency_penalty=s.frequency_penalty,
            presence_penalty=s.presence_penalty,
            watermark=s.watermark,
            schema=s.schema,
            return_k_alternatives=s.return_k_alternatives,
        ),
        stopping_parameters=pb.StoppingCriteriaParameters(
            max_new_tokens=st.max_new_tokens,
            stop_sequences=st.stop_sequences,
            ignore_eos_token=st.ignore_eos_token,
        ),
        prefill_logprobs=r.prefill_logprobs,
        adapter_index=r.adapter_index,
        blocks=r.blocks,
        slots=r.slots,
        cache_len=r.cache_len,
        chunk_len=r.chunk_len,
    )


def tokens_from_pb(t: pb.NextTokens) -> TokensOut:
    return TokensOut(
        ids=tuple(t.ids),
        logprobs=tuple(t.logprobs),
        texts=tuple(t.texts),
        is_special=tuple(t.is_special),
        alternatives=tuple(
            AlternativeTokensOut(tuple(a.ids), tuple(a.logprobs), tuple(a.texts))
            for a in t.alternative_tokens
        ),
    )


def generated_text_from_pb(x: pb.GeneratedText) -> GeneratedTextOut:
    return GeneratedTextOut(
        text=x.text,
        generated_tokens=x.generated_tokens,
        finish_reason=FinishReason(x.finish_reason),
        seed=x.seed if x.HasField("seed") else None,
        skipped_tokens=x.skipped_tokens,
    )


def generation_from_pb(g: pb.Generation) -> GenerationOut:
    return GenerationOut(
        request_id=g.request_id,
        next_tokens=tokens_from_pb(g.next_tokens),
        prefill_tokens=tokens_from_pb(g.prefill_tokens) if g.HasField("prefill_tokens") else None,
        prefill_tokens_length=g.prefill_tokens_length,
        generated_text=generated_text_from_pb(g.generated_text) if g.HasField("generated_text") else None,
    )


def tiny_png() -> bytes:
    """A valid 1x1 RGB PNG, built here so no binary blob lives in the source."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", 1, 1, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\x00\xff\x00\x00"))
        + chunk(b"IEND", b"")
    )


def warmup_request(max_input_length: int, max_prefill_tokens: int, max_total_tokens: int) -> pb.WarmupRequest:
    """The router's worst-case batch: max_input_length-token requests up to max_prefill_tokens."""

    sampling = SamplingParams(
        temperature=0.9,
        top_k=10,
        top_p=0.9,
        typical_p=0.9,
        do_sample=False,
        seed=0,
        repetition_penalty=1.2,
        frequency_penalty=0.5,
        presence_penalty=0.5,
        watermark=True,
    )
    text = "_test " * max_input_length
    requests, n_tokens = [], 0
    while n_tokens < max_prefill_tokens:
        truncate = min(max_input_length, max_prefill_tokens - n_tokens)
        chunks: list[TextChunk | ImageChunk] = [TextChunk(text)]
        if not requests:  # multimodal routers put an image in the first request; text models ignore it
            chunks.append(ImageChunk(tiny_png(), "image/png"))
        spec = RequestSpec(
            id=0,
            inputs=text,
            input_chunks=tuple(chunks),
            truncate=truncate,
            sampling=sampling,
            stopping=StoppingParams(max_new_tokens=max_total_tokens - truncate, ignore_eos_token=True),
            prefill_logprobs=True,
        )
        requests.append(request_to_pb(spec))
        n_tokens += max_input_length
    batch = pb.Batch(id=0, requests=requests, size=len(requests), max_tokens=0, max_blocks=0)
    return pb.WarmupRequest(
        batch=batch,
        max_input_length=max_input_length,
        max_prefill_tokens=max_prefill_tokens,
        max_new_tokens=max_total_tokens - max_input_length,
    )
