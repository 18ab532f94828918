"""Constrained decoding through the engine on the default model (SmolLM2-135M, CPU).

Mixed batches (constrained and unconstrained, greedy and seeded sampling), streaming, stop
strings, preemption, and failures: a constraint that fails ends only its own request.
"""

from __future__ import annotations

import json
import threading

import jsonschema
import pytest

from cascade_rag.llm import CascadeEngine
from cascade_rag.sampling import Constraint, ConstraintError, SamplingParams

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 20},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "city": {"type": "string", "enum": ["Plum", "Quill", "Lantern"]},
    },
    "required": ["name", "age", "city"],
    "additionalProperties": False,
}
ASK = [{"role": "user", "content": "Describe a person from Zorbia as JSON."}]
OTHER = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def engine(default_model):
    with CascadeEngine(default_model, kv_cache_tokens=4096, max_model_len=1024) as engine:
        yield engine


def _valid(text: str, schema: dict) -> dict:
    value = json.loads(text)
    jsonschema.validate(value, schema)
    return value


def test_mixed_batch(engine):
    constraint = Constraint(json_schema=PERSON)
    greedy_c = SamplingParams(max_tokens=60, constraint=constraint)
    sampled_c = SamplingParams(max_tokens=60, temperature=1.2, seed=3, constraint=constraint)
    plain = SamplingParams(max_tokens=24)
    outs = engine.generate([ASK, OTHER, ASK, ASK], [greedy_c, plain, sampled_c, plain])
    for out in (outs[0], outs[2]):
        assert out.finish_reason == "stop", out
        _valid(out.text, PERSON)
    # unconstrained greedy rows and seeded rows give exactly their solo output
    assert outs[1].token_ids == engine.generate(OTHER, plain).token_ids
    assert outs[3].token_ids == engine.generate(ASK, plain).token_ids
    assert outs[2].token_ids == engine.generate(ASK, sampled_c).token_ids
    assert outs[0].token_ids == engine.generate(ASK, greedy_c).token_ids


def test_streaming_and_stop_strings(engine):
    # '"' and ', ' occur inside every output: stop strings must not cut constrained JSON
    params = SamplingParams(
        max_tokens=60,
        temperature=0.8,
        seed=11,
        stop=['"', ", "],
        constraint=Constraint(json_schema=PERSON),
    )
    deltas = list(engine.stream(ASK, params))
    text = "".join(d.text for d in deltas)
    out = deltas[-1].output
    assert out.text == text and out.finish_reason == "stop" and out.stop_reason != '"'
    _valid(text, PERSON)
    sampled = [
        SamplingParams(
            max_tokens=80,
            temperature=1.0,
            seed=s,
            stop=["}"],
            constraint=Constraint(json_schema=PERSON),
        )
        for s in range(3)
    ]
    for out in engine.generate([ASK] * 3, sampled):
        assert out.finish_reason == "stop", out
        _valid(out.text, PERSON)


def test_regex_choice_and_grammar(engine):
    outs = engine.generate(
        [OTHER, OTHER, OTHER],
        [
            SamplingParams(
                max_tokens=20, constraint=Constraint(regex=r"The capital is [A-Z][a-z]+\.")
            ),
            SamplingParams(max_tokens=8, constraint=Constraint(choice=["Paris", "Lyon", "Nice"])),
            SamplingParams(
                max_tokens=30,
                constraint=Constraint(grammar='start: "Answer: " WORD "."\nWORD: /[A-Za-z]+/'),
            ),
        ],
    )
    assert outs[0].text.startswith("The capital is ") and outs[0].text.endswith(".")
    assert outs[1].text in ("Paris", "Lyon", "Nice")
    assert outs[2].text.startswith("Answer: ") and outs[2].text.endswith(".")
    assert all(o.finish_reason == "stop" for o in outs)


def test_stop_token_ids_end_a_complete_match(engine):
    period = engine.tokenizer.encode(".")[0]
    out = engine.generate(
        OTHER,
        SamplingParams(
            max_tokens=20, stop_token_ids=[period], constraint=Constraint(regex=r"[A-Z][a-z]+")
        ),
    )
    assert out.finish_reason == "stop" and out.text.isalpha()


def test_bad_constraint_fails_alone(engine, monkeypatch):
    # an unsupported schema keyword fails when SamplingParams is built, before submitting
    with pytest.raises(ValueError, match="format"):
        SamplingParams(constraint=Constraint(json_schema={"type": "string", "format": "nope"}))
    core = engine._core
    victim = Constraint(regex="[0-9]+")
    original_start = core.grammars.start

    def start(constraint, stop_token_ids=()):
        if constraint == victim:
            raise ValueError("injected compile failure")
        return original_start(constraint, stop_token_ids)

    monkeypatch.setattr(core.grammars, "start", start)
    with pytest.raises(ValueError, match="injected"):
        engine.generate(OTHER, SamplingParams(max_tokens=8, constraint=victim))
    assert engine.generate(OTHER, SamplingParams(max_tokens=8)).text  # the engine goes on
    assert not core._constraints and not core._streams and not core._generators


def test_failing_constraint_ends_only_its_request(engine, monkeypatch):
    core = engine._core
    victim = Constraint(regex="[0-9]{1,12}")
    original_start = core.grammars.start

    def start(constraint, stop_token_ids=()):
        state = original_start(constraint, stop_token_ids)
        if constraint == victim:
            real_advance = state.advance

            def advance(token):
                if state.num_tokens >= 1:
                    state.num_tokens += 1
                    raise ConstraintError("injected failure")
                real_advance(token)

            state.advance = advance
        return state

    monkeypatch.setattr(core.grammars, "start", start)
    plain = SamplingParams(max_tokens=12)
    good = SamplingParams(max_tokens=60, constraint=Constraint(json_schema=PERSON))
    bad = SamplingParams(max_tokens=12, constraint=victim)
    ref = engine.generate([OTHER, ASK], [plain, good])
    deltas_bad = engine.stream(OTHER, bad)
    outs = {}

    def run():
        outs["others"] = engine.generate([OTHER, ASK], [plain, good])

    thread = threading.Thread(target=run)
    thread.start()
    with pytest.raises(ConstraintError, match="injected"):
        for _ in deltas_bad:
            pass
    thread.join()
    assert [o.token_ids for o in outs["others"]] == [o.token_ids for o in ref]
    assert not core._constraints  # every state was dropped


def test_preempted_constrained_requests_stay_valid(default_model):
    schema = {
        "type": "array",
        "items": {"type": "string", "maxLength": 6},
        "minItems": 8,
        "maxItems": 8,
    }
    prompts = [
        [{"role": "user", "content": f"List eight words about topic {i}."}] for i in range(6)
    ]
    params = SamplingParams(max_tokens=80, constraint=Constraint(json_schema=schema))
    with CascadeEngine(default_model, kv_cache_tokens=320, page_size=16) as small:
        outs = small.generate(prompts, params)
        assert small.stats().num_preemptions > 0, "the pool is small enough to preempt"
    with CascadeEngine(default_model, kv_cache_tokens=8192) as big:
        ref = big.generate(prompts, params)
    assert [o.token_ids for o in outs] == [r.token_ids for r in ref]
    for out in outs:
        _valid(out.text, schema)
