"""Overlap (EngineConfig.overlap): one step of lookahead changes when tokens are read, never
which tokens come out.

Each test drives the engine core step by step with overlap on and off (same model, float32 on
the CPU) and compares outputs and streamed deltas; greedy outputs are also compared with
transformers. The cases are the ones overlap has to get right: mixed prompt lengths and
max_tokens 1..N, EOS and stop tokens, stop strings that span tokens, seeded sampling, aborts
while a step is in flight, preemption in a small pool, a request that fails in the model, and
constrained requests (which force synchronous steps) next to free ones.
"""

from __future__ import annotations

import pytest
import torch

from cascade_rag.composition import Composition
from cascade_rag.llm import CascadeEngine
from cascade_rag.sampling import Constraint, SamplingParams

DOC = (
    "The Plum Railway links the old harbour of Zorbia with the hill towns. Its trains are "
    "painted green and run every twenty minutes from dawn until midnight."
)
QUERIES = [
    "Describe the Plum Railway.",
    "What colour are the trains?",
    "How often do the trains run, and until when? Answer in one sentence please.",
    "Name the towns.",
    "Write a short poem about a green train that climbs the hills of Zorbia at dawn.",
]


def prompt(i: int) -> Composition:
    return Composition(query=QUERIES[i % len(QUERIES)], chunks=[DOC], system="Be helpful.")


def make(default_model, overlap: bool, **kw) -> CascadeEngine:
    kw.setdefault("kv_cache_tokens", 8192)
    return CascadeEngine(default_model, overlap=overlap, **kw)


@pytest.fixture(scope="module")
def engines(default_model):
    with make(default_model, True) as on, make(default_model, False) as off:
        assert on._core.overlap and not off._core.overlap
        yield on, off


@pytest.fixture(scope="module")
def hf_model(default_model):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(default_model.model_dir, dtype=torch.float32)
    return model.eval()


def hf_greedy(hf_model, ids: list[int], max_new: int) -> list[int]:
    with torch.inference_mode():
        out = hf_model.generate(
            torch.tensor([ids]),
            attention_mask=torch.ones(1, len(ids), dtype=torch.int64),
            max_new_tokens=max_new,
            do_sample=False,
            pad_token_id=0,
        )
    return out[0, len(ids) :].tolist()


class Aborted(tuple):
    """The generated ids a request had when it was aborted."""

    finish_reason = "abort"

    @property
    def token_ids(self) -> list[int]:
        return list(self)


def drive(engine: CascadeEngine, prompts, params, on_step=None):
    """Run requests on the engine core step by step (no worker thread).

    Returns (outputs or errors, per-request deltas [(token_ids, text)], stats of the run).
    `on_step(step, core, seqs)` runs between steps (aborts).
    """
    core = engine._core
    before = core.generated_tokens
    seqs = [
        core.add_request(engine.prepare(p), sp, sp.max_tokens, stream_text=True)
        for p, sp in zip(prompts, params)
    ]
    ends: dict[int, object] = {}
    deltas: dict[int, list] = {s.seq_id: [] for s in seqs}
    inflight_steps = 0
    step = 0
    while core.has_work():
        for u in core.step():
            assert u.seq.seq_id not in ends, "an update after the request ended"
            if u.token_ids or u.text:
                deltas.setdefault(u.seq.seq_id, []).append((tuple(u.token_ids), u.text))
            if u.error is not None:
                ends[u.seq.seq_id] = u.error
            elif u.output is not None:
                ends[u.seq.seq_id] = u.output
        inflight_steps += core._flight is not None
        step += 1
        if on_step is not None:
            on_step(step, core, seqs)
            for s in seqs:  # an abort between steps ends a request without an update
                if s.finish_reason == "abort" and s.seq_id not in ends:
                    ends[s.seq_id] = Aborted(s.generated_ids)
        assert step < 10_000
    for s in seqs:
        assert s.seq_id in ends, "every request ends"
        assert -1 not in s.token_ids, "no placeholder is left in a finished request"
    delivered = sum(len(t) for d in deltas.values() for t, _ in d)
    assert core.generated_tokens - before == delivered, "generated_tokens counts deliveries"
    assert core.scheduler.block_table.num_used == 0
    assert not any(s.num_pending for s in seqs), "no placeholder is counted after the end"
    return [ends[s.seq_id] for s in seqs], [deltas[s.seq_id] for s in seqs], inflight_steps


