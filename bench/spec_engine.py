"""The real engine for the speculative benches: a ShardEngine configured as `shard-server serve` would
configure it (CUDA graphs and verify graphs captured at Warmup, the decode overlap on CUDA), chat prompts,
and a generation loop that drives it the way the router does (Prefill, then Decode until every request
finished; finished requests leave the batch inside the engine, as after the router's FilterBatch)."""

from __future__ import annotations

import gc
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import torch

from shard_server.engine.speculative.speculator import BASE_MEDUSA_DIR

T = TypeVar("T")


@dataclass(frozen=True)
class EngineSettings:
    device: str = "cuda"
    dtype: str = "bfloat16"
    max_batch: int = 16  # CUDA graphs are captured for batch buckets up to this
    max_input: int = 512  # Warmup's longest request: graphs cover max_input + max_new tokens
    max_new: int = 256
    kv_bytes: int = 2 << 30  # an upper bound on CUDA: engines run one after another on one device
    cuda_graphs: bool = True


def make_engine(model_dir: Path, k: int, s: EngineSettings):
    """A warmed-up engine with `k` speculative tokens (0: off) over `model_dir`."""
    from shard_server.config import ShardConfig
    from shard_server.engine.engine import ShardEngine
    from shard_server.types import BatchSpec, RequestSpec, StoppingParams

    cfg = ShardConfig(model_dir=Path(model_dir), device=s.device, dtype=s.dtype, speculative_tokens=k,
                      max_batch_size=s.max_batch, max_kv_cache_bytes=s.kv_bytes, cuda_graphs=s.cuda_graphs,
                      overlap=s.device == "cuda")  # fmt: skip  # the overlap as serve resolves it
    engine = ShardEngine(cfg)
    warm = RequestSpec(id=0, input_ids=tuple(3 + i % 300 for i in range(s.max_input)),
                       stopping=StoppingParams(max_new_tokens=2))  # fmt: skip
    rows = min(4, s.max_batch)
    engine.warmup(BatchSpec(id=0, requests=(warm,) * rows), s.max_input, rows * s.max_input, s.max_new)
    return engine


def with_engine(model_dir: Path, k: int, s: EngineSettings, work: Callable[[object], T]) -> T:
    """work(engine) on a fresh engine, whose device memory is freed before this returns (the next
    engine sizes its KV cache from what is free)."""
    engine = make_engine(model_dir, k, s)
    dev = engine.device
    try:
        return work(engine)
    finally:
        engine.clear_cache()
        engine.grammars.close()
        del engine
        gc.collect()
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
            torch.cuda.empty_cache()


def chat_ids(tokenizer, text: str) -> list[int]:
    """The prompt as the router would send it: the model's chat template, or the text itself."""
    if getattr(tokenizer, "chat_template", None):
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": text}],
                                               add_generation_prompt=True, tokenize=False)  # fmt: skip
        return list(tokenizer(prompt, add_special_tokens=False).input_ids)  # the template has its BOS
    return list(tokenizer(text).input_ids)


@dataclass
class Generation:
    """Greedy outputs of a list of prompts and what the decode steps cost."""

    tokens: list[list[int]] = field(default_factory=list)  # per prompt: every generated token
    prefill_s: float = 0.0
    decode_s: float = 0.0  # Decode calls only (the speculation's share), synchronized
    steps: int = 0  # Decode calls
    row_steps: int = 0  # sum over Decode calls of the rows stepped
    decode_tokens: int = 0  # tokens emitted by Decode calls (the first token comes from Prefill)
    drafted: int = 0  # speculator counters over this generation
    accepted: int = 0
    medusa_drafted: int = 0

    @property
    def tok_s(self) -> float:
        return self.decode_tokens / self.decode_s if self.decode_s > 0 else 0.0

    @property
    def tokens_per_step(self) -> float:
        """Tokens a row gains per Decode step (1 without speculation)."""
        return self.decode_tokens / self.row_steps if self.row_steps else 0.0

    @property
    def acceptance(self) -> float | None:
        return self.accepted / self.drafted if self.drafted else None


class Ids:
    """Request and batch ids, unique over an engine's life."""

    def __init__(self) -> None:
        self.n = 0

    def __call__(self) -> int:
        self.n += 1
        return self.n


