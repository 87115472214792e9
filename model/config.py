"""MistralConfig: the model's shape, read from a Hugging Face `config.json` (no transformers import)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SUPPORTED_MODEL_TYPES = ("mistral",)
REQUIRED_KEYS = (
    "model_type",
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
)
# Absent key -> this default. Mistral's own defaults (HF MistralConfig), not Llama's.
_MISSING = object()


class ConfigError(ValueError):
    """A config.json the model cannot run; the message names the offending key."""


@dataclass(frozen=True)
class MistralConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int = 8
    head_dim: int | None = None  # None: hidden_size // num_attention_heads (filled in __post_init__)
    max_position_embeddings: int = 4096 * 32
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    sliding_window: int | None = 4096
    tie_word_embeddings: bool = False
    torch_dtype: str = "float32"
    bos_token_id: int | None = 1
    eos_token_id: list[int] = field(default_factory=lambda: [2])

    def __post_init__(self) -> None:
        if self.head_dim is None:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.sliding_window is not None and self.sliding_window <= 0:
            raise ConfigError(f"sliding_window must be positive or null, got {self.sliding_window}")

    @property
    def q_size(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_key_value_heads * self.head_dim

    @classmethod
    def from_pretrained(cls, model_dir: str | Path) -> MistralConfig:
        path = Path(model_dir) / "config.json"
        if not path.is_file():
            raise ConfigError(f"no config.json in {model_dir}")
        return cls.from_dict(json.loads(path.read_text()))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> MistralConfig:
        for key in REQUIRED_KEYS:
            if d.get(key) is None:
                raise ConfigError(f"config.json lacks the required key '{key}'")
        if d["model_type"] not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(
                f"config.json key 'model_type' is '{d['model_type']}'; supported: {SUPPORTED_MODEL_TYPES}"
            )
        eos = d.get("eos_token_id", 2)
        # `sliding_window` absent means Mistral's default 4096, explicit null means full attention;
        # the two must not be conflated, hence the sentinel.
        window = d.get("sliding_window", _MISSING)
        return cls(
            vocab_size=int(d["vocab_size"]),
            hidden_size=int(d["hidden_size"]),
            intermediate_size=int(d["intermediate_size"]),
            num_hidden_layers=int(d["num_hidden_layers"]),
            num_attention_heads=int(d["num_attention_heads"]),
            num_key_value_heads=int(d.get("num_key_value_heads") or 8),
            head_dim=None if d.get("head_dim") is None else int(d["head_dim"]),
            max_position_embeddings=int(d.get("max_position_embeddings", 4096 * 32)),
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            rope_theta=_rope_theta(d),
            sliding_window=4096 if window is _MISSING else (None if window is None else int(window)),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            torch_dtype=str(d.get("dtype") or d.get("torch_dtype") or "float32"),
            bos_token_id=d.get("bos_token_id", 1),
            eos_token_id=_eos_list(eos),
        )


def _eos_list(eos: Any) -> list[int]:
    if eos is None:
        return []
    return [int(eos)] if isinstance(eos, int) else [int(e) for e in eos]


def _rope_theta(d: dict[str, Any]) -> float:
    """transformers 5 writes `rope_parameters: {rope_type, rope_theta}`; older files a top-level `rope_theta`.

    Only the default (unscaled) rotary embedding is implemented: anything else is refused rather than run
    with silently wrong positions.
    """
    params = d.get("rope_parameters")
    for key, scaling in (("rope_parameters", params), ("rope_scaling", d.get("rope_scaling"))):
        if isinstance(scaling, dict):
            rope_type = scaling.get("rope_type", scaling.get("type", "default"))
            if rope_type != "default":
                raise ConfigError(
                    f"config.json key '{key}.rope_type' is '{rope_type}'; only 'default' is supported"
                )
    if isinstance(params, dict) and params.get("rope_theta") is not None:
        return float(params["rope_theta"])
    if d.get("rope_theta") is not None:
        return float(d["rope_theta"])
    return 10000.0
