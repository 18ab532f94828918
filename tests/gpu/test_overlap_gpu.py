"""Overlap on the GPU: the same greedy tokens with overlap on and off (CUDA graphs, cascade).

On `save_peaked_llama` weights every greedy token leads by a wide margin, so overlap (which
changes when tokens are read, not how they are computed) must give exactly the tokens of
overlap off and of the mechanism's prediction; 37 requests over a shared cached context,
64 tokens each, plus a batch with stop tokens and aborts. Skipped without a GPU and FlashInfer.
"""

from __future__ import annotations

import random

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)
pytest.importorskip("flashinfer", reason="needs the gpu extra (flashinfer-python)")

from cascade_rag.chunks import ChunkType  # noqa: E402
from cascade_rag.engine.sequence import PreparedPrompt  # noqa: E402
from cascade_rag.llm import CascadeEngine  # noqa: E402
from cascade_rag.sampling import SamplingParams  # noqa: E402
from cascade_rag.testing import byte_bpe_tokenizer, peaked_greedy, save_peaked_llama  # noqa: E402

NEW_TOKENS = 64


@pytest.fixture(scope="module")
def peaked(tmp_path_factory):
    return save_peaked_llama(
        tmp_path_factory.mktemp("peaked"),
        tokenizer=byte_bpe_tokenizer(600, padded_vocab_size=1024),
        margin=8.0,
        device="cuda",
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=2,
        head_dim=64,
        max_position_embeddings=4096,
    )


def _prompts(engine, count: int) -> list[PreparedPrompt]:
    rng = random.Random(0)
    vocab = 600
    system = engine.register_token_chunk(
        [rng.randrange(1, vocab) for _ in range(600)], ChunkType.SYSTEM_PROMPT
    )
    doc = engine.register_token_chunk([rng.randrange(1, vocab) for _ in range(333)])
    return [
        PreparedPrompt(
            (system, doc) if i % 3 else (system,),
            tuple(rng.randrange(1, vocab) for _ in range(rng.randint(3, 12))),
        )
        for i in range(count)
    ]


def _drive(core, prompts, params, abort_at=None):
    seqs = [core.add_request(p, sp, sp.max_tokens, False) for p, sp in zip(prompts, params)]
    steps = overlapped = 0
    while core.has_work():
        core.step()
        steps += 1
        overlapped += core._flight is not None
        if abort_at is not None and steps == abort_at:
            for s in seqs[::5]:
                core.abort(s)
    return [(s.finish_reason, s.generated_ids) for s in seqs], overlapped


def test_overlap_gives_the_same_tokens_with_graphs_and_cascade(peaked):
    options = dict(
        device="cuda", kv_cache_tokens=65536, page_size=16, cuda_graphs=True,
        cascade=True, max_cascade_levels=3, cascade_min_shared_tokens=0,
    )  # fmt: skip
    runs = {}
    for overlap in (False, True):
        with CascadeEngine(str(peaked), overlap=overlap, **options) as engine:
            core = engine._core
            prompts = _prompts(engine, 37)
            greedy = SamplingParams(max_tokens=NEW_TOKENS, ignore_eos=True)
            out, overlapped = _drive(core, prompts, [greedy] * 37)
            assert core.runner.graphs is not None and core.runner.graphs.num_replays > 0
            assert (overlapped > NEW_TOKENS // 2) == overlap
            expected = [peaked_greedy(peaked, p.token_ids, NEW_TOKENS) for p in prompts]
            assert [ids for _, ids in out] == expected, f"overlap={overlap}"
            stop = expected[1][10]
            params = [
                SamplingParams(max_tokens=n, stop_token_ids=[stop] if i % 2 else [])
                for i, n in enumerate([1, 2, 5, 17, 40, 64] * 6)
            ]
            mixed, _ = _drive(core, prompts[: len(params)], params, abort_at=9)
            runs[overlap] = (out, mixed)
            assert not core.has_work() and core.scheduler.block_table.num_used == 0
    assert runs[True][0] == runs[False][0]
    # aborts after step 9: overlap delivers one step later, so an aborted request may hold one
    # token fewer (or be aborted where overlap off had just ended it); the rest are identical
    for (ra, a), (rb, b) in zip(runs[True][1], runs[False][1]):
        if ra == "abort":
            assert a == b[: len(a)] and len(b) - len(a) <= 1
        else:
            assert (ra, a) == (rb, b)
