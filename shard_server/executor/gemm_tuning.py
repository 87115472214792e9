"""The decode graphs' matmuls with the fastest algorithm cuBLASLt has for them, measured on this device.

torch runs a matmul with the first algorithm of the library's heuristic. For the GEMV-shaped decode
matmuls of a 7B model that pick leaves time on the table: on an H200, per layer at 128 rows, the best
of cuBLASLt's own candidates took 128.1 us against 132.9 us for torch's best setting (0.15 ms a step;
bench/results/h200-lt-algos-2026-12-01.json, bench/lt_algos.py). So while a CUDA graph is captured,
every projection (qkv, o, gate_up, down) is bound to a `GemmTuner`:

    linear(x) during a capture -> tuner.matmul(x, w)
        key = (M, N, K, dtype, the graph's GemmPolicy, SMs reserved for a LoRA side stream)
        first time: time F.linear under the policy and every admissible candidate (model/kernels/
                    cublaslt.py; each checked against F.linear, <= 4 bf16 ulps) over the projection's
                    weights of several layers (so each launch streams from HBM, as in the model);
                    keep the fastest candidate if it beats F.linear by MIN_GAIN, else F.linear
        then:       the kept choice (captured into the graph like any matmul)
    admissible: any SM target for a graph without a side stream; with one, targets that leave its
                SMs free (the side stream's kernels need them: gemm_policy.py)

Only matmuls of at least TUNE_MIN_ROWS rows and TUNE_MIN_WEIGHT_BYTES of weight are tuned (below, the
heuristic's pick was within noise of the best: same file); eager forwards never see the tuner. A
failure of the library (or no cuBLASLt in the process) leaves every matmul to F.linear, with one warning.
Candidates sum in another order than torch's pick, so a tuned graph's logits differ from the eager
forward's by bf16 rounding, as torch's own cuBLAS / cuBLASLt choices already do.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from model.kernels.cublaslt import CublasLtError, LtCandidate, LtPlan, LtProblem, LtRuntime
from shard_server.executor.gemm_policy import GemmPolicy

log = logging.getLogger(__name__)

TUNE_MIN_ROWS = 48
TUNE_MIN_WEIGHT_BYTES = 8 << 20
MIN_GAIN = 0.02  # a candidate replaces F.linear only when this much faster (timing noise is ~1%)
ROTATE_LAYERS = 8  # weights cycled while timing (the largest projection's 8 copies exceed the L2)
LAUNCHES, REPLAYS = 10, 5  # launches per timing graph, replays timed (median)
WORKSPACE_LIMITS = (0, 1 << 20, 32 << 20)  # heuristic queries per SM target (cublaslt.LtPlan)


def projection_modules(model) -> dict[str, list[torch.nn.Module]]:
    """The linear modules a decode graph's matmuls run in, by projection, in layer order."""
    layers = model.model.layers
    return {
        "qkv_proj": [layer.self_attn.qkv_proj for layer in layers],
        "o_proj": [layer.self_attn.o_proj for layer in layers],
        "gate_up_proj": [layer.mlp.gate_up_proj for layer in layers],
        "down_proj": [layer.mlp.down_proj for layer in layers],
    }


