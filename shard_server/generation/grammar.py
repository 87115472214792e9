"""JSON-schema constraints: checking a request's schema, compiling it with llguidance, caching the result.

`SchemaCompiler` is one per engine (one tokenizer, one model vocabulary). `compile(schema_text)` returns a
`CompiledSchema` or raises `SchemaError` (a ValueError: the caller answers INVALID_ARGUMENT with its
text) or `GrammarUnavailable` (a NotImplementedError: llguidance missing, or a tokenizer it cannot read).
It is thread-safe: the servicer compiles a Prefill's schemas on its handler thread before the batch
reaches the model thread, so decoding of other batches goes on meanwhile; the model thread then finds
them in the cache (or compiles a miss itself).

Bounds on what a schema may cost, all refused with a message that names the problem:
- text: at most `max_schema_bytes`; JSON nesting at most `max_depth`;
- grammar: llguidance's own limits (grammar size, lexer states, regex fuel per compile and per token):
  counted work, not time, so every rank of a tensor-parallel group reaches the same verdict;
- time: with one rank, a compile that takes longer than `compile_timeout_s` is refused (it finishes on a
  worker thread, bounded by the limits above, and its verdict is cached as the refusal). With several
  ranks there is no clock-based refusal: ranks must agree, and the counted limits bound the work.

Every result, refusals included, stays in an LRU cache keyed by the schema text (the compiler belongs to
one tokenizer, so the key is (schema, tokenizer)). Output format: no free whitespace (a model cannot
loop on blanks), separators ", " and ": " as `json.dumps` writes them; the schema's own `x-guidance`
options are ignored.
"""

from __future__ import annotations

import ctypes
import json
import logging
import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from typing import Any

import torch

from shard_server.config import GrammarConfig
from shard_server.generation.grammar_masks import MaskFiller, RequestGrammar

log = logging.getLogger(__name__)

JSON_OPTIONS = {
    "whitespace_flexible": False,
    "item_separator": ", ",
    "key_separator": ": ",
    "lenient": False,  # an unsupported keyword is an error, never silently ignored
    "coerce_one_of": False,
}


class SchemaError(ValueError):
    """The request's schema cannot be served; the text names the problem."""


class GrammarUnavailable(NotImplementedError):
    """Constrained decoding cannot run here (llguidance missing, or the tokenizer is not supported)."""


@dataclass(frozen=True)
class CompiledSchema:
    """A compiled schema: each request starts from a copy of `template` (a matcher at the start)."""

    schema: str
    template: Any  # llguidance.LLMatcher
    filler: MaskFiller

    def start(self) -> RequestGrammar:
        return RequestGrammar(self.template.deep_copy(), self.filler)


def check_schema_text(schema: str, config: GrammarConfig) -> dict | bool:
    """Size, JSON, shape and nesting checks -> the parsed schema."""
    size = len(schema.encode("utf-8", errors="replace"))
    if size > config.max_schema_bytes:
        raise SchemaError(f"schema is {size} bytes, over the limit of {config.max_schema_bytes}")
    try:
        doc = json.loads(schema)
    except RecursionError:
        raise SchemaError(f"schema nests deeper than the limit of {config.max_depth} levels") from None
    except ValueError as e:
        raise SchemaError(f"schema is not JSON: {e}") from None
    if not isinstance(doc, (dict, bool)):
        raise SchemaError(f"schema must be a JSON object (a JSON schema), got a JSON {type(doc).__name__}")
    depth = json_depth(doc)
    if depth > config.max_depth:
        raise SchemaError(f"schema nests {depth} levels deep, over the limit of {config.max_depth}")
    return doc


def json_depth(doc: Any) -> int:
    """Nesting depth of objects and arrays (a scalar is 0), without recursion."""
    deepest, stack = 0, [(doc, 1)]
    while stack:
        node, d = stack.pop()
        children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else None
        if children is None:
            continue
        deepest = max(deepest, d)
        stack.extend((c, d + 1) for c in children)
    return deepest


