"""The gRPC servicer: protobuf -> shard_server.types -> ShardEngine call -> protobuf.

Only wire-level shape is checked here (a Decode without batches, an input chunk with neither text nor
image, an enum value outside the protocol); everything semantic is the engine's. Every engine call runs
on one dedicated model thread (`EngineWorkers.model`); DownloadAdapter's and LoadAdapter's file I/O runs
on a second thread (`EngineWorkers.io`). Info and ServiceDiscovery answer from the handler thread;
Health answers from the model thread's heartbeat and never queues behind a long Prefill or Decode
(`health.ShardHealth`).
No exception ever leaves a handler: a model.errors.ShardError -> its status (`GRPC_STATUS`), anything
else -> INTERNAL (logged with its traceback); the server keeps serving either way.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

import grpc

from model.errors import Cancelled, InvalidArgument, ShardError, Status, Unimplemented
from shard_server.pb.generate.v1 import generate_pb2 as pb
from shard_server.pb.generate.v1 import generate_pb2_grpc
from shard_server.server.bounds import bounded_message, check_adapter_parameters, check_api_token
from shard_server.server.health import ShardHealth
from shard_server.server.telemetry import Telemetry
from shard_server.server.workers import EngineWorkers
from shard_server.types import (
    AdapterSpec,
    BatchSpec,
    CachedBatchInfo,
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

log = logging.getLogger(__name__)
T = TypeVar("T")

# Wire enum value -> domain string, by value (the protocol fixes the numbers, not our spelling).
ADAPTER_SOURCES = {pb.HUB: "hub", pb.S3: "s3", pb.LOCAL: "local", pb.PBASE: "pbase"}
MERGE_STRATEGIES = {
    pb.LINEAR: "linear",
    pb.TIES: "ties",
    pb.DARE_LINEAR: "dare_linear",
    pb.DARE_TIES: "dare_ties",
}
MAJORITY_SIGN_METHODS = {pb.TOTAL: "total", pb.FREQUENCY: "frequency"}


def _inverse(d: dict[int, str]) -> dict[str, int]:
    return {v: k for k, v in d.items()}


def _enum(table: dict[int, str], value: int, field: str) -> str:
    try:
        return table[value]
    except KeyError:
        raise InvalidArgument(f"{field}={value} is not a value of the protocol's enum") from None


# ---------------------------------------------------------------- protobuf -> domain (requests)


def sampling_from_pb(p: pb.NextTokenChooserParameters) -> SamplingParams:
    return SamplingParams(
        temperature=p.temperature,
        top_k=p.top_k,
        top_p=p.top_p,
        typical_p=p.typical_p,
        do_sample=p.do_sample,
        seed=p.seed,
        repetition_penalty=p.repetition_penalty,
        frequency_penalty=p.frequency_penalty,
        presence_penalty=p.presence_penalty,
        watermark=p.watermark,
        return_k_alternatives=p.return_k_alternatives,
        schema=p.schema if p.HasField("schema") else None,
    )


def stopping_from_pb(s: pb.StoppingCriteriaParameters) -> StoppingParams:
    return StoppingParams(
        max_new_tokens=s.max_new_tokens,
        stop_sequences=tuple(s.stop_sequences),
        ignore_eos_token=s.ignore_eos_token,
    )


def request_from_pb(r: pb.Request) -> RequestSpec:
    chunks: list[TextChunk | ImageChunk] = []
    for i, c in enumerate(r.tokenized_inputs.input_chunks):
        kind = c.WhichOneof("chunk")
        if kind == "text":
            chunks.append(TextChunk(c.text))
        elif kind == "image":
            chunks.append(ImageChunk(bytes(c.image.data), c.image.mimetype))
        else:
            raise InvalidArgument(
                f"request {r.id}: tokenized_inputs.input_chunks[{i}] has neither text nor image"
            )
    return RequestSpec(
        id=r.id,
        inputs=r.inputs,
        input_ids=tuple(r.tokenized_inputs.ids),
        input_chunks=tuple(chunks),
        truncate=r.truncate,
        # A message the router left out means "defaults", not "all zero" (top_p=0 would be invalid).
        sampling=sampling_from_pb(r.parameters) if r.HasField("parameters") else SamplingParams(),
        stopping=stopping_from_pb(r.stopping_parameters)
        if r.HasField("stopping_parameters")
        else StoppingParams(),
        prefill_logprobs=r.prefill_logprobs,
        adapter_index=r.adapter_index,
        blocks=tuple(r.blocks),
        slots=tuple(r.slots),
        cache_len=r.cache_len,
        chunk_len=r.chunk_len if r.HasField("chunk_len") else None,
    )


def batch_from_pb(b: pb.Batch, rpc: str) -> BatchSpec:
    if not b.requests:
        raise InvalidArgument(f"{rpc}: batch {b.id} has no requests")
    return BatchSpec(
        id=b.id,
        requests=tuple(request_from_pb(r) for r in b.requests),
        max_tokens=b.max_tokens,
        max_blocks=b.max_blocks,
    )


def adapter_from_pb(params: pb.AdapterParameters, source: int, api_token: str | None = None) -> AdapterSpec:
    if not params.adapter_ids:
        raise InvalidArgument("adapter_parameters.adapter_ids is empty")
    check_adapter_parameters(params.adapter_ids, params.weights, params.density)
    check_api_token(api_token)
    return AdapterSpec(
        adapter_ids=tuple(params.adapter_ids),
        weights=tuple(params.weights),
        merge_strategy=_enum(MERGE_STRATEGIES, params.merge_strategy, "adapter_parameters.merge_strategy"),
        density=params.density,
        majority_sign_method=_enum(
            MAJORITY_SIGN_METHODS, params.majority_sign_method, "adapter_parameters.majority_sign_method"
        ),
        source=_enum(ADAPTER_SOURCES, source, "adapter_source"),
        api_token=api_token,
    )


# ---------------------------------------------------------------- domain -> protobuf (responses)


def tokens_to_pb(t: TokensOut) -> pb.NextTokens:
    return pb.NextTokens(
        ids=t.ids,
        logprobs=t.logprobs,
        texts=t.texts,
        is_special=t.is_special,
        alternative_tokens=[
            pb.AlternativeTokens(ids=a.ids, logprobs=a.logprobs, texts=a.texts) for a in t.alternatives
        ],
    )


def generation_to_pb(g: GenerationOut) -> pb.Generation:
    out = pb.Generation(
        request_id=g.request_id,
        next_tokens=tokens_to_pb(g.next_tokens),
        prefill_tokens_length=g.prefill_tokens_length,
    )
    if g.prefill_tokens is not None:
        out.prefill_tokens.CopyFrom(tokens_to_pb(g.prefill_tokens))
    if g.generated_text is not None:
        gt = g.generated_text
        out.generated_text.CopyFrom(
            pb.GeneratedText(
                text=gt.text,
                generated_tokens=gt.generated_tokens,
                skipped_tokens=gt.skipped_tokens,
                finish_reason=int(gt.finish_reason),  # FinishReason's values are the wire enum's
                seed=gt.seed,  # None leaves the optional field unset (greedy requests)
            )
        )
    return out


def cached_batch_to_pb(c: CachedBatchInfo) -> pb.CachedBatch:
    return pb.CachedBatch(
        id=c.id,
        request_ids=c.request_ids,
        size=c.size,
        max_tokens=c.max_tokens,
        current_tokens=c.current_tokens,
    )


def adapter_to_pb(spec: AdapterSpec) -> tuple[pb.AdapterParameters, int]:
    params = pb.AdapterParameters(
        adapter_ids=spec.adapter_ids,
        weights=spec.weights,
        merge_strategy=_inverse(MERGE_STRATEGIES)[spec.merge_strategy],
        density=spec.density,
        majority_sign_method=_inverse(MAJORITY_SIGN_METHODS)[spec.majority_sign_method],
    )
    return params, _inverse(ADAPTER_SOURCES)[spec.source]


def info_to_pb(info: ShardInfo) -> pb.InfoResponse:
    preloaded = []
    for index, spec in info.preloaded_adapters:
        params, source = adapter_to_pb(spec)
        preloaded.append(
            pb.PreloadedAdapter(adapter_parameters=params, adapter_source=source, adapter_index=index)
        )
    return pb.InfoResponse(
        requires_padding=False,  # flattened (unpadded) batches
        dtype=info.dtype,
        device_type=info.device_type,
        window_size=info.window_size,  # None leaves the optional field unset
        block_size=info.block_size,
        speculate=info.speculate,
        preloaded_adapters=preloaded,
        supports_generation=info.supports_generation,
        supports_embeddings=info.supports_embeddings,
        supports_classification=info.supports_classification,
        chunked_prefill=info.chunked_prefill,
        requires_block_allocator=info.requires_block_allocator,
    )


def step_to_pb(result: StepResult, response_type: type[T]) -> T:
    resp = response_type(generations=[generation_to_pb(g) for g in result.generations])
    if result.batch is not None:  # no batch once every request has finished
        resp.batch.CopyFrom(cached_batch_to_pb(result.batch))
    return resp


# ---------------------------------------------------------------- error mapping


# Our status enum -> gRPC's, member by member (the one place that knows both).
GRPC_STATUS = {status: grpc.StatusCode[status.name] for status in Status}


def _is_out_of_memory(e: BaseException) -> bool:
    # torch.OutOfMemoryError (a RuntimeError) is matched by name: this layer does not import torch. A
    # failed host allocation in torch is a plain RuntimeError from its CPU allocator.
    return (
        isinstance(e, MemoryError)
        or any(c.__name__ == "OutOfMemoryError" for c in type(e).__mro__)
        or (isinstance(e, RuntimeError) and "DefaultCPUAllocator: can't allocate memory" in str(e))
    )


def rpc(method: Callable[..., T]) -> Callable[..., T]:
    """Run a handler; turn every exception into a status. context.abort is called outside the try:
    it raises to end the RPC and must not be caught and re-mapped."""

    @functools.wraps(method)
    def handler(self: LoraxServiceServicer, request: Any, context: grpc.ServicerContext) -> T:
        name = method.__name__
        call = self._telemetry.start(name, request, context)
        try:
            response = method(self, request, context)
            call.finish(grpc.StatusCode.OK, None, response)
            return response
        except ShardError as e:
            code, message = GRPC_STATUS[e.status], bounded_message(str(e) or type(e).__name__)
            log.info("%s -> %s: %s", name, code.name, message)
        except Exception as e:  # noqa: BLE001 - the server must survive any bug in one request
            if _is_out_of_memory(e):
                code = grpc.StatusCode.RESOURCE_EXHAUSTED
                message = bounded_message(f"{name}: out of memory: {e}")
                log.warning("%s -> RESOURCE_EXHAUSTED: %s", name, message)
            else:
                code, message = grpc.StatusCode.INTERNAL, bounded_message(f"{name}: {type(e).__name__}: {e}")
                log.exception("%s failed with an unexpected error", name)
        call.finish(code, message)
        context.abort(code, message)

    return handler


# ---------------------------------------------------------------- the servicer


class LoraxServiceServicer(generate_pb2_grpc.LoraxServiceServicer):
    """generate.v1.LoraxService over a ShardEngine (see docs/INTERNALS.md, Engine API)."""

    def __init__(
        self,
        engine: Any,
        service_urls: Iterable[str],
        workers: EngineWorkers,
        health: ShardHealth,
        telemetry: Telemetry | None = None,
    ) -> None:
        self._engine = engine
        self._urls = tuple(service_urls)
        self._workers = workers
        self._health = health
        self._telemetry = telemetry or Telemetry()
        # Info is static facts: read once (on the model thread) so Info never waits behind a Decode.
        self._info: ShardInfo = workers.model(engine.info)
        self._info_pb = info_to_pb(self._info)
        for index, spec in self._info.preloaded_adapters:
            self._telemetry.adapter_registered(index, spec)

    def _model(self, context: Any, fn: Callable[..., T], *args: Any, **kwargs: Any) -> tuple[T, float]:
        """fn on the model thread -> (its result, seconds it ran there). Work whose caller is already
        gone (deadline passed while queued, or cancelled) is not started; engine stats are sampled
        after every call when metrics are on."""

        def job() -> tuple[T, float]:
            if context is not None and not context.is_active():
                raise Cancelled(f"{fn.__name__}: the caller is gone (deadline passed or cancelled)")
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs), time.perf_counter() - t0
            finally:
                if self._telemetry.metrics is not None:
                    self._telemetry.engine_sampled(self._engine.stats())

        job.__name__ = getattr(fn, "__name__", job.__name__)  # Health names the call that is running
        return self._workers.model(job)

    @rpc
    def Info(self, request: pb.InfoRequest, context: grpc.ServicerContext) -> pb.InfoResponse:
        return self._info_pb

    @rpc
    def ServiceDiscovery(self, request, context) -> pb.ServiceDiscoveryResponse:
        return pb.ServiceDiscoveryResponse(urls=self._urls)

    @rpc
    def Health(self, request: pb.HealthRequest, context) -> pb.HealthResponse:
        self._health.check()  # never queues behind the model thread (health.py)
        return pb.HealthResponse()

    @rpc
    def ClearCache(self, request: pb.ClearCacheRequest, context) -> pb.ClearCacheResponse:
        batch_id = request.id if request.HasField("id") else None
        self._model(None, self._engine.clear_cache, batch_id)
        return pb.ClearCacheResponse()

    @rpc
    def FilterBatch(self, request: pb.FilterBatchRequest, context) -> pb.FilterBatchResponse:
        info, _ = self._model(None, self._engine.filter_batch, request.batch_id, list(request.request_ids))
        return pb.FilterBatchResponse(batch=cached_batch_to_pb(info))

    @rpc
    def Warmup(self, request: pb.WarmupRequest, context) -> pb.WarmupResponse:
        batch = batch_from_pb(request.batch, "Warmup")
        total, _ = self._model(
            context,
            self._engine.warmup,
            batch,
            request.max_input_length,
            request.max_prefill_tokens,
            request.max_new_tokens,
        )
        return pb.WarmupResponse(max_supported_total_tokens=total)  # None leaves it unset

    @rpc
    def Prefill(self, request: pb.PrefillRequest, context) -> pb.PrefillResponse:
        batch = batch_from_pb(request.batch, "Prefill")
        cached_id = request.cached_batch.id if request.HasField("cached_batch") else None
        # JSON schemas compile here, on this handler thread, while the model thread decodes on.
        self._engine.prepare_grammars(batch)
        # Nothing is committed for a caller that is gone by the time the forward is done.
        result, seconds = self._model(context, self._engine.prefill, batch, cached_id, context.is_active)
        size = len(batch.requests) + len(request.cached_batch.request_ids)
        self._telemetry.step("prefill", size, seconds, result)
        return step_to_pb(result, pb.PrefillResponse)

    @rpc
    def Decode(self, request: pb.DecodeRequest, context) -> pb.DecodeResponse:
        if not request.batches:
            raise InvalidArgument("Decode: DecodeRequest.batches is empty")
        ids = [b.id for b in request.batches]
        result, seconds = self._model(context, self._engine.decode, ids, context.is_active)
        self._telemetry.step("decode", sum(len(b.request_ids) for b in request.batches), seconds, result)
        return step_to_pb(result, pb.DecodeResponse)

    @rpc
    def Embed(self, request: pb.EmbedRequest, context) -> pb.EmbedResponse:
        batch = batch_from_pb(request.batch, "Embed")
        rows, _ = self._model(context, self._engine.embed, batch)
        # errorMsg stays empty on success; failures are status codes, not a message in a 200.
        return pb.EmbedResponse(
            embeddings=[pb.Embedding(request_id=rid, values=values) for rid, values in rows]
        )

    @rpc
    def Classify(self, request: pb.ClassifyRequest, context) -> pb.ClassifyResponse:
        if not self._info.supports_classification:
            raise Unimplemented(
                "Classify: this model has no classification head "
                "(InfoResponse.supports_classification=false); use Prefill/Decode or Embed"
            )
        batch = batch_from_pb(request.batch, "Classify")
        # Engine contract for classification models: classify(BatchSpec) -> [(request_id, labels, scores)].
        rows = self._workers.model(self._engine.classify, batch)
        return pb.ClassifyResponse(
            classify_prediction_lists=[
                pb.ClassifyPredictionList(request_id=rid, predictions=labels, scores=scores)
                for rid, labels, scores in rows
            ]
        )

    @rpc
    def DownloadAdapter(self, request: pb.DownloadAdapterRequest, context) -> pb.DownloadAdapterResponse:
        token = request.api_token if request.HasField("api_token") else None
        spec = adapter_from_pb(request.adapter_parameters, request.adapter_source, token)
        # Disk/network I/O off the model thread: a slow download never stalls Decode.
        fraction = self._workers.io(self._engine.download_adapter, spec)
        return pb.DownloadAdapterResponse(downloaded=True, memory_fraction=fraction)

    @rpc
    def LoadAdapter(self, request: pb.LoadAdapterRequest, context) -> pb.LoadAdapterResponse:
        token = request.api_token if request.HasField("api_token") else None
        spec = adapter_from_pb(request.adapter_parameters, request.adapter_source, token)
        t0 = time.perf_counter()
        # Reading, validating and packing the files runs on the I/O thread: a slow disk, a hub download
        # or a large adapter never holds the model thread (Decode, Health) while it happens.
        prepared = self._workers.io(self._engine.prepare_adapter, spec)
        previous = self._telemetry.adapter_registered(request.adapter_index, spec)  # labels its device load
        try:
            self._model(None, self._engine.load_adapter, request.adapter_index, spec, prepared)
        except BaseException:
            self._telemetry.adapter_relabelled(request.adapter_index, previous)
            raise
        self._telemetry.adapter_loaded(request.adapter_index, spec, time.perf_counter() - t0)
        return pb.LoadAdapterResponse(loaded=True)

    @rpc
    def OffloadAdapter(self, request: pb.OffloadAdapterRequest, context) -> pb.OffloadAdapterResponse:
        spec = adapter_from_pb(request.adapter_parameters, request.adapter_source)
        offloaded, _ = self._model(None, self._engine.offload_adapter, request.adapter_index, spec)
        if offloaded:
            self._telemetry.adapter_offloaded(request.adapter_index)
        return pb.OffloadAdapterResponse(offloaded=bool(offloaded))
