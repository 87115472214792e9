"""Where does a decode step's time go? A Mistral-7B-shaped model with random bf16 weights built on the
GPU (no checkpoint), one decode step profiled per batch size, kernels grouped by name.

    python -m bench.profile_decode [--batches 1,64] [--context 544] [--compile]

Prints, per batch: the eager step, the CUDA-graph step, optionally a torch.compile'd step, the
floor (weights + KV bytes / measured copy bandwidth), and the top kernels by total CUDA time.
"""

from __future__ import annotations

import argparse
from collections import defaultdict

import torch

from bench.common import copy_bandwidth_gbps, time_ms
from cache.kv_cache import KVCache
from model.config import MistralConfig
from model.flash_mistral import FlashMistralForCausalLM
from model.forward_batch import ForwardBatch
from model.layers.fused import FusedOps

SHAPE = dict(
    vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
    num_key_value_heads=8, head_dim=128, max_position_embeddings=32768, rms_norm_eps=1e-5, rope_theta=1e6,
    sliding_window=None, tie_word_embeddings=False, torch_dtype="bfloat16",
)


def build_model(device: torch.device) -> FlashMistralForCausalLM:
    config = MistralConfig(**SHAPE)
    model = FlashMistralForCausalLM(config, None, dtype=torch.bfloat16, device=device)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02)
    return model


def bandwidth_model_and_weight_bytes(dev: torch.device) -> tuple[float, FlashMistralForCausalLM, int]:
    """(copy bandwidth in bytes/s, the random 7B-shaped model, weight bytes one decode step reads);
    of the embedding only the batch's rows are read, so it is left out."""
    bw = copy_bandwidth_gbps(dev, 2 << 30) * 1e9
    model = build_model(dev)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    return bw, model, weight_bytes - model.model.embed_tokens.weight.numel() * 2


class DecodeCase:
    """Static decode inputs for `batch` sequences at `context` tokens each, in a fresh KV cache."""

    def __init__(self, model: FlashMistralForCausalLM, batch: int, context: int, kv_dtype=None):
        dev, bs = model.device, model.block_size
        blocks_per_seq = -(-(context + 1) // bs)
        self.kv = KVCache.for_model(model, batch * blocks_per_seq + 1, kv_dtype)
        self.model, self.batch, self.context = model, batch, context
        first_free = torch.arange(batch * blocks_per_seq, device=dev, dtype=torch.int32) + 1  # skip block 0
        self.tables = first_free.view(batch, -1)
        self.positions = torch.full((batch,), context, dtype=torch.int64, device=dev)
        self.input_ids = torch.randint(0, model.config.vocab_size, (batch,), device=dev)

    def step(self, max_s: int) -> torch.Tensor:
        fb = ForwardBatch.decode(
            self.input_ids, self.positions, self.tables, block_size=self.model.block_size, max_s=max_s
        )
        return fb.run(self.model, self.kv.layers)


def kv_bytes(case: DecodeCase) -> int:
    return case.batch * (case.context + 1) * KVCache.bytes_per_token_for(32, 8, 128, torch.bfloat16)


def kernel_times(fn) -> list[tuple[str, float, int]]:
    """One call of `fn` under the profiler (graph replays included: CUPTI reports the graph's kernels):
    (kernel name, total ms, launches) per kernel name, most time first."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    totals: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            t = totals[e.name[:90]]
            t[0] += e.device_time_total / 1000.0
            t[1] += 1
    return sorted(((k, v[0], int(v[1])) for k, v in totals.items()), key=lambda r: -r[1])


def profile_top(fn, n: int = 14) -> list[tuple[str, float, int]]:
    return kernel_times(fn)[:n]


MAX_S = 1024  # the context bucket a graph is captured with for ~544-token contexts


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", default="1,64")
    ap.add_argument("--context", type=int, default=544)
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--compile-mode", default="default", help="torch.compile mode, e.g. max-autotune")
    ap.add_argument("--split-sweep", default="", help="min tokens per attention split to try, e.g. 256,64")
    args = ap.parse_args()
    dev = torch.device("cuda")
    bw, model, weight_bytes = bandwidth_model_and_weight_bytes(dev)
    print(f"copy {bw / 1e9:.0f} GB/s, weights {weight_bytes / 1e9:.2f} GB, backend {model.attention.name}")
    for b in [int(x) for x in args.batches.split(",")]:
        case = DecodeCase(model, b, args.context)
        floor = (weight_bytes + kv_bytes(case)) / bw * 1e3
        eager = sorted(time_ms(lambda c=case: c.step(MAX_S), dev, 3, 10))[5]
        g = torch.cuda.CUDAGraph()
        case.step(MAX_S)
        with torch.cuda.graph(g):
            case.step(MAX_S)
        graph = sorted(time_ms(g.replay, dev, 3, 20))[10]
        line = f"batch {b:4d}: eager {eager:7.2f} ms  graph {graph:7.2f} ms  floor {floor:6.2f} ms  " \
               f"graph/floor {floor / graph:.3f}"
        fused = FusedOps.for_device(dev, torch.bfloat16, 128)
        if fused.add_rmsnorm is not None:  # the same step with plain torch elementwise code, same run
            model.use_fused_ops(FusedOps())
            g0 = torch.cuda.CUDAGraph()
            case.step(MAX_S)
            with torch.cuda.graph(g0):
                case.step(MAX_S)
            unfused = sorted(time_ms(g0.replay, dev, 3, 20))[10]
            model.use_fused_ops(fused)
            line += f"  (unfused graph {unfused:7.2f} ms)"
        if args.compile:
            # Inductor fuses the plain torch elementwise code itself: compile the unfused model, so the
            # comparison is torch.compile's fusion against our Triton kernels.
            model.use_fused_ops(FusedOps())
            torch._dynamo.reset()
            compiled = torch.compile(case.step, mode=args.compile_mode, dynamic=False)
            try:
                for _ in range(3):
                    compiled(MAX_S)
                gc = torch.cuda.CUDAGraph()
                with torch.cuda.graph(gc):
                    compiled(MAX_S)
                comp = sorted(time_ms(gc.replay, dev, 3, 20))[10]
                line += f"  compile+graph {comp:7.2f} ms ({floor / comp:.3f})"
            except Exception as e:  # noqa: BLE001 - report and continue
                line += f"  compile failed: {type(e).__name__}: {str(e)[:300]}"
            model.use_fused_ops(fused)
        print(line, flush=True)
        for min_tokens in [int(x) for x in args.split_sweep.split(",") if x]:
            import model.kernels.paged_attention as pa

            default, pa._MIN_TOKENS_PER_SPLIT = pa._MIN_TOKENS_PER_SPLIT, min_tokens
            gs = torch.cuda.CUDAGraph()
            case.step(MAX_S)
            with torch.cuda.graph(gs):
                case.step(MAX_S)
            t_split = sorted(time_ms(gs.replay, dev, 3, 20))[10]
            pa._MIN_TOKENS_PER_SPLIT = default
            print(f"    attention min tokens per split {min_tokens}: graph {t_split:7.2f} ms", flush=True)
        for name, ms, count in profile_top(lambda c=case: c.step(MAX_S)):
            print(f"    {ms:8.3f} ms  x{count:<4d} {name}")
        del case, g
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
