"""The public engine API: bad input, streaming, stop strings, sampling, concurrency, asyncio.

Runs the real default model on a short budget of tokens. Bad input must raise a clear
exception naming the problem, and the engine must keep serving with its cache intact.
"""

from __future__ import annotations

import asyncio
import threading

import pytest

from cascade_rag.chunks import UnknownChunkError
from cascade_rag.composition import ChunkId, Composition
from cascade_rag.llm import CascadeEngine
from cascade_rag.sampling import SamplingParams

DOC = (
    "Zorbia is a small island nation in the Lantern Sea. Its capital city is Plum, which has "
    "about forty thousand inhabitants. The river Quill flows through Plum."
)
SYSTEM = "Answer the question using only the context."


@pytest.fixture(scope="module")
def engine(default_model):
    with CascadeEngine(default_model, kv_cache_tokens=4096, max_model_len=512) as eng:
        yield eng


def ask(query: str) -> Composition:
    return Composition(query=query, chunks=[DOC], system=SYSTEM)


def cache_fingerprint(engine: CascadeEngine) -> tuple:
    s = engine.stats()
    return s.kv_cache.num_nodes, s.kv_cache.cached_tokens, s.chunks.num_chunks


def test_answers_and_reports_usage(engine):
    first = engine.generate(ask("What is the capital of Zorbia?"), SamplingParams(max_tokens=16))
    assert "Plum" in first.text
    assert first.finish_reason in ("stop", "length")
    assert first.usage.prompt_tokens == len(
        engine.prepare(ask("What is the capital of Zorbia?")).token_ids
    )
    again = engine.generate(ask("Which river flows through Plum?"), SamplingParams(max_tokens=16))
    chunk_tokens = engine.prepare(ask("x")).num_chunk_tokens
    assert again.usage.cached_tokens == chunk_tokens
    assert again.usage.completion_tokens == len(again.token_ids)
    stats = engine.stats()
    assert stats.kv_cache.hit_tokens >= chunk_tokens and stats.cache_hit_rate > 0


BAD_INPUTS = [
    ("", ValueError, "empty"),
    ("   ", ValueError, "empty"),
    (None, TypeError, "prompt must be"),
    (42, TypeError, "prompt must be"),
    (b"bytes", TypeError, "prompt must be"),
    ([[]], TypeError, "prompt must be"),
    ([{"role": "user"}], TypeError, "content"),
    ([{"role": "user", "content": "  "}], ValueError, "empty"),
    ("word " * 600, ValueError, "context"),
    (Composition(query="q", chunks=[ChunkId("0" * 32)]), UnknownChunkError, "0" * 32),
    (Composition(query="q", chunks=[""]), ValueError, "empty"),
]


@pytest.mark.parametrize("prompt,exc,words", BAD_INPUTS, ids=[repr(b[0])[:20] for b in BAD_INPUTS])
def test_bad_prompts_raise_and_engine_keeps_serving(engine, prompt, exc, words):
    engine.generate(ask("What is the capital of Zorbia?"), SamplingParams(max_tokens=4))
    before = cache_fingerprint(engine)
    with pytest.raises(exc, match=words):
        engine.generate(prompt, SamplingParams(max_tokens=4))
    after = cache_fingerprint(engine)
    assert after[:2] == before[:2], "a bad request changed the KV cache"
    assert after[2] >= before[2], "a bad request lost registered chunks"
    out = engine.generate(ask("What is the capital of Zorbia?"), SamplingParams(max_tokens=4))
    assert out.usage.cached_tokens > 0 and out.token_ids


@pytest.mark.parametrize(
    "kwargs,words",
    [
        (dict(max_tokens=0), "max_tokens"),
        (dict(max_tokens=-3), "max_tokens"),
        (dict(temperature=-1.0), "temperature"),
        (dict(top_p=0.0), "top_p"),
        (dict(stop=[""]), "stop"),
    ],
)
def test_bad_sampling_params(kwargs, words):
    with pytest.raises(ValueError, match=words):
        SamplingParams(**kwargs)


def test_empty_batch_gives_no_outputs(engine):
    assert engine.generate([], SamplingParams(max_tokens=2)) == []


def test_wrong_sampling_type(engine):
    with pytest.raises(TypeError, match="SamplingParams"):
        engine.generate("hello", {"max_tokens": 3})


def test_pool_too_small_for_one_request(default_model):
    with CascadeEngine(default_model, kv_cache_tokens=64, page_size=16) as small:
        with pytest.raises(ValueError, match="kv_cache_tokens"):
            small.generate(ask("What is the capital of Zorbia?"), SamplingParams(max_tokens=8))
        # a request that fits still runs
        out = small.generate("Hi", SamplingParams(max_tokens=4))
        assert len(out.token_ids) >= 1


def test_long_generation_is_clamped_to_the_context(engine):
    prompt = "word " * 480
    out = engine.generate(prompt, SamplingParams(max_tokens=100, ignore_eos=True))
    assert out.finish_reason == "length"
    assert out.usage.prompt_tokens + out.usage.completion_tokens == engine.max_model_len


