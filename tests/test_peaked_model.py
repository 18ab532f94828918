"""The peaked random model (cascade_rag.testing.save_peaked_llama) on the CPU in float32.

Its greedy tokens must equal (1) what its mechanism predicts (`peaked_greedy`), (2) transformers'
`generate`, and (3) the engine's, cascade on and off, cold and warm, for 1, 37 and 128 requests
over a cached shared context, 64 tokens each; the lead of the top logit stays wide in bfloat16;
and the tokens depend on the shared chunks (dropping a chunk that holds the deciding trigger
changes them), so equal tokens say the shared KV was read right.
"""

from __future__ import annotations

import json
import random

import pytest
import torch

from cascade_rag.chunks import ChunkType
from cascade_rag.engine.sequence import PreparedPrompt
from cascade_rag.llm import CascadeEngine
from cascade_rag.sampling import SamplingParams
from cascade_rag.testing import (
    PEAKED_MECHANISM_FILE,
    greedy_margins,
    peaked_greedy,
    save_peaked_llama,
)

NEW_TOKENS = 64
MARGIN = 8.0
SHAPE = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=1024,
)


@pytest.fixture(scope="module")
def peaked(tmp_path_factory):
    return save_peaked_llama(
        tmp_path_factory.mktemp("peaked"), margin=MARGIN, dtype=torch.float32, **SHAPE
    )


@pytest.fixture(scope="module")
def mechanism(peaked):
    return json.loads((peaked / PEAKED_MECHANISM_FILE).read_text())


def _by_level(mechanism, level: int) -> list[int]:
    return [t for t, lv in enumerate(mechanism["level_of"]) if lv == level and t != 0]


def _context(mechanism, seed: int = 0):
    """Token ids of a system prompt and 4 documents. The documents hold the triggers: doc 0 a
    level-3 one, doc 1 a level-2 one, doc 2 a level-1 one, doc 3 none; the system prompt none."""
    rng = random.Random(seed)
    plain = _by_level(mechanism, 0)
    system = [rng.choice(plain) for _ in range(21)]
    docs = []
    for n, level in zip((13, 40, 7, 25), (3, 2, 1, 0)):  # lengths that do not fill pages
        doc = [rng.choice(plain) for _ in range(n)]
        if level:
            doc[rng.randrange(n)] = rng.choice(_by_level(mechanism, level))
        docs.append(doc)
    return system, docs


def _requests(engine, mechanism, count: int, seed: int = 1) -> list[PreparedPrompt]:
    """`count` requests over the cached context: each the system prompt and one of several
    document chains, then its own tail of 3-12 tokens (a few with a trigger of their own)."""
    system_ids, doc_ids = _context(mechanism)
    system = engine.register_token_chunk(system_ids, ChunkType.SYSTEM_PROMPT)
    docs = [engine.register_token_chunk(ids) for ids in doc_ids]
    chains = [(), (3,), (2, 3), (1, 3), (0, 3), (3, 1), (1, 2, 3), (0, 1, 2)]
    rng = random.Random(seed)
    plain, level2 = _by_level(mechanism, 0), _by_level(mechanism, 2)
    out = []
    for i in range(count):
        tail = [rng.choice(plain) for _ in range(rng.randint(3, 12))]
        if i % 9 == 4:
            tail[0] = rng.choice(level2)  # the deciding trigger in the request's own tokens
        chain = chains[i % len(chains)] if count > 1 else (1, 2, 3)
        out.append(PreparedPrompt((system, *(docs[d] for d in chain)), tuple(tail)))
    return out


def _levels(mechanism, prompts) -> list[int]:
    return [max(mechanism["level_of"][t] for t in p.token_ids) for p in prompts]


@pytest.mark.parametrize("batch", [1, 37, 128])
def test_engine_equals_transformers_and_the_mechanism(peaked, mechanism, batch):
    params = SamplingParams(max_tokens=NEW_TOKENS, ignore_eos=True)
    reference = None
    for cascade in (True, False):
        options = dict(cascade=True, max_cascade_levels=3, cascade_min_shared_tokens=0)
        if not cascade:
            options = dict(cascade=False)
        with CascadeEngine(str(peaked), kv_cache_tokens=32768, page_size=8, **options) as engine:
            prompts = _requests(engine, mechanism, batch)
            if reference is None:
                expected = [peaked_greedy(peaked, p.token_ids, NEW_TOKENS) for p in prompts]
                hf, _ = greedy_margins(
                    peaked, [p.token_ids for p in prompts], NEW_TOKENS, dtype=torch.float32
                )
                assert hf == expected, "transformers differs from the mechanism"
                reference = expected
            for run in ("cold", "warm"):
                outs = engine.generate(prompts, params)
                for i, out in enumerate(outs):
                    assert out.token_ids == reference[i], f"cascade={cascade} {run} request {i}"
            stats = engine.stats()
            assert stats.kv_cache.hit_tokens > 0
            assert (stats.num_cascade_steps > 0) == (cascade and batch > 1)
    if batch > 1:  # the tokens depend on what the shared chunks hold
        assert set(_levels(mechanism, prompts)) == {0, 1, 2, 3}
        assert len({tuple(t) for t in reference}) > len(reference) // 4


def test_bfloat16_lead_stays_wide(peaked, mechanism):
    with CascadeEngine(str(peaked), kv_cache_tokens=8192, page_size=8) as engine:
        prompts = [p.token_ids for p in _requests(engine, mechanism, 37)]
    tokens, min_gap = greedy_margins(peaked, prompts, NEW_TOKENS, dtype=torch.bfloat16)
    assert tokens == [peaked_greedy(peaked, p, NEW_TOKENS) for p in prompts]
    assert min_gap > MARGIN / 2, f"min top-1 minus top-2 logit gap {min_gap:.3f}"


def test_dropping_the_deciding_chunk_changes_the_tokens(peaked, mechanism):
    system, docs = _context(mechanism)
    with_trigger = system + docs[0] + docs[3] + [5, 6, 7]  # doc 0 holds the level-3 trigger
    without = system + docs[3] + [5, 6, 7]
    (a, b), _ = greedy_margins(peaked, [with_trigger, without], NEW_TOKENS, dtype=torch.float32)
    assert a == peaked_greedy(peaked, with_trigger, NEW_TOKENS)
    assert b == peaked_greedy(peaked, without, NEW_TOKENS)
    assert sum(x != y for x, y in zip(a, b)) > NEW_TOKENS // 2


def test_plain_random_weights_tie_where_the_peaked_model_does_not(tmp_path):
    """Why the mechanism exists: plain random weights (LM head scaled up, as the other tests
    do) give near ties, so bfloat16 and float32 greedy tokens part on the same weights."""
    from cascade_rag.testing import save_random_llama

    plain = save_random_llama(tmp_path / "plain", lm_head_scale=30.0, dtype=torch.float32,
                              tie_word_embeddings=False, **SHAPE)  # fmt: skip
    rng = random.Random(0)
    prompts = [[rng.randrange(1, 600) for _ in range(60)] for _ in range(16)]
    f32, _ = greedy_margins(plain, prompts, NEW_TOKENS, dtype=torch.float32)
    b16, min_gap = greedy_margins(plain, prompts, NEW_TOKENS, dtype=torch.bfloat16)
    assert f32 != b16 and min_gap < 0.1


def test_too_small_a_model_is_refused(tmp_path):
    with pytest.raises(ValueError, match="hidden_size"):
        save_peaked_llama(
            tmp_path / "x",
            hidden_size=8,
            intermediate_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
        )
