"""The front end never wedges: failures at every stage, aborts, close, interrupts, bad config.

Runs the real default model on short generations. Every wait in these tests has a timeout, so
a regression shows up as a failure, not as a hung test run.
"""

from __future__ import annotations

import asyncio
import gc
import queue
import signal
import threading
import time
import weakref

import pytest

from cascade_rag.chunks import Chunk, ChunkType
from cascade_rag.composition import Composition
from cascade_rag.config import EngineConfig
from cascade_rag.engine.sequence import PreparedPrompt
from cascade_rag.llm import CascadeEngine, EngineClosedError
from cascade_rag.sampling import SamplingParams

DOC = (
    "Zorbia is a small island nation in the Lantern Sea. Its capital city is Plum, which has "
    "about forty thousand inhabitants. The river Quill flows through Plum."
)
SYSTEM = "Answer the question using only the context."
PROBE_PARAMS = SamplingParams(max_tokens=8)
VICTIM = 7  # max_tokens that marks the request a test makes fail


def ask(query: str) -> Composition:
    return Composition(query=query, chunks=[DOC], system=SYSTEM)


PROBE = ask("What is the capital of Zorbia?")
OTHER = ask("Which river flows through Plum?")


@pytest.fixture(scope="module")
def engine(default_model):
    with CascadeEngine(default_model, kv_cache_tokens=4096, max_model_len=512) as eng:
        yield eng


@pytest.fixture(scope="module")
def baseline(engine):
    """Greedy tokens of the probe requests, each run alone on a fresh cache."""
    return {
        "probe": engine.generate(PROBE, PROBE_PARAMS).token_ids,
        "other": engine.generate(OTHER, PROBE_PARAMS).token_ids,
    }


def fingerprint(engine: CascadeEngine) -> tuple[int, int]:
    s = engine.stats()
    return s.kv_cache.num_nodes, s.chunks.num_chunks


