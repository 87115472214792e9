"""The attention backends against each other on one GPU, in one run: decode step (CUDA graph) and
prefill, Mistral-7B shape with random bf16 weights built on the device.

    FLASH_ATTN=1 source bench/gpu_env.sh; python -m bench.attention_backends [--out FILE]

Every backend that can run here (`model.attention.available_backends`) is swapped into the same model:
reference (torch gather + float32 softmax), torch_cuda (varlen_attn prefill + our Triton paged decode),
flash_attn (the flash-attn package; KV blocks of 256). Decode: batch 1 and 64 at context 544, one graph
replay, vs the floor (weights + KV bytes / copy bandwidth). Prefill: 16 x 1024 tokens, whole forward.
"""

from __future__ import annotations

import argparse
import json

import torch

from bench.common import device_name, time_ms
from bench.profile_decode import DecodeCase, bandwidth_model_and_weight_bytes, kv_bytes
from model.attention import available_backends, select_attention_backend
from model.forward_batch import ForwardBatch, PrefillSeq

MAX_S = 1024


def use_backend(model, backend) -> None:
    model.attention = backend
    for layer in model.model.layers:
        layer.self_attn.attention = backend


def decode_ms(model, batch: int, context: int, dev) -> tuple[float, int]:
    case = DecodeCase(model, batch, context)
    case.step(MAX_S)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        case.step(MAX_S)
    ms = sorted(time_ms(g.replay, dev, 3, 20))[10]
    kv = kv_bytes(case)
    del case, g
    torch.cuda.empty_cache()
    return ms, kv


def prefill_ms(model, prompts: int, length: int, dev) -> float:
    """Whole prefill forward of `prompts` x `length` random tokens, no KV cache, last-token logits."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (prompts, length), generator=g).tolist()
    fb = ForwardBatch.prefill([PrefillSeq(p) for p in ids], device=dev)
    return sorted(time_ms(lambda: fb.run(model, None), dev, 2, 5))[2]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    dev = torch.device("cuda")
    bw, model, weight_bytes = bandwidth_model_and_weight_bytes(dev)
    rows = []
    for name in available_backends(dev, torch.bfloat16):
        use_backend(model, select_attention_backend(dev, torch.bfloat16, prefer=name))
        for batch in (1, 64):
            ms, kv = decode_ms(model, batch, 544, dev)
            rows.append(dict(backend=name, kind="decode", batch=batch, step_ms=ms, tok_s=batch / ms * 1e3,
                             roofline_fraction=(weight_bytes + kv) / bw / (ms / 1e3)))
            print(rows[-1], flush=True)
        ms = prefill_ms(model, 16, 1024, dev)
        rows.append(dict(backend=name, kind="prefill", batch=16, prompt=1024, ms=ms, tok_s=16384 / ms * 1e3))
        print(rows[-1], flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": device_name(dev), "bandwidth_GBps": bw / 1e9, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
