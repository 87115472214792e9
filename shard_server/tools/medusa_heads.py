"""Write Medusa heads in the Medusa / LoRAX directory format (config.json + medusa_lm_head.safetensors).

Used by the tests (random heads for a tiny model) and by bench/medusa_train.py (heads trained on the
demo model). Format and semantics: model/adapters/medusa.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

WEIGHTS_FILE = "medusa_lm_head.safetensors"


def write_medusa_heads(
    out_dir: str | Path,
    w: torch.Tensor,
    b: torch.Tensor,
    out: torch.Tensor | None = None,
    *,
    extra_config: dict | None = None,
) -> Path:
    """w [heads, layers, H, H], b [heads, layers, H], out [heads, V, H] (v1) or None (v2: the model's
    lm_head). Merges `medusa_num_heads` / `medusa_num_layers` into an existing config.json (an adapter
    directory keeps its other files)."""
    from safetensors.torch import save_file

    heads, layers = w.shape[0], w.shape[1]
    d = Path(out_dir)
    d.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for h in range(heads):
        for layer in range(layers):
            tensors[f"{h}.{layer}.linear.weight"] = w[h, layer].contiguous()
            tensors[f"{h}.{layer}.linear.bias"] = b[h, layer].contiguous()
        if out is not None:
            tensors[f"{h}.{layers}.weight"] = out[h].contiguous()
    save_file({k: v.detach().cpu() for k, v in tensors.items()}, str(d / WEIGHTS_FILE))
    cfg_path = d / "config.json"
    cfg = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
    cfg.update({"medusa_num_heads": heads, "medusa_num_layers": layers, **(extra_config or {})})
    cfg.setdefault("version", 1 if out is not None else 2)
    cfg_path.write_text(json.dumps(cfg, indent=2))
    return d


def random_medusa_heads(
    out_dir: str | Path, hidden: int, vocab: int, heads: int = 3, layers: int = 1, *, v1: bool = False,
    seed: int = 0, std: float = 0.2,
) -> Path:  # fmt: skip
    """Seeded random heads (drafts of an untrained head are mostly wrong: exactness is what they test)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(heads, layers, hidden, hidden, generator=g) * std
    b = torch.randn(heads, layers, hidden, generator=g) * std
    out = torch.randn(heads, vocab, hidden, generator=g) * std if v1 else None
    return write_medusa_heads(out_dir, w, b, out)