def same_runs(engines, prompts, params, on_step=None):
    on, off = engines
    out_on, d_on, inflight = drive(on, prompts, params, on_step)
    out_off, d_off, none = drive(off, prompts, params, on_step)
    assert none == 0
    for i, (a, b) in enumerate(zip(out_on, out_off)):
        if isinstance(b, BaseException):
            assert type(a) is type(b) and str(a) == str(b), i
            continue
        if isinstance(b, Aborted):  # overlap delivers a step later: one token fewer at most
            for ids, deltas in ((a, d_on[i]), (b, d_off[i])):
                assert list(ids) == [t for ids_, _ in deltas for t in ids_], i
            assert list(a) == list(b)[: len(a)] and len(b) - len(a) <= 1, (a, b)
            continue
        assert a.token_ids == b.token_ids, f"request {i}: on {a.token_ids} off {b.token_ids}"
        assert (a.text, a.finish_reason, a.stop_reason) == (b.text, b.finish_reason, b.stop_reason)
        assert a.usage == b.usage, i
        assert d_on[i] == d_off[i], f"request {i}: streamed deltas differ"
    return out_on, inflight


def test_greedy_mixed_lengths_and_max_tokens_match_off_and_transformers(engines, hf_model):
    prompts = [prompt(i) for i in range(5)]
    params = [SamplingParams(max_tokens=n) for n in (1, 2, 3, 9, 14)]
    outs, inflight = same_runs(engines, prompts, params)
    assert inflight > 3, "decode steps overlapped"
    for p, sp, out in zip(prompts, params, outs):
        ids = engines[0].prepare(p).token_ids
        assert out.token_ids == hf_greedy(hf_model, ids, sp.max_tokens), out


