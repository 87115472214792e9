"""Shared pieces of the benchmarks: model shapes, the roofline arithmetic, timing, device ceilings, and a
writer of random Mistral-shaped checkpoints and PEFT adapters (no download, no peft/transformers models).

Roofline of a decode step (memory bound): every byte the step must read once, over measured copy
bandwidth. Roofline of prefill (compute bound): its FLOPs over measured bf16 matmul throughput.
"""

from __future__ import annotations

import itertools
import json
import re
import statistics
import string
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")


# ---------------------------------------------------------------- shapes and arithmetic


@dataclass(frozen=True)
class ModelShape:
    """A Mistral decoder's dimensions (defaults: Mistral-7B)."""

    hidden: int = 4096
    layers: int = 32
    heads: int = 32
    kv_heads: int = 8
    head_dim: int = 128
    intermediate: int = 14336
    vocab: int = 32000

    def projections(self) -> dict[str, tuple[int, int]]:
        """(in_features, out_features) of each projection of one layer."""
        h, i = self.hidden, self.intermediate
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        return {
            "q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
            "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h),
        }  # fmt: skip

    @property
    def layer_matmul_params(self) -> int:
        return sum(i * o for i, o in self.projections().values())

    @property
    def matmul_params(self) -> int:
        """Parameters of every layer's projections (lm_head and the embedding excluded)."""
        return self.layers * self.layer_matmul_params

    @property
    def vocab_params(self) -> int:
        """One of embed_tokens / lm_head (untied: the model has both)."""
        return self.vocab * self.hidden

    @property
    def norm_params(self) -> int:
        return (2 * self.layers + 1) * self.hidden

    @property
    def total_params(self) -> int:
        return self.matmul_params + 2 * self.vocab_params + self.norm_params

    def kv_bytes_per_token(self, elem: int = 2) -> int:
        return 2 * self.layers * self.kv_heads * self.head_dim * elem

    def adapter_params(self, rank: int, targets: tuple[str, ...] = LORA_TARGETS) -> int:
        """A [r, in] + B [out, r] of every targeted projection of every layer."""
        proj = self.projections()
        return self.layers * sum(rank * (proj[t][0] + proj[t][1]) for t in targets)


MISTRAL_7B = ModelShape()
# Smoke shape: small enough for CPU, GQA like the real one, vocab above the tokenizer's trained 512.
TINY = ModelShape(hidden=64, layers=2, heads=4, kv_heads=2, head_dim=16, intermediate=128, vocab=1024)


@dataclass(frozen=True)
class StepBytes:
    weights: int
    kv: int
    adapters: int

    @property
    def total(self) -> int:
        return self.weights + self.kv + self.adapters


def decode_step_bytes(
    shape: ModelShape, batch: int, mean_context: float, distinct_adapters: int = 0, rank: int = 16,
    elem: int = 2, kv_elem: int = 2,
) -> StepBytes:
    """The fewest bytes one decode step must read.

    Weights: every projection, lm_head and the norms once; of the embedding only the batch's rows.
    KV: K and V of every cached token of every sequence (`mean_context` = KV length after the step).
    Adapters: each distinct adapter's A and B once (rank-`rank`, all seven projections).
    Writes (one token's K/V, logits) are a few MB and left out.
    """
    weights = elem * (shape.matmul_params + shape.vocab_params + shape.norm_params + batch * shape.hidden)
    kv = round(batch * mean_context * shape.kv_bytes_per_token(kv_elem))
    adapters = distinct_adapters * shape.adapter_params(rank) * elem
    return StepBytes(weights, kv, adapters)


def roofline_fraction(step_bytes: int, step_seconds: float, bandwidth_bytes_per_s: float) -> float:
    """Time the bytes need at measured bandwidth / the time the step took (1.0 = at the limit)."""
    return step_bytes / bandwidth_bytes_per_s / step_seconds


