"""Load a PEFT LoRA adapter directory and validate it against the base Mistral model.

Input: `adapter_config.json` + `adapter_model.safetensors` as written by `peft.save_pretrained`, keys like

    base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight   [r, in]
    base_model.model.model.layers.{i}.mlp.down_proj.lora_B.weight      [out, r]
    base_model.model.lm_head.lora_A.weight                             [r, hidden]

Output: a `LoraAdapter` on the host, float32, whose B is already multiplied by the PEFT scaling
(`lora_alpha / r`, or `lora_alpha / sqrt(r)` with rsLoRA; per-module `rank_pattern`/`alpha_pattern`
honoured), so that at serving time every kernel computes `y += (x @ A.T) @ B.T` with no scale argument.

DoRA (`use_dora: true`): each module also has `...{module}.lora_magnitude_vector` [out] (no `.weight`
suffix in the file), kept as `LoraModule.magnitude`; the per-output scale m / ||W + s B A||_row needs
the base weight W and is computed by the adapter store at load (model/adapters/dora.py).

The adapter store's fast path, `read_peft_adapter`, does the same validation but returns `PeftTensors`:
A and B as views of one read-only mapping of the file (its dtype, no copy) plus each module's scale, so
that the store can slice, cast and scale them straight into its own host buffer in a single pass
(a 7B rank-16 adapter is 448 tensors / 84 MB: every extra full pass or allocation costs milliseconds).

Refused (InvalidArgument, the message names the problem): a pickle-only `adapter_model.bin` (never opened,
let alone unpickled), missing files, a non-LoRA peft_type, `modules_to_save`, LoRA biases, unknown
target modules, layers beyond the base model, shapes that do not fit the base model, ranks outside 1..256,
a DoRA magnitude vector without `use_dora` (or `use_dora` with a module lacking one), non-finite magnitudes.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from model.adapters.peft_config import CONFIG_FILE, MAX_RANK, pattern_value
from model.adapters.peft_config import read_adapter_config as _read_checked_config
from model.errors import InvalidArgument, NotFound, shown

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head")
# Row-parallel layers shard their input dim, so under TP their LoRA A is sliced on `in` and the shrink
# result must be all-reduced; every other target shards its output dim (B sliced on `out`).
ROW_PARALLEL = frozenset({"o_proj", "down_proj"})
LM_HEAD_LAYER = -1  # layer_idx used for lm_head in add_lora and in LoraAdapter.weights keys

WEIGHTS_FILE = "adapter_model.safetensors"
PICKLE_FILE = "adapter_model.bin"

# adapter_config.json fields that change the math in ways this shard does not implement.
_UNSUPPORTED_FIELDS = {
    "modules_to_save": "modules_to_save is not supported: the adapter replaces whole base modules",
    "lora_bias": "LoRA biases (lora_bias=true) are not supported",
    "fan_in_fan_out": "fan_in_fan_out=true (Conv1D-style transposed weights) does not apply to Mistral",
    "layer_replication": "layer_replication is not supported",
    "trainable_token_indices": "trainable_token_indices is not supported",
    "use_qalora": "QA-LoRA (use_qalora=true) is not supported",
}

_KEY_RE = re.compile(
    r"^base_model\.model\.(?P<module>.+?)\.(?:(?P<part>lora_A|lora_B)\.weight|lora_magnitude_vector)$"
)
_LAYER_RE = re.compile(r"(?:^|\.)layers\.(\d+)\.")


@dataclass(frozen=True)
class TargetShapes:
    """(in_features, out_features) of every LoRA-targetable projection of the base model (full, TP=1)."""

    shapes: dict[str, tuple[int, int]]
    num_layers: int

    @classmethod
    def from_config(cls, config) -> TargetShapes:
        """`config`: model.config.MistralConfig or anything with the same attribute names."""
        h, inter = config.hidden_size, config.intermediate_size
        d = getattr(config, "head_dim", None) or h // config.num_attention_heads
        q, kv = config.num_attention_heads * d, config.num_key_value_heads * d
        shapes = {
            "q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
            "gate_proj": (h, inter), "up_proj": (h, inter), "down_proj": (inter, h),
            "lm_head": (h, config.vocab_size),
        }  # fmt: skip
        return cls(shapes=shapes, num_layers=config.num_hidden_layers)


@dataclass
class LoraAdapter:
    """Host-side LoRA weights of one (possibly merged) adapter.

    weights[(layer_idx, target)] = (A [r, in] float32, B [out, r] float32 with the scaling folded in);
    layer_idx is LM_HEAD_LAYER (-1) for lm_head. Modules the adapter does not target are absent.
    """

    name: str
    weights: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)

    @property
    def rank(self) -> int:
        return max((a.shape[0] for a, _ in self.weights.values()), default=0)

    @property
    def targets(self) -> frozenset[str]:
        return frozenset(t for _, t in self.weights)

    def delta(self, layer_idx: int, target: str) -> torch.Tensor | None:
        """The dense weight delta B @ A [out, in] (tests, merges); None when the module is not targeted."""
        if (layer_idx, target) not in self.weights:
            return None
        a, b = self.weights[(layer_idx, target)]
        return b @ a


def read_adapter_config(adapter_dir: Path) -> dict:
    """adapter_config.json, type-checked (peft_config), and the features that change the math refused."""
    path = adapter_dir / CONFIG_FILE
    cfg = _read_checked_config(adapter_dir, _UNSUPPORTED_FIELDS)
    targets = cfg.get("target_modules")
    if isinstance(targets, list):  # a string is a regex; then the tensor keys are checked instead
        unknown = sorted({t.split(".")[-1] for t in targets} - set(TARGETS))
        if unknown:
            raise InvalidArgument(
                f"{path}: unknown target module(s) {shown(unknown)}; supported: {', '.join(TARGETS)}"
            )
    return cfg


@dataclass(frozen=True)
class LoraModule:
    """One module of a PEFT file as stored: delta = scale * B @ A (scale not yet folded in)."""

    a: torch.Tensor  # [r, in], the file's dtype; a view of the file mapping (read-only use)
    b: torch.Tensor  # [out, r], ditto, unscaled
    scale: float
    magnitude: torch.Tensor | None = None  # DoRA: [out], ditto; None for plain LoRA


@dataclass
class PeftTensors:
    """A validated PEFT adapter before any conversion; modules[(layer_idx, target)] as in LoraAdapter."""

    name: str
    modules: dict[tuple[int, str], LoraModule] = field(default_factory=dict)

    def to_lora_adapter(self) -> LoraAdapter:
        """float32 copies with the scaling folded into B (owned memory: the file may change later)."""
        adapter = LoraAdapter(name=self.name)
        for key, m in self.modules.items():
            adapter.weights[key] = (m.a.to(torch.float32, copy=True), (m.b.float() * m.scale).contiguous())
        return adapter


# safetensors dtype names of the floating types a LoRA weight can have.
_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
# A LoRA header lists 2 tensors per targeted module: ~450 entries / ~70 KB for a 7B model on every
# target. Both bounds are checked before the JSON is parsed, so a crafted header costs no parse time.
_MAX_HEADER = 8 << 20
_MAX_HEADER_ENTRIES = 16384


def _map_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """name -> zero-copy view of a private read-only mapping of `path` (a safetensors file).

    Format: u64 little-endian header length N, N bytes of JSON {name: {dtype, shape, data_offsets:
    [begin, end]}, "__metadata__": {...}}, then the data; offsets are relative to the data start. One
    mapping instead of one allocated tensor per name (what safetensors' load_file returns): pages come
    straight from the page cache and only bytes the caller reads are touched. Only floating dtypes are
    mapped: a LoRA weight of another dtype is an error, any other such tensor is left out.
    """
    with path.open("rb") as f:
        size = f.seek(0, 2)
        f.seek(0)
        head = f.read(8)
        if len(head) < 8:
            raise ValueError("file shorter than the 8-byte header length")
        n = int.from_bytes(head, "little")
        if n > size - 8:
            raise ValueError(f"header length {n} does not fit a {size}-byte file")
        if n > _MAX_HEADER:
            raise ValueError(f"header of {n} bytes; an adapter's is at most {_MAX_HEADER}")
        raw_header = f.read(n)
    entries = raw_header.count(b'"data_offsets"')
    if entries > _MAX_HEADER_ENTRIES:
        raise ValueError(f"header lists {entries} tensors; an adapter has at most {_MAX_HEADER_ENTRIES}")
    try:
        header = json.loads(raw_header)
    except RecursionError:
        raise ValueError("header JSON nested too deeply") from None
    if not isinstance(header, dict):
        raise ValueError("header is not a JSON object")
    start, data_len = 8 + n, size - 8 - n
    raw = torch.empty(0, dtype=torch.uint8)
    if size:
        raw = raw.set_(torch.UntypedStorage.from_file(str(path), False, size))  # MAP_PRIVATE: never writes
    out: dict[str, torch.Tensor] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype_name, shape, (begin, end) = (
                info["dtype"],
                [int(d) for d in info["shape"]],
                info["data_offsets"],
            )
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"malformed header entry for {shown(name)}: {shown(info)}") from e
        if not (isinstance(begin, int) and isinstance(end, int) and 0 <= begin <= end <= data_len):
            raise ValueError(f"{shown(name)}: data offsets {[begin, end]} outside the {data_len}-byte data")
        dtype = _DTYPES.get(dtype_name)
        if dtype is None:
            if name.endswith((".lora_A.weight", ".lora_B.weight", ".lora_magnitude_vector")):
                raise ValueError(
                    f"{shown(name)} has dtype {dtype_name}; LoRA weights must be one of {list(_DTYPES)}"
                )
            continue  # e.g. a saved base layer in another dtype: never used
        numel = math.prod(shape)
        if min(shape, default=0) < 0 or numel * dtype.itemsize != end - begin:
            raise ValueError(f"{shown(name)}: {end - begin} bytes do not hold {dtype_name} {shape}")
        chunk = raw[start + begin : start + end]
        if (start + begin) % dtype.itemsize:  # the format does not promise alignment: copy that one
            chunk = chunk.clone()
        out[name] = chunk.view(dtype).view(shape)
    return out


def _read_tensors(adapter_dir: Path) -> dict[str, torch.Tensor]:
    path = adapter_dir / WEIGHTS_FILE
    if not path.is_file():
        if (adapter_dir / PICKLE_FILE).exists():
            # Unpickling runs arbitrary code from whoever published the adapter: never open it.
            raise InvalidArgument(
                f"{adapter_dir}: only a pickle file {PICKLE_FILE} is present; pickle-only adapters are "
                f"refused (never unpickled) - convert it to {WEIGHTS_FILE}"
            )
        raise InvalidArgument(f"{adapter_dir}: missing {WEIGHTS_FILE}")
    try:
        return _map_safetensors(path)
    except (OSError, ValueError, RuntimeError) as e:
        raise InvalidArgument(f"{path}: unreadable safetensors file: {e}") from e


def _parse_key(key: str, num_layers: int, where: Path) -> tuple[int, str, str] | None:
    """-> (layer_idx, target, 'lora_A'|'lora_B'|'magnitude'), None for keys to skip; raises on others."""
    m = _KEY_RE.match(key)
    if m is None:
        # peft saves the unchanged base weight of an lm_head/embedding target (save_embedding_layers).
        if key.endswith(".base_layer.weight"):
            return None
        if "modules_to_save" in key:
            raise InvalidArgument(f"{where}: modules_to_save weight {shown(key)} is not supported")
        raise InvalidArgument(f"{where}: unsupported tensor {shown(key)} (not a LoRA A/B weight)")
    module, part = m.group("module"), m.group("part") or "magnitude"
    target = module.split(".")[-1]
    if target not in TARGETS:
        raise InvalidArgument(
            f"{where}: unknown target module {shown(target)} in {shown(key)}; supported: {', '.join(TARGETS)}"
        )
    if target == "lm_head":
        return LM_HEAD_LAYER, target, part
    lm = _LAYER_RE.search("." + module + ".")
    if lm is None:
        raise InvalidArgument(f"{where}: cannot find the layer index in {shown(key)}")
    layer = int(lm.group(1))
    if layer >= num_layers:
        raise InvalidArgument(
            f"{where}: {shown(key)} targets layer {layer} but the base model has {num_layers}"
        )
    return layer, target, part


def load_peft_adapter(adapter_dir: str | Path, config, name: str | None = None) -> LoraAdapter:
    """Read, validate and scale one PEFT LoRA adapter. `config`: the base model's MistralConfig."""
    return read_peft_adapter(adapter_dir, config, name).to_lora_adapter()


def read_peft_adapter(adapter_dir: str | Path, config, name: str | None = None) -> PeftTensors:
    """Read and validate one PEFT LoRA adapter; tensors stay views of the file, scales stay separate."""
    adapter_dir = Path(adapter_dir)
    if not adapter_dir.is_dir():
        raise NotFound(f"adapter directory {adapter_dir} does not exist")
    cfg = read_adapter_config(adapter_dir)
    tensors = _read_tensors(adapter_dir)
    return validate_lora_tensors(tensors, cfg, config, adapter_dir / WEIGHTS_FILE, name or str(adapter_dir))


def validate_lora_tensors(
    tensors: dict[str, torch.Tensor], cfg: dict, config, where: Path, name: str
) -> PeftTensors:
    """Check every tensor name and shape against the base model and the config; -> modules + scales."""
    shapes = TargetShapes.from_config(config)
    parts: dict[tuple[int, str], dict[str, tuple[str, torch.Tensor]]] = {}
    for key, t in tensors.items():
        parsed = _parse_key(key, shapes.num_layers, where)
        if parsed is not None:
            layer, target, part = parsed
            parts.setdefault((layer, target), {})[part] = (key, t)

    alpha, r_default = cfg.get("lora_alpha", cfg["r"]), cfg["r"]
    rank_pattern, alpha_pattern = cfg.get("rank_pattern") or {}, cfg.get("alpha_pattern") or {}
    dora = bool(cfg.get("use_dora"))
    out = PeftTensors(name=name)
    for (layer, target), ab in sorted(parts.items()):
        magnitude = _magnitude(ab.pop("magnitude", None), dora, layer, target, shapes, where)
        if set(ab) != {"lora_A", "lora_B"}:
            raise InvalidArgument(
                f"{where}: layer {layer} {target} has only {sorted(ab)}; needs lora_A and lora_B"
            )
        (ka, a), (kb, b) = ab["lora_A"], ab["lora_B"]
        fan_in, fan_out = shapes.shapes[target]
        r = a.shape[0] if a.dim() else 0
        if a.dim() != 2 or b.dim() != 2 or not 1 <= r <= MAX_RANK:
            raise InvalidArgument(
                f"{where}: {shown(ka)} has shape {tuple(a.shape)}; rank must be in 1..{MAX_RANK}"
            )
        if tuple(a.shape) != (r, fan_in):
            raise InvalidArgument(
                f"{where}: shape mismatch for {shown(ka)}: got {tuple(a.shape)}, "
                f"base model needs ({r}, {fan_in})"
            )
        if tuple(b.shape) != (fan_out, r):
            raise InvalidArgument(
                f"{where}: shape mismatch for {shown(kb)}: got {tuple(b.shape)}, "
                f"base model needs ({fan_out}, {r})"
            )
        module = ka[len("base_model.model.") : -len(".lora_A.weight")]
        r_cfg = pattern_value(rank_pattern, module, r_default)
        if r != r_cfg:
            raise InvalidArgument(f"{where}: {shown(ka)} has rank {r} but adapter_config.json says r={r_cfg}")
        a_mod = pattern_value(alpha_pattern, module, alpha)
        scale = a_mod / math.sqrt(r) if cfg.get("use_rslora") else a_mod / r
        out.modules[(layer, target)] = LoraModule(a, b, scale, magnitude)
    if not out.modules:
        raise InvalidArgument(f"{where}: no LoRA weights found")
    return out


def _magnitude(entry, dora: bool, layer: int, target: str, shapes: TargetShapes, where: Path):
    """The DoRA magnitude vector of one module [out] (None for plain LoRA), checked."""
    if entry is None:
        if dora:
            raise InvalidArgument(
                f"{where}: use_dora is set but layer {layer} {target} has no lora_magnitude_vector"
            )
        return None
    key, m = entry
    if not dora:
        raise InvalidArgument(
            f"{where}: DoRA magnitude vector {key!r} present but adapter_config.json does not set use_dora"
        )
    fan_out = shapes.shapes[target][1]
    if tuple(m.shape) != (fan_out,):
        raise InvalidArgument(
            f"{where}: shape mismatch for {key!r}: got {tuple(m.shape)}, needs ({fan_out},)"
        )
    if not torch.isfinite(m).all():
        raise InvalidArgument(f"{where}: {key!r} has non-finite values")
    return m