def test_eos_stop_tokens_and_stop_strings_across_tokens(engines):
    on, _ = engines
    # the free run's tokens pick stop tokens and stop strings that are really hit
    free = drive(on, [prompt(0), prompt(2)], [SamplingParams(max_tokens=14)] * 2)[0]
    tok = on._core.tokenizer
    text0 = free[0].text
    spanning = text0[len(text0) // 3 : len(text0) // 3 + 5]  # likely spans a token boundary
    stop_tok = free[1].token_ids[4]
    params = [
        SamplingParams(max_tokens=14, stop=[spanning]),
        SamplingParams(max_tokens=14, stop_token_ids=[stop_tok]),
        SamplingParams(max_tokens=14, stop=[spanning], include_stop_str_in_output=True),
        SamplingParams(max_tokens=30),  # may end at EOS
        SamplingParams(max_tokens=14, ignore_eos=True, min_tokens=6, stop_token_ids=[stop_tok]),
    ]
    prompts = [prompt(0), prompt(2), prompt(0), prompt(1), prompt(2)]
    outs, _ = same_runs(engines, prompts, params)
    assert outs[0].finish_reason == "stop" and outs[0].stop_reason == spanning
    assert outs[1].finish_reason == "stop" and outs[1].stop_reason == stop_tok
    assert len(tok.encode(spanning, add_special_tokens=False)) >= 1


def test_seeded_sampling_matches_off(engines):
    params = [
        SamplingParams(max_tokens=10, temperature=1.0, seed=7),
        SamplingParams(max_tokens=12, temperature=0.8, top_p=0.9, top_k=40, seed=11),
        SamplingParams(max_tokens=8, temperature=1.3, min_p=0.05, seed=3, min_tokens=4),
        SamplingParams(max_tokens=6),
    ]
    same_runs(engines, [prompt(i) for i in range(4)], params)


def test_abort_while_a_step_is_in_flight(engines):
    def abort(step, core, seqs):
        if step == 4:
            assert core._flight is None or seqs[1] in core._flight.seqs or not core.overlap
            core.abort(seqs[1])
        if step == 6:
            core.abort(seqs[3])

    params = [SamplingParams(max_tokens=12)] * 4
    outs, _ = same_runs(engines, [prompt(i) for i in range(4)], params, abort)
    assert outs[1].finish_reason == "abort" and outs[3].finish_reason == "abort"
    assert 0 < len(outs[1].token_ids) < 12


def test_preemption_in_a_small_pool_matches_off_and_transformers(default_model, hf_model):
    # 4 prompts of 54-67 tokens and 32 new tokens each need 23 pages: 18 force preemption
    kw = dict(kv_cache_tokens=18 * 16, page_size=16, enable_chunk_cache=False)
    with make(default_model, True, **kw) as on, make(default_model, False, **kw) as off:
        prompts = [prompt(i) for i in range(4)]
        params = [SamplingParams(max_tokens=32, ignore_eos=True)] * 4
        outs, _ = same_runs((on, off), prompts, params)
        assert on._core.num_preemptions > 0 and off._core.num_preemptions > 0
        for p, out in zip(prompts, outs):
            ids = on.prepare(p).token_ids
            ref = hf_greedy(hf_model, ids, 32)  # up to its EOS (the engine ignores EOS here)
            assert out.token_ids[: len(ref)] == ref


def test_a_request_failing_in_the_model_ends_alone(engines, monkeypatch):
    class Injected(RuntimeError):
        pass

    for engine in engines:
        runner = engine._core.runner
        original = runner.run

        def run(batch, rows=None, original=original):
            if any(e.seq.params.max_tokens == 7 and e.seq.num_generated >= 3 for e in batch):
                raise Injected("model")
            return original(batch, rows)

        monkeypatch.setattr(runner, "run", run)
    params = [SamplingParams(max_tokens=n) for n in (10, 7, 12)]
    outs, _ = same_runs(engines, [prompt(i) for i in range(3)], params)
    assert isinstance(outs[1], Injected)
    assert outs[0].token_ids and outs[2].token_ids


def test_constrained_requests_next_to_free_ones(engines):
    schema = {
        "type": "object",
        "properties": {"colour": {"type": "string"}, "every": {"type": "integer"}},
        "required": ["colour", "every"],
    }
    params = [
        SamplingParams(max_tokens=40, constraint=Constraint(json_schema=schema)),
        SamplingParams(max_tokens=10),
        SamplingParams(max_tokens=8, constraint=Constraint(choice=["green", "red"])),
        SamplingParams(max_tokens=12, repetition_penalty=1.3, presence_penalty=0.5),
        SamplingParams(max_tokens=6, logprobs=2),
    ]
    outs, _ = same_runs(engines, [prompt(i) for i in range(5)], params)
    assert outs[2].text in ("green", "red")
    assert outs[4].logprobs is not None and len(outs[4].logprobs) == len(outs[4].token_ids)


def test_threaded_engine_streams_and_finishes(engines):
    on, off = engines
    params = SamplingParams(max_tokens=9)
    a = [d.text for d in on.stream(prompt(3), params)]
    b = [d.text for d in off.stream(prompt(3), params)]
    assert a == b
    assert [o.token_ids for o in on.generate([prompt(i) for i in range(3)], params)] == [
        o.token_ids for o in off.generate([prompt(i) for i in range(3)], params)
    ]
    assert not on._core.has_work()


def test_pending_input_ids_are_gathered_for_decode_mixed_and_readmitted_rows(engines):
    """Every step's input ids, recorded as the model got them, equal the tokens the requests
    have once resolved: pending decode rows, steps mixing them with new prompts, and a request
    preempted while its token is pending and re-admitted by the same schedule."""
    on, _ = engines
    core = on._core
    seen = []  # (entries, order, input ids) per forward pass
    runner, scheduler = core.runner, core.scheduler
    prepare, forward, schedule = runner.prepare, runner.model.forward, scheduler.schedule
    state = {"preempt": 3}

    def prepare_rec(batch, *args, **kwargs):
        inputs = prepare(batch, *args, **kwargs)
        entries = [(e.seq, e.q_start, e.kv_len, e.slots is not None) for e in batch]
        seen.append([entries, inputs.order.tolist(), None])
        return inputs

    def forward_rec(input_ids, *args, **kwargs):
        seen[-1][2] = input_ids.tolist()
        return forward(input_ids, *args, **kwargs)

    def schedule_preempting():
        state["preempt"] -= 1
        if state["preempt"] == 0:  # the oldest running request, its token pending
            victim = scheduler.running[0]
            assert victim.num_pending == 1
            scheduler._preempt(victim)
            plan = schedule()
            readmitted = [e for e in plan.scheduled if e.seq is victim]
            assert readmitted and readmitted[0].slots is not None, "re-admitted at once"
            return plan
        return schedule()

    runner.prepare, runner.model.forward, scheduler.schedule = (
        prepare_rec,
        forward_rec,
        schedule_preempting,
    )
    try:
        late = []

        def add_late(step, core, seqs):
            if step == 3:
                late.append(
                    core.add_request(on.prepare(prompt(4)), SamplingParams(max_tokens=5), 5)
                )

        params = [SamplingParams(max_tokens=8)] * 3
        outs, _, _ = drive(on, [prompt(i) for i in range(3)], params, add_late)
    finally:
        del runner.prepare, runner.model.forward, scheduler.schedule
    kinds = set()
    for entries, order, ids in seen:
        expected = []
        for i in order:
            seq, q_start, kv_len, prefill = entries[i]
            expected.extend(seq.token_ids[q_start:kv_len])
            kinds.add((prefill, kv_len > seq.num_prompt_tokens, len(entries) > 1))
        assert ids == expected
    # prompts alone, prompts next to decode rows, decode rows, a re-admitted request's prompt
    # that ends with its pending token
    assert {(True, False, True), (False, True, True), (True, True, True)} <= kinds
    _, off = engines
    ref = drive(off, [prompt(i) for i in range(3)], params)[0]
    assert [o.token_ids for o in outs] == [o.token_ids for o in ref]
