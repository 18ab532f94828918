"""Sampling: per-request options, output constraints and the batched next-token sampler.

- `SamplingParams` (params.py): what one request asks for, checked when built.
- `Constraint` (constraints.py): a JSON schema, JSON object, regex, choice or grammar the
  output must match; `GrammarCompiler` / `ConstraintState` (grammar.py) compile it for a
  tokenizer and track one request's match.
- `Sampler` (sampler.py): one step's logits to one token per row, with penalties, masks,
  temperature, top-k/top-p/min-p, seeds and log-probabilities.

Everything public is importable from `cascade_rag.sampling`. This package does not detect
stop strings or end requests (the engine does).
"""

from cascade_rag.sampling.constraints import JSON_OPTIONS, Constraint
from cascade_rag.sampling.grammar import (
    ConstraintError,
    ConstraintState,
    GrammarCompiler,
    unpack_bitmask,
)
from cascade_rag.sampling.params import MAX_LOGPROBS, SAMPLING_EPS, SamplingParams
from cascade_rag.sampling.sampler import Sampler, SamplerOutput, TokenLogprob, make_generator

__all__ = [
    "JSON_OPTIONS",
    "MAX_LOGPROBS",
    "SAMPLING_EPS",
    "Constraint",
    "ConstraintError",
    "ConstraintState",
    "GrammarCompiler",
    "Sampler",
    "SamplerOutput",
    "SamplingParams",
    "TokenLogprob",
    "make_generator",
    "unpack_bitmask",
]
