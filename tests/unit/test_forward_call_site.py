"""`FlashMistralForCausalLM.forward` is called from one place, `ForwardBatch.run`; every other forward
(shard, benchmarks, tests) goes through a ForwardBatch constructor. Read statically: a call passing
forward's `cu_seqlen_prefill` (it has no default, so every call names it) anywhere else fails here."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CALL_SITE = REPO / "model" / "forward_batch.py"


def _callers_of_forward() -> list[str]:
    found = []
    for top in ("model", "cache", "shard_server", "bench", "tests"):
        for path in (REPO / top).rglob("*.py"):
            if "pb" in path.relative_to(REPO).parts:
                continue
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.Call) and any(k.arg == "cu_seqlen_prefill" for k in node.keywords):
                    found.append(f"{path.relative_to(REPO)}:{node.lineno}")
    return found


def test_forward_is_called_only_from_forward_batch_run():
    callers = _callers_of_forward()
    assert callers == [f"{CALL_SITE.relative_to(REPO)}:{_run_call_line()}"], callers


def _run_call_line() -> int:
    tree = ast.parse(CALL_SITE.read_text())
    run = next(n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == "run")
    return next(n.lineno for n in ast.walk(run) if isinstance(n, ast.Call))
