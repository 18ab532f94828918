"""The peaked random model on the GPU in bfloat16: transformers, eager, graph, cascade, plain.

On `save_peaked_llama` weights every greedy token leads by a wide margin, so all systems must
give identical tokens: transformers' `generate` (bf16, CUDA), the engine with cascade on and off,
each with CUDA graphs on and off (where `EngineConfig` has `cuda_graphs`), for 1, 37 and 128
requests over a cached shared context, 64 tokens each; and all equal the mechanism's prediction.
Skipped without a GPU and FlashInfer.
"""

from __future__ import annotations

import dataclasses
import json
import random

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)
pytest.importorskip("flashinfer", reason="needs the gpu extra (flashinfer-python)")

from cascade_rag.attention.flashinfer_backend import FlashInferAttention  # noqa: E402
from cascade_rag.chunks import ChunkType  # noqa: E402
from cascade_rag.config import EngineConfig  # noqa: E402
from cascade_rag.engine.sequence import PreparedPrompt  # noqa: E402
from cascade_rag.llm import CascadeEngine  # noqa: E402
from cascade_rag.sampling import SamplingParams  # noqa: E402
from cascade_rag.testing import (  # noqa: E402
    PEAKED_MECHANISM_FILE,
    byte_bpe_tokenizer,
    greedy_margins,
    peaked_greedy,
    save_peaked_llama,
)

NEW_TOKENS = 64
MARGIN = 8.0
HAS_GRAPHS = "cuda_graphs" in {f.name for f in dataclasses.fields(EngineConfig)}


@pytest.fixture(scope="module")
def peaked(tmp_path_factory):
    return save_peaked_llama(
        tmp_path_factory.mktemp("peaked"),
        tokenizer=byte_bpe_tokenizer(600, padded_vocab_size=1024),
        margin=MARGIN,
        device="cuda",
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=2,
        head_dim=64,
        max_position_embeddings=4096,
    )


@pytest.fixture(scope="module")
def mechanism(peaked):
    return json.loads((peaked / PEAKED_MECHANISM_FILE).read_text())


def _by_level(mechanism, level: int) -> list[int]:
    return [t for t, lv in enumerate(mechanism["level_of"]) if lv == level and t != 0]


def _requests(engine, mechanism, count: int) -> list[PreparedPrompt]:
    """System prompt + one of 8 chains of 4 documents (triggers of level 3, 2, 1 in docs 0-2;
    lengths that do not fill pages), then a private tail of 3-12 tokens (every 9th with a
    level-2 trigger of its own)."""
    rng = random.Random(0)
    plain = _by_level(mechanism, 0)
    system = engine.register_token_chunk(
        [rng.choice(plain) for _ in range(37)], ChunkType.SYSTEM_PROMPT
    )
    docs = []
    for n, level in zip((300, 513, 77, 250), (3, 2, 1, 0)):
        ids = [rng.choice(plain) for _ in range(n)]
        if level:
            ids[rng.randrange(n)] = rng.choice(_by_level(mechanism, level))
        docs.append(engine.register_token_chunk(ids))
    chains = [(), (3,), (2, 3), (1, 3), (0, 3), (3, 1), (1, 2, 3), (0, 1, 2)]
    out = []
    for i in range(count):
        tail = [rng.choice(plain) for _ in range(rng.randint(3, 12))]
        if i % 9 == 4:
            tail[0] = rng.choice(_by_level(mechanism, 2))
        chain = chains[i % len(chains)] if count > 1 else (1, 2, 3)
        out.append(PreparedPrompt((system, *(docs[d] for d in chain)), tuple(tail)))
    return out


def _systems():
    for cascade in (True, False):
        for graphs in (False, True):
            marks = ()
            if graphs and not HAS_GRAPHS:
                marks = pytest.mark.skip(reason="EngineConfig has no cuda_graphs option yet")
            yield pytest.param(
                cascade, graphs, marks=marks, id=f"cascade={cascade}-graphs={graphs}"
            )


@pytest.fixture(scope="module")
def references(peaked, mechanism):
    """Per batch: the prompts' ids and transformers' bf16 greedy tokens (checked against the
    mechanism, and the lead checked wide)."""
    out = {}
    with CascadeEngine(str(peaked), device="cuda", kv_cache_tokens=8192) as engine:
        for batch in (1, 37, 128):
            ids = [p.token_ids for p in _requests(engine, mechanism, batch)]
            tokens, min_gap = greedy_margins(
                peaked, ids, NEW_TOKENS, dtype=torch.bfloat16, device="cuda"
            )
            assert tokens == [peaked_greedy(peaked, p, NEW_TOKENS) for p in ids]
            assert min_gap > MARGIN / 2, f"batch {batch}: bf16 min top-1 - top-2 {min_gap:.3f}"
            out[batch] = (ids, tokens)
    return out


@pytest.mark.parametrize("batch", [1, 37, 128])
@pytest.mark.parametrize("cascade, graphs", list(_systems()))
def test_engine_equals_transformers_in_bfloat16(
    peaked, mechanism, references, batch, cascade, graphs
):
    options = dict(device="cuda", kv_cache_tokens=65536, page_size=16)
    options |= (
        dict(cascade=True, max_cascade_levels=3, cascade_min_shared_tokens=0)
        if cascade
        else dict(cascade=False)
    )
    if HAS_GRAPHS:
        options["cuda_graphs"] = graphs
    ids, expected = references[batch]
    params = SamplingParams(max_tokens=NEW_TOKENS, ignore_eos=True)
    with CascadeEngine(str(peaked), **options) as engine:
        assert isinstance(engine._core.runner.attn, FlashInferAttention)
        assert engine.config.resolved_dtype == "bfloat16"
        prompts = _requests(engine, mechanism, batch)
        assert [p.token_ids for p in prompts] == ids
        for run in ("cold", "warm"):
            outs = engine.generate(prompts, params)
            wrong = [i for i, out in enumerate(outs) if out.token_ids != expected[i]]
            assert not wrong, f"{run}: requests {wrong[:8]} differ from transformers"
        stats = engine.stats()
        assert stats.kv_cache.hit_tokens > 0
        assert (stats.num_cascade_steps > 0) == (cascade and batch > 1)