def prefill_flops(shape: ModelShape, prompt_lengths: list[int], logits_rows: int) -> float:
    """2 * matmul params * tokens, lm_head for the rows that get logits, causal attention (QK^T, PV)."""
    tokens = sum(prompt_lengths)
    attn_pairs = sum(n * (n + 1) / 2 for n in prompt_lengths)  # (query, key) pairs under the causal mask
    attention = shape.layers * 2 * 2 * shape.heads * shape.head_dim * attn_pairs
    return 2.0 * shape.matmul_params * tokens + 2.0 * shape.vocab_params * logits_rows + attention


# ---------------------------------------------------------------- timing


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def write_results(path: str, data: dict) -> None:
    """A bench script's --out: its numbers as indented JSON (nothing written for an empty path)."""
    if path:
        with open(path, "w") as f:
            json.dump(data, f, indent=1)


def time_ms(fn: Callable[[], object], device: torch.device, warmup: int, reps: int) -> list[float]:
    """Per-call milliseconds of `fn`: CUDA events around each call on a GPU, the host clock otherwise."""
    for _ in range(warmup):
        fn()
    sync(device)
    out = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            out.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            out.append((time.perf_counter() - t0) * 1e3)
    return out


def copy_bandwidth_gbps(device: torch.device, nbytes: int, warmup: int = 3, reps: int = 10) -> float:
    """Device-to-device copy of random bytes; (bytes read + bytes written) / median time, in GB/s."""
    src = torch.randint(0, 256, (nbytes,), dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = median(time_ms(lambda: dst.copy_(src), device, warmup, reps))
    return 2 * nbytes / (ms * 1e-3) / 1e9


def matmul_tflops(device: torch.device, n: int, dtype: torch.dtype, warmup: int = 3, reps: int = 10) -> float:
    """n^3 matrix product of random data (two input sets in turn, so no run reuses the last one's L2)."""
    sets = [(torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype))
            for _ in range(2)]  # fmt: skip
    out = torch.empty(n, n, device=device, dtype=dtype)
    turn = itertools.cycle(sets)

    def mm():
        a, b = next(turn)
        torch.matmul(a, b, out=out)

    ms = median(time_ms(mm, device, warmup, reps))
    return 2 * n**3 / (ms * 1e-3) / 1e12


# ---------------------------------------------------------------- run identity


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return "cpu"


def card_slug(name: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'h100-80gb-hbm3' (file names of bench/results)."""
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    return slug.removeprefix("nvidia-") or "unknown"


def git_commit(repo: Path) -> str:
    """HEAD (with -dirty when the tree has changes), or 'unknown' where the copy has no .git."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=repo, capture_output=True, text=True, timeout=10,
        ).stdout.strip()  # fmt: skip
        return head + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


# ---------------------------------------------------------------- checkpoint and adapter writers


def build_tokenizer_files(out: Path, vocab_size: int) -> None:
    """Tokenizer files whose vocabulary covers every model id.

    The kit's byte-level BPE (trained on the shipped corpus, 512 entries) is extended with plain-ASCII
    tokens up to `vocab_size`: a random model emits ids anywhere in [0, vocab), and an id the tokenizer
    does not know decodes to nothing, which makes the shard's incremental detokenizer keep re-decoding a
    growing window (host work a real tokenizer never causes).
    """
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    from shard_server.tools.tiny_model import build_tokenizer

    data = json.loads(build_tokenizer(min(512, vocab_size)).to_str())
    vocab: dict[str, int] = data["model"]["vocab"]
    for k in itertools.count(2):
        if len(vocab) >= vocab_size:
            break
        for letters in itertools.product(string.ascii_lowercase, repeat=k):
            if len(vocab) >= vocab_size:
                break
            vocab.setdefault("".join(letters), len(vocab))
    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(json.dumps(data)),
        bos_token="<s>", eos_token="</s>", unk_token="<unk>",
    )  # fmt: skip
    tok.save_pretrained(out)


def _random(shape: tuple[int, ...], std: float, gen: torch.Generator, device, dtype) -> torch.Tensor:
    # Never zeros: a product of zeros can run faster than real data (METHOD.md).
    return torch.randn(shape, generator=gen, device=device, dtype=dtype).mul_(std)


