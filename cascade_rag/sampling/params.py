"""Per-request sampling options: `SamplingParams`, every field checked when it is built.

`SamplingParams` holds what one request asks for: length, temperature, top-k/top-p/min-p,
penalties, seed, stop conditions, log-probabilities, and an optional output `Constraint`
(JSON schema, JSON object, regex, choice or grammar). The batched sampler that applies them is
in sampler.py; constraints are described in constraints.py.

This module computes nothing per step and holds no per-request state.
"""

from __future__ import annotations

import decimal
import math
import numbers
import operator
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from cascade_rag.sampling.constraints import Constraint

SAMPLING_EPS = 1e-5
"""Temperatures below this are greedy: dividing logits by them would overflow or round every
probability but one to zero, so argmax is what such a temperature means (vLLM uses the same
threshold)."""

MAX_LOGPROBS = 20
"""Most alternatives `SamplingParams.logprobs` may ask for per generated token."""

_MAX_SEED = 2**64  # torch.Generator.manual_seed takes 64-bit seeds


@dataclass(frozen=True)
class SamplingParams:
    """Sampling options of one request, validated when built.

    Integer fields accept Python and numpy integers (stored as `int`); float fields accept any
    real number (`int`, `float`, numpy floats, `Fraction`, `Decimal`; stored as `float`).
    Booleans are not numbers here and strings are not parsed: a bad value raises a `TypeError`
    (wrong type) or `ValueError` (out of range) that names the field and the allowed values.

    Attributes:
        max_tokens: Most tokens to generate (>= 1).
        temperature: Softmax temperature (>= 0). Below `SAMPLING_EPS` (1e-5), including 0,
            decoding is greedy (argmax); above, tokens are sampled.
        top_k: Keep only the `top_k` most likely tokens before sampling (>= 1); 0 or -1 turn
            it off (stored as 0).
        top_p: Nucleus sampling, in (0, 1]: keep the smallest set of most likely tokens whose
            total probability is >= `top_p` (the most likely token is always kept); 1.0 turns
            it off. Applied after temperature and top-k.
        seed: Seed of this request's own generator, an int in [0, 2**64); None draws from
            torch's global RNG.
        stop: Stop strings. Generation ends when one appears in the generated text, which is
            cut before it (see `include_stop_str_in_output`). A single string or a sequence of
            non-empty strings; stored as a tuple.
        stop_token_ids: Token ids (ints >= 0) that end generation (besides EOS unless
            `ignore_eos`); stored as a tuple. `check_vocab` checks them against a vocabulary.
        ignore_eos: Keep generating past the end-of-sequence token.
        include_stop_str_in_output: Keep the matched stop string at the end of the output.
        repetition_penalty: > 0, 1.0 is off. Every token that occurs in the prompt or the
            output so far has its logit divided by it when positive and multiplied by it when
            negative (transformers' `RepetitionPenaltyLogitsProcessor`, vLLM's semantics);
            > 1 discourages repeats.
        presence_penalty: In [-2, 2], 0 is off. Subtracted once from the logit of every token
            that occurs in the output so far (not the prompt); > 0 encourages new tokens.
        frequency_penalty: In [-2, 2], 0 is off. Subtracted from the logit of every output
            token once per occurrence so far: `logit -= frequency_penalty * count +
            presence_penalty * (count > 0)`.
        min_p: In [0, 1], 0 is off. After temperature, drop tokens whose probability is below
            `min_p` times the most likely token's probability.
        min_tokens: Tokens to generate before EOS or a `stop_token_ids` token may be sampled
            (>= 0, <= `max_tokens`): until then their logits are -inf (EOS only unless
            `ignore_eos`), and the engine does not check stop strings.
        logprobs: None, or the number of alternatives in [0, 20] to return per generated
            token: the sampled token's log-probability and rank (1 = most likely) plus the
            `logprobs` most likely tokens with theirs. Log-probabilities are `log_softmax` of
            the model's raw logits, before penalties, temperature and filters.
        constraint: None, or a `Constraint` the output must match (a JSON schema, any JSON
            object, a regex, a choice of strings, a grammar). Tokens that cannot continue a
            match are masked at every step (after penalties, before temperature and
            filters), and EOS is allowed only where the output is a complete match, so an
            output that ends with EOS or a stop token always matches (one cut by `max_tokens`
            ends with finish_reason "length"). Stop strings do not cut constrained output
            (see `Constraint.stop_after`). Not combinable with `ignore_eos` or `min_tokens`,
            which would force tokens past the end of a match.

    Example:
        >>> params = SamplingParams(max_tokens=64, temperature=0.7, top_p=0.9, stop="\\n\\n")
        >>> params.stop, params.is_greedy
        (('\\n\\n',), False)
        >>> SamplingParams(temperature=1e-9).is_greedy
        True
    """

    max_tokens: int = 256
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    min_p: float = 0.0
    min_tokens: int = 0
    logprobs: int | None = None
    constraint: Constraint | None = None

    def __post_init__(self) -> None:
        def put(name: str, value: object) -> None:
            object.__setattr__(self, name, value)

        put("max_tokens", _check_int("max_tokens", self.max_tokens, low=1))
        put("temperature", _check_float("temperature", self.temperature, low=0.0))
        top_k = _check_int("top_k", self.top_k)
        if top_k < -1:
            raise ValueError(
                f"top_k={top_k} must be >= 1 to keep the top_k most likely tokens, or 0 or -1 "
                "to turn top-k off"
            )
        put("top_k", max(top_k, 0))
        put("top_p", _check_float("top_p", self.top_p, low=0.0, high=1.0, open_low=True))
        if self.seed is not None:
            put("seed", _check_int("seed", self.seed, low=0, high=_MAX_SEED - 1))
        put("stop", _check_stop(self.stop))
        put("stop_token_ids", _check_token_ids("stop_token_ids", self.stop_token_ids))
        for name in ("ignore_eos", "include_stop_str_in_output"):
            value = getattr(self, name)
            if not isinstance(value, bool):
                raise TypeError(f"{name}={value!r} is a {type(value).__name__}; pass True or False")
        put(
            "repetition_penalty",
            _check_float("repetition_penalty", self.repetition_penalty, low=0.0, open_low=True),
        )
        for name in ("presence_penalty", "frequency_penalty"):
            put(name, _check_float(name, getattr(self, name), low=-2.0, high=2.0))
        put("min_p", _check_float("min_p", self.min_p, low=0.0, high=1.0))
        put("min_tokens", _check_int("min_tokens", self.min_tokens, low=0))
        if self.min_tokens > self.max_tokens:
            raise ValueError(
                f"min_tokens={self.min_tokens} must be <= max_tokens={self.max_tokens}; lower "
                "min_tokens or raise max_tokens"
            )
        if self.logprobs is not None:
            put("logprobs", _check_int("logprobs", self.logprobs, low=0, high=MAX_LOGPROBS))
        if self.constraint is not None:
            if not isinstance(self.constraint, Constraint):
                raise TypeError(
                    f"constraint={self.constraint!r} is a {type(self.constraint).__name__}; pass "
                    "a cascade_rag.sampling.Constraint, e.g. Constraint(json_schema=schema)"
                )
            for name in ("ignore_eos", "min_tokens"):
                if getattr(self, name):
                    raise ValueError(
                        f"{name}={getattr(self, name)!r} cannot be combined with a constraint: "
                        "the constraint decides where the output ends (EOS is allowed exactly "
                        f"where the output is a complete match); drop {name}"
                    )
        # Derived flags read by the sampler every step (not fields: not compared or repr'd).
        put(
            "_penalised",
            self.repetition_penalty != 1.0
            or self.presence_penalty != 0.0
            or self.frequency_penalty != 0.0,
        )
        # Argmax of the raw logits is this row's token (logprobs aside): nothing to redo.
        put(
            "_argmax_only",
            self.is_greedy
            and not self._penalised
            and not self.min_tokens
            and self.constraint is None,
        )
        put("_plain_greedy", self._argmax_only and self.logprobs is None)

    @property
    def is_greedy(self) -> bool:
        """Whether this request decodes greedily (temperature below `SAMPLING_EPS`)."""
        return self.temperature < SAMPLING_EPS

    @property
    def needs_token_history(self) -> bool:
        """Whether `Sampler.sample_step` reads this request's prompt and output tokens.

        True with any penalty (which reads the ids) or `min_tokens` (which reads the output's
        length); other requests may pass empty histories.
        """
        return self._penalised or self.min_tokens > 0

    def check_vocab(self, vocab_size: int) -> None:
        """Raise `ValueError` if a `stop_token_ids` entry is not below `vocab_size`.

        Example:
            >>> SamplingParams(stop_token_ids=[7]).check_vocab(8)
            >>> SamplingParams(stop_token_ids=[8]).check_vocab(8)
            Traceback (most recent call last):
              ...
            ValueError: stop_token_ids contains 8, outside the vocabulary of 8 tokens (ids 0..7)
        """
        vocab_size = _check_int("vocab_size", vocab_size, low=1)
        for token_id in self.stop_token_ids:
            if token_id >= vocab_size:
                raise ValueError(
                    f"stop_token_ids contains {token_id}, outside the vocabulary of {vocab_size} "
                    f"tokens (ids 0..{vocab_size - 1})"
                )


