"""Constraints compiled against a tokenizer: per-request matchers and batched token masks.

`GrammarCompiler` (one per engine) wraps the model's tokenizer for llguidance once, compiles
each distinct `Constraint` once (an LRU cache of pristine matchers, copied per request) and
computes the allowed-token bitmasks of a whole batch in one call that runs on llguidance's
thread pool without the GIL. `ConstraintState` is one request's matcher: the engine creates it
when the request is admitted, the sampler masks with it, and the engine advances it with each
token it appends (`advance`) and drops it when the request ends.

Masks: llguidance writes one bit per token id (`[rows, ceil(vocab / 32)]` int32 words, bit `t
% 32` of word `t // 32` set = token t allowed); `unpack_bitmask` turns them into a bool
`[rows, vocab]` on the logits' device with three tensor ops, so a batch is masked with one
`masked_fill`. EOS is allowed exactly where the output so far is a complete match; the
request's `stop_token_ids` are allowed there too.

This module does not sample (sampler.py applies the masks) and does not decide which requests
are constrained (the engine passes one state or None per row).
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from collections.abc import Iterable, Sequence

import numpy as np
import torch

from cascade_rag.sampling.constraints import Constraint

_CACHE_SIZE = 256  # compiled constraints kept per compiler


class ConstraintError(ValueError):
    """A token the constraint does not allow was appended, or the constraint cannot go on."""


class GrammarCompiler:
    """Compiles constraints for one tokenizer and computes batched token masks.

    Args:
        tokenizer: the model's Hugging Face fast tokenizer.
        vocab_size: width of the model's logits (may exceed the tokenizer's length).
        eos_token_ids: ids that end generation; allowed where the output is a complete match.
        num_threads: threads of llguidance's mask pool (default: up to 4, one per core).

    The llguidance tokenizer (about 0.5 s to build) is made on first use, so an engine that
    never sees a constraint pays nothing. Safe to call from several threads.

    Example:
        >>> compiler = GrammarCompiler(tokenizer, vocab_size=49152, eos_token_ids=[2])
        >>> state = compiler.start(Constraint(choice=["yes", "no"]))
        >>> allowed = compiler.fill_bitmask([state])  # [1, 1536] int32 words
    """

    def __init__(
        self,
        tokenizer,
        vocab_size: int,
        eos_token_ids: Iterable[int],
        num_threads: int | None = None,
    ) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.eos_token_ids = tuple(sorted(set(eos_token_ids)))
        self.num_words = (vocab_size + 31) // 32
        self._num_threads = num_threads or max(1, min(4, os.cpu_count() or 1))
        self._lock = threading.Lock()
        self._ll_tokenizer = None
        self._executor = None
        self._cache: OrderedDict[tuple[str, str], object] = OrderedDict()

    def _ensure_tokenizer(self):
        with self._lock:
            if self._ll_tokenizer is None:
                import llguidance
                import llguidance.hf

                if not self.eos_token_ids:
                    raise ValueError(
                        "the model has no end-of-sequence token, so a constrained output could "
                        "never end; set eos_token_id in the model's config"
                    )
                self._ll_tokenizer = llguidance.hf.from_tokenizer(
                    self.tokenizer, n_vocab=self.vocab_size, eos_token=list(self.eos_token_ids)
                )
                self._executor = llguidance.LLExecutor(self._num_threads)
            return self._ll_tokenizer

    def start(self, constraint: Constraint, stop_token_ids: Sequence[int] = ()) -> ConstraintState:
        """A fresh matcher state for one request (compiled once per distinct constraint).

        Raises:
            ValueError: the constraint does not compile for this tokenizer (the message says
                why, e.g. a grammar too large for llguidance's limits).
        """
        if not isinstance(constraint, Constraint):
            raise TypeError(f"constraint must be a Constraint, got {type(constraint).__name__}")
        ll_tokenizer = self._ensure_tokenizer()
        key = constraint.key
        with self._lock:
            pristine = self._cache.get(key)
            if pristine is not None:
                self._cache.move_to_end(key)
        if pristine is None:
            from llguidance import LLMatcher

            # compiling drops the GIL; two threads may compile the same key once each
            pristine = LLMatcher(ll_tokenizer, constraint.grammar_text(), log_level=0)
            if pristine.is_error():
                raise ValueError(
                    f"the {constraint.kind} constraint does not compile: {pristine.get_error()}"
                )
            with self._lock:
                self._cache[key] = pristine
                while len(self._cache) > _CACHE_SIZE:
                    self._cache.popitem(last=False)
        with self._lock:
            matcher = pristine.deep_copy()
        return ConstraintState(matcher, constraint, self, stop_token_ids)

    @property
    def num_cached(self) -> int:
        """How many compiled constraints are cached."""
        return len(self._cache)

    def fill_bitmask(self, states: Sequence[ConstraintState]) -> np.ndarray:
        """[len(states), num_words] int32 allowed-token bits, computed in one parallel call.

        Raises:
            ConstraintError: a state allows no token at all (its matcher failed); the message
                names the row, so the caller can fail that request alone.
        """
        from llguidance.torch import fill_next_token_bitmask_par

        self._ensure_tokenizer()
        words = torch.empty((len(states), self.num_words), dtype=torch.int32)
        fill_next_token_bitmask_par(
            self._executor, [(s.matcher, i) for i, s in enumerate(states)], words
        )
        bits = words.numpy()
        for i, s in enumerate(states):
            if s.stop_token_ids and s.matcher.is_accepting():
                for t in s.stop_token_ids:
                    if t < self.vocab_size:
                        bits.view(np.uint32)[i, t // 32] |= np.uint32(1 << (t % 32))
        empty = ~bits.any(axis=1)
        for i, s in enumerate(states):
            if empty[i] or s.matcher.is_error():  # a failed matcher would only allow EOS
                raise ConstraintError(
                    f"row {i}: the constraint allows no next token ({s.error or 'no match'})"
                )
        return bits


class ConstraintState:
    """One request's progress through its constraint (made by `GrammarCompiler.start`).

    `advance(token)` after every appended token; `stop_allowed` says whether stop strings may
    end the request after the tokens so far (see `Constraint.stop_after`).
    """

    def __init__(
        self,
        matcher,
        constraint: Constraint,
        compiler: GrammarCompiler,
        stop_token_ids: Sequence[int] = (),
    ) -> None:
        self.matcher = matcher
        self.constraint = constraint
        self.compiler = compiler
        self.stop_token_ids = tuple(stop_token_ids)
        self._ll_tokenizer = compiler._ll_tokenizer
        self._stop_after = constraint.stop_after.encode() if constraint.stop_after else None
        self._text = b""  # generated bytes, kept only while stop_after may still appear
        self.stop_allowed = self._stop_after is not None
        self.num_tokens = 0

    @property
    def error(self) -> str:
        return self.matcher.get_error()

    @property
    def is_accepting(self) -> bool:
        """Whether the output so far is a complete match (EOS would be allowed)."""
        return self.matcher.is_accepting()

    def advance(self, token_id: int) -> None:
        """Consume one generated token.

        A stop token id (allowed where the output is complete) ends the match without being
        consumed.

        Raises:
            ConstraintError: the constraint does not allow `token_id` here.
        """
        self.num_tokens += 1
        if token_id in self.stop_token_ids and self.matcher.is_accepting():
            self.stop_allowed = False
            return
        if not self.matcher.consume_token(token_id):
            raise ConstraintError(
                f"token {token_id} is not allowed by the {self.constraint.kind} constraint "
                f"after {self.num_tokens - 1} tokens: {self.matcher.get_error() or 'no match'}"
            )
        if self.stop_allowed:
            self._text += self._ll_tokenizer.decode_bytes([token_id])
            if self._stop_after in self._text:
                self.stop_allowed = False
                self._text = b""


def unpack_bitmask(words: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[rows, vocab_size] bool (True = allowed) from [rows, num_words] int32 bit words.

    Runs on `words.device`: move the (small) words there, not the unpacked mask.
    """
    shifts = torch.arange(32, dtype=torch.int32, device=words.device)
    bits = (words[:, :, None] >> shifts) & 1  # [rows, num_words, 32]
    return bits.view(words.shape[0], -1)[:, :vocab_size].bool()