def test_stream_concatenates_to_final_text(engine):
    params = SamplingParams(max_tokens=24)
    deltas = list(engine.stream(ask("Describe Zorbia."), params))
    assert deltas[-1].finished and not any(d.finished for d in deltas[:-1])
    final = deltas[-1].output
    assert "".join(d.text for d in deltas) == final.text
    assert [t for d in deltas for t in d.token_ids] == final.token_ids
    same = engine.generate(ask("Describe Zorbia."), params)
    assert same.token_ids == final.token_ids


def test_stop_string_truncates(engine):
    full = engine.generate(ask("Describe Zorbia."), SamplingParams(max_tokens=24))
    words = full.text.split()
    assert len(words) > 3
    stop = words[2]
    cut = engine.generate(ask("Describe Zorbia."), SamplingParams(max_tokens=24, stop=[stop]))
    assert cut.finish_reason == "stop" and cut.stop_reason == stop
    assert stop not in cut.text and full.text.startswith(cut.text)
    streamed = "".join(
        d.text
        for d in engine.stream(ask("Describe Zorbia."), SamplingParams(max_tokens=24, stop=[stop]))
    )
    assert streamed == cut.text


def test_seeded_sampling_is_reproducible_in_any_batch(engine):
    params = SamplingParams(max_tokens=12, temperature=0.9, top_p=0.95, top_k=50, seed=7)
    alone = engine.generate(ask("Tell me about Plum."), params)
    batch = engine.generate(
        [ask("Where is Zorbia?"), ask("Tell me about Plum."), ask("Name the river.")],
        [params][0],
    )
    assert batch[1].token_ids == alone.token_ids
    other_seed = engine.generate(
        ask("Tell me about Plum."),
        SamplingParams(max_tokens=12, temperature=0.9, top_p=0.95, top_k=50, seed=8),
    )
    assert len(other_seed.token_ids) > 0


def test_concurrent_threads_are_batched(engine):
    queries = [f"Question {i}: what is the capital of Zorbia?" for i in range(6)]
    params = SamplingParams(max_tokens=8, ignore_eos=True)
    expected = [engine.generate(ask(q), params).token_ids for q in queries]
    steps_before = engine.stats().num_steps
    results: dict[int, list[int]] = {}
    barrier = threading.Barrier(len(queries))

    def worker(i: int) -> None:
        barrier.wait()
        results[i] = engine.generate(ask(queries[i]), params).token_ids

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(queries))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert [results[i] for i in range(len(queries))] == expected
    steps = engine.stats().num_steps - steps_before
    assert steps < len(queries) * 8, f"{steps} steps: concurrent callers were not batched"


def test_asyncio_callers_are_batched(engine):
    queries = [f"Async question {i}: where is Plum?" for i in range(5)]
    params = SamplingParams(max_tokens=8, ignore_eos=True)
    expected = [engine.generate(ask(q), params).token_ids for q in queries]
    steps_before = engine.stats().num_steps

    async def main():
        return await asyncio.gather(*(engine.agenerate(ask(q), params) for q in queries))

    outs = asyncio.run(main())
    assert [o.token_ids for o in outs] == expected
    assert engine.stats().num_steps - steps_before < len(queries) * 8


def test_async_stream_and_early_break(engine):
    async def main():
        texts = []
        async for delta in engine.astream(ask("Describe Zorbia."), SamplingParams(max_tokens=16)):
            texts.append(delta.text)
        # breaking out of a stream aborts the request; the engine keeps going
        agen = engine.astream(
            ask("Describe Plum."), SamplingParams(max_tokens=200, ignore_eos=True)
        )
        async for _ in agen:
            break
        await agen.aclose()
        return texts

    texts = asyncio.run(main())
    assert texts
    out = engine.generate(ask("What is the capital of Zorbia?"), SamplingParams(max_tokens=4))
    assert out.token_ids
    stats = engine.stats()
    assert stats.num_running == 0 and stats.num_waiting == 0


def test_closed_engine_refuses(default_model):
    eng = CascadeEngine(default_model, kv_cache_tokens=1024)
    eng.close()
    with pytest.raises(RuntimeError, match="closed"):
        eng.generate("Hello", SamplingParams(max_tokens=2))


def test_chat_messages_are_cut_at_message_ends(engine):
    """A short system message is a chunk of its own, so a new user turn reuses its KV."""
    system = {"role": "system", "content": "Be brief."}
    first = [system, {"role": "user", "content": "Where is Plum?"}]
    second = [system, {"role": "user", "content": "Name a river."}]
    prepared = engine.prepare(first)
    text = engine.tokenizer.apply_chat_template(first, tokenize=False, add_generation_prompt=True)
    assert prepared.token_ids == engine.tokenizer.encode(text, add_special_tokens=False)
    head = engine.tokenizer.apply_chat_template([system], tokenize=False)
    assert prepared.chunks and engine.tokenizer.decode(prepared.chunks[0].token_ids) == head
    engine.generate(first, SamplingParams(max_tokens=2))
    out = engine.generate(second, SamplingParams(max_tokens=2))
    assert out.usage.cached_tokens == len(prepared.chunks[0].token_ids)
