"""Prometheus metrics of the server and its engine (`GET /metrics`, text format).

Two sources, one registry per app:
- what the server sees per request (`ServerMetrics`): counters of requests by endpoint and
  outcome, prompt / cached prompt (by chunk kind) / generated tokens, and histograms of time to
  first token, time per output token and end-to-end latency;
- what the engine counts (`EngineCollector`), read from `engine.stats()` at scrape time:
  counters of preemptions, chunk KV evictions, cascade steps, steps, KV hit / miss tokens,
  registry hits / misses; gauges of running and waiting requests, free and total KV pages,
  cached chunk nodes and tokens, registered chunks and pinned chains.

Counters are monotonic totals, never gauges overwritten per batch, so rates and hit ratios
come from `rate()`. This module does not serve HTTP (app.py does) and does not time requests
itself (generation.py calls `observe`).
"""

from __future__ import annotations

import logging

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from cascade_rag.chunks import Chunk, ChunkType
from cascade_rag.outputs import Usage

logger = logging.getLogger(__name__)

PREFIX = "cascade_rag"
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
TPOT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
E2E_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
PRIVATE_KIND = "private"  # prompt tokens outside any chunk (the query, the generation prompt)


def cached_tokens_by_kind(chunks: tuple[Chunk, ...], usage: Usage) -> dict[str, int]:
    """Split a request's cached prompt tokens by the type of the chunk that held them.

    The cache serves a prefix of the prompt (the chunks whose KV was found), so the first
    `usage.cached_tokens` tokens are attributed to the chunks in prompt order.
    """
    left = usage.cached_tokens
    out: dict[str, int] = {}
    for chunk in chunks:
        if left <= 0:
            break
        take = min(left, len(chunk))
        out[chunk.type.value] = out.get(chunk.type.value, 0) + take
        left -= take
    if left > 0:
        out[PRIVATE_KIND] = out.get(PRIVATE_KIND, 0) + left
    return out


class ServerMetrics:
    """The server's metrics over one `CollectorRegistry`.

    Args:
        engine: the engine whose `stats()` the scrape reads (`EngineCollector`).
    """

    def __init__(self, engine) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            f"{PREFIX}_requests",
            "Finished requests by endpoint and outcome (stop, length, abort, error, rejected).",
            ["endpoint", "outcome"],
            registry=r,
        )
        self.prompt_tokens = Counter(
            f"{PREFIX}_prompt_tokens", "Prompt tokens of finished requests.", registry=r
        )
        self.cached_prompt_tokens = Counter(
            f"{PREFIX}_cached_prompt_tokens",
            "Prompt tokens served from the chunk KV cache, by the kind of chunk that held them.",
            ["kind"],
            registry=r,
        )
        self.generation_tokens = Counter(
            f"{PREFIX}_generation_tokens", "Generated tokens of finished requests.", registry=r
        )
        self.ttft = Histogram(
            f"{PREFIX}_time_to_first_token_seconds",
            "Time from a request's arrival to its first generated token.",
            buckets=TTFT_BUCKETS,
            registry=r,
        )
        self.tpot = Histogram(
            f"{PREFIX}_time_per_output_token_seconds",
            "Mean time between a request's generated tokens after the first.",
            buckets=TPOT_BUCKETS,
            registry=r,
        )
        self.e2e = Histogram(
            f"{PREFIX}_e2e_request_latency_seconds",
            "Time from a request's arrival to its last token.",
            buckets=E2E_BUCKETS,
            registry=r,
        )
        for kind in [t.value for t in ChunkType] + [PRIVATE_KIND]:
            self.cached_prompt_tokens.labels(kind)  # every kind shows, at 0 until used
        self.registry.register(EngineCollector(engine))

    def observe(
        self,
        endpoint: str,
        outcome: str,
        usage: Usage | None = None,
        chunks: tuple[Chunk, ...] = (),
        ttft_s: float | None = None,
        e2e_s: float | None = None,
    ) -> None:
        """Record one request that ended (outcome: a finish reason, abort, error, rejected)."""
        self.requests.labels(endpoint, outcome).inc()
        if usage is not None:
            self.prompt_tokens.inc(usage.prompt_tokens)
            self.generation_tokens.inc(usage.completion_tokens)
            for kind, n in cached_tokens_by_kind(chunks, usage).items():
                self.cached_prompt_tokens.labels(kind).inc(n)
        if ttft_s is not None:
            self.ttft.observe(ttft_s)
            if e2e_s is not None and usage is not None and usage.completion_tokens > 1:
                self.tpot.observe((e2e_s - ttft_s) / (usage.completion_tokens - 1))
        if e2e_s is not None:
            self.e2e.observe(e2e_s)

    def render(self) -> bytes:
        """The registry in Prometheus' text format."""
        return generate_latest(self.registry)


