"""Output constraints: `Constraint` checks, compiled masks against a slow reference, and
property tests over generated JSON schemas.

The sampler runs on the real SmolLM2 tokenizer with a fake model: random logits biased towards
short closing tokens (so random walks through a schema end in a few dozen tokens). Every
output that ends with EOS must parse as JSON and validate against its schema (`jsonschema`),
greedy or sampled, and unconstrained rows in the same batch must get exactly the tokens they
get alone.
"""

from __future__ import annotations

import json
import re

import jsonschema
import pydantic
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cascade_rag.sampling import (
    Constraint,
    ConstraintError,
    GrammarCompiler,
    Sampler,
    SamplingParams,
    make_generator,
    unpack_bitmask,
)

# ---- Constraint --------------------------------------------------------------------------


def test_constraint_kinds_and_equality():
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}}
    c = Constraint(json_schema=schema)
    assert c.kind == "json_schema" and c.json_schema == schema
    schema["properties"]["m"] = {}  # the constraint keeps its own copy
    assert "m" not in c.json_schema
    assert Constraint(json_schema=json.dumps(c.json_schema)) == c
    assert hash(Constraint(json_schema=c.json_schema)) == hash(c)
    assert Constraint(regex="a+") != Constraint(regex="b+")
    assert Constraint(json_object=True).kind == "json_object"
    assert Constraint(choice=["a", "b"]).choice == ("a", "b")
    assert Constraint(grammar='root ::= "x" | "y"').kind == "grammar"  # GBNF
    assert Constraint(grammar='start: "x" | "y"').kind == "grammar"  # Lark


def test_constraint_from_pydantic_model():
    class Person(pydantic.BaseModel):
        name: str
        age: int

    c = Constraint(json_schema=Person)
    assert c.json_schema["required"] == ["name", "age"]


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({}, ValueError, "exactly one"),
        ({"regex": "a", "choice": ["a"]}, ValueError, "exactly one"),
        ({"regex": "(("}, ValueError, "unclosed group"),
        ({"regex": ""}, ValueError, "empty"),
        ({"regex": b"a"}, TypeError, "bytes"),
        ({"json_schema": {"type": "nope"}}, ValueError, "Invalid type"),
        ({"json_schema": "{not json"}, ValueError, "not valid JSON"),
        ({"json_schema": {"minimum": float("nan")}}, ValueError, "JSON values"),
        ({"json_schema": 3}, TypeError, "dict"),
        ({"json_object": 1}, TypeError, "True or False"),
        ({"choice": []}, ValueError, "empty"),
        ({"choice": "yes"}, TypeError, "list of strings"),
        ({"choice": ["a", ""]}, ValueError, "non-empty"),
        ({"grammar": "start: x"}, ValueError, "unknown name"),
        ({"regex": "a", "stop_after": "b"}, ValueError, "free-text"),
        ({"grammar": 'start: "a"', "stop_after": ""}, TypeError, "non-empty"),
    ],
)
def test_constraint_errors(kwargs, error, match):
    with pytest.raises(error, match=match):
        Constraint(**kwargs)


def test_sampling_params_with_constraint():
    c = Constraint(regex="[0-9]+")
    p = SamplingParams(constraint=c)
    assert p.constraint is c and not p._argmax_only and not p._plain_greedy
    with pytest.raises(TypeError, match="Constraint"):
        SamplingParams(constraint={"json_schema": {}})
    with pytest.raises(ValueError, match="ignore_eos"):
        SamplingParams(constraint=c, ignore_eos=True)
    with pytest.raises(ValueError, match="min_tokens"):
        SamplingParams(constraint=c, min_tokens=2, max_tokens=4)


# ---- compiled masks ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer(default_model):
    return default_model.tokenizer


@pytest.fixture(scope="module")
def compiler(tokenizer):
    return GrammarCompiler(tokenizer, len(tokenizer), [tokenizer.eos_token_id])