def _check_int(name: str, value: object, low: int | None = None, high: int | None = None) -> int:
    try:
        if isinstance(value, (bool, np.bool_)):
            raise TypeError
        value = operator.index(value)  # int, numpy integers, integer 0-dim tensors
    except TypeError:
        raise TypeError(
            f"{name}={value!r} is a {type(value).__name__}, not an int; pass a whole number"
            + (f" >= {low}" if low is not None else "")
        ) from None
    if (low is not None and value < low) or (high is not None and value > high):
        allowed = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ValueError(f"{name}={value} must be an int {allowed}")
    return value


def _check_float(
    name: str, value: object, low: float, high: float | None = None, open_low: bool = False
) -> float:
    allowed = f"{'(' if open_low else '['}{low:g}, {'inf)' if high is None else f'{high:g}]'}"
    if isinstance(value, (bool, np.bool_)) or not isinstance(
        value, (numbers.Real, decimal.Decimal)
    ):
        raise TypeError(
            f"{name}={value!r} is a {type(value).__name__}, not a real number; pass a number "
            f"in {allowed}"
        )
    try:
        number = float(value)
    except (OverflowError, ValueError):  # 10**400, Decimal('sNaN')
        number = math.nan
    if not math.isfinite(number):
        raise ValueError(f"{name}={value} must be a finite number in {allowed}")
    if number < low or (open_low and number == low) or (high is not None and number > high):
        raise ValueError(f"{name}={value} must be in {allowed}")
    return number