def write_model_dir(
    out: Path, shape: ModelShape, device: torch.device, dtype: torch.dtype = torch.bfloat16, *,
    seed: int = 0, std: float = 0.02, layers_per_file: int = 4, max_positions: int = 32768,
) -> Path:
    """config.json + tokenizer + sharded model-*.safetensors with random weights drawn on `device`.

    Shards of a few layers keep host memory to one shard at a time; the index file makes it a normal
    Hugging Face checkpoint that the shard, the server process and transformers all load the same way.
    """
    from safetensors.torch import save_file
    from transformers import MistralConfig

    out.mkdir(parents=True, exist_ok=True)
    MistralConfig(
        vocab_size=shape.vocab, hidden_size=shape.hidden, intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers, num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads,
        head_dim=shape.head_dim, max_position_embeddings=max_positions, sliding_window=None,
        rope_theta=1e6, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
        dtype=str(dtype).removeprefix("torch."),
    ).save_pretrained(out)  # fmt: skip
    build_tokenizer_files(out, shape.vocab)

    gen = torch.Generator(device=device).manual_seed(seed)
    h = shape.hidden

    def layer_tensors(i: int) -> dict[str, tuple[int, ...]]:
        p = f"model.layers.{i}."
        shapes = {p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,)}
        for name, (fan_in, fan_out) in shape.projections().items():
            part = "self_attn" if name in _ATTN else "mlp"
            shapes[f"{p}{part}.{name}.weight"] = (fan_out, fan_in)
        return shapes

    files: list[dict[str, tuple[int, ...]]] = [
        {"model.embed_tokens.weight": (shape.vocab, h), "lm_head.weight": (shape.vocab, h),
         "model.norm.weight": (h,)}
    ]  # fmt: skip
    for first in range(0, shape.layers, layers_per_file):
        group: dict[str, tuple[int, ...]] = {}
        for i in range(first, min(first + layers_per_file, shape.layers)):
            group.update(layer_tensors(i))
        files.append(group)

    weight_map, total = {}, 0
    for n, group in enumerate(files, 1):
        fname = f"model-{n:05d}-of-{len(files):05d}.safetensors"
        tensors = {}
        for name, s in group.items():
            if name.endswith("norm.weight"):
                t = 1.0 + _random(s, 0.1, gen, device, dtype)  # non-trivial norms
            else:
                t = _random(s, std, gen, device, dtype)
            tensors[name] = t.cpu()
            weight_map[name] = fname
            total += t.numel() * t.element_size()
        save_file(tensors, str(out / fname), metadata={"format": "pt"})
        del tensors
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
    return out


def write_adapter(
    out: Path, shape: ModelShape, rank: int, device: torch.device, dtype: torch.dtype = torch.bfloat16, *,
    seed: int = 1, std: float = 0.02, targets: tuple[str, ...] = LORA_TARGETS, dora: bool = False,
) -> Path:
    """A PEFT LoRA directory (adapter_config.json + adapter_model.safetensors) written directly.

    dora: also a DoRA magnitude vector [out] per module (values near 1, after the same A and B as the
    plain adapter of this seed, so a DoRA/LoRA pair differs only by DoRA)."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator(device=device).manual_seed(seed)
    mgen = torch.Generator(device=device).manual_seed(seed + 7919)
    proj = shape.projections()
    tensors = {}
    for i in range(shape.layers):
        for t in targets:
            fan_in, fan_out = proj[t]
            key = f"base_model.model.model.layers.{i}.{'self_attn' if t in _ATTN else 'mlp'}.{t}"
            tensors[f"{key}.lora_A.weight"] = _random((rank, fan_in), std, gen, device, dtype).cpu()
            tensors[f"{key}.lora_B.weight"] = _random((fan_out, rank), std, gen, device, dtype).cpu()
            if dora:  # its own generator: A and B stay those of the plain adapter of this seed
                m = 1.0 + _random((fan_out,), 0.1, mgen, device, dtype)
                tensors[f"{key}.lora_magnitude_vector"] = m.cpu()
    save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": 2 * rank,
        "target_modules": list(targets), "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False,
        "use_rslora": False, "use_dora": dora, "inference_mode": True, "modules_to_save": None,
    }  # fmt: skip
    (out / "adapter_config.json").write_text(json.dumps(config, indent=1))
    return out
