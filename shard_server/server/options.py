"""The options of `serve`, each defined once; `serve`'s and `launch`'s parsers, launch's argv for every rank
and the typed configs are all derived from `OPTIONS`.

An option names the config field it fills (`shard.<ShardConfig field>` or `serve.<ServeConfig field>`);
its default is that field's default unless it says otherwise (device and dtype default to None: resolved
at start from the machine and the checkpoint). A new option is one entry here and one config field.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shard_server.config import (
    ATTENTION_BACKENDS,
    BLOCK_ALLOCATORS,
    DEVICES,
    DTYPES,
    KV_CACHE_DTYPES,
    LOG_FORMATS,
    ServeConfig,
    ShardConfig,
)

_FIELD_DEFAULT = object()  # sentinel: take the default of the config field the option fills
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


@dataclass(frozen=True)
class Option:
    name: str  # "--kv-cache-dtype"; without dashes: a positional argument
    field: str  # "shard.kv_cache_dtype" | "serve.grace_seconds"
    help: str
    type: Callable[[str], Any] = str
    choices: tuple[str, ...] | None = None
    many: bool = False  # zero or more values (nargs="*"); a tuple in the config
    switch: bool = False  # --name / --no-name
    required: bool = False
    default: Any = _FIELD_DEFAULT
    to_config: Callable[[Any], Any] | None = None  # the parsed value -> the config field's type

    @property
    def scope(self) -> str:
        return self.field.split(".", 1)[0]

    @property
    def dest(self) -> str:
        return self.field.split(".", 1)[1]

    @property
    def positional(self) -> bool:
        return not self.name.startswith("-")

    def default_value(self) -> Any:
        if self.default is not _FIELD_DEFAULT:
            return self.default
        cls = ShardConfig if self.scope == "shard" else ServeConfig
        f = {f.name: f for f in dataclasses.fields(cls)}[self.dest]
        value = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if value is dataclasses.MISSING:
            raise AssertionError(f"{self.name}: config field {self.field} has no default; make it required")
        return list(value) if self.many else value


def _path(value: str | None) -> Path | None:
    return None if value is None else Path(value)


OPTIONS: tuple[Option, ...] = (
    Option(
        "model_dir",
        "shard.model_dir",
        "Hugging Face Mistral directory (config.json, safetensors)",
        to_config=Path,
    ),
    Option("--uds-path", "serve.uds_path", "socket path prefix; rank r listens on PATH-r", required=True),
    Option(
        "--device", "shard.device", "default: cuda when available, else cpu", choices=DEVICES, default=None
    ),
    Option(
        "--dtype",
        "shard.dtype",
        "default: the checkpoint's on cuda, float32 on cpu",
        choices=DTYPES,
        default=None,
    ),
    Option("--kv-cache-dtype", "shard.kv_cache_dtype", "KV cache element type", choices=KV_CACHE_DTYPES),
    Option(
        "--max-kv-cache-bytes",
        "shard.max_kv_cache_bytes",
        "KV cache size after Warmup (CPU: required bound)",
        type=int,
    ),
    Option(
        "--adapter-root", "shard.adapter_root", "directory for downloaded / local adapters", to_config=_path
    ),
    Option(
        "--adapter-memory-fraction",
        "shard.adapter_memory_fraction",
        "share of device memory for adapters",
        type=float,
    ),
    Option(
        "--adapter-slots",
        "shard.adapter_slots",
        "device adapter slots laid out at start (rank <= --adapter-slot-rank, all 7 projections): a "
        "LoadAdapter that fits never re-lays out or recaptures graphs; 0: grow on demand",
        type=int,
    ),
    Option(
        "--adapter-slot-rank",
        "shard.adapter_slot_rank",
        "largest LoRA rank the --adapter-slots stacks hold without a re-layout",
        type=int,
    ),
    Option(
        "--adapter-cache-dir",
        "shard.adapter_cache_dir",
        "where S3 adapters are downloaded (default $XDG_CACHE_HOME or ~/.cache, /shard-server/adapters)",
        default=None,
        to_config=_path,
    ),
    Option(
        "--adapter-cache-max-bytes",
        "shard.adapter_cache_max_bytes",
        "size bound of --adapter-cache-dir; least recently used adapters are deleted beyond it",
        type=int,
    ),
    Option(
        "--preloaded-adapter-ids",
        "shard.preloaded_adapter_ids",
        "adapters loaded at start (indices 1..)",
        many=True,
        to_config=tuple,
    ),
    Option(
        "--block-allocator",
        "shard.block_allocator",
        "shard: the shard allocates KV blocks; router: requests bring blocks and slots",
        choices=BLOCK_ALLOCATORS,
    ),
    Option(
        "--max-batch-size",
        "shard.max_batch_size",
        "most requests in one batch (default: KV cache bound)",
        type=int,
    ),
    Option(
        "--cuda-graphs",
        "shard.cuda_graphs",
        "decode replays CUDA graphs per batch bucket (CUDA only)",
        switch=True,
    ),
    Option(
        "--attention-backend",
        "shard.attention_backend",
        "auto: the measured-fastest that can run (torch_cuda before flash_attn on CUDA)",
        choices=ATTENTION_BACKENDS,
    ),
    Option(
        "--overlap",
        "shard.overlap",
        "decode: enqueue the next step's forward before the response leaves (default: on for cuda)",
        switch=True,
        default=None,
    ),
    Option(
        "--lora-stream",
        "shard.lora_stream",
        "decode: run each projection's LoRA on a side stream beside its base matmul (CUDA)",
        switch=True,
    ),
    Option(
        "--speculative-tokens",
        "shard.speculative_tokens",
        "speculative decoding: draft tokens verified per decode step (n-gram / Medusa); 0 = off",
        type=int,
    ),
    Option("--log-format", "serve.log_format", "text or one JSON object per line", choices=LOG_FORMATS),
    Option("--log-level", "serve.log_level", "root log level", type=str.upper, choices=LOG_LEVELS),
    Option("--grace-seconds", "serve.grace_seconds", "SIGTERM: time the RPC in flight may take", type=float),
    Option(
        "--health-stuck-seconds",
        "serve.health_stuck_seconds",
        "Health answers UNAVAILABLE once one engine call has run this long",
        type=float,
    ),
    Option(
        "--grpc-threads",
        "serve.grpc_threads",
        "gRPC handler threads (model work runs on one thread)",
        type=int,
    ),
    Option(
        "--metrics-port",
        "serve.metrics_port",
        "serve Prometheus metrics at http://HOST:PORT/metrics (rank r: PORT + r); off by default",
        type=int,
    ),
    Option("--metrics-host", "serve.metrics_host", "address the metrics server binds"),
    Option(
        "--otlp-endpoint",
        "serve.otlp_endpoint",
        "export a span per RPC over OTLP/gRPC to this collector (host:port); off by default",
    ),
    Option("--otlp-service-name", "serve.otlp_service_name", "service.name of the spans"),
)


def add_options(parser: argparse.ArgumentParser, options: Sequence[Option] = OPTIONS) -> None:
    for o in options:
        kwargs: dict[str, Any] = {"help": o.help}
        if o.switch:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["type"] = o.type
            if o.choices is not None:
                kwargs["choices"] = o.choices
            if o.many:
                kwargs["nargs"] = "*"
        if o.positional:
            parser.add_argument(o.dest, metavar=o.dest.upper(), **kwargs)
            continue
        if o.required:
            kwargs["required"] = True
        else:
            kwargs["default"] = o.default_value()
        parser.add_argument(o.name, dest=o.dest, **kwargs)


def _text(value: Any) -> str:
    return repr(value) if isinstance(value, float) else str(value)  # repr: a float round-trips exactly


def to_argv(args: argparse.Namespace, options: Sequence[Option] = OPTIONS) -> list[str]:
    """The command line that parses back to the same values of `options` (positionals first, so that a
    many-valued option cannot swallow them)."""
    argv: list[str] = []
    for o in sorted(options, key=lambda o: not o.positional):
        value = getattr(args, o.dest)
        if o.positional:
            argv.append(_text(value))
        elif o.switch:
            if value is not None:  # None: resolved at start (e.g. --overlap by the device)
                argv.append(o.name if value else f"--no-{o.name[2:]}")
        elif o.many:
            if value:
                argv += [o.name, *map(_text, value)]
        elif value is not None:
            argv += [o.name, _text(value)]
    return argv


def _checkpoint_dtype(model_dir: Path) -> str:
    """The dtype config.json names (transformers 5: `dtype`, older: `torch_dtype`); bfloat16 if none."""
    try:
        cfg = json.loads((model_dir / "config.json").read_text())
    except (OSError, ValueError):
        return "bfloat16"  # the engine reports the unreadable directory itself
    name = str(cfg.get("dtype") or cfg.get("torch_dtype") or "bfloat16").removeprefix("torch.")
    return name if name in DTYPES else "bfloat16"


def _default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _default_cache_dir(env: Mapping[str, str]) -> Path:
    base = env.get("XDG_CACHE_HOME") or str(Path(env.get("HOME") or "/tmp") / ".cache")
    return Path(base) / "shard-server" / "adapters"


def serve_config(args: argparse.Namespace, env: Mapping[str, str]) -> ServeConfig:
    """Parsed options + the rendezvous values torchrun/launch put in the environment -> ServeConfig.
    ValueError when a value is out of range (the configs check themselves)."""
    values: dict[str, dict[str, Any]] = {"shard": {}, "serve": {}}
    for o in OPTIONS:
        value = getattr(args, o.dest)
        values[o.scope][o.dest] = o.to_config(value) if o.to_config is not None else value
    shard = values["shard"]
    shard["device"] = shard["device"] or _default_device()
    if shard["overlap"] is None:  # on a CPU the overlap only moves work earlier: nothing to hide
        shard["overlap"] = shard["device"] == "cuda"
    if shard["dtype"] is None:
        shard["dtype"] = _checkpoint_dtype(shard["model_dir"]) if shard["device"] == "cuda" else "float32"
    if shard["adapter_cache_dir"] is None:  # resolved by each rank from its own environment
        shard["adapter_cache_dir"] = _default_cache_dir(env)
    port = env.get("MASTER_PORT")
    shard.update(
        rank=int(env.get("RANK", "0")),
        world_size=int(env.get("WORLD_SIZE", "1")),
        master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
        master_port=int(port) if port else None,
    )
    return ServeConfig(shard=ShardConfig(**shard), **values["serve"])
