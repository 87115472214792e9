"""xgrammar vs llguidance on the shard's structured-output workload (host CPU only, no model).

    python -m bench.grammar_engines --tokenizer DIR [--tokenizer DIR2 ...] [--out FILE.json]

Per tokenizer directory (any Hugging Face fast tokenizer) and engine:
  tokenizer   seconds to build the engine's tokenizer object (once per process in the shard)
  compile     per schema of shard_server/testing/json_schemas.py, a cold compile (no cache): p50, p99,
              max; a schema that fails to compile is a coverage miss
  coverage    per schema, 8 documents drawn by a random walk under the mask (a uniformly random
              allowed token per step, EOS once allowed with probability 1/2): every document must
              finish within 400 tokens and validate with `jsonschema`
  mask        64 rows, each with its own schema (64 distinct schemas), advanced by random walks; the
              time to fill the [64, ceil(V/32)] int32 host bitmask of one step with the engine's
              parallel batch call: p50, p99 over 200 steps
  refusals    schemas with keywords that neither engine implements (uniqueItems, not, if/then,
              propertyNames, dependentRequired, an unknown format): refused at compile time (good: the
              request gets INVALID_ARGUMENT) or accepted and silently ignored (documents that may not
              validate)
Both engines get the shard's output format: no free whitespace, separators ", " and ": ".
Each engine is optional: one that is not installed is reported as such.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from pathlib import Path

import numpy as np

from shard_server.generation.grammar import JSON_OPTIONS
from shard_server.testing.json_schemas import SCHEMAS, distinct_schemas, schema_text

SEPARATORS = (JSON_OPTIONS["item_separator"], JSON_OPTIONS["key_separator"])
UNIMPLEMENTED = [
    {"type": "array", "items": {"type": "integer"}, "uniqueItems": True},
    {"not": {"type": "integer"}},
    {"if": {"type": "integer"}, "then": {"minimum": 1}},
    {"type": "object", "propertyNames": {"maxLength": 3}},
    {"type": "object", "properties": {"a": {"type": "integer"}}, "dependentRequired": {"a": ["b"]}},
    {"type": "string", "format": "wibble"},
]


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(round(q * (len(s) - 1))))]


def allowed_ids(row: np.ndarray, vocab: int) -> np.ndarray:
    bits = np.unpackbits(row.view(np.uint8), bitorder="little")[:vocab]
    return np.flatnonzero(bits)


# ---------------------------------------------------------------- engines behind one small interface


class LLGuidance:
    name = "llguidance"

    def __init__(self, tokenizer, vocab: int, eos: int):
        import llguidance

        self.ll = llguidance
        backend = tokenizer.backend_tokenizer
        self.tok = llguidance.LLTokenizer(backend.to_str(), n_vocab=vocab, eos_token=eos)
        self.executor = llguidance.LLExecutor()
        self.vocab = vocab

    def compile(self, schema: str):
        g = self.ll.LLMatcher.grammar_from_json_schema(schema, overrides=JSON_OPTIONS)
        m = self.ll.LLMatcher(self.tok, g, log_level=0)
        if m.is_error():
            raise ValueError(m.get_error())
        return m

    def matcher(self, compiled):
        return compiled.deep_copy()

    def fill(self, matchers, bitmask: np.ndarray) -> None:
        width = bitmask.shape[1] * 4
        self.executor.unsafe_compute_mask_ptr(
            [(m, i) for i, m in enumerate(matchers)], bitmask.ctypes.data, width, bitmask.shape[0]
        )

    def accept(self, m, token: int) -> bool:
        return m.consume_token(token)

    def done(self, m) -> bool:
        return m.is_stopped()


class XGrammar:
    name = "xgrammar"

    def __init__(self, tokenizer, vocab: int, eos: int):
        import xgrammar

        self.xgr = xgrammar
        info = xgrammar.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab, stop_token_ids=[eos])
        self.compiler = xgrammar.GrammarCompiler(info, cache_enabled=False)
        self.batch = xgrammar.BatchGrammarMatcher()
        self.vocab = vocab

    def compile(self, schema: str):
        return self.compiler.compile_json_schema(schema, any_whitespace=False, separators=SEPARATORS)

    def matcher(self, compiled):
        return self.xgr.GrammarMatcher(compiled)

    def fill(self, matchers, bitmask: np.ndarray) -> None:
        self.batch.batch_fill_next_token_bitmask(matchers, bitmask)

    def accept(self, m, token: int) -> bool:
        return m.accept_token(token)

    def done(self, m) -> bool:
        return m.is_terminated()


ENGINES = {"llguidance": LLGuidance, "xgrammar": XGrammar}


# ---------------------------------------------------------------- measurements


def random_document(engine, compiled, rng: random.Random, eos: int, max_tokens: int = 400):
    """A random walk under the mask -> (token ids, finished)."""
    m = engine.matcher(compiled)
    mask = np.zeros((1, (engine.vocab + 31) // 32), dtype=np.int32)
    ids: list[int] = []
    for _ in range(max_tokens):
        engine.fill([m], mask)
        allowed = allowed_ids(mask[0], engine.vocab)
        if len(allowed) == 0:
            return ids, False
        if eos in allowed and (len(allowed) == 1 or rng.random() < 0.5):
            return ids, True
        tok = int(rng.choice([t for t in allowed if t != eos]))
        if not engine.accept(m, tok):
            return ids, False
        ids.append(tok)
    return ids, False


def coverage(engine, tokenizer, eos: int, docs: int = 8) -> dict:
    import jsonschema

    per_schema = {}
    compile_s = []
    for name, schema in SCHEMAS.items():
        t0 = time.perf_counter()
        try:
            compiled = engine.compile(schema_text(schema))
        except Exception as e:  # noqa: BLE001 - a compile failure is what is being counted
            per_schema[name] = f"compile error: {str(e)[:120]}"
            continue
        compile_s.append(time.perf_counter() - t0)
        rng = random.Random(hash(name) & 0xFFFF)
        problems = []
        for _ in range(docs):
            ids, finished = random_document(engine, compiled, rng, eos)
            text = tokenizer.decode(ids)
            if not finished:
                problems.append(f"unfinished after {len(ids)} tokens: {text[:60]!r}")
                continue
            try:
                jsonschema.validate(json.loads(text), schema)
            except Exception as e:  # noqa: BLE001
                problems.append(f"invalid {text[:60]!r}: {str(e)[:80]}")
        per_schema[name] = problems[0] if problems else "ok"
    ok = sum(v == "ok" for v in per_schema.values())
    return {
        "schemas": len(SCHEMAS),
        "ok": ok,
        "failures": {k: v for k, v in per_schema.items() if v != "ok"},
        "compile_ms_p50": 1e3 * pct(compile_s, 0.5) if compile_s else None,
        "compile_ms_p99": 1e3 * pct(compile_s, 0.99) if compile_s else None,
        "compile_ms_max": 1e3 * max(compile_s) if compile_s else None,
    }


def mask_time(engine, eos: int, batch: int = 64, steps: int = 200) -> dict:
    schemas = [schema_text(s) for s in distinct_schemas(batch)]
    compiled = [engine.compile(s) for s in schemas]
    matchers = [engine.matcher(c) for c in compiled]
    mask = np.zeros((batch, (engine.vocab + 31) // 32), dtype=np.int32)
    rng = random.Random(0)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        engine.fill(matchers, mask)
        times.append(time.perf_counter() - t0)
        for i, m in enumerate(matchers):
            allowed = allowed_ids(mask[i], engine.vocab)
            others = [int(t) for t in allowed if t != eos]
            if engine.done(m) or not others or (eos in allowed and rng.random() < 0.5):
                matchers[i] = engine.matcher(compiled[i])  # a finished row starts a new document
            else:
                engine.accept(m, rng.choice(others))
    return {
        "batch": batch,
        "mask_ms_p50": 1e3 * statistics.median(times),
        "mask_ms_p99": 1e3 * pct(times, 0.99),
    }


def refusals(engine) -> dict:
    refused = 0
    for s in UNIMPLEMENTED:
        try:
            engine.compile(json.dumps(s))
        except Exception:  # noqa: BLE001 - any refusal counts
            refused += 1
    return {"unimplemented_refused": refused, "unimplemented_total": len(UNIMPLEMENTED)}


def run(tokenizer_dir: Path, engines: list[str]) -> list[dict]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    vocab = len(tokenizer)
    eos = tokenizer.eos_token_id
    rows = []
    for name in engines:
        row: dict = {"engine": name, "tokenizer": str(tokenizer_dir), "vocab": vocab}
        try:
            t0 = time.perf_counter()
            engine = ENGINES[name](tokenizer, vocab, eos)
            row["tokenizer_s"] = time.perf_counter() - t0
            row.update(coverage(engine, tokenizer, eos))
            row.update(mask_time(engine, eos))
            row.update(refusals(engine))
        except ImportError as e:
            row["error"] = f"not installed: {e}"
        except Exception as e:  # noqa: BLE001 - fail soft per engine
            row["error"] = f"{type(e).__name__}: {e}"
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokenizer", action="append", required=True, help="a Hugging Face tokenizer dir")
    ap.add_argument("--engine", action="append", choices=sorted(ENGINES), help="default: both")
    ap.add_argument("--out", type=Path, help="write the rows as JSON here")
    args = ap.parse_args(argv)
    rows = []
    for d in args.tokenizer:
        rows += run(Path(d), args.engine or sorted(ENGINES))
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
