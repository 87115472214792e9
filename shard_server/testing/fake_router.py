"""A fake router: drives one or more shard processes over gRPC the way the LoRAX router does.

It discovers every shard from one URL (ServiceDiscovery), sends each RPC to all shards at once (tensor
parallel ranks must enter their collectives together), concatenates the shards' `generations` and takes
`batch` from the first. `warmup()` sends the router's worst-case batch (PROTOCOL.md, Warmup) and keeps
the returned token budget; `generate()` is the continuous-batching loop: a waiting queue, Prefill of
new requests within the budget (concatenated into the running batch through `cached_batch`, or through
a multi-batch Decode), Decode, FilterBatch after requests finish or are cancelled, ClearCache at the end.
Protocol breaches it can see (a missing or duplicate Generation, a CachedBatch listing the wrong
requests) raise ProtocolViolation, so tests catch them where they happen.
"""

from __future__ import annotations

import itertools
import math
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any

import grpc

from shard_server.pb.generate.v1 import generate_pb2 as pb
from shard_server.pb.generate.v1 import generate_pb2_grpc
from shard_server.server.convert import adapter_to_pb
from shard_server.testing.wire import (
    generated_text_from_pb,
    generation_from_pb,
    request_to_pb,
    tokens_from_pb,
    warmup_request,
)
from shard_server.types import AdapterSpec, FinishReason, GenerationOut, RequestSpec, TokensOut

CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", 512 << 20),
    ("grpc.max_send_message_length", 512 << 20),
]


class ProtocolViolation(AssertionError):
    """The shard answered something a router cannot accept."""


@dataclass(frozen=True)
class RouterLimits:
    """The router's launch settings that shape its batches (names as in the router's CLI)."""

    max_input_length: int = 64
    max_total_tokens: int = 128
    max_prefill_tokens: int = 256
    max_batch_total_tokens: int = 4096  # used only when Warmup returns no max_supported_total_tokens
    max_batch_size: int | None = None
    concat_via: str = "prefill"  # prefill: PrefillRequest.cached_batch | decode: DecodeRequest with 2 batches
    # With a shard that says chunked_prefill: the request that overflows the prefill budget is admitted
    # with `chunk_len` = what is left of it (exact prompt lengths only); the shard computes the rest later.
    chunking: bool = True


@dataclass(frozen=True)
class TokenEvent:
    id: int
    logprob: float
    text: str
    is_special: bool


@dataclass
class RequestResult:
    token_ids: list[int] = field(default_factory=list)
    token_texts: list[str] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    text: str = ""
    finish_reason: FinishReason | None = None
    generated_tokens: int = 0
    skipped_tokens: int = 0  # of generated_tokens, accepted speculative drafts
    seed: int | None = None
    prefill_tokens: TokensOut | None = None
    prefill_tokens_length: int = 0
    cancelled: bool = False


@dataclass
class RouterStats:
    """What the loop did (tests assert that continuous batching really happened)."""

    prefills: int = 0
    prefills_into_running: int = 0  # Prefill with cached_batch, or a 2-batch Decode after it
    decodes: int = 0
    filters: int = 0
    chunked_requests: int = 0
    # wall seconds spent waiting on each RPC method (all shards at once), for benchmarks' breakdowns
    rpc_seconds: dict[str, float] = field(default_factory=dict)


# on_token(index of the request in generate()'s list, event) -> False cancels that request.
TokenCallback = Callable[[int, TokenEvent], Any]


# ---------------------------------------------------------------- the router


@dataclass
class _Live:
    index: int  # position in generate()'s list
    spec: RequestSpec
    input_tokens: int  # exact, or an upper bound for text without a tokenizer
    tokens: int  # budget reserved: input length + max_new_tokens, in whole blocks
    result: RequestResult
    blocks: tuple[int, ...] = ()
    exact: bool = True  # input_tokens is the true prompt length (ids, or a tokenizer)
    started: bool = False  # has had its first Generation (its prompt is fully prefilled)
    chunked: bool = False  # admitted with a partial first chunk