class EngineCollector(Collector):
    """Engine counters and gauges, read from `engine.stats()` when scraped."""

    def __init__(self, engine) -> None:
        self.engine = engine

    def collect(self):
        s = self.engine.stats()
        counters = [
            ("engine_steps", "Engine steps (forward passes).", s.num_steps),
            (
                "preemptions",
                "Requests preempted for KV pages (recomputed later).",
                s.num_preemptions,
            ),
            (
                "cascade_steps",
                "Steps whose attention used a shared cascade level.",
                s.num_cascade_steps,
            ),
            (
                "kv_evicted_chunks",
                "Chunk KV nodes evicted from the page pool.",
                s.kv_cache.evicted_nodes,
            ),
            (
                "kv_hit_tokens",
                "Prompt tokens whose KV was found in the cache.",
                s.kv_cache.hit_tokens,
            ),
            ("kv_miss_tokens", "Prompt tokens whose KV was computed.", s.kv_cache.miss_tokens),
            (
                "engine_prompt_tokens",
                "Prompt tokens the engine admitted (all callers).",
                s.prompt_tokens,
            ),
            (
                "engine_computed_prompt_tokens",
                "Prompt positions computed (first time).",
                s.computed_prompt_tokens,
            ),
            (
                "engine_recomputed_tokens",
                "Prompt positions computed again after preemption.",
                s.recomputed_tokens,
            ),
            ("engine_generation_tokens", "Tokens generated (all callers).", s.generated_tokens),
            ("chunk_registry_hits", "Chunk registrations that found the chunk.", s.chunks.hits),
            ("chunk_registry_misses", "Chunk registrations that added a chunk.", s.chunks.misses),
            ("chunk_registry_evictions", "Chunks the registry forgot.", s.chunks.evictions),
        ]
        for name, doc, value in counters:
            metric = CounterMetricFamily(f"{PREFIX}_{name}", doc)
            metric.add_metric([], value)
            yield metric
        gauges = [
            ("num_requests_running", "Requests in the running batch.", s.num_running),
            ("num_requests_waiting", "Requests waiting for the running batch.", s.num_waiting),
            ("kv_free_pages", "Free KV pages.", s.kv_cache.free_pages),
            ("kv_total_pages", "KV pages in the pool.", s.kv_cache.total_pages),
            ("kv_cached_chunks", "Chunk KV nodes in the cache.", s.kv_cache.num_nodes),
            ("kv_cached_tokens", "Tokens of chunk KV in the cache.", s.kv_cache.cached_tokens),
            ("registered_chunks", "Chunks in the registry.", s.chunks.num_chunks),
            (
                "cache_hit_rate",
                "Fraction of prompt tokens served from the cache.",
                s.cache_hit_rate,
            ),
        ]
        for name, doc, value in gauges:
            yield GaugeMetricFamily(f"{PREFIX}_{name}", doc, value=value)
        pinned = _pinned_chains(self.engine)
        if pinned is not None:
            yield GaugeMetricFamily(
                f"{PREFIX}_pinned_chains", "Chunk chains pinned in the KV cache.", value=pinned
            )


def _pinned_chains(engine) -> int | None:
    """Pinned chains (a read on the worker thread, at most one step away)."""
    try:
        return len(engine.pinned_chains())
    except Exception:  # noqa: BLE001 - a closed engine: the gauge is left out
        logger.debug("could not read the pinned chains", exc_info=True)
        return None
