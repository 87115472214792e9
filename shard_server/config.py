"""Typed start-up configuration of one shard process.

`ShardConfig` is what `ShardEngine(config)` receives: every value already resolved (no "auto" device,
no "checkpoint" dtype), so the engine never reads the environment or guesses. Only `shard_server/cli.py`
reads os.environ (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT as torchrun/launch set them) and builds it.
`ServeConfig` adds what only the gRPC server needs (socket path, logging, shutdown grace).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

DEVICES = ("cpu", "cuda")
DTYPES = ("float32", "bfloat16", "float16")
KV_CACHE_DTYPES = ("auto", "fp8_e4m3")
BLOCK_ALLOCATORS = ("shard", "router")
LOG_FORMATS = ("text", "json")


@dataclass(frozen=True)
class ShardConfig:
    model_dir: Path
    device: str = "cpu"  # cpu | cuda (resolved: cuda when available unless given)
    dtype: str = "float32"  # float32 | bfloat16 | float16 (resolved: checkpoint's on cuda, float32 on cpu)
    kv_cache_dtype: str = "auto"  # auto (= dtype) | fp8_e4m3
    # KV cache size after Warmup on CPU (no free-memory query there); on CUDA an upper bound if set.
    max_kv_cache_bytes: int | None = None
    adapter_root: Path | None = None  # where DownloadAdapter puts / LoadAdapter finds adapters
    adapter_memory_fraction: float = 0.1  # share of device memory the adapter store may use
    # Adapters loaded at start-up (ids as LoadAdapter would name them, source LOCAL when a directory);
    # the engine picks their indices and reports them in info().preloaded_adapters.
    preloaded_adapter_ids: tuple[str, ...] = ()
    block_allocator: str = "shard"  # shard: the shard allocates KV blocks | router: requests bring them
    max_batch_size: int | None = None  # None: bounded by the KV cache only (graphs up to 256)
    cuda_graphs: bool = True  # decode replays CUDA graphs per batch bucket (CUDA only)
    # Tensor parallelism (torch.distributed, env:// style rendezvous values passed explicitly).
    rank: int = 0
    world_size: int = 1
    master_addr: str = "127.0.0.1"
    master_port: int | None = None

    def __post_init__(self) -> None:
        _one_of("device", self.device, DEVICES)
        _one_of("dtype", self.dtype, DTYPES)
        _one_of("kv_cache_dtype", self.kv_cache_dtype, KV_CACHE_DTYPES)
        _one_of("block_allocator", self.block_allocator, BLOCK_ALLOCATORS)
        if self.max_kv_cache_bytes is not None and self.max_kv_cache_bytes <= 0:
            raise ValueError(f"max_kv_cache_bytes must be > 0, got {self.max_kv_cache_bytes}")
        if not 0.0 < self.adapter_memory_fraction <= 1.0:
            raise ValueError(f"adapter_memory_fraction must be in (0, 1], got {self.adapter_memory_fraction}")
        if self.max_batch_size is not None and self.max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {self.max_batch_size}")
        if self.world_size < 1 or not 0 <= self.rank < self.world_size:
            raise ValueError(
                f"need 0 <= rank < world_size, got rank={self.rank} world_size={self.world_size}"
            )


@dataclass(frozen=True)
class ServeConfig:
    shard: ShardConfig
    uds_path: str  # the socket is {uds_path}-{rank}
    log_format: str = "text"
    log_level: str = "INFO"
    # SIGTERM: how long the RPC in flight may take to finish before the server is torn down.
    grace_seconds: float = 30.0
    grpc_threads: int = 16  # gRPC handler threads; model work still runs on one thread
    # Tests only (hidden flag --test-hold-decode-file): every Decode waits on the model thread until this
    # file exists, so that a test can act while an RPC is certainly in flight (shard_server/testing/hold.py).
    test_hold_decode_file: Path | None = None

    def __post_init__(self) -> None:
        _one_of("log_format", self.log_format, LOG_FORMATS)
        if not self.uds_path:
            raise ValueError("uds_path must not be empty")

    @property
    def socket_path(self) -> str:
        return f"{self.uds_path}-{self.shard.rank}"


def _one_of(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(allowed)}; got {value!r}")