def generate(engine, prompts: list[list[int]], max_new: int, batch: int, ids: Ids | None = None,
             sampling=None) -> Generation:  # fmt: skip
    """Greedy (or `sampling`) generation of `prompts`, `batch` at a time, in order."""
    from shard_server.types import BatchSpec, RequestSpec, SamplingParams, StoppingParams

    ids = ids or Ids()
    sampling = sampling or SamplingParams()
    out = Generation(tokens=[[] for _ in prompts])
    spec0 = engine.speculator.stats() if engine.speculator is not None else None
    for start in range(0, len(prompts), batch):
        by_id: dict[int, int] = {}
        reqs = []
        for j in range(start, min(start + batch, len(prompts))):
            rid = ids()
            by_id[rid] = j
            reqs.append(RequestSpec(id=rid, input_ids=tuple(prompts[j]), sampling=sampling,
                                    stopping=StoppingParams(max_new_tokens=max_new)))  # fmt: skip
        t0 = time.perf_counter()
        res = engine.prefill(BatchSpec(id=ids(), requests=tuple(reqs)))
        for g in res.generations:
            out.tokens[by_id[g.request_id]].extend(g.next_tokens.ids)
        _sync(engine.device)
        t1 = time.perf_counter()
        running = res.batch
        while running is not None:
            out.row_steps += running.size
            res = engine.decode([running.id])
            out.steps += 1
            for g in res.generations:
                out.tokens[by_id[g.request_id]].extend(g.next_tokens.ids)
                out.decode_tokens += len(g.next_tokens.ids)
            running = res.batch
        _sync(engine.device)
        out.prefill_s += t1 - t0
        out.decode_s += time.perf_counter() - t1
    _count_drafts(engine, spec0, out)
    return out


def generate_continuous(engine, prompts: list[list[int]], max_new: int, batch: int, ids: Ids | None = None,
                        sampling=None) -> Generation:  # fmt: skip
    """Greedy (or `sampling`) generation of `prompts` the way a router keeps a server busy: up to `batch`
    requests running; whenever some finish, the next ones in the queue are prefilled (a new batch) and
    decoded together with the running ones (a Decode of both batches: concatenation). So the batch stays
    full until the queue is empty, and rows that finish early are replaced instead of leaving the
    slowest rows to run alone. decode_s here is the wall time of the whole run, prefills included
    (they are the same work with speculation on or off)."""
    from shard_server.types import BatchSpec, RequestSpec, SamplingParams, StoppingParams

    ids = ids or Ids()
    sampling = sampling or SamplingParams()
    out = Generation(tokens=[[] for _ in prompts])
    spec0 = engine.speculator.stats() if engine.speculator is not None else None
    by_id: dict[int, int] = {}
    queue = list(range(len(prompts)))
    running = None
    t0 = time.perf_counter()
    while queue or running is not None:
        live = 0 if running is None else len(running.request_ids)
        batches = [] if running is None else [running.id]
        if queue and live < batch:
            reqs = []
            for j in queue[: batch - live]:
                rid = ids()
                by_id[rid] = j
                reqs.append(RequestSpec(id=rid, input_ids=tuple(prompts[j]), sampling=sampling,
                                        stopping=StoppingParams(max_new_tokens=max_new)))  # fmt: skip
            del queue[: len(reqs)]
            res = engine.prefill(BatchSpec(id=ids(), requests=tuple(reqs)))
            for g in res.generations:  # the first tokens count as one-token steps of their rows
                out.tokens[by_id[g.request_id]].extend(g.next_tokens.ids)
                out.decode_tokens += len(g.next_tokens.ids)
                out.row_steps += 1
            if res.batch is not None:
                batches.append(res.batch.id)
        if not batches:
            running = None
            continue
        res = engine.decode(batches)
        out.steps += 1
        out.row_steps += len(res.generations)
        for g in res.generations:
            out.tokens[by_id[g.request_id]].extend(g.next_tokens.ids)
            out.decode_tokens += len(g.next_tokens.ids)
        running = res.batch
    _sync(engine.device)
    out.decode_s = time.perf_counter() - t0
    _count_drafts(engine, spec0, out)
    return out


def _count_drafts(engine, before: dict | None, out: Generation) -> None:
    """The speculator's counters grown since `before` (its stats() when the generation began)."""
    if before is not None:
        now = engine.speculator.stats()
        out.drafted = now["drafted"] - before["drafted"]
        out.accepted = now["accepted"] - before["accepted"]
        out.medusa_drafted = now["medusa_drafted"] - before["medusa_drafted"]


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def model_view(src: Path, dst: Path, medusa: Path | None = None) -> Path:
    """`dst`: the files of model directory `src` as links, with `medusa` (a directory of heads) copied
    in as dst/medusa, or no medusa/ at all: an engine over `dst` drafts with those heads or n-gram only,
    whatever `src` holds."""
    shutil.rmtree(dst, ignore_errors=True)
    dst.mkdir(parents=True)
    for f in Path(src).iterdir():
        if f.name != BASE_MEDUSA_DIR:
            os.symlink(f.resolve(), dst / f.name)
    if medusa is not None:
        shutil.copytree(medusa, dst / BASE_MEDUSA_DIR)  # the loader refuses linked Medusa files
    return dst