def _check_stop(stop: object) -> tuple[str, ...]:
    if isinstance(stop, str):
        return (stop,)
    if not isinstance(stop, Sequence):
        raise TypeError(
            f"stop={stop!r} is not a string or a sequence of strings; pass e.g. "
            "stop=('\\n\\n',) or stop='</answer>'"
        )
    stop = tuple(stop)
    for s in stop:
        if not isinstance(s, str):
            raise TypeError(
                f"stop string {s!r} is a {type(s).__name__}, not a str; pass stop strings "
                "as text, and token ids as stop_token_ids"
            )
        if not s:
            raise ValueError(
                f"stop={stop!r} contains an empty string, which would match at once; remove it"
            )
    return stop


def _check_token_ids(name: str, ids: object) -> tuple[int, ...]:
    if isinstance(ids, (str, bytes)) or not isinstance(ids, Iterable):
        raise TypeError(
            f"{name}={ids!r} is not a sequence of token ids; pass e.g. {name}=[2] "
            "(stop strings go in stop)"
        )
    out = []
    for token_id in ids:
        try:
            if isinstance(token_id, (bool, np.bool_)):
                raise TypeError
            token_id = operator.index(token_id)
        except TypeError:
            raise TypeError(
                f"{name} contains {token_id!r}, a {type(token_id).__name__}; token ids are "
                "ints >= 0"
            ) from None
        if token_id < 0:
            raise ValueError(f"{name} contains {token_id}; token ids are ints >= 0")
        out.append(token_id)
    return tuple(out)
