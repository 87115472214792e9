"""The shard's gRPC server: unix socket, health + reflection, one model thread, SIGTERM drain.

`create_server` wires a ready engine into a grpc.Server listening on `unix://{uds_path}-{rank}`;
`serve` is the whole process lifecycle used by `shard-server serve`: logging, engine construction on the
model thread, start, wait for SIGTERM/SIGINT, drain, remove the socket, exit 0.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import stat
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from shard_server.config import ServeConfig
from shard_server.pb.generate.v1 import generate_pb2, generate_pb2_grpc
from shard_server.server.health import ShardHealth
from shard_server.server.service import LoraxServiceServicer
from shard_server.server.telemetry import Telemetry
from shard_server.server.workers import EngineWorkers

log = logging.getLogger(__name__)

SERVICE_NAME = generate_pb2.DESCRIPTOR.services_by_name["LoraxService"].full_name  # generate.v1.LoraxService
# Large batches (thousands of requests with token ids, logprobs of every prompt token) exceed gRPC's 4 MiB.
MAX_MESSAGE_BYTES = 512 * 1024 * 1024
SERVER_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
]


def socket_path(uds_path: str, rank: int) -> str:
    return f"{uds_path}-{rank}"


def service_urls(uds_path: str, world_size: int) -> list[str]:
    return [f"unix://{socket_path(uds_path, r)}" for r in range(world_size)]


def remove_stale_socket(path: str) -> None:
    """Remove a socket file left by a dead shard; refuse to touch a live one or a non-socket file."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise RuntimeError(f"{path} exists and is not a unix socket; refusing to replace it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(1.0)
        probe.connect(path)
    except OSError:
        os.unlink(path)  # nobody listens: stale
        log.info("removed stale socket %s", path)
        return
    finally:
        probe.close()
    raise RuntimeError(f"another process is already serving on {path}")


@dataclass
class BuiltServer:
    server: grpc.Server  # bound, not started
    address: str  # unix://{uds_path}-{rank}
    health: ShardHealth  # LoRAX Health and grpc.health.v1, SERVING once built
    workers: EngineWorkers  # the model thread (and adapter I/O thread)
    telemetry: Telemetry  # metrics / spans (each optional); closed after the server stops


def create_server(
    engine: Any,
    uds_path: str,
    rank: int,
    world_size: int,
    *,
    workers: EngineWorkers | None = None,
    grpc_threads: int = 16,
    health_stuck_seconds: float = ServeConfig.health_stuck_seconds,
) -> tuple[grpc.Server, str]:
    """A bound, not yet started server for a ready engine. Returns (server, "unix://{uds_path}-{rank}").

    `workers` owns the model thread; pass the one the engine was built on (see `serve`).
    """
    built = build_server(
        engine,
        uds_path,
        rank,
        world_size,
        workers=workers,
        grpc_threads=grpc_threads,
        health_stuck_seconds=health_stuck_seconds,
    )
    return built.server, built.address


def build_server(
    engine: Any,
    uds_path: str,
    rank: int,
    world_size: int,
    *,
    workers: EngineWorkers | None = None,
    grpc_threads: int = 16,
    health_stuck_seconds: float = ServeConfig.health_stuck_seconds,
    telemetry: Telemetry | None = None,
) -> BuiltServer:
    path = socket_path(uds_path, rank)
    remove_stale_socket(path)
    workers = workers or EngineWorkers()
    # SERVING from here on: the engine is built and the socket about to be bound.
    shard_health = ShardHealth(workers, engine.health, health_stuck_seconds, (SERVICE_NAME,))
    telemetry = telemetry or Telemetry()
    servicer = LoraxServiceServicer(
        engine, service_urls(uds_path, world_size), workers, shard_health, telemetry
    )
    # Handler threads only convert messages and wait on the model thread; several of them keep Health,
    # Info and ServiceDiscovery answering while one waits on a long Decode.
    server = grpc.server(
        ThreadPoolExecutor(max_workers=grpc_threads, thread_name_prefix="grpc"), options=SERVER_OPTIONS
    )
    generate_pb2_grpc.add_LoraxServiceServicer_to_server(servicer, server)
    health_pb2_grpc.add_HealthServicer_to_server(shard_health.servicer, server)
    reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    address = f"unix://{path}"
    # gRPC binds the socket in add_insecure_port: a umask there makes it 0600 from birth (no window in
    # which another user could connect); the chmod below makes it independent of umask semantics.
    old_umask = os.umask(0o177)
    try:
        server.add_insecure_port(address)
    finally:
        os.umask(old_umask)
    os.chmod(path, 0o600)
    return BuiltServer(server, address, shard_health, workers, telemetry)