class FakeRouter:
    def __init__(
        self,
        url: str,
        limits: RouterLimits | None = None,
        *,
        timeout: float = 300.0,
        tokenize: Callable[[str], Sequence[int]] | None = None,
    ) -> None:
        self.limits = limits or RouterLimits()
        self.timeout = timeout
        self._tokenize = tokenize  # exact input lengths; without it text length is bounded by bytes + BOS
        first = grpc.insecure_channel(url, options=CHANNEL_OPTIONS)
        try:
            urls = (
                generate_pb2_grpc.LoraxServiceStub(first)
                .ServiceDiscovery(pb.ServiceDiscoveryRequest(), timeout=timeout)
                .urls
            )
        finally:
            first.close()
        self.urls = list(urls) or [url]
        self._channels = [grpc.insecure_channel(u, options=CHANNEL_OPTIONS) for u in self.urls]
        self.stubs = [generate_pb2_grpc.LoraxServiceStub(c) for c in self._channels]
        self._pool = ThreadPoolExecutor(max_workers=len(self.stubs), thread_name_prefix="fake-router")
        self._batch_ids = itertools.count(1)
        self._request_ids = itertools.count(1)
        self.budget = self.limits.max_batch_total_tokens
        self.warmup_response: pb.WarmupResponse | None = None
        self.stats = RouterStats()
        self.info_pb = self._call("Info", pb.InfoRequest())[0]
        # Router-allocation mode: block 0 is the shard's (Health); the rest are ours to hand out.
        self._free_blocks: list[int] = []

    @property
    def free_router_blocks(self) -> int:
        """Router-allocation mode: KV blocks this router has not handed out (all of them when idle)."""
        return len(self._free_blocks)

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        for c in self._channels:
            c.close()

    def __enter__(self) -> FakeRouter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, method: str, request: Any) -> list[Any]:
        """Send to every shard at once; return their responses in rank order (first error raised)."""
        t0 = time.perf_counter()
        try:
            if len(self.stubs) == 1:  # no thread hop for one shard: it is on every step's critical path
                return [getattr(self.stubs[0], method)(request, timeout=self.timeout)]
            futures = [
                self._pool.submit(getattr(s, method), request, timeout=self.timeout) for s in self.stubs
            ]
            return [f.result() for f in futures]
        finally:
            seconds = self.stats.rpc_seconds
            seconds[method] = seconds.get(method, 0.0) + time.perf_counter() - t0

    # ------------------------------------------------------------ single RPCs
    def health(self) -> None:
        self._call("Health", pb.HealthRequest())

    def clear_cache(self, batch_id: int | None = None) -> None:
        self._call("ClearCache", pb.ClearCacheRequest(id=batch_id))

    def warmup(self) -> int:
        """Warmup with the router's batch; the answer becomes this router's token budget."""
        lim = self.limits
        self.clear_cache()  # the router clears on connect: a restarted router must not inherit batches
        request = warmup_request(lim.max_input_length, lim.max_prefill_tokens, lim.max_total_tokens)
        self.warmup_response = resp = self._call("Warmup", request)[0]
        if resp.HasField("max_supported_total_tokens"):
            self.budget = resp.max_supported_total_tokens
        if self.info_pb.requires_block_allocator:
            self._free_blocks = list(range(1, self.budget // self.info_pb.block_size))
        return self.budget

    def prefill(
        self, batch: pb.Batch, cached: pb.CachedBatch | None = None
    ) -> tuple[list[GenerationOut], Any]:
        gens, out = self._prefill_pb(batch, cached)
        return [generation_from_pb(g) for g in gens], out

    def decode(self, batches: Sequence[pb.CachedBatch]) -> tuple[list[GenerationOut], Any]:
        gens, out = self._decode_pb(batches)
        return [generation_from_pb(g) for g in gens], out

    def _prefill_pb(self, batch: pb.Batch, cached: pb.CachedBatch | None) -> tuple[list[pb.Generation], Any]:
        self.stats.prefills += 1
        self.stats.prefills_into_running += cached is not None
        return self._merge(self._call("Prefill", pb.PrefillRequest(batch=batch, cached_batch=cached)))

    def _decode_pb(self, batches: Sequence[pb.CachedBatch]) -> tuple[list[pb.Generation], Any]:
        self.stats.decodes += 1
        self.stats.prefills_into_running += len(batches) > 1
        return self._merge(self._call("Decode", pb.DecodeRequest(batches=batches)))

    def filter_batch(self, batch_id: int, request_ids: Sequence[int]) -> pb.CachedBatch:
        self.stats.filters += 1
        req = pb.FilterBatchRequest(batch_id=batch_id, request_ids=request_ids)
        return self._call("FilterBatch", req)[0].batch

    def download_adapter(self, spec: AdapterSpec) -> float:
        params, source = adapter_to_pb(spec)
        req = pb.DownloadAdapterRequest(
            adapter_parameters=params, adapter_source=source, api_token=spec.api_token
        )
        return self.stubs[0].DownloadAdapter(req, timeout=self.timeout).memory_fraction  # rank 0 only

    def load_adapter(self, index: int, spec: AdapterSpec) -> bool:
        params, source = adapter_to_pb(spec)
        req = pb.LoadAdapterRequest(
            adapter_parameters=params, adapter_source=source, adapter_index=index, api_token=spec.api_token
        )
        return all(r.loaded for r in self._call("LoadAdapter", req))

    def offload_adapter(self, index: int, spec: AdapterSpec) -> bool:
        params, source = adapter_to_pb(spec)
        req = pb.OffloadAdapterRequest(adapter_parameters=params, adapter_source=source, adapter_index=index)
        return all(r.offloaded for r in self._call("OffloadAdapter", req))

    @staticmethod
    def _merge(responses: list[Any]) -> tuple[list[pb.Generation], Any]:
        gens = [g for r in responses for g in r.generations]
        first = responses[0]
        return gens, (first.batch if first.HasField("batch") else None)

    # ------------------------------------------------------------ continuous batching
    def _reserve(self, tokens: int) -> int:
        """Budget a request by whole KV blocks, as the router does: the shard cannot give out less."""
        bs = max(1, self.info_pb.block_size)
        return -(-tokens // bs) * bs

    def _input_tokens(self, r: RequestSpec) -> int:
        if r.input_ids:
            n = len(r.input_ids)
        elif self._tokenize is not None:
            n = len(self._tokenize(r.inputs))
        else:
            n = len(r.inputs.encode()) + 1  # byte-level BPE: at most one token per byte, plus BOS
        return min(n, r.truncate) if r.truncate else n

    def _admit(self, queue: deque[_Live], live: dict[int, _Live]) -> list[_Live]:
        reserved = sum(e.tokens for e in live.values())
        taken: list[_Live] = []
        prefill_tokens = 0
        size_cap = self.limits.max_batch_size or math.inf
        chunking = self.limits.chunking and self.info_pb.chunked_prefill
        while queue:
            e = queue[0]
            inp = e.input_tokens
            if reserved + e.tokens > self.budget or len(live) + len(taken) >= size_cap:
                break
            room = self.limits.max_prefill_tokens - prefill_tokens
            chunk = chunking and e.exact and 0 < room < inp
            if taken and inp > room and not chunk:
                break
            if self.info_pb.requires_block_allocator:
                if not self._allocate(e):
                    break
            queue.popleft()
            taken.append(e)
            reserved += e.tokens
            if chunk:  # the rest of its prompt is computed by the following steps
                e.chunked, e.spec = True, replace(e.spec, chunk_len=room)
                self.stats.chunked_requests += 1
                break
            prefill_tokens += inp
        return taken

    def _allocate(self, e: _Live) -> bool:
        """Router-allocation mode: whole blocks for prompt + max_new_tokens, one slot per token."""
        if not e.spec.input_ids and self._tokenize is None:
            raise ValueError("router-allocation mode needs exact prompt lengths: pass input_ids or tokenize=")
        bs = self.info_pb.block_size
        n = math.ceil(e.tokens / bs)
        if n > len(self._free_blocks):
            return False
        blocks = tuple(self._free_blocks[:n])
        del self._free_blocks[:n]
        # As LoRAX's router: Info.speculate extra slots, which a speculative step may write.
        needed = e.input_tokens + e.spec.stopping.max_new_tokens + self.info_pb.speculate
        slots = tuple(b * bs + i for b in blocks for i in range(bs))[:needed]
        e.blocks = blocks
        e.spec = replace(e.spec, blocks=blocks, slots=slots)
        return True

    def _release(self, e: _Live) -> None:
        self._free_blocks.extend(e.blocks)
        e.blocks = ()

    def generate(
        self,
        requests: Sequence[RequestSpec],
        on_token: TokenCallback | None = None,
        *,
        clear_at_end: bool = True,
    ) -> list[RequestResult]:
        """Run every request to completion with continuous batching; results in input order."""
        queue: deque[_Live] = deque()
        for i, r in enumerate(requests):
            spec = replace(r, id=next(self._request_ids))
            inp = self._input_tokens(spec)
            exact = bool(spec.input_ids) or self._tokenize is not None
            # As LoRAX's router: Info.speculate more tokens per request, for speculative steps.
            budget = self._reserve(inp + spec.stopping.max_new_tokens + self.info_pb.speculate)
            e = _Live(i, spec, inp, budget, RequestResult(), exact=exact)
            if e.tokens > self.budget:
                raise ValueError(f"request {i} needs {e.tokens} tokens; the shard's budget is {self.budget}")
            queue.append(e)
        live: dict[int, _Live] = {}
        done: list[_Live] = []
        running: pb.CachedBatch | None = None
        pending: pb.CachedBatch | None = None  # concat_via=decode: prefilled, merged by the next Decode
        prefilled_last = False
        while queue or running is not None or pending is not None:
            # One Decode between two Prefills, so a long queue cannot starve the running batch.
            new = [] if prefilled_last else self._admit(queue, live)
            if new:
                batch = pb.Batch(
                    id=next(self._batch_ids),
                    requests=[request_to_pb(e.spec) for e in new],
                    size=len(new),
                    max_tokens=sum(e.tokens for e in new),
                    max_blocks=max(len(e.blocks) for e in new),
                )
                new_ids = {e.spec.id for e in new}
                full = {e.spec.id for e in new if not e.chunked}  # these must emit their first token
                live.update((e.spec.id, e) for e in new)
                if running is not None and self.limits.concat_via == "decode":
                    gens, fresh = self._prefill_pb(batch, None)
                    pending = self._apply(gens, fresh, full, new_ids, new_ids, live, done, on_token)
                else:
                    members = new_ids | set(running.request_ids if running is not None else ())
                    # Pending prefills of the cached batch may finish here; its decoding rows do not step.
                    may = new_ids | {rid for rid in members if not live[rid].started}
                    gens, running = self._prefill_pb(batch, running)
                    running = self._apply(gens, running, full, may, members, live, done, on_token)
                prefilled_last = True
            elif running is not None or pending is not None:
                batches = [b for b in (running, pending) if b is not None]
                members = {rid for b in batches for rid in b.request_ids}
                decoding = {rid for rid in members if live[rid].started}
                gens, running = self._decode_pb(batches)
                pending = None
                running = self._apply(gens, running, decoding, members, members, live, done, on_token)
                prefilled_last = False
            else:
                raise RuntimeError("nothing runs and the next request does not fit the budget")
        if clear_at_end:  # the router owns the shard: nothing of this run may stay cached
            self.clear_cache()
        return [e.result for e in sorted(done, key=lambda e: e.index)]

    def _apply(
        self,
        gens: list[pb.Generation],
        batch: pb.CachedBatch | None,
        must: set[int],
        may: set[int],
        members: set[int],
        live: dict[int, _Live],
        done: list[_Live],
        on_token: TokenCallback | None,
    ) -> pb.CachedBatch | None:
        """Apply one step's generations, check the shard's answer, filter out what finished.

        must: requests that must each get exactly one Generation (across all shards);
        may: requests that may get one (at most one): pending chunked prefills that can complete;
        members: requests the returned CachedBatch must list, less those that finished.
        Reads the protobuf messages directly: this runs once a step for every row, between two Decodes.
        """
        seen: set[int] = set()
        finished: set[int] = set()
        allowed = must | may
        for g in gens:
            rid = g.request_id
            e = live.get(rid)
            if e is None or rid in seen or rid not in allowed:
                raise ProtocolViolation(f"unexpected or duplicate Generation for request {rid}")
            seen.add(rid)
            e.started = True
            res = e.result
            if g.HasField("prefill_tokens"):
                res.prefill_tokens, res.prefill_tokens_length = (
                    tokens_from_pb(g.prefill_tokens),
                    g.prefill_tokens_length,
                )
            nt = g.next_tokens
            ids = list(nt.ids)
            n = len(ids)
            # A shard may send fewer logprobs / texts than ids (the wire allows it): pad as the router does.
            logprobs = list(nt.logprobs[:n])
            texts = list(nt.texts[:n])
            logprobs += [math.nan] * (n - len(logprobs))
            texts += [""] * (n - len(texts))
            res.token_ids += ids
            res.logprobs += logprobs
            res.token_texts += texts
            if on_token is not None:
                special = list(nt.is_special[:n])
                special += [False] * (n - len(special))
                for k in range(n):
                    if on_token(e.index, TokenEvent(ids[k], logprobs[k], texts[k], special[k])) is False:
                        res.cancelled = True  # the client went away: the router filters it out below
            if g.HasField("generated_text"):  # once a request, so the dataclass costs nothing per step
                gt = generated_text_from_pb(g.generated_text)
                res.text, res.finish_reason, res.seed = gt.text, gt.finish_reason, gt.seed
                res.generated_tokens, res.cancelled = gt.generated_tokens, False
                res.skipped_tokens = gt.skipped_tokens
                finished.add(rid)
        if must - seen:
            raise ProtocolViolation(f"no Generation for live requests {sorted(must - seen)}")
        expected = members - finished
        listed = set(batch.request_ids) if batch is not None else set()
        if listed != expected:
            raise ProtocolViolation(
                f"CachedBatch lists {sorted(listed)} but the unfinished requests are {sorted(expected)}"
            )
        cancelled = {rid for rid in expected if live[rid].result.cancelled}
        for rid in finished | cancelled:
            e = live.pop(rid)
            self._release(e)
            done.append(e)
        if batch is not None and (finished or cancelled):
            # Finished requests already left the batch (a no-op for them); cancelled ones leave here.
            keep = [rid for rid in batch.request_ids if rid in live]
            if not keep:
                self.clear_cache(batch.id)
                return None
            batch = self.filter_batch(batch.id, keep)
        return batch
