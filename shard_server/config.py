"""Typed start-up configuration of one shard process.

`ShardConfig` is what `ShardEngine(config)` receives: every value already resolved (no "auto" device,
no "checkpoint" dtype), so the engine never reads the environment or guesses. Only
`shard_server/server/cli.py` reads os.environ (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT as
torchrun/launch set them); `shard_server/server/options.py` builds both configs from the command line.
`ServeConfig` adds what only the gRPC server needs (socket path, logging, shutdown grace, health).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

DEVICES = ("cpu", "cuda")
DTYPES = ("float32", "bfloat16", "float16")
KV_CACHE_DTYPES = ("auto", "fp8_e4m3")
BLOCK_ALLOCATORS = ("shard", "router")
LOG_FORMATS = ("text", "json")
MAX_SPECULATIVE_TOKENS = 16  # also bounded by the KV block size with a sliding window (engine)
# "auto": the measured-fastest backend that can run (model/attention BACKENDS order)
ATTENTION_BACKENDS = ("auto", "torch_cuda", "flash_attn", "reference")


@dataclass(frozen=True)
class GrammarConfig:
    """Structured output (JSON schemas): bounds on what one schema may cost, caches, threads."""

    max_schema_bytes: int = 64 * 1024
    max_depth: int = 32  # nesting of objects/arrays in the schema document itself
    compile_timeout_s: float = 5.0  # one rank only (generation/grammar.py says why)
    cache_size: int = 512  # compiled schemas (and refusals) kept
    compile_threads: int = 2
    mask_threads: int = 8  # llguidance's pool that fills a step's masks in parallel
    # llguidance limits (None: llguidance's defaults)
    max_grammar_size: int | None = None
    max_lexer_states: int | None = None
    initial_lexer_fuel: int | None = None
    step_lexer_fuel: int | None = None


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
    # Device slots laid out at start-up for adapters of rank <= adapter_slot_rank on all seven projections
    # (then fixed: beyond them the least recently used adapters move to host memory), so a LoadAdapter
    # that fits is a copy into a free slot: no re-layout, no CUDA graph recapture. 0: the stacks are laid
    # out by the first LoadAdapter and grow with the adapters (each growth recaptures the LoRA graphs).
    adapter_slots: int = 0
    adapter_slot_rank: int = 16
    # S3 adapters are downloaded here (one directory per adapter, least recently used deleted first
    # beyond adapter_cache_max_bytes); None: S3 ids are refused.
    adapter_cache_dir: Path | None = None
    adapter_cache_max_bytes: int = 20 << 30
    # Adapters loaded at start-up (ids as LoadAdapter would name them, source LOCAL when a directory);
    # the engine picks their indices and reports them in info().preloaded_adapters.
    preloaded_adapter_ids: tuple[str, ...] = ()
    block_allocator: str = "shard"  # shard: the shard allocates KV blocks | router: requests bring them
    max_batch_size: int | None = None  # None: bounded by the KV cache only (graphs up to 256)
    cuda_graphs: bool = True  # decode replays CUDA graphs per batch bucket (CUDA only)
    # Speculative decoding: draft tokens verified per decode step (n-gram lookup, or Medusa heads where
    # present); 0 = off. Reported as Info.speculate.
    speculative_tokens: int = 0
    # Decode overlap: enqueue the next step's forward before this step's response leaves (no change in
    # tokens; on a CPU it only moves work earlier, so the CLI turns it on for cuda by default).
    overlap: bool = False
    # Decode LoRA beside the base matmuls: each projection group's shrink and expand run on a side stream
    # into a delta that the next kernel adds (model/adapters/batch.py); off: added in place, in order.
    lora_stream: bool = True
    attention_backend: str = "auto"  # or one name of ATTENTION_BACKENDS (an error says why it cannot run)
    # Tensor parallelism (torch.distributed, env:// style rendezvous values passed explicitly).
    rank: int = 0
    world_size: int = 1
    master_addr: str = "127.0.0.1"
    master_port: int | None = None
    grammar: GrammarConfig = field(default_factory=GrammarConfig)

    def __post_init__(self) -> None:
        _one_of("device", self.device, DEVICES)
        _one_of("dtype", self.dtype, DTYPES)
        _one_of("kv_cache_dtype", self.kv_cache_dtype, KV_CACHE_DTYPES)
        _one_of("block_allocator", self.block_allocator, BLOCK_ALLOCATORS)
        _one_of("attention_backend", self.attention_backend, ATTENTION_BACKENDS)
        if self.max_kv_cache_bytes is not None and self.max_kv_cache_bytes <= 0:
            raise ValueError(f"max_kv_cache_bytes must be > 0, got {self.max_kv_cache_bytes}")
        if self.adapter_cache_max_bytes <= 0:
            raise ValueError(f"adapter_cache_max_bytes must be > 0, got {self.adapter_cache_max_bytes}")
        if not 0.0 < self.adapter_memory_fraction <= 1.0:
            raise ValueError(f"adapter_memory_fraction must be in (0, 1], got {self.adapter_memory_fraction}")
        if self.adapter_slots < 0 or self.adapter_slot_rank < 1:
            raise ValueError(
                f"need adapter_slots >= 0 and adapter_slot_rank >= 1, got {self.adapter_slots} and "
                f"{self.adapter_slot_rank}"
            )
        if self.max_batch_size is not None and self.max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {self.max_batch_size}")
        if not 0 <= self.speculative_tokens <= MAX_SPECULATIVE_TOKENS:
            raise ValueError(
                f"speculative_tokens must be in 0..{MAX_SPECULATIVE_TOKENS}, got {self.speculative_tokens}"
            )
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
    # Prometheus /metrics over HTTP (None: off); rank r listens on metrics_port + r (0: any free port).
    metrics_port: int | None = None
    metrics_host: str = "127.0.0.1"
    # OpenTelemetry spans over OTLP/gRPC to this receiver (None: off).
    otlp_endpoint: str | None = None
    otlp_service_name: str = "lorax-shard"
    # Health turns UNAVAILABLE / NOT_SERVING once one engine call has run this long: above any real
    # call (Warmup with graph capture on a 7B takes about a minute), below the 10-minute timeout of a
    # collective whose peer rank died.
    health_stuck_seconds: float = 300.0
    # Tests only (hidden flag --test-hold-decode-file): every Decode waits on the model thread until this
    # file exists, so that a test can act while an RPC is certainly in flight (shard_server/testing/hold.py).
    test_hold_decode_file: Path | None = None

    def __post_init__(self) -> None:
        _one_of("log_format", self.log_format, LOG_FORMATS)
        if not self.uds_path:
            raise ValueError("uds_path must not be empty")
        if self.metrics_port is not None and not 0 <= self.metrics_port <= 65535:
            raise ValueError(f"metrics_port must be in 0..65535, got {self.metrics_port}")
        if self.grace_seconds < 0:
            raise ValueError(f"grace_seconds must be >= 0, got {self.grace_seconds}")
        if self.health_stuck_seconds <= 0:
            raise ValueError(f"health_stuck_seconds must be > 0, got {self.health_stuck_seconds}")
        if self.grpc_threads < 1:
            raise ValueError(f"grpc_threads must be >= 1, got {self.grpc_threads}")

    @property
    def socket_path(self) -> str:
        return f"{self.uds_path}-{self.shard.rank}"


def _one_of(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(allowed)}; got {value!r}")
