"""World size 2 over gloo on CPU: the sharded model equals transformers (split and replicated KV heads).

Only world size 1 is required today; this proves the sharding is wiring, not a rewrite. Two processes
are forked once for all configurations (fork, not spawn: re-importing torch in fresh interpreters
costs more than the test itself); each child runs with one intra-op thread, which keeps OpenMP fork-safe.
"""

from __future__ import annotations

import torch
import torch.multiprocessing as mp
from mistral_harness import PagedRunner, hf_logits, random_prompts

PROMPTS = random_prompts([9, 4, 14], 512, seed=21)
DECODE = [[40, 41, 42], [50, 51, 52], [60, 61, 62]]


def _rank_main(rank: int, world: int, init_file: str, model_dirs: list[str], out_file: str) -> None:
    import torch.distributed as dist

    from model.flash_mistral import FlashMistralForCausalLM
    from model.parallel import TPGroup

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        results = []
        for d in model_dirs:
            model = FlashMistralForCausalLM.from_pretrained(d, tp=TPGroup(rank, world))
            runner = PagedRunner(model, model.new_kv_cache(16), seed=1)
            logits, _ = runner.prefill(PROMPTS)
            steps = [runner.decode(tokens) for tokens in DECODE]
            results.append((logits, steps))
        if rank == 0:
            torch.save(results, out_file)
    finally:
        dist.destroy_process_group()


def test_world_size_2_equals_transformers(tiny_model_factory, tmp_path):
    from transformers import MistralForCausalLM

    shapes = [dict(heads=4, kv_heads=2), dict(heads=4, kv_heads=1, head_dim=24, sliding_window=8)]
    dirs = [str(tiny_model_factory(**s)) for s in shapes]
    out = tmp_path / "logits.pt"
    args = (2, str(tmp_path / "init"), dirs, str(out))
    mp.start_processes(_rank_main, args=args, nprocs=2, join=True, start_method="fork")
    for d, (logits, steps) in zip(dirs, torch.load(out), strict=True):
        hf = MistralForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
        seqs = [list(p) for p in PROMPTS]
        torch.testing.assert_close(logits, torch.cat([hf_logits(hf, p) for p in seqs]), atol=1e-4, rtol=0)
        for tokens, step in zip(DECODE, steps, strict=True):
            for b, tok in enumerate(tokens):
                seqs[b].append(tok)
                torch.testing.assert_close(step[b], hf_logits(hf, seqs[b])[-1], atol=1e-4, rtol=0)
