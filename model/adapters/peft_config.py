"""adapter_config.json as untrusted input: a bounded read, typed fields, and patterns matched without regex.

Adapter configs come from third parties (the hub, S3, a user's directory). Everything here refuses with
InvalidArgument (INVALID_ARGUMENT) naming the field, in time bounded by the (bounded) file size:

- the file: a regular file of at most MAX_CONFIG_BYTES, UTF-8 JSON whose top level is an object
  (nesting too deep for the parser is refused, not a crash);
- `r` an integer in 1..MAX_RANK, `lora_alpha` a finite number, `use_rslora` a bool, `peft_type` a string,
  `target_modules` a list of strings (or one string, PEFT's regex form, which we do not evaluate: the
  tensor names decide what is targeted);
- `rank_pattern` / `alpha_pattern`: objects of at most MAX_PATTERN_KEYS keys, values an int rank / a
  finite number.

Pattern keys. PEFT applies a key to a module when `re.match(rf"(.*\\.)?({key})$", module_name)` matches,
i.e. the key is a regular expression. Evaluating a third party's regular expression with a backtracking
engine can take exponential time (`(.*.*)*Z`) while holding the GIL, which would stall every thread of
the shard. So keys are matched as literal module-name suffixes on a dot boundary (`match_pattern`): the
key equals the module name or the name ends with "." + key. For keys made of name characters
([A-Za-z0-9_-] and dots, `\\.` accepted for a dot) this is exactly PEFT's result for every module name;
any other regex syntax is refused by name rather than guessed at.
"""

from __future__ import annotations

import json
import math
import re
import stat
from pathlib import Path

from model.errors import InvalidArgument, shown

CONFIG_FILE = "adapter_config.json"
MAX_RANK = 256
MAX_CONFIG_BYTES = 1 << 20  # a real adapter_config.json is ~1 KB; patterns for every module ~100 KB
MAX_PATTERN_KEYS = 4096  # >= one key per module of a 128-layer model with all 7 targets + lm_head
MAX_PATTERN_KEY_CHARS = 512
_LITERAL_KEY = re.compile(r"[A-Za-z0-9_\-]+(?:\.[A-Za-z0-9_\-]+)*")  # linear: no nested quantifiers


def read_adapter_config(adapter_dir: Path, unsupported: dict[str, str]) -> dict:
    """adapter_config.json, type-checked; `unsupported`: field -> why, refused when the field is truthy."""
    path = adapter_dir / CONFIG_FILE
    cfg = _load_object(path)
    peft_type = cfg.get("peft_type", "LORA")
    if peft_type != "LORA":
        raise InvalidArgument(f"{path}: peft_type {shown(peft_type)} is not LORA")
    for key, why in unsupported.items():
        if cfg.get(key):
            raise InvalidArgument(f"{path}: {why}")
    _check_rank(path, "r", cfg.get("r"))
    if "lora_alpha" in cfg:
        _check_number(path, "lora_alpha", cfg["lora_alpha"])
    if not isinstance(cfg.get("use_rslora", False), bool):
        raise InvalidArgument(f"{path}: use_rslora must be true or false, got {shown(cfg['use_rslora'])}")
    for field, check in (("rank_pattern", _check_rank), ("alpha_pattern", _check_number)):
        patterns = cfg.get(field) or {}
        if not isinstance(patterns, dict):
            raise InvalidArgument(f"{path}: {field} must be an object of module name -> value")
        if len(patterns) > MAX_PATTERN_KEYS:
            raise InvalidArgument(f"{path}: {field} has {len(patterns)} keys; at most {MAX_PATTERN_KEYS}")
        for key, value in patterns.items():
            _check_pattern_key(path, field, key)
            check(path, f"{field}[{shown(key)}]", value)
    targets = cfg.get("target_modules")
    if targets is not None and not isinstance(targets, str):
        if not isinstance(targets, list) or not all(isinstance(t, str) for t in targets):
            raise InvalidArgument(f"{path}: target_modules must be a list of module names (or one string)")
    return cfg


def match_pattern(key: str, module: str) -> bool:
    """PEFT's pattern match for a literal key: the module name equals it or ends with "." + key."""
    key = key.replace("\\.", ".")
    return module == key or module.endswith("." + key)


def pattern_value(patterns: dict, module: str, default):
    """The value of the first key (in file order, as PEFT) that matches `module`; else `default`."""
    for key, value in patterns.items():
        if match_pattern(key, module):
            return value
    return default


def _load_object(path: Path) -> dict:
    try:
        st = path.stat()  # follows links; the source checks where they lead
    except FileNotFoundError:
        raise InvalidArgument(
            f"{path.parent}: missing {CONFIG_FILE} (not a PEFT adapter directory)"
        ) from None
    except (OSError, RuntimeError, ValueError) as e:  # a link loop, a bad name
        raise InvalidArgument(f"{path}: cannot be read: {type(e).__name__}") from None
    if not stat.S_ISREG(st.st_mode):
        raise InvalidArgument(f"{path}: {CONFIG_FILE} is not a regular file")
    with path.open("rb") as f:
        raw = f.read(MAX_CONFIG_BYTES + 1)  # /proc files report size 0: bound the read, not the stat
    if len(raw) > MAX_CONFIG_BYTES:
        raise InvalidArgument(f"{path}: more than {MAX_CONFIG_BYTES} bytes; an adapter config is a few KB")
    try:
        cfg = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise InvalidArgument(f"{path}: not UTF-8 JSON: {shown(str(e), 120)}") from None
    except RecursionError:
        raise InvalidArgument(f"{path}: JSON nested too deeply") from None
    if not isinstance(cfg, dict):
        raise InvalidArgument(f"{path}: {CONFIG_FILE} must hold a JSON object, not {type(cfg).__name__}")
    return cfg


def _check_rank(path: Path, field: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_RANK:
        raise InvalidArgument(
            f"{path}: rank {field}={shown(value)} is out of range 1..{MAX_RANK} (an integer)"
        )


def _check_number(path: Path, field: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InvalidArgument(f"{path}: {field} must be a finite number, got {shown(value)}")


def _check_pattern_key(path: Path, field: str, key: str) -> None:
    if len(key) > MAX_PATTERN_KEY_CHARS or not _LITERAL_KEY.fullmatch(key.replace("\\.", ".")):
        raise InvalidArgument(
            f"{path}: {field} key {shown(key)} is not a module name: pattern keys are matched as literal "
            "module-name suffixes (e.g. 'q_proj' or 'model.layers.0.self_attn.q_proj'); regular "
            "expressions are not evaluated"
        )