def build_telemetry(config: ServeConfig) -> Telemetry:
    """Metrics (HTTP server started) and tracing as the config asks; neither imports anything if off."""
    metrics = tracer = None
    rank = config.shard.rank
    if config.metrics_port is not None:
        from shard_server.server.metrics import MetricsConfig, ShardMetrics

        metrics = ShardMetrics()
        port = config.metrics_port + rank if config.metrics_port else 0
        metrics.serve(MetricsConfig(port=port, host=config.metrics_host))
    if config.otlp_endpoint:
        from shard_server.server.tracing import RpcTracer, TracingConfig

        tracing = TracingConfig(endpoint=config.otlp_endpoint, service_name=config.otlp_service_name)
        tracer = RpcTracer(tracing, rank=rank, world_size=config.shard.world_size)
    return Telemetry(metrics, tracer)


# ---------------------------------------------------------------- logging


class JsonFormatter(logging.Formatter):
    """One JSON object per line, for log shippers."""

    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "thread": record.threadName,
            "message": record.getMessage(),
        }
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False)


def configure_logging(log_format: str, level: str, rank: int) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(
            logging.Formatter(
                f"%(asctime)s %(levelname)s [rank {rank}] %(name)s [%(threadName)s] %(message)s"
            )
        )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


# ---------------------------------------------------------------- process lifecycle


def serve(config: ServeConfig, engine_factory: Callable[[], Any] | None = None) -> int:
    """Run one shard until SIGTERM/SIGINT; returns the process exit code.

    `engine_factory` defaults to `ShardEngine(config.shard)`. It runs on the model thread so that
    thread-local torch state set while building (current CUDA device, process group) is where the
    engine will run.
    """
    shard = config.shard
    configure_logging(config.log_format, config.log_level, shard.rank)
    stop = threading.Event()

    def on_signal(signum: int, frame: object) -> None:
        if stop.is_set():
            log.info("signal %s: already stopping", signal.Signals(signum).name)
        else:
            log.info("signal %s: draining (grace %.0fs)", signal.Signals(signum).name, config.grace_seconds)
        stop.set()

    # Installed before the (slow) engine build so that a SIGTERM during start-up also exits cleanly.
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    if engine_factory is None:

        def engine_factory() -> Any:
            # Imported here: torch and the model load only after the socket path is known to be free.
            from shard_server.engine.engine import ShardEngine

            return ShardEngine(shard)

    workers = EngineWorkers()
    path = socket_path(config.uds_path, shard.rank)
    telemetry = None
    try:
        remove_stale_socket(path)  # fail fast, before the slow engine build, if the path is taken
        engine = workers.model(engine_factory)
        telemetry = build_telemetry(config)
        built = build_server(
            engine,
            config.uds_path,
            shard.rank,
            shard.world_size,
            workers=workers,
            grpc_threads=config.grpc_threads,
            health_stuck_seconds=config.health_stuck_seconds,
            telemetry=telemetry,
        )
    except Exception:
        log.exception("shard rank %d failed to start", shard.rank)
        if telemetry is not None:
            telemetry.close()
        workers.close()
        return 1
    built.server.start()
    log.info("shard rank %d/%d serving on %s", shard.rank, shard.world_size, built.address)
    # Event.wait with a timeout keeps the main thread returning to the interpreter, where signal
    # handlers run.
    while not stop.wait(0.5):
        pass
    built.health.enter_graceful_shutdown()  # NOT_SERVING for health checkers from now on
    # stop(grace): new RPCs are refused at once; RPCs in flight get `grace` seconds to finish.
    built.server.stop(config.grace_seconds).wait()
    workers.close()
    built.telemetry.close()  # flushes the last spans
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    log.info("shard rank %d stopped", shard.rank)
    return 0
