"""Sampling options end to end, against Hugging Face transformers on the same token ids.

Greedy decoding with `repetition_penalty` and `min_tokens` must equal transformers'
`generate(repetition_penalty=..., min_new_tokens=...)` token for token (its processors have the
same definitions), and `logprobs` must equal transformers' log-softmax of the same positions.
Mixed batches (options differ per row) give each row what it gets alone.
"""

from __future__ import annotations

import pytest
import torch

from cascade_rag.composition import Composition
from cascade_rag.llm import CascadeEngine
from cascade_rag.sampling import SamplingParams

DOC = (
    "The Plum Railway opened in 1899. It has a single line of twelve kilometres between the "
    "harbour and the hills. Trains run every twenty minutes."
)
PROMPTS = [
    Composition(query="Describe the Plum Railway.", chunks=[DOC], system="Be helpful."),
    Composition(query="List three facts about the railway.", chunks=[DOC], system="Be helpful."),
]
MAX_NEW = 16


@pytest.fixture(scope="module")
def engine(default_model):
    with CascadeEngine(default_model, kv_cache_tokens=8192) as eng:
        yield eng


@pytest.fixture(scope="module")
def hf_model(default_model):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(default_model.model_dir, dtype=torch.float32)
    return model.eval()


def hf_generate(hf_model, ids: list[int], **kwargs) -> list[int]:
    with torch.inference_mode():
        out = hf_model.generate(
            torch.tensor([ids]),
            attention_mask=torch.ones(1, len(ids), dtype=torch.int64),
            max_new_tokens=MAX_NEW,
            do_sample=False,
            pad_token_id=hf_model.config.eos_token_id,
            **kwargs,
        )
    return out[0, len(ids) :].tolist()


@pytest.mark.parametrize("penalty", [1.3, 0.8])
def test_repetition_penalty_matches_transformers(engine, hf_model, penalty):
    params = SamplingParams(max_tokens=MAX_NEW, repetition_penalty=penalty)
    outs = engine.generate(PROMPTS, params)
    plain = engine.generate(PROMPTS, SamplingParams(max_tokens=MAX_NEW))
    for prompt, out in zip(PROMPTS, outs):
        ids = engine.prepare(prompt).token_ids
        assert out.token_ids == hf_generate(hf_model, ids, repetition_penalty=penalty)
    assert any(o.token_ids != b.token_ids for o, b in zip(outs, plain)), "penalty had no effect"


def test_min_tokens_matches_transformers(engine, hf_model):
    prompt = Composition(query="Say yes.", chunks=[], system="Answer with one word.")
    ids = engine.prepare(prompt).token_ids
    short = engine.generate(prompt, SamplingParams(max_tokens=MAX_NEW))
    assert short.finish_reason == "stop" and len(short.token_ids) < 10, "needs an early EOS"
    n = len(short.token_ids) + 4
    out = engine.generate(prompt, SamplingParams(max_tokens=MAX_NEW, min_tokens=n))
    assert len(out.token_ids) >= n
    ref = hf_generate(hf_model, ids, min_new_tokens=n)
    eos = set(engine._core.eos_token_ids)
    assert out.token_ids == ref[: len(out.token_ids)]
    assert not eos & set(out.token_ids[: n - 1]), "EOS before min_tokens"


def test_logprobs_match_transformers(engine, hf_model):
    prompt = PROMPTS[0]
    ids = engine.prepare(prompt).token_ids
    out = engine.generate(prompt, SamplingParams(max_tokens=6, logprobs=5))
    full = torch.tensor([ids + out.token_ids])
    with torch.inference_mode():
        logits = hf_model(full).logits[0].float()
    ref = torch.log_softmax(logits, dim=-1)
    assert len(out.logprobs) == len(out.token_ids)
    for i, (tok, lp) in enumerate(zip(out.token_ids, out.logprobs)):
        row = ref[len(ids) - 1 + i]
        assert lp.token_id == tok
        assert abs(lp.logprob - row[tok].item()) < 1e-3, (lp.logprob, row[tok].item())
        assert lp.rank == 1  # greedy picks the most likely token
        top_ids = torch.topk(row, 5).indices.tolist()
        assert [t for t, _ in lp.top] == top_ids
        for t, v in lp.top:
            assert abs(v - row[t].item()) < 1e-3


def test_mixed_batch_gives_each_row_its_solo_output(engine):
    options = [
        SamplingParams(max_tokens=MAX_NEW),
        SamplingParams(max_tokens=MAX_NEW, repetition_penalty=1.5),
        SamplingParams(max_tokens=MAX_NEW, temperature=0.8, seed=7, top_p=0.9, min_p=0.05),
        SamplingParams(max_tokens=MAX_NEW, presence_penalty=1.0, frequency_penalty=0.5),
        SamplingParams(max_tokens=MAX_NEW, logprobs=2, min_tokens=4),
    ]
    prompts = [PROMPTS[i % 2] for i in range(len(options))]
    solo = [engine.generate(p, o).token_ids for p, o in zip(prompts, options)]
    batch = engine.generate(prompts, options)
    assert [o.token_ids for o in batch] == solo
