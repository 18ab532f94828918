"""Validation of SamplingParams: every field's types, ranges and messages, and normalisation."""

from __future__ import annotations

import dataclasses
import math
import pickle
from decimal import Decimal
from fractions import Fraction

import numpy as np
import pytest
import torch

from cascade_rag.sampling import SAMPLING_EPS, Sampler, SamplingParams

INT_FIELDS = ["max_tokens", "top_k", "min_tokens", "logprobs", "seed"]
FLOAT_FIELDS = [
    "temperature",
    "top_p",
    "min_p",
    "repetition_penalty",
    "presence_penalty",
    "frequency_penalty",
]
BOOL_FIELDS = ["ignore_eos", "include_stop_str_in_output"]


@pytest.mark.parametrize("field", INT_FIELDS)
@pytest.mark.parametrize("value", [True, False, 1.5, 2.0, "8", None, np.bool_(True)])
def test_int_fields_refuse_non_ints(field, value):
    if value is None and field in ("logprobs", "seed"):
        return  # None means "off" for these two
    with pytest.raises(TypeError, match=rf"{field}=.*not an int"):
        SamplingParams(**{field: value})


def test_string_max_tokens_names_the_field():
    with pytest.raises(TypeError, match=r"max_tokens='8' is a str, not an int"):
        SamplingParams(max_tokens="8")


@pytest.mark.parametrize(
    "field, value",
    [
        ("max_tokens", np.int64(8)),
        ("max_tokens", np.uint8(3)),
        ("top_k", np.int32(5)),
        ("min_tokens", np.int16(2)),
        ("logprobs", np.int64(20)),
        ("seed", np.uint64(2**64 - 1)),
        ("max_tokens", torch.tensor(7)),
    ],
)
def test_numpy_and_index_ints_are_stored_as_int(field, value):
    params = SamplingParams(**{field: value})
    stored = getattr(params, field)
    assert type(stored) is int and stored == int(value)


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"max_tokens": 0}, ValueError, r"max_tokens=0 must be an int >= 1"),
        ({"max_tokens": -3}, ValueError, r"max_tokens=-3"),
        ({"top_k": -2}, ValueError, r"top_k=-2 must be >= 1 .* 0 or -1"),
        ({"min_tokens": -1}, ValueError, r"min_tokens=-1 must be an int >= 0"),
        ({"min_tokens": 9, "max_tokens": 8}, ValueError, r"min_tokens=9 must be <= max_tokens=8"),
        ({"logprobs": -1}, ValueError, r"logprobs=-1 must be an int in \[0, 20\]"),
        ({"logprobs": 21}, ValueError, r"logprobs=21"),
        ({"seed": -1}, ValueError, r"seed=-1 must be an int in \[0, 18446744073709551615\]"),
        ({"seed": 2**64}, ValueError, r"seed=18446744073709551616"),
        ({"temperature": -0.1}, ValueError, r"temperature=-0.1 must be in \[0, inf\)"),
        ({"temperature": math.nan}, ValueError, r"temperature=nan must be a finite number"),
        ({"temperature": math.inf}, ValueError, r"temperature=inf must be a finite"),
        ({"temperature": Decimal("NaN")}, ValueError, r"temperature=NaN must be a finite"),
        ({"temperature": Decimal("sNaN")}, ValueError, r"temperature=sNaN must be a finite"),
        ({"temperature": 10**400}, ValueError, r"temperature=1000.* must be a finite"),
        ({"top_p": 0.0}, ValueError, r"top_p=0.0 must be in \(0, 1\]"),
        ({"top_p": 1.5}, ValueError, r"top_p=1.5 must be in \(0, 1\]"),
        ({"top_p": -math.inf}, ValueError, r"top_p=-inf must be a finite"),
        ({"min_p": -0.1}, ValueError, r"min_p=-0.1 must be in \[0, 1\]"),
        ({"min_p": 1.01}, ValueError, r"min_p=1.01"),
        ({"repetition_penalty": 0.0}, ValueError, r"repetition_penalty=0.0 must be in \(0, inf\)"),
        ({"repetition_penalty": -1}, ValueError, r"repetition_penalty=-1"),
        ({"repetition_penalty": math.inf}, ValueError, r"repetition_penalty=inf"),
        ({"presence_penalty": 2.5}, ValueError, r"presence_penalty=2.5 must be in \[-2, 2\]"),
        ({"presence_penalty": -2.01}, ValueError, r"presence_penalty=-2.01"),
        ({"frequency_penalty": Fraction(5, 2)}, ValueError, r"frequency_penalty=5/2"),
        ({"stop_token_ids": [3, -1]}, ValueError, r"stop_token_ids contains -1; .* >= 0"),
        ({"stop_token_ids": [1.7]}, TypeError, r"stop_token_ids contains 1.7, a float"),
        ({"stop_token_ids": [True]}, TypeError, r"stop_token_ids contains True, a bool"),
        ({"stop_token_ids": 5}, TypeError, r"stop_token_ids=5 is not a sequence"),
        ({"stop_token_ids": "12"}, TypeError, r"stop_token_ids='12' is not a sequence"),
        ({"stop": 5}, TypeError, r"stop=5 is not a string"),
        ({"stop": ["ok", 3]}, TypeError, r"stop string 3 is a int"),
        ({"stop": ("ok", "")}, ValueError, r"empty string"),
    ],
)
def test_out_of_range_and_bad_values(kwargs, error, message):
    with pytest.raises(error, match=message):
        SamplingParams(**kwargs)


