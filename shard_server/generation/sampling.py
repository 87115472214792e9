"""Heterogeneous next-token chooser: every request of a batch sampled on the device in one pass.

`NextTokenChooser` holds the per-request parameters and state (token counts, seen-token masks, step
counters, previous token) as device tensors. One `choose(logits)` per step returns device tensors;
the caller moves them to the host once (`SampleOutput.to_host`) and then calls `update(next_ids)`.

Choices (see logits_process.py for the per-processor pseudo-code):

- Order: repetition penalty -> frequency/presence penalties -> watermark -> grammar mask (rows with
  a JSON schema: -inf where the grammar refuses, see grammar_masks.py) -> temperature -> top-k
  -> top-p -> typical-p -> argmax (greedy rows) or Gumbel-max (sampled rows), as transformers
  chains its processors and warpers. The mask after the penalties and watermark changes nothing they
  compute (-inf stays -inf under all three) and comes before every warper, so the warpers see only
  the tokens the grammar allows.
- Greedy: `do_sample=False` (or temperature 0) takes the argmax of the logits after penalties and
  watermark; temperature, top-k, top-p and typical-p are ignored for that request.
- Penalties: repetition penalty over prompt + generated tokens (transformers); frequency and presence
  penalties over generated tokens only (OpenAI): `x -= freq * count + pres * (count > 0)`.
- Seeds: the noise of request r at its n-th generated token is a hash of (seed_r, n, token id), so
  draws are reproducible whatever the batch composition, filtering or concatenation.
- Watermark: gamma 0.5, delta 2.0 (WatermarkConfig); the green list is seeded by the previous token
  (the last prompt token for the first generated token).
- logprobs are the log-softmax of the processed logits (after warpers for sampled requests, so
  filtered tokens have -inf); alternatives are the top `return_k_alternatives` of those logprobs.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cached_property

import torch

from shard_server.generation import logits_process as lp
from shard_server.generation.grammar_masks import GrammarRows
from shard_server.types import SamplingParams

# Bounds that keep every processed logit finite (no inf, so no NaN in the softmax) for any finite model
# logits |x| <= 1e29: repetition scales x by at most 1e4, the additive penalties add at most
# 1e4 * (count + 1) <= ~1e10 for any count a sequence can reach, temperature divides by >= 1e-4, so
# |x| stays below ~1e37 < float32's 3.4e38. The bounds are far beyond useful values (vLLM clamps
# temperatures below 1e-2; OpenAI allows penalties in [-2, 2]).
MIN_TEMPERATURE = 1e-4
REPETITION_PENALTY_RANGE = (1e-4, 1e4)
MAX_ADDITIVE_PENALTY = 1e4


def validate_sampling_params(p: SamplingParams) -> None:
    """Raise ValueError naming the bad field (`schema` is checked when it is compiled)."""

    def bad(name: str, value: object, rule: str) -> ValueError:
        return ValueError(f"{name} must be {rule}, got {value!r}")

    if not math.isfinite(p.temperature) or p.temperature < 0:
        raise bad("temperature", p.temperature, ">= 0")
    if 0 < p.temperature < MIN_TEMPERATURE and p.do_sample:
        raise bad("temperature", p.temperature, f"0 (greedy) or >= {MIN_TEMPERATURE}")
    if not (0.0 < p.top_p <= 1.0):
        raise bad("top_p", p.top_p, "in (0, 1]")
    if not (0.0 < p.typical_p <= 1.0):
        raise bad("typical_p", p.typical_p, "in (0, 1]")
    if p.top_k < 0:
        raise bad("top_k", p.top_k, ">= 0 (0 disables it)")
    lo, hi = REPETITION_PENALTY_RANGE
    if not math.isfinite(p.repetition_penalty) or not lo <= p.repetition_penalty <= hi:
        raise bad("repetition_penalty", p.repetition_penalty, f"in [{lo}, {hi}] (1 disables it)")
    for name in ("frequency_penalty", "presence_penalty"):
        value = getattr(p, name)
        if not math.isfinite(value) or abs(value) > MAX_ADDITIVE_PENALTY:
            raise bad(name, value, f"in [-{MAX_ADDITIVE_PENALTY}, {MAX_ADDITIVE_PENALTY}]")
    if p.return_k_alternatives < 0:
        raise bad("return_k_alternatives", p.return_k_alternatives, ">= 0")
    if not (0 <= p.seed < 2**64):
        raise bad("seed", p.seed, "a 64-bit unsigned integer")


@dataclass(frozen=True)
class WatermarkConfig:
    gamma: float = 0.5  # share of the vocabulary that is green
    delta: float = 2.0  # bias added to green logits
    key: int = 15485863  # hash key of the green lists (the paper's default prime)


@dataclass
class HostSample:
    """One step's choices on the host; alternatives trimmed to each request's k."""

    next_ids: list[int]
    logprobs: list[float]
    alternatives: list[list[tuple[int, float]]]


@dataclass
class SampleOutput:
    """Device tensors of one step: next_ids [B] int64, logprobs [B] float32, alt_* [B, K] or None."""

    next_ids: torch.Tensor
    logprobs: torch.Tensor
    alt_ids: torch.Tensor | None = None
    alt_logprobs: torch.Tensor | None = None
    alt_k: tuple[int, ...] = ()  # per-request k (host ints), to trim alternatives

    def to_host(self) -> HostSample:
        """ONE device->host transfer: everything packed into a float64 tensor (ids < 2**53 exact)."""
        return self.start_to_host()()

    def start_to_host(self) -> Callable[[], HostSample]:
        """Enqueue the packed copy now; the returned call waits for that copy alone and parses it.

        Work enqueued on the stream after this call (the next step's forward, with the decode overlap)
        does not delay the result: the wait is on an event recorded right after the copy.
        """
        parts = [self.next_ids.to(torch.float64)[:, None], self.logprobs.to(torch.float64)[:, None]]
        if self.alt_ids is not None and self.alt_logprobs is not None:
            parts += [self.alt_ids.to(torch.float64), self.alt_logprobs.to(torch.float64)]
        packed = torch.cat(parts, dim=1)
        done = None
        if packed.is_cuda:
            host = torch.empty(packed.shape, dtype=packed.dtype, pin_memory=True)
            host.copy_(packed, non_blocking=True)
            done = torch.cuda.Event()
            done.record()
        else:
            host = packed
        return lambda: self._parse(host, done)

    def _parse(self, host: torch.Tensor, done) -> HostSample:
        if done is not None:
            done.synchronize()
        rows = host.tolist()
        k_max = self.alt_ids.shape[1] if self.alt_ids is not None else 0
        ids = [int(r[0]) for r in rows]
        logprobs = [r[1] for r in rows]
        alts = []
        for b, r in enumerate(rows):
            k = self.alt_k[b] if self.alt_k else 0
            alts.append([(int(r[2 + i]), r[2 + k_max + i]) for i in range(k)])
        return HostSample(ids, logprobs, alts)


def is_sampled(p: SamplingParams) -> bool:
    """Whether a request draws at random; otherwise it is greedy (temperature 0 is greedy too)."""
    return p.do_sample and p.temperature > 0


def _seed_bits(seed: int) -> int:
    """uint64 -> the int64 with the same bit pattern (tensors have no uint64 arithmetic)."""
    return seed - (1 << 64) if seed >= (1 << 63) else seed


@dataclass(frozen=True)
class ChooserFlags:
    """Which processors run for a batch: host bools from the params only (no device sync), so the
    step's control flow is fixed for the batch's lifetime (CUDA-graph friendly)."""

    any_sampled: bool
    any_watermark: bool
    top_k: int  # largest k < V among sampled rows; 0 if none uses top-k
    top_p: bool
    typical: bool
    max_alternatives: int

    @classmethod
    def of(cls, params: Sequence[SamplingParams], vocab_size: int) -> ChooserFlags:
        sampled = [p for p in params if is_sampled(p)]
        return cls(
            any_sampled=bool(sampled),
            any_watermark=any(p.watermark for p in params),
            top_k=max((p.top_k for p in sampled if 0 < p.top_k < vocab_size), default=0),
            top_p=any(p.top_p < 1.0 for p in sampled),
            typical=any(p.typical_p < 1.0 for p in sampled),
            max_alternatives=min(max((p.return_k_alternatives for p in params), default=0), vocab_size),
        )


@dataclass(eq=False)
class NextTokenChooser:
    """Per-request sampling parameters and state for a batch of B requests over a vocabulary of V.

    Build with `from_params`; never mutate `params` (host copy used for flags and reporting seeds).
    Device tensors, all with B rows: temperature/top_p/typical_p/repetition/frequency/presence
    float32 [B], top_k int64 [B] (V = off), do_sample bool [B], seed int64 [B] (uint64 bit pattern),
    step int64 [B] (tokens generated so far), prev_ids int64 [B], counts int32 [B, V] | None
    (generated-token counts, only when some request has frequency/presence penalties), seen
    bool [B, V] | None (prompt + generated tokens, only when some request has a repetition penalty).
    """

    params: tuple[SamplingParams, ...]
    vocab_size: int
    temperature: torch.Tensor
    top_k: torch.Tensor
    top_p: torch.Tensor
    typical_p: torch.Tensor
    repetition: torch.Tensor
    frequency: torch.Tensor
    presence: torch.Tensor
    do_sample: torch.Tensor
    watermark: torch.Tensor
    seed: torch.Tensor
    step: torch.Tensor
    prev_ids: torch.Tensor
    counts: torch.Tensor | None
    seen: torch.Tensor | None
    watermark_config: WatermarkConfig = field(default_factory=WatermarkConfig)
    grammar: GrammarRows | None = None  # the rows with a JSON schema; None: no row has one

    # ---- construction -------------------------------------------------------------------------

    @classmethod
    def from_params(
        cls,
        params: Sequence[SamplingParams],
        prompt_ids: Sequence[Sequence[int]],
        vocab_size: int,
        device: torch.device | str = "cpu",
        watermark_config: WatermarkConfig | None = None,
        grammar: GrammarRows | None = None,
    ) -> NextTokenChooser:
        """Validate every request's parameters and build the device state (one upload per field)."""
        if len(params) != len(prompt_ids):
            raise ValueError(f"{len(params)} sampling params for {len(prompt_ids)} prompts")
        for p in params:
            validate_sampling_params(p)
        dev = torch.device(device)
        B = len(params)

        def f32(values: list[float]) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.float32, device=dev)

        seen = None
        if any(p.repetition_penalty != 1.0 for p in params):
            seen = torch.zeros(B, vocab_size, dtype=torch.bool, device=dev)
            rows = [b for b, ids in enumerate(prompt_ids) for _ in ids]
            cols = [int(t) for ids in prompt_ids for t in ids]
            if cols:
                seen[torch.tensor(rows, device=dev), torch.tensor(cols, device=dev)] = True
        counts = None
        if any(p.frequency_penalty != 0.0 or p.presence_penalty != 0.0 for p in params):
            counts = torch.zeros(B, vocab_size, dtype=torch.int32, device=dev)
        return cls(
            params=tuple(params),
            vocab_size=vocab_size,
            temperature=f32([p.temperature if is_sampled(p) else 1.0 for p in params]),
            top_k=torch.tensor(
                [min(p.top_k, vocab_size) if p.top_k > 0 else vocab_size for p in params],
                dtype=torch.int64,
                device=dev,
            ),
            top_p=f32([p.top_p for p in params]),
            typical_p=f32([p.typical_p for p in params]),
            repetition=f32([p.repetition_penalty for p in params]),
            frequency=f32([p.frequency_penalty for p in params]),
            presence=f32([p.presence_penalty for p in params]),
            do_sample=torch.tensor([is_sampled(p) for p in params], dtype=torch.bool, device=dev),
            watermark=torch.tensor([p.watermark for p in params], dtype=torch.bool, device=dev),
            seed=torch.tensor([_seed_bits(p.seed) for p in params], dtype=torch.int64, device=dev),
            step=torch.zeros(B, dtype=torch.int64, device=dev),
            prev_ids=torch.tensor(
                [ids[-1] if len(ids) else 0 for ids in prompt_ids], dtype=torch.int64, device=dev
            ),
            counts=counts,
            seen=seen,
            watermark_config=watermark_config or WatermarkConfig(),
            grammar=grammar,
        )

    def __len__(self) -> int:
        return len(self.params)

    @cached_property
    def flags(self) -> ChooserFlags:
        return ChooserFlags.of(self.params, self.vocab_size)

    # ---- one step -------------------------------------------------------------------------------

    def process(self, logits: torch.Tensor) -> torch.Tensor:
        """Processed logits [B, V] float32: penalties and watermark for all, warpers for sampled rows."""
        if logits.shape != (len(self), self.vocab_size):
            raise ValueError(f"logits {tuple(logits.shape)} != ({len(self)}, {self.vocab_size})")
        x = logits.to(torch.float32)
        if self.seen is not None:
            x = lp.apply_repetition_penalty(x, self.seen, self.repetition)
        if self.counts is not None:
            x = lp.apply_frequency_presence(x, self.counts, self.frequency, self.presence)
        flags = self.flags
        if flags.any_watermark:
            wm = self.watermark_config
            green = lp.green_mask(self.prev_ids, self.vocab_size, wm.gamma, wm.key)
            x = x + wm.delta * (green & self.watermark[:, None]).to(x.dtype)
        if self.grammar is not None:
            x = self.grammar.apply(x)
        if not flags.any_sampled:
            return x
        y = x / self.temperature[:, None]
        if flags.top_p:  # one sort serves both
            y = lp.apply_top_k_top_p(y, self.top_k, self.top_p, use_top_p=True)
        elif flags.top_k:
            y = lp.apply_top_k(y, self.top_k, flags.top_k)
        if flags.typical:
            y = lp.apply_typical(y, self.typical_p)
        return torch.where(self.do_sample[:, None], y, x)

    def choose(self, logits: torch.Tensor) -> SampleOutput:
        """Pick the next token of every request. logits [B, V] -> SampleOutput of device tensors.

        Does not advance the state: call `update(next_ids)` once the step's tokens are final.
        """
        scores = self.process(logits)  # [B, V]
        if self.flags.any_sampled:
            noise = lp.gumbel_noise(self.seed, self.step, self.vocab_size)
            next_ids = torch.where(self.do_sample[:, None], scores + noise, scores).argmax(dim=-1)
        else:
            next_ids = scores.argmax(dim=-1)
        logprobs = scores.log_softmax(dim=-1)  # [B, V]
        out = SampleOutput(next_ids=next_ids, logprobs=logprobs.gather(1, next_ids[:, None])[:, 0])
        k = self.flags.max_alternatives
        if k > 0:
            out.alt_logprobs, out.alt_ids = logprobs.topk(k, dim=-1)
            out.alt_k = tuple(min(p.return_k_alternatives, k) for p in self.params)
        return out

    def update(self, next_ids: torch.Tensor, host_ids: Sequence[int] | None = None) -> None:
        """Record the chosen tokens [B] (device): step += 1, counts/seen/prev_ids updated in place;
        grammars advance on the same tokens as host ints (`host_ids`, read back here if not given)."""
        if self.grammar is not None:
            self.grammar.consume(next_ids.tolist() if host_ids is None else host_ids)
        ids = next_ids.to(device=self.step.device, dtype=torch.int64)
        rows = torch.arange(len(self), device=ids.device)
        if self.counts is not None:
            self.counts[rows, ids] += 1
        if self.seen is not None:
            self.seen[rows, ids] = True
        self.prev_ids.copy_(ids)  # in place: tensors keep their addresses (CUDA graphs)
        self.step += 1

    # ---- batch lifecycle -----------------------------------------------------------------------

    _ROW_FIELDS = (
        "temperature",
        "top_k",
        "top_p",
        "typical_p",
        "repetition",
        "frequency",
        "presence",
        "do_sample",
        "watermark",
        "seed",
        "step",
        "prev_ids",
    )

    def filter(self, indices: Sequence[int]) -> NextTokenChooser:
        """A new chooser with the rows `indices` (in that order); state of kept requests preserved."""
        idx = torch.tensor(list(indices), dtype=torch.int64, device=self.step.device)
        params = tuple(self.params[i] for i in indices)
        fields = {name: getattr(self, name).index_select(0, idx) for name in self._ROW_FIELDS}
        # Drop [B, V] state that no remaining request needs (frees memory, skips the kernel).
        counts = self.counts
        if counts is not None and any(p.frequency_penalty or p.presence_penalty for p in params):
            counts = counts.index_select(0, idx)
        else:
            counts = None
        seen = self.seen
        seen = (
            seen.index_select(0, idx)
            if seen is not None and any(p.repetition_penalty != 1.0 for p in params)
            else None
        )
        return NextTokenChooser(
            params=params,
            vocab_size=self.vocab_size,
            counts=counts,
            seen=seen,
            watermark_config=self.watermark_config,
            grammar=self.grammar.filter(indices) if self.grammar is not None else None,
            **fields,
        )

    @classmethod
    def concatenate(cls, choosers: Sequence[NextTokenChooser]) -> NextTokenChooser:
        """Rows of all choosers, in order. [B, V] state missing in one part becomes zeros there."""
        if not choosers:
            raise ValueError("concatenate needs at least one chooser")
        first = choosers[0]
        if any(c.vocab_size != first.vocab_size for c in choosers):
            raise ValueError("cannot concatenate choosers over different vocabularies")
        fields = {name: torch.cat([getattr(c, name) for c in choosers]) for name in cls._ROW_FIELDS}

        def cat_state(name: str, dtype: torch.dtype) -> torch.Tensor | None:
            parts = [getattr(c, name) for c in choosers]
            if all(p is None for p in parts):
                return None
            dev = first.step.device
            return torch.cat(
                [
                    p if p is not None else torch.zeros(len(c), first.vocab_size, dtype=dtype, device=dev)
                    for p, c in zip(parts, choosers, strict=True)
                ]
            )

        return cls(
            params=tuple(p for c in choosers for p in c.params),
            vocab_size=first.vocab_size,
            counts=cat_state("counts", torch.int32),
            seen=cat_state("seen", torch.bool),
            watermark_config=first.watermark_config,
            grammar=GrammarRows.concatenate([(c.grammar, len(c)) for c in choosers]),
            **fields,
        )

    def seeds_for_report(self) -> list[int | None]:
        """GeneratedText.seed per request: the seed for sampled requests, None for greedy ones."""
        return [p.seed if is_sampled(p) else None for p in self.params]


def prompt_logprobs(
    logits: torch.Tensor, input_ids: torch.Tensor, cu_seqlens: torch.Tensor | None = None
) -> torch.Tensor:
    """Logprob the model gave each prompt token, from the raw (unprocessed) prefill logits.

    logits [T, V] for every prompt position, input_ids [T]; cu_seqlens [B+1] when several prompts
    are flattened together (None: one prompt). Returns [T] float32 on the device: out[t] =
    log_softmax(logits[t-1])[input_ids[t]], NaN at the first token of each prompt.
    """
    logp = logits.to(torch.float32).log_softmax(dim=-1)  # [T, V]
    nxt = torch.roll(input_ids.to(torch.int64), shifts=-1)  # target of position t is token t+1
    per_pos = logp.gather(1, nxt[:, None])[:, 0]  # [T]: logprob of the following token
    out = torch.roll(per_pos, shifts=1)
    starts = cu_seqlens[:-1].to(torch.int64) if cu_seqlens is not None else torch.zeros(1, dtype=torch.int64)
    out[starts.to(out.device)] = float("nan")
    return out
