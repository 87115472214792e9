"""Health of one shard, answered without queueing behind the model thread.

LoRAX Health and grpc.health.v1 Check give the same verdict, from the model thread's heartbeat
(`EngineWorkers.current()`) and, when that thread is idle, a real device op:

- model thread busy for less than `stuck_after_s`: healthy (the device is running our work; its
  finishing is the device check) and no device op is queued behind it;
- busy for longer: unhealthy (UNAVAILABLE / NOT_SERVING), naming the call and how long it has run, until
  that call returns;
- idle: the engine's device probe runs on the model thread (the thread that owns the device state and
  streams; a probe from another thread could break a CUDA graph capture there) and Health waits for it
  at most `PROBE_WAIT_S`. A call that slips in first makes the thread busy again: the heartbeat answers.
  A probe that fails answers UNAVAILABLE. At most one probe is queued at a time.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout

import grpc
from grpc_health.v1 import health, health_pb2

from model.errors import ShardError, Unavailable
from shard_server.server.workers import EngineWorkers

log = logging.getLogger(__name__)

PROBE_WAIT_S = 0.05  # Health must answer within 100 ms; a probe on an idle device takes well under 1 ms


class ShardHealth:
    def __init__(
        self,
        workers: EngineWorkers,
        probe: Callable[[], None],
        stuck_after_s: float,
        service_names: tuple[str, ...],
    ) -> None:
        self._workers = workers
        self._probe = probe
        self._stuck_after_s = stuck_after_s
        self._names = ("", *service_names)
        self._pending: Future | None = None  # the probe last queued on the model thread
        self._lock = threading.Lock()  # concurrent checks share one pending probe
        self.servicer = _CheckedHealthServicer(self)  # grpc.health.v1
        self._set(True)

    def check(self) -> None:
        """Raise Unavailable unless the shard can do work now; grpc.health.v1 follows the verdict."""
        try:
            self._verdict()
        except ShardError:
            self._set(False)
            raise
        except Exception as e:  # the probe's own failure: the device cannot run work
            self._set(False)
            raise Unavailable(f"Health: device cannot run work: {type(e).__name__}: {e}") from e
        self._set(True)

    def enter_graceful_shutdown(self) -> None:
        """NOT_SERVING for every service from now on, whatever later checks find."""
        self.servicer.enter_graceful_shutdown()

    def _verdict(self) -> None:
        if self._heartbeat():
            return
        with self._lock:
            probe = self._pending
            if probe is None or probe.done():
                probe = self._pending = self._workers.submit_model(self._probe)
        try:
            probe.result(timeout=PROBE_WAIT_S)
        except FutureTimeout:
            # Queued behind a call that slipped in, or slow itself: the heartbeat decides (and a probe
            # that finished meanwhile still reports its failure).
            if not self._heartbeat() and probe.done():
                probe.result()

    def _heartbeat(self) -> bool:
        """True if the model thread is busy within the threshold; raise if it is stuck; False if idle."""
        current = self._workers.current()
        if current is None:
            return False
        name, seconds = current
        if seconds > self._stuck_after_s:
            raise Unavailable(
                f"Health: the model thread has been running {name} for {seconds:.1f} s, longer than the "
                f"stuck threshold ({self._stuck_after_s:g} s, --health-stuck-seconds)"
            )
        return True

    def _set(self, ok: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if ok else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in self._names:
            self.servicer.set(name, status)


class _CheckedHealthServicer(health.HealthServicer):
    """grpc.health.v1 whose Check first runs the shard's check (the stored status alone would keep
    SERVING while the model thread is stuck and nobody calls LoRAX Health)."""

    def __init__(self, shard_health: ShardHealth) -> None:
        super().__init__()
        self._shard_health = shard_health

    def Check(self, request: health_pb2.HealthCheckRequest, context: grpc.ServicerContext):
        try:
            self._shard_health.check()
        except ShardError as e:
            log.warning("grpc.health.v1 Check: %s", e)
        return super().Check(request, context)