@dataclass
class TunedMatmul:
    """x @ w^T with one cuBLASLt candidate (shapes of its plan only)."""

    plan: LtPlan
    candidate: LtCandidate
    us: float  # measured per launch
    torch_us: float  # F.linear under the graph's policy, same measurement

    def __call__(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        out = torch.empty(x.shape[0], w.shape[0], dtype=x.dtype, device=x.device)
        return self.plan.run(x, w, out, self.candidate)


@dataclass(frozen=True)
class _Key:
    m: int
    n: int
    k: int
    dtype: torch.dtype
    policy: GemmPolicy
    reserved_sms: int


@dataclass
class GemmTuner:
    """Tunes and remembers the decode graphs' matmuls of one device (module docstring)."""

    device: torch.device
    sms: int
    min_rows: int = TUNE_MIN_ROWS
    min_weight_bytes: int = TUNE_MIN_WEIGHT_BYTES
    min_gain: float = MIN_GAIN  # tests: -1 takes the fastest candidate even when torch's pick is faster
    runtime: LtRuntime = field(default_factory=LtRuntime)
    choices: dict[_Key, TunedMatmul | None] = field(default_factory=dict)
    seconds: float = 0.0  # spent timing candidates
    broken: str | None = None  # why the tuner stopped (every matmul then F.linear)
    _rotation: dict[tuple[int, int], list[torch.Tensor]] = field(default_factory=dict)

    @contextlib.contextmanager
    def installed(self, model, policy: GemmPolicy, reserved_sms: int = 0) -> Iterator[None]:
        """Inside: every projection of `model` runs its matmul through this tuner under `policy`, leaving
        `reserved_sms` free for a side stream. Outside: F.linear again."""
        modules = projection_modules(model)
        for mods in modules.values():
            if mods:
                w = mods[0].weight
                self._rotation.setdefault(tuple(w.shape), [m.weight for m in mods[:ROTATE_LAYERS]])

        def matmul(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
            return self.matmul(x, w, policy, reserved_sms)

        try:
            for mods in modules.values():
                for mod in mods:
                    mod.matmul_override = matmul
            yield
        finally:
            for mods in modules.values():
                for mod in mods:
                    mod.matmul_override = None

    def matmul(self, x: torch.Tensor, w: torch.Tensor, policy: GemmPolicy, reserved_sms: int) -> torch.Tensor:
        choice = self.choice(x, w, policy, reserved_sms)
        return F.linear(x, w) if choice is None else choice(x, w)

    def choice(self, x: torch.Tensor, w: torch.Tensor, policy: GemmPolicy, reserved_sms: int):
        """The tuned matmul for x @ w^T, or None (F.linear): tunes on first sight outside a capture."""
        if self.broken is not None or not self._tunable(x, w):
            return None
        key = _Key(x.shape[0], w.shape[0], w.shape[1], x.dtype, policy, reserved_sms)
        if key in self.choices:
            return self.choices[key]
        if torch.cuda.is_current_stream_capturing():
            return None  # the capture's eager warm-up tunes first; nothing may sync inside a capture
        start = time.monotonic()
        try:
            self.choices[key] = self._tune(key, self._rotation.get(tuple(w.shape), [w]))
        except (CublasLtError, OSError, RuntimeError) as e:
            self.broken = f"{type(e).__name__}: {e}"
            log.warning("matmul tuning is off for this process (%s): decode graphs use torch's matmuls", e)
            return None
        finally:
            self.seconds += time.monotonic() - start
        return self.choices.get(key)

    def summary(self) -> dict:
        tuned = [c for c in self.choices.values() if c is not None]
        return {
            "shapes": len(self.choices),
            "tuned": len(tuned),
            "seconds": round(self.seconds, 2),
            "broken": self.broken,
            "saved_us_per_call": round(sum(c.torch_us - c.us for c in tuned), 2),
        }

    def _tunable(self, x: torch.Tensor, w: torch.Tensor) -> bool:
        return (
            x.dim() == 2
            and x.shape[0] >= self.min_rows
            and x.dtype in (torch.bfloat16, torch.float16)
            and w.dtype == x.dtype
            and x.is_contiguous()
            and w.is_contiguous()
            and w.numel() * w.element_size() >= self.min_weight_bytes
        )

    def _tune(self, key: _Key, weights: list[torch.Tensor]) -> TunedMatmul | None:
        m, n, k = key.m, key.n, key.k
        x = torch.randn(m, k, device=self.device, dtype=key.dtype)
        ref = F.linear(x, weights[0])
        tol = 4 * 2.0**-7 * ref.abs().max().item() + 1e-6  # 4 bf16 ulps of the largest output
        torch_us = _launch_us([lambda w=w: F.linear(x, w) for w in weights])
        if key.reserved_sms:
            targets = (self.sms - key.reserved_sms,)
        else:
            targets = (0, self.sms - 16)
        plan = LtPlan.create(LtProblem(m, n, k, key.dtype), self.runtime, sm_targets=targets,
                             workspace_limits=WORKSPACE_LIMITS, count=8)  # fmt: skip
        out = torch.empty(m, n, device=self.device, dtype=key.dtype)
        best: tuple[float, LtCandidate] | None = None
        for cand in plan.candidates:
            plan.run(x, weights[0], out, cand)
            if (out.float() - ref.float()).abs().max().item() > tol:
                continue
            us = _launch_us([lambda w=w, c=cand: plan.run(x, w, out, c) for w in weights])
            if best is None or us < best[0]:
                best = (us, cand)
        if best is None or best[0] > (1 - self.min_gain) * torch_us:
            plan.close()
            log.debug("matmul M=%d N=%d K=%d %s: torch's %.1f us kept", m, n, k, key.policy, torch_us)
            return None
        log.debug("matmul M=%d N=%d K=%d %s: candidate %.1f us against torch's %.1f us (%s)", m, n, k,
                  key.policy, best[0], torch_us, best[1].describe())  # fmt: skip
        return TunedMatmul(plan, best[1], best[0], torch_us)


def _launch_us(fns: list[Callable[[], object]]) -> float:
    """LAUNCHES calls (cycling over `fns`) in one CUDA graph; median over REPLAYS replays / LAUNCHES."""
    for f in fns:
        f()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(LAUNCHES):
            fns[i % len(fns)]()
    graph.replay()
    times = []
    for _ in range(REPLAYS):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / LAUNCHES)
    del graph
    return sorted(times)[len(times) // 2]
