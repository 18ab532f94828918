"""Sampler.sample_step on CUDA: same choices as on CPU, seeded rows reproducible, one sync.

Skipped without a CUDA device. Needs only torch and pytest (no hypothesis), so it also runs
on a bare GPU machine.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from cascade_rag.sampling import Sampler, SamplingParams, make_generator

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

EOS = (1, 3)
VOCAB = 4096


def _mixed_batch(vocab: int = VOCAB):
    g = torch.Generator().manual_seed(0)
    params = [
        SamplingParams(),
        SamplingParams(repetition_penalty=1.3, frequency_penalty=0.5, logprobs=5),
        SamplingParams(min_tokens=4, stop_token_ids=[7]),
        SamplingParams(temperature=0.8, top_k=50, top_p=0.9, min_p=0.02, seed=1),
        SamplingParams(temperature=1.1, presence_penalty=1.0, seed=2, logprobs=2),
        SamplingParams(temperature=0.7),  # global RNG
        SamplingParams(logprobs=20),
    ]
    prompts = [torch.randint(vocab, (300,), generator=g).tolist() for _ in params]
    outputs = [torch.randint(vocab, (n,), generator=g).tolist() for n in (0, 40, 2, 9, 5, 0, 1)]
    logits = torch.randn(len(params), vocab, generator=g) * 3
    logits[:, [1, 3, 7]] += 8.0  # EOS and the stop id likeliest: min_tokens must mask them
    return logits, params, prompts, outputs


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_deterministic_rows_match_cpu(dtype):
    logits, params, prompts, outputs = _mixed_batch()
    logits = logits.to(dtype)
    sampler = Sampler(EOS)
    deterministic = [i for i, p in enumerate(params) if p.is_greedy]
    cpu = sampler.sample_step(logits, params, [None] * len(params), prompts, outputs)
    gens = [make_generator(p.seed, "cuda") for p in params]
    gpu = sampler.sample_step(logits.cuda(), params, gens, prompts, outputs)
    for i in deterministic:
        assert gpu.token_ids[i] == cpu.token_ids[i], i
        if params[i].logprobs is not None:
            a, b = gpu.logprobs[i], cpu.logprobs[i]
            assert a.rank == b.rank and [t for t, _ in a.top] == [t for t, _ in b.top]
            assert abs(a.logprob - b.logprob) < 1e-4
    assert gpu.token_ids[2] not in (1, 3, 7)
    for i, p in enumerate(params):
        assert (gpu.logprobs[i] is None) == (p.logprobs is None)


def test_cuda_seeded_rows_reproducible_and_independent_of_batch():
    logits, params, prompts, outputs = _mixed_batch()
    logits = logits.cuda()
    sampler = Sampler(EOS)
    target = 3
    alone = []
    gen = make_generator(params[target].seed, "cuda")
    for _ in range(10):
        out = sampler.sample_step(
            logits[target : target + 1],
            [params[target]],
            [gen],
            [prompts[target]],
            [outputs[target]],
        )
        alone.append(out.token_ids[0])
    assert len(set(alone)) > 1  # really sampling
    gens = [make_generator(p.seed, "cuda") for p in params]
    batched = [
        sampler.sample_step(logits, params, gens, prompts, outputs).token_ids[target]
        for _ in range(10)
    ]
    assert batched == alone


def test_cuda_step_synchronises_once():
    logits, params, prompts, outputs = _mixed_batch()
    logits = logits.cuda()
    sampler = Sampler(EOS)
    gens = [make_generator(p.seed, "cuda") for p in params]
    sampler.sample_step(logits, params, gens, prompts, outputs)  # warm up (pinned memory pool)
    torch.cuda.synchronize()
    for batch in (params, [SamplingParams()] * len(params)):
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                sampler.sample_step(logits, batch, gens, prompts, outputs)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        syncs = [str(w.message) for w in caught if "synchroniz" in str(w.message)]
        assert len(syncs) == 1, syncs  # the final .tolist()


def test_cuda_constrained_rows_match_cpu_and_stay_valid():
    """Masks applied on CUDA: greedy constrained rows pick what they pick on the CPU, sampled
    constrained rows only produce matches, unconstrained rows are untouched."""
    pytest.importorskip("llguidance")
    import re

    from cascade_rag.sampling import Constraint, GrammarCompiler
    from cascade_rag.testing import byte_bpe_tokenizer

    tok = byte_bpe_tokenizer(600)
    vocab, eos = len(tok), tok.eos_token_id
    compiler = GrammarCompiler(tok, vocab, [eos])
    pattern = r"(word|token|piece)[0-9]{1,3}( (word|token|piece)[0-9]{1,3}){0,3}"
    constraint = Constraint(regex=pattern)
    rows = [
        SamplingParams(max_tokens=40, constraint=constraint),
        SamplingParams(max_tokens=40, temperature=1.0, seed=5, constraint=constraint),
        SamplingParams(max_tokens=40),
    ]

    def decode(device: str) -> list[list[int]]:
        g = torch.Generator().manual_seed(1)
        sampler = Sampler([eos])
        states = [compiler.start(p.constraint) if p.constraint else None for p in rows]
        gens = [make_generator(p.seed, device) for p in rows]
        out: list[list[int]] = [[] for _ in rows]
        live = list(range(len(rows)))
        for _ in range(40):
            # every row's logits drawn every step, so rows that end early change nothing
            logits = torch.randn(len(rows), vocab, generator=g)[live].to(device)
            step = sampler.sample_step(
                logits,
                [rows[i] for i in live],
                [gens[i] for i in live],
                [()] * len(live),
                [()] * len(live),
                [states[i] for i in live],
            )
            for i, t in zip(live, step.token_ids):
                if states[i] is not None:
                    states[i].advance(t)
                out[i].append(t)
            live = [i for i in live if out[i][-1] != eos]
            if not live:
                break
        return out

    cpu, cuda = decode("cpu"), decode("cuda")
    assert cuda[0] == cpu[0]  # greedy constrained
    assert cuda[2] == cpu[2]  # greedy unconstrained
    for ids in (cuda[0], cuda[1]):
        assert ids[-1] == eos and re.fullmatch(pattern, tok.decode(ids[:-1])), tok.decode(ids)