def wait_idle(engine: CascadeEngine, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        s = engine.stats()
        if s.num_running == 0 and s.num_waiting == 0 and not engine._worker.inbox:
            return
        time.sleep(0.02)
    raise AssertionError("the engine did not become idle")


class Injected(RuntimeError):
    """The failure a test injects."""


def _is_victim(params: SamplingParams) -> bool:
    return params.max_tokens == VICTIM


def inject(engine: CascadeEngine, stage: str, monkeypatch) -> None:
    """Make the victim request (max_tokens == VICTIM) fail at `stage`."""
    core = engine._core
    if stage == "admission":
        original = core.add_request

        def add_request(prompt, params, *args, **kwargs):
            if _is_victim(params):
                raise Injected("admission")
            return original(prompt, params, *args, **kwargs)

        monkeypatch.setattr(core, "add_request", add_request)
    elif stage == "scheduling":
        original = core.scheduler._admit

        def admit(seq, created):
            if _is_victim(seq.params):
                raise Injected("scheduling")
            return original(seq, created)

        monkeypatch.setattr(core.scheduler, "_admit", admit)
    elif stage == "model":
        original = core.runner.run

        def run(batch, rows=None):
            if any(_is_victim(e.seq.params) for e in batch):
                raise Injected("model")
            return original(batch, rows)

        monkeypatch.setattr(core.runner, "run", run)
    elif stage == "sampling":
        name = "sample_step" if hasattr(core.sampler, "sample_step") else "sample"
        original = getattr(core.sampler, name)

        def sample(logits, params, *args, **kwargs):
            if any(_is_victim(p) for p in params):
                raise Injected("sampling")
            return original(logits, params, *args, **kwargs)

        monkeypatch.setattr(core.sampler, name, sample)
    elif stage == "stop handling":
        original = core._append

        def append(seq, *args):
            if _is_victim(seq.params):
                raise Injected("stop handling")
            return original(seq, *args)

        monkeypatch.setattr(core, "_append", append)
    else:
        raise AssertionError(stage)


STAGES = ["admission", "scheduling", "model", "sampling", "stop handling"]


@pytest.mark.parametrize("stage", STAGES)
def test_a_failure_at_any_stage_ends_only_its_request(engine, baseline, stage, monkeypatch):
    engine.generate(PROBE, PROBE_PARAMS)  # the probe's chunks are cached
    before = fingerprint(engine)
    inject(engine, stage, monkeypatch)

    async def main():
        return await asyncio.gather(
            engine.agenerate(OTHER, SamplingParams(max_tokens=VICTIM)),
            engine.agenerate(PROBE, PROBE_PARAMS),
            engine.agenerate(OTHER, PROBE_PARAMS),
            return_exceptions=True,
        )

    victim, probe, other = asyncio.run(asyncio.wait_for(main(), 60))
    assert isinstance(victim, Injected) and str(victim) == stage
    assert not isinstance(probe, BaseException), probe
    assert not isinstance(other, BaseException), other
    assert probe.token_ids == baseline["probe"], "a co-batched request's output changed"
    assert other.token_ids == baseline["other"], "a co-batched request's output changed"
    monkeypatch.undo()
    wait_idle(engine)
    out = engine.generate(PROBE, PROBE_PARAMS)
    assert out.token_ids == baseline["probe"] and out.usage.cached_tokens > 0
    assert fingerprint(engine) >= before, "the failure lost cached chunks"


def test_a_caller_whose_delivery_fails_does_not_stop_the_worker(engine, baseline):
    def broken(item):
        raise Injected("delivery")

    (req,) = engine._make_requests([(PROBE, PROBE_PARAMS, broken)], stream_text=True)
    engine._worker.submit([req])
    assert engine.generate(OTHER, PROBE_PARAMS).token_ids == baseline["other"]
    wait_idle(engine)
    assert engine.generate(PROBE, PROBE_PARAMS).token_ids == baseline["probe"]


def test_a_step_that_fails_unattributably_ends_only_the_running_requests(
    engine, baseline, monkeypatch
):
    calls = {"n": 0}
    original = engine._core.scheduler.schedule

    def schedule():
        calls["n"] += 1
        if calls["n"] == 3:  # once, in the middle of a generation
            raise Injected("schedule")
        return original()

    monkeypatch.setattr(engine._core.scheduler, "schedule", schedule)
    with pytest.raises(Injected):
        engine.generate(PROBE, SamplingParams(max_tokens=20, ignore_eos=True))
    monkeypatch.undo()
    wait_idle(engine)
    assert engine.generate(PROBE, PROBE_PARAMS).token_ids == baseline["probe"]


# ---- aborts and statistics -------------------------------------------------------------


def test_stats_and_aborts_do_not_wait_for_a_step(engine):
    """While a step holds the core lock, stats() and abort() still return at once."""
    engine.generate(PROBE, SamplingParams(max_tokens=2))  # a snapshot exists
    sink: queue.SimpleQueue = queue.SimpleQueue()
    (req,) = engine._make_requests(
        [(PROBE, SamplingParams(max_tokens=200, ignore_eos=True), sink.put)], stream_text=True
    )
    with engine._worker.core_lock:  # a very long step
        engine._worker.submit([req])
        done = threading.Event()

        def probe():
            engine.stats()
            engine._worker.abort(req)
            done.set()

        threading.Thread(target=probe, daemon=True).start()
        assert done.wait(5), "stats() or abort() waited for the step"
    wait_idle(engine)
    assert engine.stats().num_running == 0


def test_a_request_read_at_its_end_gets_one_delivery_and_a_stream_gets_every_token(engine):
    """generate / agenerate requests (stream_text=False) are handed only their end, so the
    caller is not woken once per token; streams get one delta per token before the end."""
    params = SamplingParams(max_tokens=6, ignore_eos=True)
    sinks = {flag: queue.SimpleQueue() for flag in (False, True)}
    requests = [
        engine._make_requests([(PROBE, params, sinks[flag].put)], stream_text=flag)[0]
        for flag in (False, True)
    ]
    engine._worker.submit(requests)
    got = {}
    for flag, sink in sinks.items():
        items = [sink.get(timeout=60)]
        while items[-1].output is None:
            items.append(sink.get(timeout=60))
        got[flag] = items
    (end,) = got[False]
    assert end.output.token_ids == got[True][-1].output.token_ids
    assert len(end.output.token_ids) == 6
    streamed = [t for item in got[True] for t in item.token_ids]
    assert streamed == end.output.token_ids and len(got[True]) >= 2
    wait_idle(engine)


@pytest.mark.parametrize("when", ["before admission", "mid-prefill", "mid-decode"])
def test_an_abort_at_any_moment_stops_the_request_within_a_step(engine, when):
    params = SamplingParams(max_tokens=200, ignore_eos=True)
    worker = engine._worker
    before = engine.stats().generated_tokens
    sink: queue.SimpleQueue = queue.SimpleQueue()
    (req,) = engine._make_requests([(PROBE, params, sink.put)], stream_text=True)
    if when == "before admission":
        with worker.wake:  # the worker cannot take the inbox yet
            worker.submit([req])
            worker.abort(req)
    elif when == "mid-prefill":
        with worker.core_lock:  # the worker has taken the inbox and waits for the lock
            worker.submit([req])
            time.sleep(0.1)
            worker.abort(req)
    else:
        worker.submit([req])
        sink.get(timeout=30)  # a first token arrived: it is decoding
        worker.abort(req)
    wait_idle(engine)
    generated = engine.stats().generated_tokens - before
    assert generated <= (0 if when == "before admission" else 3), generated


def test_cancelling_an_async_stream_does_not_block_the_loop(engine):
    async def main():
        async def consume():
            async for _ in engine.astream(PROBE, SamplingParams(max_tokens=200, ignore_eos=True)):
                pass

        task = asyncio.create_task(consume())
        await asyncio.sleep(0.3)
        with engine._worker.core_lock:  # cancel while a step is "running"
            t0 = time.monotonic()
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            return time.monotonic() - t0

    assert asyncio.run(main()) < 1.0
    wait_idle(engine)


# ---- close, dropping, interrupts -------------------------------------------------------


def test_close_ends_running_and_queued_requests_and_joins_the_worker(default_model):
    eng = CascadeEngine(default_model, kv_cache_tokens=2048, max_num_seqs=1)
    results: list = []

    def call(prompt):
        try:
            results.append(eng.generate(prompt, SamplingParams(max_tokens=400, ignore_eos=True)))
        except BaseException as exc:  # noqa: BLE001 - recorded for the assertions
            results.append(exc)

    threads = [threading.Thread(target=call, args=(p,), daemon=True) for p in (PROBE, OTHER)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 30
    while eng.stats().generated_tokens == 0 and time.monotonic() < deadline:
        time.sleep(0.02)
    worker_thread = eng._worker.thread
    eng.close()
    for t in threads:
        t.join(10)
        assert not t.is_alive(), "a caller still waits after close()"
    assert not worker_thread.is_alive()
    assert len(results) == 2 and all(isinstance(r, EngineClosedError) for r in results), results
    t0 = time.monotonic()
    with pytest.raises(EngineClosedError):
        eng.generate(PROBE, PROBE_PARAMS)
    with pytest.raises(EngineClosedError):
        eng.stream(PROBE, PROBE_PARAMS).__next__()
    assert time.monotonic() - t0 < 1.0
    eng.close()  # closing twice is fine


def test_a_dropped_engine_releases_its_worker_and_memory(default_model):
    eng = CascadeEngine(default_model, kv_cache_tokens=2048)
    eng.generate(PROBE, SamplingParams(max_tokens=2))
    thread = eng._worker.thread
    core = weakref.ref(eng._core)
    del eng
    gc.collect()
    thread.join(10)
    assert not thread.is_alive(), "the worker thread outlived its engine"
    gc.collect()
    assert core() is None, "the engine core (model, KV pool) is still referenced"


def test_ctrl_c_in_generate_aborts_its_requests(engine):
    def interrupt(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGALRM, interrupt)
    before = engine.stats().generated_tokens
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.5)
        with pytest.raises(KeyboardInterrupt):
            engine.generate(PROBE, SamplingParams(max_tokens=400, ignore_eos=True))
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    wait_idle(engine)
    assert engine.stats().generated_tokens - before < 400, "the request kept running"


# ---- scheduling semantics --------------------------------------------------------------


def test_cache_hit_rate_stays_in_range_with_preemptions(default_model):
    prompts = [ask(f"Question number {i}: where is Plum?") for i in range(6)]
    params = SamplingParams(max_tokens=48, ignore_eos=True)
    with CascadeEngine(default_model, kv_cache_tokens=320, page_size=16) as small:
        outs = small.generate(prompts, params)
        stats = small.stats()
    with CascadeEngine(default_model, kv_cache_tokens=8192) as big:
        ref = big.generate(prompts, params)
    assert stats.num_preemptions > 0, "the pool is small enough to preempt"
    assert 0.0 <= stats.cache_hit_rate <= 1.0
    assert stats.recomputed_tokens > 0
    assert stats.computed_prompt_tokens <= stats.prompt_tokens
    assert [o.token_ids for o in outs] == [r.token_ids for r in ref]


def test_stop_token_text_is_not_in_the_output(engine, baseline):
    tokens = baseline["probe"]
    stop = tokens[2]
    out = engine.generate(PROBE, SamplingParams(max_tokens=8, stop_token_ids=[stop]))
    assert out.token_ids == tokens[:3] and out.stop_reason == stop
    assert out.text == engine.tokenizer.decode(tokens[:2], skip_special_tokens=True)
    kept = engine.generate(
        PROBE,
        SamplingParams(max_tokens=8, stop_token_ids=[stop], include_stop_str_in_output=True),
    )
    assert kept.text == engine.tokenizer.decode(tokens[:3], skip_special_tokens=True)


# ---- bad input -------------------------------------------------------------------------


def test_out_of_vocabulary_token_ids_are_refused(engine, baseline):
    vocab = engine.vocab_size
    for bad in ([vocab], [-1], [5, vocab + 10**6]):
        with pytest.raises(ValueError, match="vocabulary"):
            engine.generate(PreparedPrompt(chunks=(), tail_ids=tuple(bad)), PROBE_PARAMS)
    with pytest.raises(ValueError, match="vocabulary"):
        engine.register_token_chunk([1, vocab])
    assert engine.generate(PROBE, PROBE_PARAMS).token_ids == baseline["probe"]


def test_out_of_vocabulary_ids_are_refused_in_chunks_and_beside_checked_chunks(engine, baseline):
    """Registered chunk objects skip the per-request token pass; nothing else does: a
    hand-built chunk, or the private tail next to a checked chunk, is still checked."""
    vocab = engine.vocab_size
    checked = engine.register_token_chunk([5, 6, 7, 8])
    hits = engine.stats().chunks.hits
    with pytest.raises(ValueError, match="vocabulary"):
        engine.generate(PreparedPrompt(chunks=(checked,), tail_ids=(9, vocab)), PROBE_PARAMS)
    for forged_id in ("not-a-hash", checked.id):  # a new id, and a checked chunk's id
        forged = Chunk(forged_id, ChunkType.RAG_RESULT, (5, 6, vocab + 3))
        with pytest.raises(ValueError, match="vocabulary"):
            engine.generate(PreparedPrompt(chunks=(checked, forged), tail_ids=(9,)), PROBE_PARAMS)
    out = engine.generate(PreparedPrompt(chunks=(checked,), tail_ids=(9, 10)), PROBE_PARAMS)
    assert out.usage.prompt_tokens == 6
    assert engine.stats().chunks.hits > hits  # reusing the object still counts as a hit
    assert engine.generate(PROBE, PROBE_PARAMS).token_ids == baseline["probe"]


def test_a_refused_request_registers_nothing(engine):
    before = engine.stats().chunks.num_chunks
    novel = "A passage never seen before about the lighthouse of Vell. " * 3
    with pytest.raises(ValueError, match="context"):
        engine.generate(Composition(query="word " * 600, chunks=[novel], system="Fresh system."))
    assert engine.stats().chunks.num_chunks == before


def test_hand_built_chunks_are_adopted_and_never_share_kv_by_id(engine):
    a_text = "The ferry to Vell leaves at nine."
    b_text = "The ferry to Vell leaves at noon."
    a_ids = engine.register_chunk(a_text).token_ids  # the tokens a text chunk has
    b_ids = engine.register_chunk(b_text).token_ids
    # two chunks built by hand with the same id and different tokens
    a = Chunk(id="doc-42", type=ChunkType.RAG_RESULT, token_ids=a_ids)
    b = Chunk(id="doc-42", type=ChunkType.RAG_RESULT, token_ids=b_ids)
    q = "When does the ferry to Vell leave?"
    params = SamplingParams(max_tokens=12)
    for chunk, text in ((a, a_text), (b, b_text)):
        out = engine.generate(Composition(query=q, chunks=[chunk], system=SYSTEM), params)
        ref = engine.generate(Composition(query=q, chunks=[text], system=SYSTEM), params)
        assert out.token_ids == ref.token_ids
    engine.clear_cache()  # eviction of adopted chunks works
    assert engine.generate(PROBE, PROBE_PARAMS).token_ids


def test_bad_config_is_refused_with_the_reason(default_model):
    cases = [
        (dict(page_size=10**6), ValueError, "page_size"),
        (dict(kv_cache_tokens=True), TypeError, "kv_cache_tokens"),
        (dict(max_num_seqs=2.0), TypeError, "max_num_seqs"),
        (dict(max_cascade_levels=1000), ValueError, "max_cascade_levels"),
        (dict(dtype="float8"), ValueError, "dtype"),
        (dict(device="tpu"), ValueError, "device"),
        (dict(cascade="yes"), TypeError, "cascade"),
    ]
    for kwargs, exc, words in cases:
        with pytest.raises(exc, match=words):
            EngineConfig(**kwargs)
    with pytest.raises(TypeError, match="kv_cache_token"):
        CascadeEngine(default_model, kv_cache_token=4096)  # a typo
    with pytest.raises(ValueError, match="free"):
        CascadeEngine(default_model, kv_cache_tokens=2**40)


def test_dtype_auto_and_devices(default_model):
    import torch

    assert EngineConfig().resolved_dtype == "float32"
    assert EngineConfig(device="cuda", dtype="auto").resolved_dtype == "bfloat16"
    assert EngineConfig(device="cuda:1", dtype="float16").resolved_dtype == "float16"
    with pytest.raises(ValueError, match="float32"):
        EngineConfig(device="cuda", dtype="float32", attention_backend="flashinfer").check_runtime()
    with pytest.raises(ValueError, match="CUDA only"):
        EngineConfig(attention_backend="flashinfer").check_runtime()
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="device='cuda'"):
            CascadeEngine(default_model, device="cuda")
