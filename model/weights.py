"""Safetensors checkpoints -> the fused, sharded parameters of FlashMistralForCausalLM.

Checkpoint names are Hugging Face's (`model.layers.0.self_attn.q_proj.weight`, ...). Fused parameters
are filled part by part through their `weight_loader(param, tensor, shard_id)`, which takes this
rank's share (nano-vllm style), so loading knows nothing about tensor parallelism.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from model.layers.linear import WeightShapeError, default_weight_loader

log = logging.getLogger(__name__)
PROGRESS_EVERY_SECONDS = 5.0  # a progress line at most this often while loading (and at the end)

# fused parameter -> ((checkpoint module name, shard id), ...), in the fused layout's order.
PACKED_MODULES: tuple[tuple[str, tuple[tuple[str, object], ...]], ...] = (
    ("qkv_proj", (("q_proj", "q"), ("k_proj", "k"), ("v_proj", "v"))),
    ("gate_up_proj", (("gate_proj", 0), ("up_proj", 1))),
)


class WeightsError(ValueError):
    """A checkpoint that cannot be loaded; the message names the tensor (or file) at fault."""


class Weights:
    """Lazy reader over one `model.safetensors` or the shards of `model.safetensors.index.json`.

    `dtype`/`device` are the model's: parameters are allocated there, and each weight loader's
    `copy_` converts only this rank's shard (so a rank never holds a whole converted tensor on the
    device). `get` returns the checkpoint tensor as stored, on the CPU.
    """

    def __init__(self, files: dict[str, Path], *, dtype: torch.dtype, device: torch.device | str = "cpu"):
        self.dtype, self.device = dtype, torch.device(device)
        self._file_of = files  # tensor name -> file
        self._handles: dict[Path, object] = {}

    @classmethod
    def from_dir(cls, model_dir: str | Path, *, dtype: torch.dtype = torch.float32, device="cpu") -> Weights:
        model_dir = Path(model_dir)
        index = model_dir / "model.safetensors.index.json"
        single = model_dir / "model.safetensors"
        if index.is_file():
            weight_map = json.loads(index.read_text()).get("weight_map")
            if not isinstance(weight_map, dict):
                raise WeightsError(f"{index} has no 'weight_map'")
            files = {name: model_dir / fname for name, fname in weight_map.items()}
            for path in sorted(set(files.values())):
                if not path.is_file():
                    raise WeightsError(f"shard file '{path.name}' listed in {index.name} is missing")
        elif single.is_file():
            with safe_open(single, framework="pt") as f:
                files = {name: single for name in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
        else:
            raise WeightsError(f"no model.safetensors or model.safetensors.index.json in {model_dir}")
        return cls(files, dtype=dtype, device=device)

    def names(self) -> list[str]:
        return list(self._file_of)

    def file_of(self, name: str) -> Path | None:
        return self._file_of.get(name)

    def total_bytes(self) -> int:
        return sum(path.stat().st_size for path in set(self._file_of.values()))

    def __contains__(self, name: str) -> bool:
        return name in self._file_of

    def get(self, name: str) -> torch.Tensor:
        path = self._file_of.get(name)
        if path is None:
            raise WeightsError(f"checkpoint is missing tensor '{name}'")
        handle = self._handles.get(path)
        if handle is None:
            handle = self._handles[path] = safe_open(path, framework="pt")
        try:
            tensor = handle.get_tensor(name)
        except Exception as e:  # an index that lists a tensor its shard does not hold
            raise WeightsError(f"checkpoint is missing tensor '{name}' (listed for {path.name}): {e}") from e
        return tensor


def checkpoint_sources(model: nn.Module, tie_word_embeddings: bool) -> list[tuple[str, str, object]]:
    """[(parameter name, checkpoint tensor name, shard id or None)] covering every parameter."""
    out: list[tuple[str, str, object]] = []
    for pname, _ in model.named_parameters():
        if pname == "lm_head.weight" and tie_word_embeddings:
            out.append((pname, "model.embed_tokens.weight", None))
            continue
        for fused, parts in PACKED_MODULES:
            if f".{fused}." in pname:
                out.extend((pname, pname.replace(fused, part), shard) for part, shard in parts)
                break
        else:
            out.append((pname, pname, None))
    return out


def load_weights(model: nn.Module, weights: Weights) -> None:
    """Fill every parameter of `model` (a FlashMistralForCausalLM) from `weights`.

    Errors name the checkpoint tensor: missing ones, and ones whose shape does not fit.
    """
    params = dict(model.named_parameters())
    sources = checkpoint_sources(model, model.config.tie_word_embeddings)
    progress = _Progress(weights, len(sources))
    for pname, cname, shard in sources:
        tensor = weights.get(cname)
        progress.tensor(cname, tensor.nbytes)
        param = params[pname]
        loader = getattr(param, "weight_loader", default_weight_loader)
        try:
            loader(param, tensor) if shard is None else loader(param, tensor, shard)
        except WeightShapeError as e:
            raise WeightsError(f"checkpoint tensor '{cname}' does not fit {pname}: {e}") from e
    progress.done()


class _Progress:
    """Log lines while a checkpoint loads: files and tensors done, bytes read and the read rate."""

    def __init__(self, weights: Weights, num_tensors: int):
        self.weights, self.num_tensors = weights, num_tensors
        self.files: set[Path] = set()
        self.num_files = len({weights.file_of(n) for n in weights.names()})
        self.total = weights.total_bytes()
        self.bytes = self.tensors = 0
        self.start = self.last = time.monotonic()
        log.info(
            "loading weights: %d files, %.1f MB, %d tensors", self.num_files, self.total / 1e6, num_tensors
        )

    def tensor(self, name: str, nbytes: int) -> None:
        self.files.add(self.weights.file_of(name))
        self.bytes += nbytes
        self.tensors += 1
        now = time.monotonic()
        if now - self.last >= PROGRESS_EVERY_SECONDS:
            self.last = now
            self._line("loading weights")

    def done(self) -> None:
        self._line("loaded weights")

    def _line(self, what: str) -> None:
        seconds = max(time.monotonic() - self.start, 1e-9)
        log.info(
            "%s: file %d/%d, tensor %d/%d, %.1f/%.1f MB in %.1f s (%.1f MB/s)", what, len(self.files),
            self.num_files, self.tensors, self.num_tensors, self.bytes / 1e6, self.total / 1e6, seconds,
            self.bytes / 1e6 / seconds,
        )  # fmt: skip
