"""Medusa heads (Cai et al., 2024) in the Medusa / LoRAX format: draft tokens from the final hidden state.

A directory carries heads when its `config.json` names `medusa_num_heads` and `medusa_num_layers`; the
weights are in its safetensors files (any `*.safetensors` of the directory; LoRAX reads them from the
adapter's files next to the LoRA weights), keys for head h and residual layer l:

    {h}.{l}.linear.weight   [H, H]      {h}.{l}.linear.bias   [H]      ResBlock: y = y + SiLU(W y + b)
    {h}.{L}.weight          [V, H]      v1 only (L = medusa_num_layers): the head's own LM head

Without `{h}.{L}.weight` the heads are v2 (LoRAX's MedusaV2): each head's output goes through the
model's own lm_head. Semantics, for the hidden state x_t that the LM head turns into token t+1 (after
the final norm), head h proposes token t+2+h:

    y = x_t; for l < L: y = y + silu(W[h, l] @ y + b[h, l])
    draft[h] = argmax(out[h] @ y)        (v1)      argmax(lm_head(y))      (v2)

The drafts are a point mass (argmax), which is what lets verification accept them exactly (see
shard_server/generation/speculative.py). Everything in the directory is untrusted: counts are bounded,
every shape must fit the base model, values must be finite, links are refused.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from model.adapters.peft_loader import _map_safetensors
from model.errors import InvalidArgument

CONFIG_FILE = "config.json"
MAX_HEADS = 16
MAX_LAYERS = 8
MAX_FILES = 8
MAX_CONFIG_BYTES = 1 << 16
_KEY_RE = re.compile(r"^(\d+)\.(\d+)\.(linear\.weight|linear\.bias|weight)$")


@dataclass(frozen=True)
class MedusaConfig:
    num_heads: int
    num_layers: int


def read_medusa_config(directory: Path) -> MedusaConfig | None:
    """The directory's Medusa config; None when it has no config.json naming medusa_num_heads."""
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        return None
    if path.is_symlink():
        raise InvalidArgument(f"{path}: a symbolic link; Medusa files must be regular files")
    if path.stat().st_size > MAX_CONFIG_BYTES:
        raise InvalidArgument(f"{path}: larger than {MAX_CONFIG_BYTES} bytes")
    try:
        cfg = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise InvalidArgument(f"{path}: unreadable JSON: {e}") from e
    if not isinstance(cfg, dict) or "medusa_num_heads" not in cfg:
        return None
    heads, layers = cfg.get("medusa_num_heads"), cfg.get("medusa_num_layers", 1)
    for name, value, top in (
        ("medusa_num_heads", heads, MAX_HEADS),
        ("medusa_num_layers", layers, MAX_LAYERS),
    ):
        if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= top:
            raise InvalidArgument(f"{path}: {name} must be an integer in 1..{top}, got {value!r}")
    return MedusaConfig(heads, layers)


class MedusaHeads:
    """Heads on the device: w [heads, layers, H, H], b [heads, layers, H], out [heads, V, H] or None (v2)."""

    def __init__(self, w: torch.Tensor, b: torch.Tensor, out: torch.Tensor | None):
        self.w, self.b, self.out = w, b, out

    @property
    def num_heads(self) -> int:
        return self.w.shape[0]

    @classmethod
    def load(cls, directory: str | Path, hidden_size: int, vocab_size: int, *, dtype: torch.dtype,
             device: torch.device | str) -> MedusaHeads | None:  # fmt: skip
        """Heads of `directory`, validated against the base model's sizes; None if it carries none."""
        directory = Path(directory)
        cfg = read_medusa_config(directory)
        if cfg is None:
            return None
        tensors = _read_medusa_tensors(directory)
        hh, L = cfg.num_heads, cfg.num_layers
        v1 = f"0.{L}.weight" in tensors
        expected = {}
        for h in range(hh):
            for layer in range(L):
                expected[f"{h}.{layer}.linear.weight"] = (hidden_size, hidden_size)
                expected[f"{h}.{layer}.linear.bias"] = (hidden_size,)
            if v1:
                expected[f"{h}.{L}.weight"] = (vocab_size, hidden_size)
        missing = sorted(set(expected) - set(tensors))
        extra = sorted(set(tensors) - set(expected))
        if missing or extra:
            raise InvalidArgument(
                f"{directory}: Medusa tensors do not match medusa_num_heads={hh}, medusa_num_layers={L}: "
                f"missing {missing[:4]}, unexpected {extra[:4]}"
            )
        for name, shape in expected.items():
            t = tensors[name]
            if tuple(t.shape) != shape:
                raise InvalidArgument(
                    f"{directory}: Medusa tensor {name} is {list(t.shape)}, expected {list(shape)}"
                )
            if not bool(torch.isfinite(t).all()):
                raise InvalidArgument(f"{directory}: Medusa tensor {name} holds non-finite values")

        def stack(fmt: str, per_layer: bool) -> torch.Tensor:
            rows = [
                torch.stack([tensors[fmt.format(h=h, l=layer)] for layer in range(L)])
                if per_layer
                else tensors[fmt.format(h=h, l=L)]
                for h in range(hh)
            ]
            return torch.stack(rows).to(device=device, dtype=dtype)

        out = stack("{h}.{l}.weight", per_layer=False) if v1 else None
        return cls(stack("{h}.{l}.linear.weight", True), stack("{h}.{l}.linear.bias", True), out)

    @torch.no_grad()
    def draft(self, hidden: torch.Tensor, lm_head) -> torch.Tensor:
        """hidden [N, H] (after the final norm) -> draft ids [N, heads] int64. `lm_head(y [M, H]) ->
        [M, V]` is the model's own head (v2 heads use it; under tensor parallelism it gathers the vocab)."""
        n = hidden.shape[0]
        y = hidden[:, None, :].expand(n, self.num_heads, hidden.shape[1]).to(self.w.dtype)  # [N, heads, H]
        for layer in range(self.w.shape[1]):
            lin = torch.einsum("nhi,hoi->nho", y, self.w[:, layer]) + self.b[:, layer]
            y = y + torch.nn.functional.silu(lin)
        if self.out is not None:
            logits = torch.einsum("nhi,hvi->nhv", y, self.out)  # [N, heads, V]
        else:
            logits = lm_head(y.reshape(n * self.num_heads, -1)).view(n, self.num_heads, -1)
        return logits.argmax(dim=-1)


def _read_medusa_tensors(directory: Path) -> dict[str, torch.Tensor]:
    """Every Medusa-shaped key of the directory's safetensors files (LoRA keys and others ignored)."""
    files = sorted(p for p in directory.iterdir() if p.suffix == ".safetensors")
    if len(files) > MAX_FILES:
        raise InvalidArgument(f"{directory}: more than {MAX_FILES} safetensors files")
    out: dict[str, torch.Tensor] = {}
    for path in files:
        if path.is_symlink() or not path.is_file():
            raise InvalidArgument(f"{path}: not a regular file; Medusa weights must be regular files")
        try:
            tensors = _map_safetensors(path)
        except (OSError, ValueError, RuntimeError) as e:
            raise InvalidArgument(f"{path}: unreadable safetensors file: {e}") from e
        for name, t in tensors.items():
            m = _KEY_RE.match(name)
            if m is None:
                continue
            key = f"{m.group(1)}.{m.group(2)}.{m.group(3)}"
            if key in out:
                raise InvalidArgument(f"{directory}: Medusa tensor {key} appears twice")
            out[key] = t
    if not out:
        raise InvalidArgument(
            f"{directory}: config.json names medusa_num_heads but no Medusa tensors were found"
        )
    return out
