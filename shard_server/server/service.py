"""The gRPC servicer: protobuf -> shard_server.types -> ShardEngine call -> protobuf.

The wire mapping is convert.py's; this module checks the rest of the wire-level shape (a Decode without
batches) and leaves everything semantic to the engine. Every engine call runs
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
from shard_server.server.bounds import bounded_message
from shard_server.server.convert import (
    adapter_from_pb,
    batch_from_pb,
    cached_batch_to_pb,
    info_to_pb,
    step_to_pb,
)
from shard_server.server.health import ShardHealth
from shard_server.server.telemetry import Telemetry
from shard_server.server.workers import EngineWorkers
from shard_server.types import (
    ShardInfo,
)

log = logging.getLogger(__name__)
T = TypeVar("T")

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
