"""Sampler.sample_step against a slow per-row reference.

The reference loops over one row at a time with explicit dict counts: penalties in float32
(the logits' dtype, one token at a time), then temperature, top-k, top-p, min-p and the
exponential race in float64 Python. Its float64 decisions can differ from the sampler's float32
ones only when a decision sits on a boundary (a cumulative probability equal to top_p, two
candidates of the race within 1e-4 of each other): the reference reports those rows as
ambiguous and the tests skip them (and check that they are rare).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.overrides import TorchFunctionMode

from cascade_rag.sampling import (
    Sampler,
    SamplerOutput,
    SamplingParams,
    TokenLogprob,
    make_generator,
)

EOS = (1, 3)
MARGIN = 1e-4


@dataclass
class RefRow:
    token: int | None  # None: an unseeded sampled row (global RNG), only `allowed` is known
    allowed: set[int]  # tokens the row may produce
    ambiguous: bool  # a float64 decision sat within MARGIN of a boundary
    logprob: TokenLogprob | None


def _f32(value: float) -> torch.Tensor:
    return torch.tensor(value, dtype=torch.float32)


def reference_row(
    raw: torch.Tensor,
    p: SamplingParams,
    generator: torch.Generator | None,
    prompt: list[int],
    output: list[int],
    eos: tuple[int, ...] = EOS,
) -> RefRow:
    vocab = raw.numel()
    x = raw.float().clone()
    counts: dict[int, int] = {}
    for t in output:
        counts[t] = counts.get(t, 0) + 1
    if p.repetition_penalty != 1.0:
        rep = _f32(p.repetition_penalty)
        for t in set(prompt) | set(counts):
            x[t] = x[t] / rep if x[t] > 0 else x[t] * rep
    if p.frequency_penalty != 0.0 or p.presence_penalty != 0.0:
        for t, c in counts.items():
            x[t] = x[t] - (_f32(p.frequency_penalty) * _f32(c) + _f32(p.presence_penalty))
    if len(output) < p.min_tokens:
        for t in set(p.stop_token_ids) | (set() if p.ignore_eos else set(eos)):
            x[t] = -math.inf
    values = x.tolist()

    logprob = None
    ambiguous = False
    if p.is_greedy:
        token = 0
        for t in range(vocab):
            if values[t] > values[token]:
                token = t
        allowed = {token}
    else:
        order = sorted(range(vocab), key=lambda t: (-values[t], t))
        keep = order[: p.top_k] if p.top_k else order
        top = values[order[0]]

        def probs_of(kept: list[int]) -> dict[int, float]:
            e = {t: math.exp((values[t] - top) / p.temperature) for t in kept}
            total = sum(e.values())
            return {t: v / total for t, v in e.items()}

        if p.top_p < 1.0:
            probs = probs_of(keep)
            kept, acc = [], 0.0
            for t in keep:
                if kept and acc >= p.top_p:
                    ambiguous |= acc - p.top_p < MARGIN
                    break
                ambiguous |= bool(kept) and p.top_p - acc < MARGIN
                kept.append(t)
                acc += probs[t]
            keep = kept
        probs = probs_of(keep)
        if p.min_p > 0.0:
            threshold = p.min_p * max(probs.values())
            ambiguous |= any(0 < abs(v - threshold) < MARGIN * threshold for v in probs.values())
            probs = {t: v for t, v in probs.items() if v >= threshold}
        allowed = set(probs)
        token = None
        if generator is not None:
            q = torch.empty(vocab).exponential_(generator=generator)
            q.clamp_(min=torch.finfo(torch.float32).tiny)
            race = sorted(((v / q[t].item(), -t) for t, v in probs.items()), reverse=True)
            token = -race[0][1]
            ambiguous |= len(race) > 1 and race[1][0] > race[0][0] * (1 - MARGIN)

    if p.logprobs is not None:
        lp = torch.log_softmax(raw.float(), dim=-1).tolist()
        if token is not None:
            by_likelihood = sorted(range(vocab), key=lambda t: (-lp[t], t))
            logprob = TokenLogprob(
                token_id=token,
                logprob=lp[token],
                rank=1 + sum(1 for v in lp if v > lp[token]),
                top=tuple((t, lp[t]) for t in by_likelihood[: p.logprobs]),
            )
    return RefRow(token, allowed, ambiguous, logprob)


def _check_against_reference(
    logits: torch.Tensor,
    params: list[SamplingParams],
    prompts: list[list[int]],
    outputs: list[list[int]],
    eos: tuple[int, ...] = EOS,
) -> tuple[SamplerOutput, int]:
    """Run sample_step and the reference on fresh generators; return (output, ambiguous rows)."""
    gens = [make_generator(p.seed) for p in params]
    ref_gens = [make_generator(p.seed) for p in params]
    out = Sampler(eos).sample_step(logits, params, gens, prompts, outputs)
    assert len(out.token_ids) == len(out.logprobs) == len(params)
    ambiguous = 0
    for i, p in enumerate(params):
        ref = reference_row(logits[i], p, ref_gens[i], prompts[i], outputs[i], eos)
        token = out.token_ids[i]
        assert isinstance(token, int)
        if ref.ambiguous:
            ambiguous += 1
            continue
        assert token in ref.allowed, (i, p, token, sorted(ref.allowed))
        if ref.token is not None:
            assert token == ref.token, (i, p, token, ref.token)
        if p.logprobs is None:
            assert out.logprobs[i] is None
        else:
            lp = out.logprobs[i]
            assert lp is not None and lp.token_id == token
            if ref.logprob is not None:
                assert lp == ref.logprob, (i, lp, ref.logprob)
            else:  # unseeded row: check the sampled token's entry on its own
                raw = torch.log_softmax(logits[i].float(), dim=-1)
                assert lp.logprob == raw[token].item()
                assert lp.rank == 1 + int((raw > raw[token]).sum())
    return out, ambiguous


# ---- hypothesis: random params, mixed batches ----------------------------------------------


def params_strategy(vocab: int) -> st.SearchStrategy[SamplingParams]:
    def off_or(off, strategy):
        return st.one_of(st.just(off), strategy)

    return st.builds(
        SamplingParams,
        max_tokens=st.just(32),
        temperature=off_or(0.0, st.floats(0.05, 4.0)),
        top_k=st.sampled_from([0, -1, 1, 2, 3, vocab - 1, vocab, vocab + 5]),
        top_p=off_or(1.0, st.floats(0.01, 1.0)),
        min_p=off_or(0.0, st.floats(0.0, 1.0)),
        repetition_penalty=off_or(1.0, st.floats(0.3, 3.0)),
        presence_penalty=off_or(0.0, st.floats(-2.0, 2.0)),
        frequency_penalty=off_or(0.0, st.floats(-2.0, 2.0)),
        min_tokens=st.integers(0, 4),
        logprobs=st.one_of(st.none(), st.integers(0, 20)),
        stop_token_ids=st.lists(st.integers(0, vocab - 1), max_size=2),
        ignore_eos=st.booleans(),
        seed=st.one_of(st.none(), st.integers(0, 2**64 - 1), st.integers(0, 2**64 - 1)),
    )


def _logits(kind: str, batch: int, vocab: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, vocab, generator=g) * 3
    if kind == "ties":  # few distinct values: ties in argmax, top-k and top-p boundaries
        logits = torch.round(logits)
    elif kind == "eos_first":  # EOS and low ids most likely: min_tokens masking matters
        logits[:, list(EOS)] += 20.0
    return logits


@settings(max_examples=300, deadline=None, derandomize=True)
@given(data=st.data())
def test_sample_step_matches_reference(data):
    vocab = data.draw(st.sampled_from([5, 12, 40]), label="vocab")
    batch = data.draw(st.integers(1, 6), label="batch")
    kind = data.draw(st.sampled_from(["randn", "ties", "eos_first"]), label="kind")
    logits = _logits(kind, batch, vocab, data.draw(st.integers(0, 2**31), label="seed"))
    params = data.draw(st.lists(params_strategy(vocab), min_size=batch, max_size=batch))
    tokens = st.lists(st.integers(0, vocab - 1), max_size=8)
    prompts = data.draw(st.lists(tokens, min_size=batch, max_size=batch), label="prompts")
    outputs = data.draw(st.lists(tokens, min_size=batch, max_size=batch), label="outputs")
    _, ambiguous = _check_against_reference(logits, params, prompts, outputs)
    assert ambiguous <= 1


def test_multi_step_generation_matches_reference():
    """Twenty engine-like steps: histories grow, generators advance, tokens agree each step."""
    vocab, steps = 24, 20
    params = [
        SamplingParams(temperature=0.8, repetition_penalty=1.3, seed=11, logprobs=3),
        SamplingParams(frequency_penalty=0.7, presence_penalty=0.4),  # greedy, penalised
        SamplingParams(temperature=1.2, top_k=6, top_p=0.9, min_p=0.05, seed=12),
        SamplingParams(),
        SamplingParams(temperature=0.5, min_tokens=8, stop_token_ids=[5], seed=13),
        SamplingParams(temperature=1.0, frequency_penalty=-0.5, seed=2**64 - 1),
    ]
    g = torch.Generator().manual_seed(7)
    prompts = [torch.randint(vocab, (n,), generator=g).tolist() for n in (5, 0, 9, 3, 4, 12)]
    outputs: list[list[int]] = [[] for _ in params]
    gens = [make_generator(p.seed) for p in params]
    ref_gens = [make_generator(p.seed) for p in params]
    sampler = Sampler(EOS)
    for _ in range(steps):
        logits = torch.randn(len(params), vocab, generator=g) * 2
        logits[:, 5] += 3.0  # a stop id that min_tokens must hold back
        out = sampler.sample_step(logits, params, gens, prompts, outputs)
        for i, p in enumerate(params):
            ref = reference_row(logits[i], p, ref_gens[i], prompts[i], outputs[i])
            assert not ref.ambiguous
            assert out.token_ids[i] == ref.token and out.logprobs[i] == ref.logprob
            outputs[i].append(out.token_ids[i])
    assert 5 not in outputs[4][:8] and len(set(outputs[0])) > 3
    # The frequency penalty keeps the greedy row from repeating one token forever.
    assert len(set(outputs[1])) > 3 and len(set(outputs[3])) < len(set(outputs[1]))


# ---- crafted cases -------------------------------------------------------------------------


def _greedy(logits, params, prompt=(), output=(), eos=()):
    out = Sampler(eos).sample_step(torch.tensor([logits]), [params], [None], [prompt], [output])
    return out.token_ids[0]


def test_penalties_change_the_greedy_choice():
    logits = [2.0, 1.9, 0.0, -1.0, -1.1]
    assert _greedy(logits, SamplingParams(), output=[0]) == 0
    # Repetition: positive logit divided (2 / 1.2 < 1.9), from the prompt or the output.
    assert _greedy(logits, SamplingParams(repetition_penalty=1.2), output=[0]) == 1
    assert _greedy(logits, SamplingParams(repetition_penalty=1.2), prompt=[0]) == 1
    assert _greedy(logits, SamplingParams(repetition_penalty=1.2), prompt=[2]) == 0
    # Presence and frequency: output only, not the prompt.
    assert _greedy(logits, SamplingParams(presence_penalty=0.5), output=[0]) == 1
    assert _greedy(logits, SamplingParams(presence_penalty=0.5), prompt=[0]) == 0
    assert _greedy(logits, SamplingParams(frequency_penalty=0.06), output=[0]) == 0
    assert _greedy(logits, SamplingParams(frequency_penalty=0.06), output=[0, 0]) == 1
    # Negative penalties encourage repeats.
    assert _greedy(logits, SamplingParams(presence_penalty=-0.5), output=[1]) == 1
    # Repetition on negative logits multiplies them: -1.0 * 1.2 < -1.1.
    neg = [-1.0, -1.1, -5.0]
    assert _greedy(neg, SamplingParams(repetition_penalty=1.2), output=[0]) == 1
    assert _greedy(neg, SamplingParams(repetition_penalty=0.5), output=[1]) == 1  # -0.55


def test_penalised_row_does_not_change_other_rows():
    logits = torch.tensor([[2.0, 1.9, 0.0], [2.0, 1.9, 0.0], [2.0, 1.9, 0.0]])
    params = [SamplingParams(), SamplingParams(repetition_penalty=2.0), SamplingParams()]
    out = Sampler().sample_step(logits, params, [None] * 3, [[0]] * 3, [[0]] * 3)
    assert out.token_ids == [0, 1, 0]
    assert torch.equal(logits, torch.tensor([[2.0, 1.9, 0.0]] * 3))  # input left untouched


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_min_tokens_masks_eos_and_stop_ids(temperature):
    logits = torch.tensor([[0.0, 10.0, 9.0, 8.0, 0.0]])  # EOS=1 likeliest, then stop id 2
    params = SamplingParams(temperature=temperature, min_tokens=2, stop_token_ids=[2], seed=0)
    sampler = Sampler(eos_token_ids=[1])
    for output, allowed in [([], {3}), ([7], {3}), ([7, 7], {1})]:
        for seed in range(20 if temperature else 1):
            gen = make_generator(seed)
            got = sampler.sample_step(logits, [params], [gen], [()], [output]).token_ids[0]
            if temperature:
                assert got not in ({1, 2} if len(output) < 2 else set()), (output, got)
            else:
                assert got in allowed, (output, got)
    # ignore_eos: EOS does not end the request, so it is not masked (stop ids still are).
    ignore = SamplingParams(min_tokens=2, stop_token_ids=[2], ignore_eos=True)
    assert sampler.sample_step(logits, [ignore], [None], [()], [[]]).token_ids == [1]
    logits2 = torch.tensor([[0.0, 0.0, 9.0, 8.0, 0.0]])
    assert sampler.sample_step(logits2, [ignore], [None], [()], [[]]).token_ids == [3]


def test_min_p_keeps_tokens_within_ratio_of_the_top():
    # probs ∝ 8, 4, 2, 1, 1/8: min_p 0.2 keeps the first three (ratios 1, .5, .25).
    logits = torch.log(torch.tensor([8.0, 4.0, 2.0, 1.0, 0.125]))
    params = SamplingParams(temperature=1.0, min_p=0.2)
    rows = 3000
    torch.manual_seed(0)
    out = Sampler().sample_step(
        logits.repeat(rows, 1), [params] * rows, [None] * rows, [()] * rows, [()] * rows
    )
    counts = torch.bincount(torch.tensor(out.token_ids), minlength=5).tolist()
    assert counts[3] == counts[4] == 0
    expected = [rows * w / 14 for w in (8, 4, 2)]
    chi2 = sum((c - e) ** 2 / e for c, e in zip(counts, expected))
    assert chi2 < 25, (counts, expected)  # df 2; P(chi2_2 > 25) ~ 4e-6, seeded
    # With temperature 0.5 the ratios square: 1, .25, .0625: min_p 0.2 keeps two tokens.
    hot = SamplingParams(temperature=0.5, min_p=0.2)
    out = Sampler().sample_step(
        logits.repeat(500, 1), [hot] * 500, [None] * 500, [()] * 500, [()] * 500
    )
    assert set(out.token_ids) == {0, 1}


def test_logprobs_are_raw_log_softmax_with_ranks_and_ties():
    logits = torch.tensor([[1.0, 3.0, 3.0, 0.5, 3.0, -2.0], [0.0, 0.0, 0.0, 0.0, 0.0, 0.0]])
    raw = torch.log_softmax(logits, dim=-1)
    params = [
        # Penalties and temperature change the choice, not the reported log-probabilities.
        SamplingParams(logprobs=4, repetition_penalty=3.0, presence_penalty=2.0),
        SamplingParams(logprobs=20),
    ]
    out = Sampler().sample_step(logits, params, [None, None], [[1, 2], ()], [[4], ()])
    assert out.token_ids == [0, 0]
    first, second = out.logprobs
    assert first.token_id == 0 and first.logprob == raw[0, 0].item() and first.rank == 4
    assert [t for t, _ in first.top] == [1, 2, 4, 0]  # ties: lower id first
    assert [v for _, v in first.top] == raw[0, [1, 2, 4, 0]].tolist()
    assert second.rank == 1 and len(second.top) == 6  # vocabulary smaller than logprobs
    assert [t for t, _ in second.top] == list(range(6))
    zero = Sampler().sample_step(logits[:1], [SamplingParams(logprobs=0)], [None], [()], [()])
    assert zero.logprobs[0] == TokenLogprob(1, raw[0, 1].item(), 1, ())


def test_seeded_row_is_independent_of_its_batch():
    vocab = 30
    g = torch.Generator().manual_seed(3)
    row = torch.randn(vocab, generator=g)
    target = SamplingParams(temperature=0.9, top_p=0.95, repetition_penalty=1.2, seed=5)
    alone = (
        Sampler()
        .sample_step(row[None], [target], [make_generator(5)], [[1, 2, 3]], [[4]])
        .token_ids[0]
    )
    others = [
        SamplingParams(),
        SamplingParams(temperature=1.0, min_p=0.5),
        SamplingParams(frequency_penalty=2.0, logprobs=2),
        SamplingParams(temperature=2.0, seed=6, min_tokens=3),
    ]
    for trial in range(8):
        position = trial % 5
        logits = torch.randn(5, vocab, generator=g)
        logits[position] = row
        params = others[:position] + [target] + others[position:]
        gens = [make_generator(p.seed) for p in params]
        prompts = [[0, trial]] * 5
        outputs = [[trial, 7]] * 5
        prompts[position], outputs[position] = [1, 2, 3], [4]
        out = Sampler(EOS).sample_step(logits, params, gens, prompts, outputs)
        assert out.token_ids[position] == alone


# ---- cost and errors -----------------------------------------------------------------------


class _RecordTorch(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.calls: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.calls.append(getattr(func, "__name__", str(func)))
        return func(*args, **(kwargs or {}))


def test_plain_greedy_batch_is_one_argmax_and_one_tolist():
    logits = torch.randn(64, 100)
    params = [SamplingParams(stop_token_ids=[3], seed=1)] * 64
    with _RecordTorch() as record:
        out = Sampler(EOS).sample_step(logits, params, [None] * 64, [()] * 64, [()] * 64)
    assert out.token_ids == torch.argmax(logits, dim=-1).tolist()
    assert [c for c in record.calls if c not in ("dim", "__get__")] == ["argmax", "tolist"]
    # min_tokens already reached: still the plain path for the tensor work.
    done = [SamplingParams(min_tokens=1)] * 64
    with _RecordTorch() as record:
        Sampler(EOS).sample_step(logits, done, [None] * 64, [()] * 64, [[0]] * 64)
    assert [c for c in record.calls if c not in ("dim", "__get__")] == ["argmax", "tolist"]


def test_penalty_counts_cover_penalised_rows_only():
    """One penalised row in a batch of 64: no [batch, vocab] intermediate besides argmax's."""
    batch, vocab = 64, 50
    logits = torch.randn(batch, vocab)
    params = [SamplingParams()] * batch
    params[10] = SamplingParams(frequency_penalty=1.0)
    shapes = []

    class Shapes(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            result = func(*args, **(kwargs or {}))
            if isinstance(result, torch.Tensor):
                shapes.append(tuple(result.shape))
            return result

    outputs = [[]] * batch
    outputs[10] = [int(torch.argmax(logits[10]))] * 3
    with Shapes():
        out = Sampler().sample_step(logits, params, [None] * batch, [()] * batch, outputs)
    assert max(math.prod(s) for s in shapes) <= vocab + batch
    assert out.token_ids[10] != outputs[10][0]


def test_legacy_sample_matches_sample_step_and_refuses_history_options():
    logits = torch.randn(4, 20)
    params = [SamplingParams(temperature=0.7, seed=i, top_k=5, min_p=0.1) for i in range(4)]
    a = Sampler().sample(logits, params, [make_generator(i) for i in range(4)])
    b = Sampler().sample_step(
        logits, params, [make_generator(i) for i in range(4)], [()] * 4, [()] * 4
    )
    assert a.tolist() == b.token_ids and a.dtype == torch.int64
    for bad in (SamplingParams(presence_penalty=0.1), SamplingParams(min_tokens=1)):
        with pytest.raises(ValueError, match="row 0 uses penalties or min_tokens.*sample_step"):
            Sampler().sample(logits[:1], [bad], [None])


def test_sample_step_argument_errors():
    logits = torch.zeros(2, 5)
    two = [SamplingParams()] * 2
    with pytest.raises(ValueError, match="prompt_ids and 2 output_ids for 2 rows"):
        Sampler().sample_step(logits, two, [None] * 2, [()], [(), ()])
    with pytest.raises(ValueError, match="one of each per row"):
        Sampler().sample_step(logits, two, [None], [()] * 2, [()] * 2)
    with pytest.raises(ValueError, match=r"\[batch, vocab\]"):
        Sampler().sample_step(torch.zeros(5), two[:1], [None], [()], [()])
    masked = SamplingParams(min_tokens=2, stop_token_ids=[5])
    with pytest.raises(ValueError, match="token id 5 is outside the vocabulary of 5"):
        Sampler().sample_step(logits[:1], [masked], [None], [()], [()])
    with pytest.raises(ValueError, match="token id 9 is outside the vocabulary of 5"):
        Sampler([9]).sample_step(logits[:1], [SamplingParams(min_tokens=1)], [None], [()], [()])
    penalised = SamplingParams(repetition_penalty=1.5)
    with pytest.raises(
        ValueError, match="row 0: prompt_ids holds token id 7, outside the vocabulary of 5 tokens"
    ):
        Sampler().sample_step(logits[:1], [penalised], [None], [[0, 7]], [()])
    with pytest.raises(ValueError, match="row 1: output_ids holds token id -1"):
        Sampler().sample_step(
            logits,
            [SamplingParams(), SamplingParams(frequency_penalty=1.0)],
            [None] * 2,
            [(), ()],
            [(), [2, -1]],
        )