def test_unpack_bitmask_matches_bits():
    g = torch.Generator().manual_seed(0)
    words = torch.randint(-(2**31), 2**31 - 1, (3, 4), dtype=torch.int64, generator=g)
    words = words.to(torch.int32)
    mask = unpack_bitmask(words, 100)
    assert mask.shape == (3, 100)
    for r in range(3):
        for t in range(100):
            assert bool(mask[r, t]) == bool((int(words[r, t // 32]) >> (t % 32)) & 1)


def _allowed_by_reference(state, tokens: list[int]) -> set[int]:
    """Tokens a copy of the matcher consumes (the slow reference of the bitmask)."""
    out = set()
    for t in tokens:
        probe = state.matcher.deep_copy()
        if probe.consume_token(t) and not probe.is_error():
            out.add(t)
    return out


@pytest.mark.parametrize(
    "constraint",
    [
        Constraint(json_schema={"type": "object", "properties": {"a": {"type": "integer"}}}),
        Constraint(regex=r"(ab|cd)+[0-9]{2}"),
        Constraint(choice=["yes", "no", "maybe"]),
    ],
)
def test_bitmask_matches_reference(compiler, tokenizer, constraint):
    state = compiler.start(constraint)
    g = torch.Generator().manual_seed(1)
    eos = tokenizer.eos_token_id
    sample = sorted(set(torch.randint(len(tokenizer), (1500,), generator=g).tolist()) | {eos})
    for _ in range(6):
        bits = compiler.fill_bitmask([state])
        mask = unpack_bitmask(torch.from_numpy(bits), len(tokenizer))[0]
        allowed = {t for t in sample if mask[t]}
        assert allowed == _allowed_by_reference(state, sample)
        choices = mask.nonzero()[:, 0].tolist()
        if state.matcher.is_stopped():
            assert choices == [eos]
            break
        pick = next(t for t in choices if t != eos)
        state.advance(pick)


def test_compiled_once_per_constraint(tokenizer):
    compiler = GrammarCompiler(tokenizer, len(tokenizer), [tokenizer.eos_token_id])
    a = compiler.start(Constraint(regex="[a-z]+"))
    b = compiler.start(Constraint(regex="[a-z]+"))
    assert compiler.num_cached == 1 and a.matcher is not b.matcher
    a.advance(tokenizer.encode("hello")[0])
    assert a.num_tokens == 1 and b.num_tokens == 0  # separate states


def test_stop_token_ids_allowed_only_when_complete(compiler, tokenizer):
    stop = 7
    state = compiler.start(Constraint(regex="[0-9]{3}"), stop_token_ids=[stop])
    bits = unpack_bitmask(torch.from_numpy(compiler.fill_bitmask([state])), len(tokenizer))
    assert not bits[0, stop] and not bits[0, tokenizer.eos_token_id]
    for t in tokenizer.encode("123"):
        state.advance(t)
    bits = unpack_bitmask(torch.from_numpy(compiler.fill_bitmask([state])), len(tokenizer))
    assert bits[0, stop] and bits[0, tokenizer.eos_token_id]
    state.advance(stop)  # ends the match without being consumed by the grammar


def test_disallowed_token_raises(compiler, tokenizer):
    state = compiler.start(Constraint(regex="[0-9]+"))
    with pytest.raises(ConstraintError, match="not allowed"):
        state.advance(tokenizer.encode("x")[0])
    with pytest.raises(ConstraintError, match="row 0"):
        compiler.fill_bitmask([state])  # a failed matcher allows nothing


def test_stop_after_tracks_free_text(compiler, tokenizer):
    grammar = 'start: TEXT | "<call>" /[a-z]+/\nTEXT: /(.|\\n)*/ & ~/<call>(.|\\n)*/'
    constraint = Constraint(grammar=grammar, stop_after="<call>")
    text = compiler.start(constraint)
    for t in tokenizer.encode("hi <call"):
        text.advance(t)
        assert text.stop_allowed and text.is_accepting
    call = compiler.start(constraint)
    for t in tokenizer.encode("<call>abc"):
        call.advance(t)
    assert not call.stop_allowed and call.is_accepting


# ---- sampling under constraints ------------------------------------------------------------


def _closing_bias(tokenizer) -> torch.Tensor:
    """Bias towards short tokens that close things (the noise is N(0, 4)), quotes first (most
    characters are valid inside a string), so random walks through a schema end soon."""
    bias = torch.zeros(len(tokenizer))
    for text, value in [('"', 16.0), ('"}', 16.0), ("}", 12.0), ("]", 12.0), (",", 12.0)]:
        (token,) = tokenizer.encode(text)
        bias[token] = value
    for text in ["1", "true", "null", " "]:
        (token,) = tokenizer.encode(text)
        bias[token] = 10.0
    bias[tokenizer.eos_token_id] = 18.0
    return bias


def _run(sampler, compiler, tokenizer, rows, steps, seed):
    """Decode `rows` (SamplingParams) together for up to `steps` steps with fake logits.

    Returns per row (token ids, ended_with_eos).
    """
    g = torch.Generator().manual_seed(seed)
    vocab = len(tokenizer)
    eos = tokenizer.eos_token_id
    bias = _closing_bias(tokenizer)
    states = [compiler.start(p.constraint) if p.constraint else None for p in rows]
    gens = [make_generator(p.seed) for p in rows]
    outputs: list[list[int]] = [[] for _ in rows]
    done = [False] * len(rows)
    # fixed per-step logits shared by all rows: an unconstrained row's tokens are a function
    # of the step only, so they can be compared with a solo run
    for _ in range(steps):
        live = [i for i in range(len(rows)) if not done[i]]
        if not live:
            break
        logits = torch.randn(vocab, generator=g) * 2.0 + bias
        batch = logits.expand(len(live), vocab).clone()
        out = sampler.sample_step(
            batch,
            [rows[i] for i in live],
            [gens[i] for i in live],
            [()] * len(live),
            [()] * len(live),
            [states[i] for i in live],
        )
        for i, tok in zip(live, out.token_ids):
            if states[i] is not None:
                states[i].advance(tok)
            outputs[i].append(tok)
            if tok == eos or len(outputs[i]) >= rows[i].max_tokens:
                done[i] = True
    return [(ids, bool(ids) and ids[-1] == eos) for ids in outputs]


_NAMES = st.text(alphabet="abcdefgh_", min_size=1, max_size=6)


def _leaf():
    bounded = st.integers(-50, 50)
    return st.one_of(
        st.just({"type": "null"}),
        st.just({"type": "boolean"}),
        st.tuples(bounded, st.integers(0, 100)).map(
            lambda t: {"type": "integer", "minimum": t[0], "maximum": t[0] + t[1]}
        ),
        st.tuples(bounded, st.integers(1, 100)).map(
            lambda t: {"type": "number", "minimum": t[0], "maximum": t[0] + t[1]}
        ),
        st.integers(0, 8).map(lambda n: {"type": "string", "maxLength": n}),
        st.lists(st.one_of(st.integers(-5, 5), _NAMES), min_size=1, max_size=4, unique=True).map(
            lambda v: {"enum": v}
        ),
        _NAMES.map(lambda s: {"const": s}),
        st.just({"type": "string", "pattern": "^[a-z]{1,4}-[0-9]{2}$"}),
        st.just({"type": "string", "format": "date"}),
    )


def _extend(children):
    obj = st.dictionaries(_NAMES, children, min_size=1, max_size=3).flatmap(
        lambda props: st.lists(st.sampled_from(sorted(props)), unique=True).map(
            lambda req: {
                "type": "object",
                "properties": props,
                "required": req,
                "additionalProperties": False,
            }
        )
    )
    arr = st.tuples(children, st.integers(0, 2), st.integers(0, 2)).map(
        lambda t: {"type": "array", "items": t[0], "minItems": t[1], "maxItems": t[1] + t[2]}
    )
    any_of = st.lists(children, min_size=2, max_size=3).map(lambda s: {"anyOf": s})
    return st.one_of(obj, arr, any_of)


schemas = st.recursive(_leaf(), _extend, max_leaves=6)

PROPERTY = settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@PROPERTY
@given(schema=schemas, temperature=st.sampled_from([0.0, 0.7, 1.5]), seed=st.integers(0, 99))
def test_outputs_validate_against_generated_schemas(compiler, tokenizer, schema, temperature, seed):
    sampler = Sampler([tokenizer.eos_token_id])
    constrained = SamplingParams(
        max_tokens=120,
        temperature=temperature,
        seed=seed,
        top_p=0.95 if temperature else 1.0,
        constraint=Constraint(json_schema=schema),
    )
    plain = SamplingParams(max_tokens=12)
    batch = _run(sampler, compiler, tokenizer, [constrained, plain, constrained], 120, seed)
    solo = _run(sampler, compiler, tokenizer, [plain], 120, seed)
    assert batch[1] == solo[0]  # a greedy unconstrained row is unaffected by its batch
    for ids, ended in (batch[0], batch[2]):
        assert ended, f"no EOS within 120 tokens: {tokenizer.decode(ids)!r}"
        text = tokenizer.decode(ids[:-1])
        value = json.loads(text)
        jsonschema.validate(value, schema, cls=jsonschema.Draft202012Validator)


@PROPERTY
@given(seed=st.integers(0, 10_000))
def test_regex_and_choice_outputs_match(compiler, tokenizer, seed):
    sampler = Sampler([tokenizer.eos_token_id])
    pattern = r"[A-Z][a-z]{0,5}( [0-9]{1,3})?"
    rows = [
        SamplingParams(max_tokens=40, temperature=1.0, constraint=Constraint(regex=pattern)),
        SamplingParams(max_tokens=40, temperature=1.0, constraint=Constraint(choice=["ab", "b"])),
        SamplingParams(max_tokens=40, constraint=Constraint(json_object=True)),
    ]
    (r_ids, r_end), (c_ids, c_end), (j_ids, j_end) = _run(
        sampler, compiler, tokenizer, rows, 40, seed
    )
    assert r_end and re.fullmatch(pattern, tokenizer.decode(r_ids[:-1]))
    assert c_end and tokenizer.decode(c_ids[:-1]) in ("ab", "b")
    assert j_end and isinstance(json.loads(tokenizer.decode(j_ids[:-1])), dict)


def test_sampler_checks_constraint_states(compiler, tokenizer):
    sampler = Sampler([tokenizer.eos_token_id])
    p = SamplingParams(constraint=Constraint(regex="a"))
    logits = torch.zeros(1, len(tokenizer))
    with pytest.raises(ValueError, match="no constraint state"):
        sampler.sample_step(logits, [p], [None], [()], [()])
    with pytest.raises(ValueError, match="no constraint in its params"):
        sampler.sample_step(
            logits, [SamplingParams()], [None], [()], [()], [compiler.start(p.constraint)]
        )
    with pytest.raises(ValueError, match="constraint"):
        sampler.sample(logits, [p], [None])
