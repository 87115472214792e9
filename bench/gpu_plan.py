"""What one `python -m bench.gpu` run measures (Plan) and where its rows go (Report, log, fail_soft).

Shared by bench/gpu.py (the CLI and summary), bench/gpu_sections.py and bench/gpu_baselines.py.
"""

from __future__ import annotations

import gc
import json
import os
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from bench import common
from bench.common import ModelShape

REPO = Path(__file__).resolve().parent.parent
ROW_KEYS = ("kind", "system", "batch", "adapters", "tok_s", "step_ms", "roofline_fraction", "ms")
RUN_START = time.perf_counter()  # log times and --deadline-seconds count from here


@dataclass
class Plan:
    device: torch.device
    dtype: torch.dtype
    shape: ModelShape
    smoke: bool = False
    prompt: int = 512
    new_tokens: int = 128
    decode_batches: list[int] = field(default_factory=lambda: [1, 8, 32, 64, 128])
    adapter_batches: list[int] = field(default_factory=lambda: [32, 64, 128])
    adapter_counts: list[int] = field(default_factory=lambda: [1, 8, 32])
    dora_batches: list[int] = field(default_factory=lambda: [1, 64])
    dora_counts: list[int] = field(default_factory=lambda: [8])
    rank: int = 16
    prefill_prompts: int = 16
    prefill_len: int = 1024
    prefill_reps: int = 3
    load_reps: int = 5
    hf_batches: list[int] = field(default_factory=lambda: [1, 32, 64])
    hf_new_tokens: int = 64
    peft_batches: list[int] = field(default_factory=lambda: [32, 64])
    peft_adapters: int = 8
    peft_new_tokens: int = 16
    e2e_batches: list[int] = field(default_factory=lambda: [1, 64, 128])
    overlap: bool = True  # decode overlap in the engine (e2e runs both settings and records each)
    max_decode_seconds: float = 6.0  # per decode row: stop early rather than blow the run's time
    prefill_chunk_tokens: int = 16384  # decode batches are prefilled in chunks of at most this
    copy_bytes: int = 1 << 30
    matmul_n: int = 8192
    cuda_graphs: bool | None = None  # None: the engine's default (ShardConfig.cuda_graphs)
    rotation_adapters: int = 1000  # registered adapters in the rotation (bench/gpu_rotation.py)
    rotation_running: int = 64  # requests running at a time
    rotation_slots: int = 64  # device slots at most (smaller than the working set)
    rotation_zipf: float = 1.1
    rotation_seconds: float = 20.0  # per driver run (baseline, rotation), after the first fill
    rotation_prompt: int = 128
    rotation_unique_files: int = 16
    attention_backend: str = "auto"  # ShardConfig.attention_backend; every shard row records the one used

    @property
    def elem(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()


def smoke_plan() -> Plan:
    return Plan(
        device=torch.device("cpu"), dtype=torch.float32, shape=common.TINY, smoke=True, prompt=24,
        new_tokens=8, decode_batches=[1, 4], adapter_batches=[4], adapter_counts=[1, 2], rank=16,
        dora_batches=[4], dora_counts=[2],
        prefill_prompts=2, prefill_len=48, prefill_reps=2, load_reps=3, hf_batches=[1, 2], hf_new_tokens=4,
        peft_batches=[2], peft_adapters=2, peft_new_tokens=3, e2e_batches=[1, 4], max_decode_seconds=10.0,
        prefill_chunk_tokens=64, copy_bytes=1 << 24, matmul_n=256, rotation_adapters=24, rotation_running=6,
        rotation_slots=8, rotation_seconds=3.0, rotation_prompt=16, rotation_unique_files=4,
    )  # fmt: skip


class Report:
    """The JSON of one `bench.gpu` run; saved after every change so that a run cut short keeps its rows."""

    def __init__(self, path: Path, device: str, commit: str):
        self.path = path
        self.data: dict = {
            "device": device, "commit": commit, "bandwidth_GBps": None, "matmul_tflops": None, "rows": [],
        }  # fmt: skip

    @property
    def rows(self) -> list[dict]:
        return self.data["rows"]

    def add(self, kind: str, system: str, **values) -> dict:
        row = {k: None for k in ROW_KEYS} | {"kind": kind, "system": system} | values
        self.rows.append(row)
        self.save()
        shown = {k: shorten(v) for k, v in row.items() if v is not None and k not in ("kind", "system")}
        log(f"  row {kind}/{system}: {shown}")
        return row

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        text = json.dumps(self.data, indent=1)
        self.path.write_text(text)
        out = os.environ.get("OUT")
        if out:
            Path(out).mkdir(parents=True, exist_ok=True)
            (Path(out) / self.path.name).write_text(text)


def shorten(v):
    if isinstance(v, float):
        return round(v, 4)
    if isinstance(v, list) and len(v) > 8:
        return f"[{len(v)} values]"
    return v


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - RUN_START:7.1f}s] {msg}", flush=True)


def free_device() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def fail_soft(report: Report, kind: str, system: str, fn: Callable[[], object], **where) -> None:
    """Run one measurement; an exception becomes a row naming it, and the run goes on."""
    try:
        fn()
    except Exception as e:  # noqa: BLE001 (a benchmark must survive any one failure)
        traceback.print_exc()
        report.add(kind, system, **where, error=f"{type(e).__name__}: {e}"[:500])
        free_device()
