"""Per-request stopping (max_new_tokens, EOS, stop sequences) and the text a request produced.

`StoppingCriteria` sees each generated token with its incremental text and says whether and why the
request stops. `GenerationTracker` bundles it with an `IncrementalDetokenizer` and the generated ids:
one `push(token_id)` per step gives the token's text, `is_special` and the finish reason; when the
request stops, `generated_text(reason, seed)` builds the GeneratedTextOut.

Precedence when several hold on one token: EOS, then stop sequence, then length. So a request that
emits EOS as its last allowed token reports EOS_TOKEN.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from shard_server.generation.detokenize import (
    Decoder,
    IncrementalDetokenizer,
    fast_decoder,
    special_token_ids,
)
from shard_server.types import FinishReason, GeneratedTextOut, StoppingParams


class StoppingCriteria:
    """Decides when one request stops.

    Stop sequences are matched on the decoded text, so a sequence split across tokens (or inside
    one token) is found. Only the last `max(len(stop)) - 1` characters are kept between steps: any
    match must end in the newest text, and a full match in older text would have stopped already.
    """

    def __init__(self, params: StoppingParams, eos_token_ids: Iterable[int] = ()):
        if params.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {params.max_new_tokens}")
        self.params = params
        self.eos_token_ids = frozenset() if params.ignore_eos_token else frozenset(eos_token_ids)
        self._stops = tuple(s for s in params.stop_sequences if s)
        self._keep = max((len(s) for s in self._stops), default=1) - 1
        self._tail = ""
        self.generated_tokens = 0

    def __call__(self, token_id: int, token_text: str) -> FinishReason | None:
        """Account for one generated token and its text; return why the request stops, or None."""
        self.generated_tokens += 1
        if token_id in self.eos_token_ids:
            return FinishReason.EOS_TOKEN
        if self._stops and token_text:
            window = self._tail + token_text
            if any(s in window for s in self._stops):
                return FinishReason.STOP_SEQUENCE
            self._tail = window[len(window) - self._keep :] if self._keep else ""
        if self.generated_tokens >= self.params.max_new_tokens:
            return FinishReason.LENGTH
        return None

    @property
    def tail(self) -> str:
        """The text kept for matching stop sequences across token boundaries."""
        return self._tail


@dataclass(frozen=True)
class TokenStep:
    """What one generated token contributes: its text, whether it is special, why it stops."""

    token_id: int
    text: str
    is_special: bool
    finish_reason: FinishReason | None
    alternative_texts: tuple[str, ...] = ()


class GenerationTracker:
    """Host-side text state of one request: detokenizer, stopping criteria and generated ids.

    `special_ids` defaults to the tokenizer's; pass a shared frozenset to avoid recomputing it per
    request. `eos_token_ids` is a list because some models have several (config eos_token_id list).
    """

    def __init__(
        self,
        tokenizer: Decoder,
        prompt_ids: Sequence[int],
        stopping: StoppingParams,
        eos_token_ids: Iterable[int],
        special_ids: frozenset[int] | None = None,
    ):
        self._tok = fast_decoder(tokenizer)
        self.detokenizer = IncrementalDetokenizer(tokenizer, prompt_ids)
        self.criteria = StoppingCriteria(stopping, eos_token_ids)
        self.special_ids = special_token_ids(tokenizer) if special_ids is None else special_ids
        self.generated_ids: list[int] = []
        self.finish_reason: FinishReason | None = None

    def push(self, token_id: int, alternative_ids: Iterable[int] = ()) -> TokenStep:
        """Record one generated token; alternatives get the text they would have had in its place.

        Calling it after the request finished is a bug.
        """
        if self.finish_reason is not None:
            raise RuntimeError(f"request already finished ({self.finish_reason.name})")
        token_id = int(token_id)
        # Alternatives compete with this token, so they are decoded in the context before it.
        alt_texts = tuple(self.detokenizer.peek(int(a)) for a in alternative_ids)
        self.generated_ids.append(token_id)
        text = self.detokenizer.push(token_id)
        self.finish_reason = self.criteria(token_id, text)
        return TokenStep(token_id, text, token_id in self.special_ids, self.finish_reason, alt_texts)

    def generated_text(self, seed: int | None = None) -> GeneratedTextOut:
        """GeneratedText of a finished request: all generated ids decoded, special tokens skipped."""
        if self.finish_reason is None:
            raise RuntimeError("generated_text() before the request finished")
        text = self._tok.decode(self.generated_ids, skip_special_tokens=True)
        return GeneratedTextOut(
            text=text,
            generated_tokens=len(self.generated_ids),
            finish_reason=self.finish_reason,
            seed=seed,
        )