@pytest.mark.parametrize("field", FLOAT_FIELDS)
@pytest.mark.parametrize("value", [True, False, "0.5", None, b"1", [0.5], 1j])
def test_float_fields_refuse_non_reals(field, value):
    with pytest.raises(TypeError, match=rf"{field}=.*not a real number"):
        SamplingParams(**{field: value})


@pytest.mark.parametrize("field", FLOAT_FIELDS)
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_float_fields_refuse_non_finite(field, value):
    with pytest.raises(ValueError, match=rf"{field}={value} must be a finite number"):
        SamplingParams(**{field: value})


@pytest.mark.parametrize(
    "value", [1, 0.5, np.float32(0.5), np.float64(0.25), Decimal("0.5"), Fraction(1, 4)]
)
@pytest.mark.parametrize("field", FLOAT_FIELDS)
def test_real_numbers_are_stored_as_float(field, value):
    params = SamplingParams(**{field: value})
    stored = getattr(params, field)
    assert type(stored) is float and stored == float(value)


@pytest.mark.parametrize("field", BOOL_FIELDS)
@pytest.mark.parametrize("value", [1, 0, "yes", None, np.bool_(True)])
def test_bool_fields_must_be_bools(field, value):
    with pytest.raises(TypeError, match=rf"{field}=.* pass True or False"):
        SamplingParams(**{field: value})


def test_seed_bounds():
    assert SamplingParams(seed=0).seed == 0
    assert SamplingParams(seed=2**64 - 1).seed == 2**64 - 1
    for bad in (-1, 2**64):
        with pytest.raises(ValueError, match=f"seed={bad}"):
            SamplingParams(seed=bad)


def test_top_k_off_values_and_stop_token_normalisation():
    assert SamplingParams(top_k=-1).top_k == 0
    assert SamplingParams(top_k=-1) == SamplingParams()
    params = SamplingParams(stop_token_ids=np.array([4, 2]))
    assert params.stop_token_ids == (4, 2)
    assert all(type(t) is int for t in params.stop_token_ids)
    assert SamplingParams(stop_token_ids=(t for t in [1, 2])).stop_token_ids == (1, 2)


def test_tiny_temperature_is_greedy_and_samples_like_greedy():
    assert SamplingParams(temperature=1e-45).is_greedy
    assert SamplingParams(temperature=SAMPLING_EPS / 2).is_greedy
    assert not SamplingParams(temperature=SAMPLING_EPS).is_greedy
    # Argmax is not token 0 and logits are negative: 0/0 = nan handling would pick token 0.
    logits = torch.tensor([[-5.0, -1.0, -3.0, -1.5], [-2.0, -9.0, -0.5, -0.6]])
    params = [SamplingParams(temperature=1e-45, seed=1)] * 2
    gens = [torch.Generator().manual_seed(1) for _ in range(2)]
    out = Sampler().sample_step(logits, params, gens, [(), ()], [(), ()])
    assert out.token_ids == [1, 2]
    assert Sampler().sample(logits, params, gens).tolist() == [1, 2]


def test_min_tokens_bound_and_defaults():
    assert SamplingParams(max_tokens=4, min_tokens=4).min_tokens == 4
    default = SamplingParams()
    assert (default.repetition_penalty, default.presence_penalty, default.frequency_penalty) == (
        1.0,
        0.0,
        0.0,
    )
    assert default.min_p == 0.0 and default.min_tokens == 0 and default.logprobs is None
    assert not default.needs_token_history
    assert SamplingParams(presence_penalty=0.1).needs_token_history
    assert SamplingParams(min_tokens=1).needs_token_history


def test_check_vocab():
    SamplingParams(stop_token_ids=[0, 9]).check_vocab(10)
    with pytest.raises(
        ValueError, match=r"stop_token_ids contains 10, outside the vocabulary of 10"
    ):
        SamplingParams(stop_token_ids=[3, 10]).check_vocab(10)
    with pytest.raises(ValueError, match=r"vocab_size=0"):
        SamplingParams().check_vocab(0)
    with pytest.raises(TypeError, match=r"vocab_size="):
        SamplingParams().check_vocab(10.0)


def test_replace_revalidates_and_derived_flags_are_not_fields():
    params = SamplingParams(temperature=0.7, presence_penalty=0.5)
    names = {f.name for f in dataclasses.fields(params)}
    assert not {"_penalised", "_plain_greedy", "_argmax_only"} & names
    assert dataclasses.replace(params, presence_penalty=0.0).needs_token_history is False
    with pytest.raises(ValueError, match="presence_penalty=3"):
        dataclasses.replace(params, presence_penalty=3)
    again = pickle.loads(pickle.dumps(params))
    assert again == params and hash(again) == hash(params) and again.needs_token_history
    assert "_penalised" not in repr(params)


def test_sampler_eos_ids_are_checked():
    assert Sampler([5, 2, 5]).eos_token_ids == (2, 5)
    with pytest.raises(TypeError, match="eos_token_ids contains 2.5"):
        Sampler([2.5])
    with pytest.raises(ValueError, match="eos_token_ids contains -1"):
        Sampler([-1])