class SchemaCompiler:
    """Compiles request schemas for one tokenizer and model vocabulary; caches the results."""

    def __init__(
        self,
        tokenizer: Any,
        vocab_size: int,
        eos_ids: tuple[int, ...],
        config: GrammarConfig | None = None,
        *,
        deterministic_only: bool = False,
        pin_memory: bool = False,
    ):
        self.config = config or GrammarConfig()
        self.vocab_size = vocab_size  # the model's rows (the logits' width)
        self.eos_ids = tuple(eos_ids)
        # Several tensor-parallel ranks must reach the same verdict: no clock-based refusal then.
        self.timeout = None if deterministic_only else self.config.compile_timeout_s
        self._hf_tokenizer = tokenizer
        self._lock = threading.Lock()
        self._cache: OrderedDict[str, Future] = OrderedDict()
        self._pool = ThreadPoolExecutor(self.config.compile_threads, thread_name_prefix="grammar-compile")
        self._ll: Any = None
        self._tokenizer: Any = None
        self._limits: Any = None
        self._filler: MaskFiller | None = None
        self._pin = pin_memory  # host masks in pinned memory (CUDA): non-blocking uploads
        # Reading the tokenizer takes ~0.5 s for a 32k vocabulary: start now, off every caller's path.
        self._pool.submit(self._setup_quietly)

    # ---- the llguidance objects (a failure is raised to the first request with a schema)

    def _setup_quietly(self) -> None:
        try:
            self._setup()
        except GrammarUnavailable as e:
            log.info("structured output unavailable: %s", e)

    def _setup(self) -> None:
        with self._lock:
            if self._tokenizer is not None:
                return
            try:
                import llguidance
            except ImportError as e:
                raise GrammarUnavailable(f"schema needs the llguidance package on the shard ({e})") from None
            backend = getattr(self._hf_tokenizer, "backend_tokenizer", None)
            if backend is None:
                raise GrammarUnavailable(
                    "schema needs a fast (tokenizer.json) tokenizer; this model's tokenizer is not one"
                )
            n_tok = backend.get_vocab_size(with_added_tokens=True)
            try:
                # The matcher's vocabulary covers both the model's rows and the tokenizer's ids; model
                # rows the tokenizer lacks (padded vocab) have no bytes, so no grammar ever allows them.
                tok = llguidance.LLTokenizer(
                    backend.to_str(), n_vocab=max(self.vocab_size, n_tok), eos_token=list(self.eos_ids)
                )
            except Exception as e:  # noqa: BLE001 - llguidance raises plain exceptions for tokenizers
                raise GrammarUnavailable(f"schema: llguidance cannot read this tokenizer: {e}") from None
            c = self.config
            self._limits = llguidance.LLParserLimits(
                max_grammar_size=c.max_grammar_size,
                max_lexer_states=c.max_lexer_states,
                initial_lexer_fuel=c.initial_lexer_fuel,
                step_lexer_fuel=c.step_lexer_fuel,
                verbose_errors=False,
            )
            self._ll = llguidance
            words = (tok.vocab_size + 31) // 32
            eos = eos_mask(llguidance, tok, words)
            self._filler = MaskFiller(llguidance, words, self.vocab_size, c.mask_threads, self._pin, eos)
            self._tokenizer = tok
            log.info("structured output: llguidance %s, %d token ids", llguidance.__version__, tok.vocab_size)

    # ---- compile, cached

    def start(self, schema: str) -> Future:
        """The schema's cached compile, started now on a compile thread if it is new (no waiting)."""
        self._setup()
        with self._lock:
            fut = self._cache.get(schema)
            if fut is not None:
                self._cache.move_to_end(schema)
            else:
                fut = self._pool.submit(self._compile, schema)
                self._cache[schema] = fut
                while len(self._cache) > self.config.cache_size:
                    self._cache.popitem(last=False)
        return fut

    def compile(self, schema: str) -> CompiledSchema:
        """-> the compiled schema; SchemaError / GrammarUnavailable otherwise (both cached per text)."""
        fut = self.start(schema)
        try:
            return fut.result(timeout=self.timeout)
        except FutureTimeout:
            refusal: Future = Future()
            refusal.set_exception(
                SchemaError(f"schema took longer than {self.timeout:g} s to compile; simplify it")
            )
            with self._lock:
                if self._cache.get(schema) is fut:
                    self._cache[schema] = refusal
            return refusal.result()

    def cached(self, schema: str) -> bool:
        with self._lock:
            fut = self._cache.get(schema)
            return fut is not None and fut.done()

    def _compile(self, schema: str) -> CompiledSchema:
        doc = check_schema_text(schema, self.config)
        if doc is False:
            raise SchemaError("schema is false: no document satisfies it")
        if doc is True:
            doc = {}
        doc.pop("x-guidance", None)  # the shard's output options win over the request's
        ll = self._ll
        try:
            grammar = ll.LLMatcher.grammar_from_json_schema(doc, overrides=JSON_OPTIONS)
        except (ValueError, TypeError) as e:
            raise SchemaError(f"schema is not supported: {_one_line(e)}") from None
        matcher = ll.LLMatcher(self._tokenizer, grammar, log_level=0, limits=self._limits)
        if not matcher.is_error():
            # The first mask builds the lexer's start; a schema that exhausts the limits there fails
            # now, as a refusal, rather than in the middle of a batch. (The pointer form drops the GIL.)
            words = bytearray(4 * ((self._tokenizer.vocab_size + 31) // 32))
            buf = (ctypes.c_char * len(words)).from_buffer(words)
            matcher.unsafe_compute_mask_ptr(ctypes.addressof(buf), len(words))
        if matcher.is_error():
            raise SchemaError(f"schema is not supported: {_one_line(matcher.get_error())}")
        return CompiledSchema(schema, matcher, self._filler)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        if self._filler is not None:
            self._filler.close()


def eos_mask(llguidance: Any, tokenizer: Any, words: int):
    """int32 [words]: the mask llguidance gives a matcher that is stopped or failed (its EOS set), taken
    from a matcher that failed at once (a grammar that does not parse)."""
    failed = llguidance.LLMatcher(tokenizer, "%% not a grammar %%", log_level=0)
    if not failed.is_error():
        raise GrammarUnavailable("llguidance accepted a broken grammar: cannot read its EOS mask")
    out = torch.zeros(words, dtype=torch.int32)
    failed.unsafe_compute_mask_ptr(out.data_ptr(), 4 * words)
    return out


def _one_line(e: object) -> str:
    """llguidance's message on one line (regex errors span several), at most 300 characters."""
    text = " ".join(line.strip() for line in str(e).splitlines() if line.strip())
    return (text or type(e).__name__)[:300]
