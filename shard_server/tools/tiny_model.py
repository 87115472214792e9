"""Tiny-model kit: real Hugging Face model and PEFT adapter directories made locally, in seconds.

No hub is reachable from our machines, so tests, the demo and the benchmarks build what they need:
a Mistral config, seeded random weights in `model.safetensors`, and a byte-level BPE tokenizer
trained with `tokenizers` on `shard_server/data/corpus.txt`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

CORPUS = Path(__file__).resolve().parent.parent / "data" / "corpus.txt"
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>"]  # ids 0, 1, 2 as in Mistral's tokenizer


@dataclass
class TinyModelSpec:
    layers: int = 2
    hidden: int = 64
    heads: int = 4
    kv_heads: int = 2
    head_dim: int | None = None  # None: hidden // heads
    intermediate: int | None = None  # None: 2 * hidden
    sliding_window: int | None = None
    vocab: int = 512
    max_positions: int = 2048
    seed: int = 0
    # Larger than HF's 0.02 so that logits are peaked and greedy choices are not near-ties.
    init_std: float = 0.15
    rope_theta: float = 10000.0
    tie_word_embeddings: bool = False


def build_tokenizer(vocab_size: int):
    """Byte-level BPE trained on the shipped corpus; adds BOS like Mistral's tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token=None, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    text = CORPUS.read_text(encoding="utf-8")
    tok.train_from_iterator([line for line in text.splitlines() if line], trainer=trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)]
    )
    return tok


def make_tiny_model(out_dir: str | Path, spec: TinyModelSpec | None = None) -> Path:
    """Write config.json, model.safetensors, tokenizer files and generation_config.json."""
    import torch
    from transformers import GenerationConfig, MistralConfig, MistralForCausalLM, PreTrainedTokenizerFast

    spec = spec or TinyModelSpec()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if spec.vocab < 300:
        raise ValueError(f"--vocab must be at least 300 for a byte-level tokenizer, got {spec.vocab}")

    tok = build_tokenizer(spec.vocab)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    fast.model_max_length = spec.max_positions
    fast.save_pretrained(out)

    head_dim = spec.head_dim or spec.hidden // spec.heads
    config = MistralConfig(
        vocab_size=spec.vocab,
        hidden_size=spec.hidden,
        intermediate_size=spec.intermediate or 2 * spec.hidden,
        num_hidden_layers=spec.layers,
        num_attention_heads=spec.heads,
        num_key_value_heads=spec.kv_heads,
        head_dim=head_dim,
        max_position_embeddings=spec.max_positions,
        sliding_window=spec.sliding_window,
        rope_theta=spec.rope_theta,
        tie_word_embeddings=spec.tie_word_embeddings,
        bos_token_id=1,
        eos_token_id=2,
        initializer_range=spec.init_std,
    )
    torch.manual_seed(spec.seed)
    model = MistralForCausalLM(config).to(torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))  # non-trivial norms catch a missing weight
            else:
                p.normal_(0.0, spec.init_std)
    model.save_pretrained(out, safe_serialization=True)
    GenerationConfig(bos_token_id=1, eos_token_id=2).save_pretrained(out)
    return out


def make_tiny_adapter(
    base_dir: str | Path,
    out_dir: str | Path,
    *,
    rank: int = 8,
    alpha: float | None = None,
    target_modules: tuple[str, ...] = ("q_proj", "v_proj"),
    use_rslora: bool = False,
    use_dora: bool = False,
    seed: int = 1,
    init_std: float = 0.1,
) -> Path:
    """A real PEFT LoRA adapter (peft's own save_pretrained) with seeded non-zero A and B.

    use_dora: a DoRA adapter; its magnitude vectors (PEFT initialises them to ||W|| per output feature)
    are scaled by seeded factors in [0.5, 1.5] so that the DoRA scale is far from 1 and differs per row."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import MistralForCausalLM

    base = MistralForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    cfg = LoraConfig(
        r=rank,
        lora_alpha=alpha if alpha is not None else 2 * rank,
        target_modules=list(target_modules),
        lora_dropout=0.0,
        bias="none",
        use_rslora=use_rslora,
        use_dora=use_dora,
        task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(base, cfg)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_A" in name or "lora_B" in name:  # B starts at zero in peft: make it matter
                p.copy_(torch.randn(p.shape, generator=gen) * init_std)
            elif "lora_magnitude_vector" in name:
                p.mul_(0.5 + torch.rand(p.shape, generator=gen))
    out = Path(out_dir)
    peft_model.save_pretrained(out, safe_serialization=True)
    return out
