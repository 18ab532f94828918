"""GPU checks of the FlashInfer backend and the engine on it (skipped without a GPU).

- FlashInfer backend vs the PyTorch reference backend, per layer, over plain and cascade
  levels, prefill and decode, page sizes and lengths that do not fill pages (bf16 tolerance).
- Engine logits vs Hugging Face transformers on the same random weights (bf16 tolerance).
- Cascade vs plain decode, and cold vs warm chunk cache, produce the same tokens.
"""

from __future__ import annotations

import random

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)
pytest.importorskip("flashinfer", reason="needs the gpu extra (flashinfer-python)")

from cascade_rag.attention.flashinfer_backend import FlashInferAttention  # noqa: E402
from cascade_rag.attention.metadata import AttentionMetadata
from cascade_rag.attention.torch_backend import TorchAttention
from cascade_rag.chunks import ChunkType
from cascade_rag.engine.cascade_plan import SeqView, order_for_sharing, plan_levels
from cascade_rag.engine.sequence import PreparedPrompt
from cascade_rag.llm import CascadeEngine
from cascade_rag.sampling import SamplingParams

DEV = torch.device("cuda")


def _batch(page_size: int, qo_len: int, rng: random.Random):
    """Sequences sharing a prefix (all), a middle part (by group) and their own tail."""
    next_page = iter(rng.sample(range(1, 4000), 3999))
    shared = [next(next_page) for _ in range(rng.randint(1, 6))]
    groups = [[next(next_page) for _ in range(rng.randint(0, 4))] for _ in range(3)]
    views, slots = [], []
    for i in range(rng.randint(1, 9)):
        own_len = rng.randint(qo_len, qo_len + 3 * page_size)  # own keys, incl. the queries
        prefix = shared + groups[i % 3]
        kv_len = len(prefix) * page_size + own_len
        own = [next(next_page) for _ in range(-(-own_len // page_size))]
        table = prefix + own
        views.append(SeqView(table, kv_len, qo_len))
        slots.append([table[p // page_size] * page_size + p % page_size
                      for p in range(kv_len - qo_len, kv_len)])  # fmt: skip
    return views, slots


def _metadata(views, slots, page_size, max_levels, order):
    levels = plan_levels([views[i] for i in order], page_size, max_levels)
    flat = [s for i in order for s in slots[i]]
    empty = torch.zeros(0, dtype=torch.int64, device=DEV)
    return AttentionMetadata(
        page_size=page_size,
        slot_mapping=torch.tensor(flat, dtype=torch.int64, device=DEV),
        copy_src=empty,
        copy_dst=empty,
        levels=levels,
    )


@pytest.mark.parametrize("page_size", [1, 16])
@pytest.mark.parametrize("qo_len", [1, 5])
@pytest.mark.parametrize("max_levels", [1, 2, 3])
@pytest.mark.parametrize("heads", [(8, 8), (12, 4), (32, 8)])
def test_flashinfer_matches_torch_reference(page_size, qo_len, max_levels, heads):
    num_qo, num_kv = heads
    head_dim = 64
    rng = random.Random(page_size * 100 + qo_len * 10 + max_levels)
    views, slots = _batch(page_size, qo_len, rng)
    order = order_for_sharing(views, page_size)
    meta = _metadata(views, slots, page_size, max_levels, order)
    n = meta.num_tokens
    torch.manual_seed(0)
    cache_shape = (4000, page_size, num_kv, head_dim)
    k_cache = torch.randn(cache_shape, device=DEV, dtype=torch.bfloat16)
    v_cache = torch.randn(cache_shape, device=DEV, dtype=torch.bfloat16)
    q = torch.randn(n, num_qo, head_dim, device=DEV, dtype=torch.bfloat16)
    k = torch.randn(n, num_kv, head_dim, device=DEV, dtype=torch.bfloat16)
    v = torch.randn(n, num_kv, head_dim, device=DEV, dtype=torch.bfloat16)

    fi = FlashInferAttention(num_qo, num_kv, head_dim, page_size, torch.bfloat16, DEV, 3)
    fi.plan(meta)
    out = fi.forward(q, k, v, k_cache.clone(), v_cache.clone()).float()

    ref_backend = TorchAttention(num_qo, num_kv, head_dim)
    ref_backend.plan(meta)
    ref = ref_backend.forward(q.float(), k.float(), v.float(), k_cache.float(), v_cache.float())
    err = (out - ref).abs()
    assert err.max() < 3e-2, f"max err {err.max():.4g}, mean {err.mean():.4g}"


def _engine(model_dir, **kw):
    kw.setdefault("kv_cache_tokens", 1 << 15)
    return CascadeEngine(str(model_dir), dtype="bfloat16", device="cuda", **kw)


def _prompts(engine, rng: random.Random, n: int):
    vocab = engine.model_config.vocab_size
    system = engine.register_token_chunk(
        [rng.randrange(1, vocab) for _ in range(53)], ChunkType.SYSTEM_PROMPT
    )
    docs = [
        engine.register_token_chunk([rng.randrange(1, vocab) for _ in range(rng.randint(40, 90))])
        for _ in range(4)
    ]
    prompts = []
    for _ in range(n):
        picked = sorted(rng.sample(range(4), 2))
        query = tuple(rng.randrange(1, vocab) for _ in range(rng.randint(5, 20)))
        prompts.append(PreparedPrompt((system, *(docs[d] for d in picked)), query))
    return prompts


def test_engine_logits_match_transformers(llama_dir):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.bfloat16).to(DEV).eval()
    with _engine(llama_dir, cascade_min_shared_tokens=0) as engine:
        core = engine._core
        prompts = _prompts(engine, random.Random(1), 6)
        for p in prompts:
            core.add_request(p, SamplingParams(max_tokens=4), 4)
        for _step in range(3):  # prefill, then two decode steps
            plan = core.scheduler.schedule()
            logits = core.runner.run(plan.scheduled)
            core.scheduler.finish_step(plan, failed=False)
            for row, entry in enumerate(plan.scheduled):
                ids = torch.tensor([entry.seq.token_ids], device=DEV)
                with torch.inference_mode():
                    ref = hf(ids).logits[0, -1].float()
                err = (logits[row] - ref).abs().max() / ref.abs().max()
                assert err < 5e-2, f"step {_step} row {row}: relative max err {err:.4g}"
                entry.seq.token_ids.append(int(ref.argmax()))


def _assert_same_or_tie(hf, prompt: PreparedPrompt, got: list[int], want: list[int], label):
    """Greedy tokens must agree; where they part, the reference's top two logits must be
    within bf16 rounding of each other (a genuine tie that either choice may break)."""
    if got == want:
        return
    j = next(i for i, (a, b) in enumerate(zip(got, want)) if a != b)
    ids = torch.tensor([prompt.token_ids + want[:j]], device=DEV)
    with torch.inference_mode():
        logits = hf(ids).logits[0, -1].float()
    top = logits.topk(2).values
    gap = float(top[0] - top[1]) / float(logits.abs().max())
    assert gap < 2e-2, f"{label}: token {j} differs ({got[j]} vs {want[j]}), top-2 gap {gap:.3g}"


def test_cascade_plain_cold_warm_same_tokens(llama_dir):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.bfloat16).to(DEV).eval()
    params = SamplingParams(max_tokens=16, ignore_eos=True)
    outputs = {}
    for name, kw in {
        "cascade": dict(cascade_min_shared_tokens=0),
        "plain": dict(cascade=False),
    }.items():
        with _engine(llama_dir, **kw) as engine:
            prompts = _prompts(engine, random.Random(2), 12)
            cold = engine.generate(prompts, params)
            warm = engine.generate(prompts, params)
            assert all(o.usage.cached_tokens > 0 for o in warm)
            assert engine.stats().kv_cache.hit_tokens > 0
            outputs[name] = [o.token_ids for o in cold]
            for i, (p, c, w) in enumerate(zip(prompts, cold, warm)):
                _assert_same_or_tie(hf, p, w.token_ids, c.token_ids, f"{name} warm vs cold #{i}")
    exact = 0
    for i, (p, c, pl) in enumerate(zip(prompts, outputs["cascade"], outputs["plain"])):
        _assert_same_or_tie(hf, p, c, pl, f"cascade vs plain #{i}")
        exact += c == pl
    assert exact >= len(prompts) - 2, f"only {exact} of {len(prompts)} identical"
