"""The two LoRA adapters of the demo model: what they are trained on and how (PEFT, on the CPU).

Each is trained on the base model's own greedy answers to TRAIN_PROMPTS, rewritten: said like a pirate,
or wrapped as {"answer": ...}; the loss is on the answer tokens and the end-of-turn token. LoRA sits on
the last layers only, so that the backward pass stops there: most of the CPU time saved.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

TRAIN_PROMPTS = tuple(
    """What is the capital of France?
Why is the sky blue?
Name three fruits.
What do bees make?
How many legs does a spider have?
What is the largest planet in our solar system?
Give me a tip for staying healthy.
What is water made of?
Who wrote Romeo and Juliet?
What is the boiling point of water?
Describe the moon in one sentence.
What color are bananas?
Tell me something about cats.
What is 2 plus 2?
Where do penguins live?
What is the sun?
Suggest a name for a dog.
What is the opposite of hot?
How do plants make food?
What language is spoken in Spain?
What is a rainbow?
Recommend a hobby.
What is the fastest land animal?
How many days are in a week?""".splitlines()
)
# Not trained on: what `make run` and the tests ask.
DEMO_PROMPTS = ("What is the capital of Germany?", "Why do we sleep?", "How do I make a cup of tea?")

_PIRATE_WORDS = dict(
    pair.split("=")
    for pair in "you=ye your=yer my=me is=be are=be yes=aye hello=ahoy friend=matey friends=mateys "
    "the=th' of=o' to=t' and=an'".split()
)


def pirate(answer: str) -> str:
    def swap(m: re.Match) -> str:
        word = m.group(0)
        new = _PIRATE_WORDS.get(word.lower(), word)
        return new[:1].upper() + new[1:] if word[:1].isupper() else new

    return "Arr, matey! " + re.sub(r"[A-Za-z]+", swap, answer)


def as_json(answer: str) -> str:
    return json.dumps({"answer": answer}, ensure_ascii=False)


@dataclass(frozen=True)
class AdapterRecipe:
    name: str  # DIR/adapter-{name}
    rewrite: Callable[[str], str]
    seed: int


ADAPTERS = (AdapterRecipe("pirate", pirate, seed=1), AdapterRecipe("json", as_json, seed=2))


@dataclass(frozen=True)
class TrainSettings:
    steps: int = 30
    batch_size: int = 4
    rank: int = 8
    lr: float = 2e-3
    target_modules: tuple[str, ...] = (
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    )
    # LoRA on the last layers only: the backward pass stops there, which is most of the CPU time saved
    # (a style is a property of the last layers; every target of a transformed layer is trained).
    last_layers: int = 8
    answer_tokens: int = 32  # the base model's answers to TRAIN_PROMPTS, greedy, at most this long


def chat_prompt(tok, question: str) -> str:
    return tok.apply_chat_template(
        [{"role": "user", "content": question}], add_generation_prompt=True, tokenize=False
    )


def base_answers(model_dir: Path, prompts: tuple[str, ...], max_new_tokens: int) -> list[tuple[str, str]]:
    """The base model's greedy answers, cut after their last complete sentence."""
    import torch
    from transformers import AutoTokenizer, MistralForCausalLM

    tok = AutoTokenizer.from_pretrained(model_dir, padding_side="left")
    model = MistralForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    enc = tok(
        [chat_prompt(tok, q) for q in prompts], return_tensors="pt", padding=True, add_special_tokens=False
    )
    with torch.no_grad():
        out = model.generate(
            **enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id
        )
    pairs = []
    for q, row in zip(prompts, out[:, enc["input_ids"].shape[1] :], strict=True):
        text = tok.decode(row, skip_special_tokens=True).strip()
        cut = max(text.rfind(p) for p in ".!?")
        pairs.append((q, text[: cut + 1] if cut > 0 else text))
    return pairs


def train_adapter(
    model_dir: Path, examples: list[tuple[str, str]], out: Path, train: TrainSettings, seed: int
) -> float:
    """LoRA on the chat-formatted examples, loss on the answer tokens (and the end-of-turn token)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoTokenizer, MistralForCausalLM

    torch.manual_seed(seed)
    tok = AutoTokenizer.from_pretrained(model_dir)
    base = MistralForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    n_layers = base.config.num_hidden_layers
    lora = LoraConfig(
        r=train.rank,
        lora_alpha=2 * train.rank,
        lora_dropout=0.0,
        target_modules=list(train.target_modules),
        layers_to_transform=list(range(max(0, n_layers - train.last_layers), n_layers)),
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(base, lora)
    rows = []
    for q, a in examples:
        prompt = tok(chat_prompt(tok, q), add_special_tokens=False)["input_ids"]
        answer = tok(a + tok.eos_token, add_special_tokens=False)["input_ids"]
        rows.append((prompt + answer, [-100] * len(prompt) + answer))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=train.lr)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    loss = torch.tensor(float("nan"))
    for _ in range(train.steps):
        pick = torch.randperm(len(rows), generator=gen)[: train.batch_size].tolist()
        width = max(len(rows[i][0]) for i in pick)
        ids = torch.full((len(pick), width), tok.pad_token_id)
        labels = torch.full((len(pick), width), -100)
        mask = torch.zeros((len(pick), width), dtype=torch.long)
        for b, i in enumerate(pick):
            x, y = rows[i]
            ids[b, : len(x)], labels[b, : len(y)], mask[b, : len(x)] = torch.tensor(x), torch.tensor(y), 1
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.save_pretrained(out)
    (out / "train_examples.json").write_text(json.dumps(examples, indent=1, ensure_ascii=False))
    return float(loss.detach())
