"""Adapter files and configs are third-party content: every crafted one is refused with a named reason
(INVALID_ARGUMENT or NOT_FOUND), in bounded time, and never read from outside the adapter root."""

from __future__ import annotations

import json
import shutil
import signal
import struct
import time
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file, save_file

from cache.adapter_sources import AdapterSourceConfig, AdapterSources
from cache.adapter_store import AdapterStore
from model.adapters.peft_config import match_pattern
from model.adapters.peft_loader import read_peft_adapter
from model.errors import InvalidArgument, ShardError
from shard_server.types import AdapterSpec

CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"


def base_config(model_dir: Path) -> SimpleNamespace:
    d = json.loads((model_dir / "config.json").read_text())
    d.setdefault("head_dim", d["hidden_size"] // d["num_attention_heads"])
    return SimpleNamespace(**d)


@pytest.fixture(scope="module")
def good(tiny_model_dir, adapter_factory) -> Path:
    return adapter_factory(tiny_model_dir, rank=4, target_modules=("q_proj", "v_proj", "down_proj"), seed=3)


@pytest.fixture
def root(tmp_path) -> Path:
    r = tmp_path / "root"
    r.mkdir()
    return r


@pytest.fixture
def copy(good, root):
    """copy(name) -> a writable copy of the good adapter under the adapter root."""

    def make(name: str = "a") -> Path:
        out = root / name
        shutil.copytree(good, out)
        return out

    return make


@contextmanager
def time_limit(seconds: float):
    """Fail (instead of hanging the suite) when the block runs longer: SIGALRM interrupts even a regex
    match, which checks for signals in the main thread."""

    def on_alarm(signum, frame):
        raise TimeoutError(f"took longer than {seconds}s")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def load(root: Path, adapter_id: str, config) -> object:
    """What LoadAdapter does with a LOCAL id: resolve under the root, read, validate."""
    sources = AdapterSources(AdapterSourceConfig(adapter_root=root))
    return read_peft_adapter(sources.resolve(adapter_id, "local"), config)


def expect_refused(root: Path, adapter_id: str, config, codes=("INVALID_ARGUMENT",)) -> str:
    with time_limit(5.0):
        with pytest.raises(ShardError) as e:
            load(root, adapter_id, config)
    assert e.value.status.name in codes, (type(e.value), e.value)
    assert len(str(e.value)) < 2000  # names the problem without echoing unbounded input
    return str(e.value)


def edit_config(d: Path, text: str) -> None:
    (d / CONFIG).write_text(text)


def with_config(d: Path, **changes) -> None:
    cfg = json.loads((d / CONFIG).read_text())
    cfg.update(changes)
    edit_config(d, json.dumps(cfg))


# ---------------------------------------------------------------- 1. non-finite values refused at load


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_weights_are_refused_at_load(copy, root, tiny_model_dir, value):
    d = copy()
    tensors = load_file(str(d / WEIGHTS))
    key = next(k for k in tensors if k.endswith("v_proj.lora_B.weight"))
    tensors[key][0, 0] = value
    save_file(tensors, str(d / WEIGHTS))
    store = AdapterStore(base_config(tiny_model_dir), sources=AdapterSources(AdapterSourceConfig(root)))
    with pytest.raises(InvalidArgument, match="non-finite"):
        store.load(1, AdapterSpec(adapter_ids=("a",), source="local"))
    assert not store.is_loaded(1)


@pytest.mark.parametrize("alpha", ["NaN", "Infinity", "-Infinity", "1e999"])
def test_non_finite_lora_alpha_is_refused(copy, root, tiny_model_dir, alpha):
    d = copy()
    text = (d / CONFIG).read_text()
    cfg = json.loads(text)
    cfg["lora_alpha"] = 12345
    edit_config(d, json.dumps(cfg).replace("12345", alpha))
    assert "lora_alpha" in expect_refused(root, "a", base_config(tiny_model_dir))


def test_non_finite_alpha_pattern_is_refused(copy, root, tiny_model_dir):
    d = copy()
    with_config(d, alpha_pattern={"q_proj": 1})
    edit_config(d, (d / CONFIG).read_text().replace('"q_proj": 1}', '"q_proj": NaN}'))
    assert "alpha_pattern" in expect_refused(root, "a", base_config(tiny_model_dir))


@pytest.mark.parametrize("weights", [(float("nan"), 1.0), (float("inf"), 1.0), (float("-inf"), 1.0)])
def test_non_finite_merge_weights_are_refused(copy, root, tiny_model_dir, weights):
    copy("a"), copy("b")
    store = AdapterStore(base_config(tiny_model_dir), sources=AdapterSources(AdapterSourceConfig(root)))
    spec = AdapterSpec(adapter_ids=("a", "b"), weights=weights, source="local")
    with pytest.raises(InvalidArgument, match="non-finite"):
        store.load(2, spec)
    assert not store.is_loaded(2)


def test_scaling_that_overflows_the_store_dtype_is_refused(copy, root, tiny_model_dir):
    """A finite float32 weight times a finite alpha can still be inf in float16."""
    d = copy()
    with_config(d, lora_alpha=1e8)
    store = AdapterStore(base_config(tiny_model_dir), dtype=torch.float16,
                         sources=AdapterSources(AdapterSourceConfig(root)))  # fmt: skip
    with pytest.raises(InvalidArgument, match="non-finite"):
        store.load(1, AdapterSpec(adapter_ids=("a",), source="local"))


# ---------------------------------------------------------------- 2. patterns: no backtracking regex


@pytest.mark.parametrize("field", ["rank_pattern", "alpha_pattern"])
def test_catastrophic_pattern_finishes_at_once(copy, root, tiny_model_dir, field):
    d = copy()
    with_config(d, **{field: {"(.*.*)*Z" + "a" * 30: 4, "(a|aa)+$": 4}})
    t0 = time.monotonic()
    msg = expect_refused(root, "a", base_config(tiny_model_dir))
    assert time.monotonic() - t0 < 2.0
    assert field in msg


PEFT_NAMES = [
    "model.layers.0.self_attn.q_proj",
    "model.layers.1.self_attn.q_proj",
    "model.layers.10.self_attn.q_proj",
    "model.layers.1.mlp.down_proj",
    "lm_head",
]
PEFT_KEYS = [
    "q_proj",
    "self_attn.q_proj",
    "layers.1.self_attn.q_proj",
    "model.layers.1.self_attn.q_proj",
    "0.self_attn.q_proj",
    "layers.1.mlp.down_proj",
    "down_proj",
    "lm_head",
    "proj",
    "attn.q_proj",
]


def test_literal_pattern_keys_match_as_peft_does():
    """PEFT: `re.match(rf"(.*\\.)?({key})$", name)`; for literal keys that is "equal, or a suffix after
    a dot", which is what match_pattern implements without a regex."""
    peft_other = pytest.importorskip("peft.utils.other")
    for name in PEFT_NAMES:
        for key in PEFT_KEYS:
            expected = peft_other.get_pattern_key([key], name) == key and (
                name == key or name.endswith("." + key)
            )
            assert match_pattern(key, name) == expected, (key, name)


def test_pattern_values_apply_per_module(copy, root, tiny_model_dir):
    d = copy()
    with_config(d, alpha_pattern={"layers.1.self_attn.v_proj": 16})
    ad = load(root, "a", base_config(tiny_model_dir))
    r = json.loads((d / CONFIG).read_text())["r"]
    alpha = json.loads((d / CONFIG).read_text())["lora_alpha"]
    assert ad.modules[(1, "v_proj")].scale == pytest.approx(16 / r)
    assert ad.modules[(0, "v_proj")].scale == pytest.approx(alpha / r)


def test_too_many_pattern_keys_are_refused(copy, root, tiny_model_dir):
    d = copy()
    with_config(d, alpha_pattern={f"layers.{i}.mlp.up_proj": 8 for i in range(5000)})  # 130 KB
    assert "alpha_pattern" in expect_refused(root, "a", base_config(tiny_model_dir))


# ---------------------------------------------------------------- 5. no file read from outside the root


@pytest.mark.parametrize("name", [CONFIG, WEIGHTS])
def test_file_symlink_out_of_the_root_is_refused(copy, root, tmp_path, tiny_model_dir, name):
    d = copy()
    outside = tmp_path / "outside"
    outside.mkdir()
    shutil.move(str(d / name), outside / name)  # a valid file, just not under the root
    (d / name).symlink_to(outside / name)
    assert "outside the adapter root" in expect_refused(root, "a", base_config(tiny_model_dir))


def test_file_symlink_inside_the_root_is_fine(copy, root, tiny_model_dir):
    d = copy()
    shared = root / "shared"
    shared.mkdir()
    shutil.move(str(d / WEIGHTS), shared / WEIGHTS)
    (d / WEIGHTS).symlink_to(shared / WEIGHTS)
    assert load(root, "a", base_config(tiny_model_dir)).modules


def test_config_pointing_at_system_files_is_refused(copy, root, tiny_model_dir):
    d = copy()
    (d / CONFIG).unlink()
    (d / CONFIG).symlink_to("/proc/self/environ")
    expect_refused(root, "a", base_config(tiny_model_dir))


# ---------------------------------------------------------------- 6. wrong types -> INVALID_ARGUMENT


BAD_CONFIGS = {
    "a list": "[1, 2]",
    "null": "null",
    "a string": '"LORA"',
    "a number": "7",
    "deeply nested": "[" * 100_000 + "]" * 100_000,
    "not JSON": "{r: 4",
    "not UTF-8": b"\xff\xfe{}".decode("latin-1"),
}


@pytest.mark.parametrize("case", list(BAD_CONFIGS))
def test_config_that_is_not_an_object_is_refused(copy, root, tiny_model_dir, case):
    d = copy()
    if case == "not UTF-8":
        (d / CONFIG).write_bytes(b"\xff\xfe{\x00}")
    else:
        edit_config(d, BAD_CONFIGS[case])
    assert CONFIG in expect_refused(root, "a", base_config(tiny_model_dir))


BAD_FIELDS = {
    "rank_pattern a list": {"rank_pattern": ["q_proj", 4]},
    "rank_pattern value a string": {"rank_pattern": {"q_proj": "4"}},
    "rank_pattern key a number": None,  # written by hand below (JSON keys are strings)
    "alpha_pattern a string": {"alpha_pattern": "q_proj"},
    "alpha_pattern value a list": {"alpha_pattern": {"q_proj": [8]}},
    "lora_alpha a string": {"lora_alpha": "8"},
    "lora_alpha a bool": {"lora_alpha": True},
    "lora_alpha a dict": {"lora_alpha": {"x": 1}},
    "r a bool": {"r": True},
    "r a float": {"r": 4.0},
    "target_modules numbers": {"target_modules": [1, 2]},
    "target_modules a dict": {"target_modules": {"q_proj": 1}},
    "target_modules nested lists": {"target_modules": [["q_proj"]]},
    "peft_type a list": {"peft_type": ["LORA"]},
    "use_rslora a string": {"use_rslora": "yes"},
}


@pytest.mark.parametrize("case", [c for c, v in BAD_FIELDS.items() if v is not None])
def test_wrong_typed_fields_are_refused(copy, root, tiny_model_dir, case):
    d = copy()
    with_config(d, **BAD_FIELDS[case])
    expect_refused(root, "a", base_config(tiny_model_dir))


def test_oversized_config_is_refused_without_reading_it(copy, root, tiny_model_dir):
    d = copy()
    cfg = json.loads((d / CONFIG).read_text())
    cfg["padding"] = "x" * (8 << 20)
    edit_config(d, json.dumps(cfg))
    assert "bytes" in expect_refused(root, "a", base_config(tiny_model_dir))


def test_symlink_loops_and_odd_ids_are_refused(copy, root, tiny_model_dir):
    cfg = base_config(tiny_model_dir)
    (root / "loop").symlink_to(root / "loop")
    expect_refused(root, "loop", cfg, codes=("INVALID_ARGUMENT", "NOT_FOUND"))
    d = copy()
    (d / CONFIG).unlink()
    (d / CONFIG).symlink_to(d / CONFIG)
    expect_refused(root, "a", cfg, codes=("INVALID_ARGUMENT", "NOT_FOUND"))
    expect_refused(root, "a\x00b", cfg)
    expect_refused(root, "x" * 300, cfg, codes=("INVALID_ARGUMENT", "NOT_FOUND"))
    expect_refused(root, "/".join(["y" * 200] * 30), cfg, codes=("INVALID_ARGUMENT", "NOT_FOUND"))
    msg = expect_refused(root, "z" * 50_000, cfg, codes=("INVALID_ARGUMENT", "NOT_FOUND"))
    assert len(msg) < 1000


def test_config_that_is_a_directory_or_fifo_is_refused(copy, root, tiny_model_dir):
    d = copy()
    (d / CONFIG).unlink()
    (d / CONFIG).mkdir()
    expect_refused(root, "a", base_config(tiny_model_dir))


# ---------------------------------------------------------------- 12. bounded safetensors header


def _write_safetensors_header(path: Path, header: dict) -> None:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw)


def test_header_with_many_entries_is_refused_quickly(copy, root, tiny_model_dir):
    d = copy()
    header = {f"base_model.model.model.layers.0.self_attn.q_proj.x{i}.lora_A.weight":
              {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]} for i in range(200_000)}  # fmt: skip
    _write_safetensors_header(d / WEIGHTS, header)
    t0 = time.monotonic()
    msg = expect_refused(root, "a", base_config(tiny_model_dir))
    assert time.monotonic() - t0 < 1.5, "the header must be bounded before it is parsed"
    assert "header" in msg


def test_header_length_beyond_the_bound_is_refused(copy, root, tiny_model_dir):
    d = copy()
    (d / WEIGHTS).write_bytes(struct.pack("<Q", 64 << 20) + b"{" + b" " * (64 << 20))
    assert "header" in expect_refused(root, "a", base_config(tiny_model_dir))


def test_header_that_is_deeply_nested_is_refused(copy, root, tiny_model_dir):
    d = copy()
    raw = b"[" * 200_000 + b"]" * 200_000
    (d / WEIGHTS).write_bytes(struct.pack("<Q", len(raw)) + raw)
    expect_refused(root, "a", base_config(tiny_model_dir))
