"""What the engine returns: finished outputs, streamed deltas, usage and statistics."""

from __future__ import annotations

from dataclasses import dataclass

from cascade_rag.chunks import ChunkStats
from cascade_rag.engine.kv_cache import KVCacheStats
from cascade_rag.sampling import TokenLogprob


@dataclass(frozen=True)
class Usage:
    """Token counts of one request.

    prompt_tokens: tokens in the prompt; cached_tokens: prompt tokens whose KV was served
    from the chunk cache (not computed for this request); completion_tokens: generated tokens;
    recomputed_tokens: with chunk_reuse="anywhere", tokens of reused chunks recomputed in this
    request's context (not counted in cached_tokens).
    """

    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    recomputed_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True)
class GenerationOutput:
    """A finished request.

    text: generated text (stop string removed unless asked to keep it); token_ids: generated
    token ids (the end-of-sequence token included when it ended the request); finish_reason:
    "stop" (end of sequence, stop string or stop token) or "length" (max_tokens or context);
    stop_reason: the stop string or stop token id that ended it; logprobs: with
    `SamplingParams(logprobs=n)`, one `TokenLogprob` per generated token (the sampled token's
    log-probability and rank, and the n most likely tokens).
    """

    request_id: int
    text: str
    token_ids: list[int]
    finish_reason: str
    usage: Usage
    stop_reason: str | int | None = None
    logprobs: list[TokenLogprob] | None = None  # one per generated token when asked


@dataclass(frozen=True)
class StreamDelta:
    """One streamed piece of a request: new text and token ids; `output` is set on the last."""

    request_id: int
    text: str
    token_ids: list[int]
    output: GenerationOutput | None = None
    logprobs: list[TokenLogprob] | None = None  # of this delta's tokens, when asked

    @property
    def finished(self) -> bool:
        return self.output is not None


@dataclass(frozen=True)
class EngineStats:
    """Counters readable while the engine runs (`engine.stats()`)."""

    chunks: ChunkStats
    kv_cache: KVCacheStats
    num_running: int
    num_waiting: int
    num_steps: int
    prompt_tokens: int
    computed_prompt_tokens: int
    generated_tokens: int
    num_preemptions: int
    num_cascade_steps: int = 0  # steps whose attention used at least one shared level
    recomputed_tokens: int = 0  # prompt positions computed again (after preemption or retry)

    @property
    def cache_hit_rate(self) -> float:
        """Fraction of prompt tokens served from the chunk cache, in [0, 1].

        Counts each prompt position once: recomputation after a preemption is reported in
        `recomputed_tokens`, not here.
        """
        if not self.prompt_tokens:
            return 0.0
        return min(1.0, max(0.0, 1.0 - self.computed_prompt_tokens / self.prompt_tokens))
