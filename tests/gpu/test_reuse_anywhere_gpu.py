"""Reuse anywhere on the GPU (skipped without CUDA and FlashInfer): the FlashInfer backend, with
its per-level query re-rotation, more levels than the cascade depth and recomputed keys written
shifted, gives the PyTorch backend's tokens and log-probabilities on the same random weights
(bf16 tolerance), per backend call on scheduled steps and end to end (ties allowed)."""

from __future__ import annotations

import random

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)
pytest.importorskip("flashinfer", reason="needs the gpu extra (flashinfer-python)")

DEV = torch.device("cuda")

from cascade_rag.chunks import ChunkType  # noqa: E402
from cascade_rag.engine.sequence import PreparedPrompt  # noqa: E402
from cascade_rag.llm import CascadeEngine  # noqa: E402
from cascade_rag.sampling import SamplingParams  # noqa: E402


def _prompts(engine, seed: int) -> list[PreparedPrompt]:
    rng = random.Random(seed)
    vocab = engine.model_config.vocab_size

    def ids(n: int) -> list[int]:
        return [rng.randrange(1, vocab) for _ in range(n)]

    system = engine.register_token_chunk(ids(37), ChunkType.SYSTEM_PROMPT)
    docs = [engine.register_token_chunk(ids(rng.randint(20, 70))) for _ in range(6)]
    prompts = []
    for _ in range(10):
        picked = rng.sample(range(6), rng.randint(1, 5))  # up to 7 levels
        prompts.append(PreparedPrompt((system, *(docs[d] for d in picked)), tuple(ids(6))))
    return prompts


def test_flashinfer_matches_torch_on_scheduled_anywhere_steps():
    """The backends on the same real reuse-anywhere steps (chunk nodes filled at canonical
    positions, recomputed rows written shifted into copied pages, shifted segments, shared
    entries over several requests, more levels than the cascade depth), random q/k/v/cache."""
    from cascade_rag.attention.flashinfer_backend import FlashInferAttention
    from cascade_rag.attention.torch_backend import TorchAttention
    from cascade_rag.chunks import ChunkRegistry
    from cascade_rag.engine.kv_cache import ChunkKVCache, PagePool
    from cascade_rag.engine.model_runner import ModelRunner
    from cascade_rag.engine.scheduler import Scheduler
    from cascade_rag.engine.segments import RecomputePolicy
    from cascade_rag.engine.sequence import Sequence

    num_qo, num_kv, head_dim, page_size = 12, 4, 64, 16
    rng = random.Random(0)
    registry = ChunkRegistry("fake-model|fake-tokenizer")
    pool = PagePool(512, page_size, 1, num_kv, head_dim, torch.bfloat16, "cuda")
    kv = ChunkKVCache(pool, registry, segment_layout=True)
    sched = Scheduler(kv, 64, 8192, RecomputePolicy(5), split_segments=True)
    runner = ModelRunner(None, pool, None, 3, min_shared_tokens=0)  # share every repeated run
    runner.inv_freq = 1.0 / (10000.0 ** (torch.arange(0, head_dim, 2).float() / head_dim))
    system = registry.register([rng.randrange(1000) for _ in range(37)], ChunkType.SYSTEM_PROMPT)
    docs = [registry.register([rng.randrange(1000) for _ in range(n)]) for n in (23, 40, 9, 61)]
    for order in ([0, 1, 2], [2, 0], [3, 1, 0, 2], [1, 3], [0]):
        prompt = PreparedPrompt((system, *(docs[d] for d in order)), (5, 6, 7))
        sched.add(Sequence(prompt=prompt, params=SamplingParams(max_tokens=4)))
    k_cache, v_cache = pool.kv_caches[0]
    k_cache.normal_()
    v_cache.normal_()
    fi = FlashInferAttention(num_qo, num_kv, head_dim, page_size, torch.bfloat16, DEV, 3)
    ref = TorchAttention(num_qo, num_kv, head_dim)
    for step in range(3):  # prefill (fill, recompute, private rows), then two decode steps
        plan = sched.schedule()
        _, meta = runner.build_metadata(plan.scheduled)
        n = meta.num_tokens
        q = torch.randn(n, num_qo, head_dim, device=DEV, dtype=torch.bfloat16)
        k = torch.randn(n, num_kv, head_dim, device=DEV, dtype=torch.bfloat16)
        v = torch.randn(n, num_kv, head_dim, device=DEV, dtype=torch.bfloat16)
        k_ref, v_ref = k_cache.float(), v_cache.float()
        fi.plan(meta)
        out = fi.forward(q, k, v, k_cache, v_cache).float()
        ref.plan(meta)
        want = ref.forward(q.float(), k.float(), v.float(), k_ref, v_ref)
        err = (out - want).abs()
        assert err.max() < 3e-2, f"step {step}: max err {err.max():.4g}, mean {err.mean():.4g}"
        sched.finish_step(plan, failed=False)
        for entry in plan.scheduled:
            entry.seq.token_ids.append(rng.randrange(1000))
    assert runner.num_cascade_steps > 0, "no entry was shared between requests"


def test_flashinfer_matches_the_torch_backend(llama_dir):
    """End to end, tie-aware: where the generations part, the PyTorch backend's top two
    log-probabilities at that token are within bf16 noise of each other (a near tie that the
    fused bf16 model ops of the FlashInfer path may break the other way)."""
    params = SamplingParams(max_tokens=8, ignore_eos=True, logprobs=2)
    outs = {}
    for backend in ("flashinfer", "torch"):
        with CascadeEngine(
            str(llama_dir),
            dtype="bfloat16",
            device="cuda",
            attention_backend=backend,
            kv_cache_tokens=1 << 14,
            chunk_reuse="anywhere",
            recompute_tokens=5,
        ) as engine:
            prompts = _prompts(engine, 0)
            batched = engine.generate(prompts, params)
            alone = [engine.generate(p, params) for p in prompts]
            outs[backend] = (batched, alone)
            assert engine.stats().kv_cache.anywhere_hit_tokens > 0
    same = total = 0
    for run in (0, 1):
        for i, (a, b) in enumerate(zip(outs["flashinfer"][run], outs["torch"][run])):
            total += 1
            if a.token_ids == b.token_ids:
                same += 1
                continue
            j = next(t for t, (x, y) in enumerate(zip(a.token_ids, b.token_ids)) if x != y)
            top = b.logprobs[j].top
            gap = top[0][1] - top[1][1]
            assert gap < 0.15, (
                f"run {run} prompt {i}: token {j} differs ({a.token_ids[j]} vs "
                f"{b.token_ids[j]}) where the PyTorch backend's top-2 gap is {gap:.3f}"
            )
    assert same >= total // 2, f"only {same} of {total} generations identical"
