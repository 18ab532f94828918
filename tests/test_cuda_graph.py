"""Decode graphs on the CPU: the graph-safe attention and the graph runner against the PyTorch
backend, with FlashInfer and CUDA graphs replaced by stand-ins.

The stand-in wrappers (tests/flashinfer_stand_in.py) read only the fixed buffers that `plan`
filled, as a replayed graph does, and poison rows without keys with NaN; the stand-in graph runs
the captured function again on replay. So these tests check the padding and buffer bookkeeping
(padded rows, shared levels with entries without keys, stale buffers from larger steps, steps
that must run eagerly) against the reference; tests/gpu/test_cuda_graph_gpu.py checks the same
on real kernels and real graphs.
"""

from __future__ import annotations

import importlib
import logging
import random
import sys

import numpy as np
import pytest
import torch
from flashinfer_stand_in import stand_in_module

from cascade_rag.attention.metadata import AttentionMetadata
from cascade_rag.attention.torch_backend import TorchAttention
from cascade_rag.engine.cascade_plan import SeqView, order_for_sharing, plan_levels
from cascade_rag.engine.cuda_graph import (
    DecodeGraphRunner,
    batch_buckets,
    make_decode_graphs,
    run_with_graphs,
)

HQ, HK, D = 8, 2, 16


@pytest.fixture
def graph_attention(monkeypatch):
    """The flashinfer_graph module imported against the FlashInfer stand-in."""
    name = "cascade_rag.attention.flashinfer_graph"
    monkeypatch.setitem(sys.modules, "flashinfer", stand_in_module())
    saved = sys.modules.pop(name, None)
    module = importlib.import_module(name)
    yield module
    sys.modules.pop(name, None)
    if saved is not None:
        sys.modules[name] = saved


def _decode_step(rng: random.Random, n: int, page_size: int, num_pages: int, long=False):
    """n decode sequences: most share a prefix, groups share a middle part, subgroups one
    more part, some share nothing; own lengths that do not fill pages. Page 0 is left for
    the scratch page. `long`: a shared prefix of over 2048 tokens."""
    free = iter(rng.sample(range(1, num_pages), num_pages - 1))
    num_shared = -(-2100 // page_size) if long else rng.randint(1, 4)
    shared = [next(free) for _ in range(num_shared)]
    middles = [[next(free) for _ in range(rng.randint(0, 3))] for _ in range(3)]
    subs = [[next(free) for _ in range(rng.randint(0, 2))] for _ in range(6)]  # within middles
    views, slots = [], []
    for i in range(n):
        prefix = [] if i % 5 == 4 else shared + middles[i % 3] + subs[i % 6]
        own_len = rng.randint(1, 2 * page_size + 3)
        table = prefix + [next(free) for _ in range(-(-own_len // page_size))]
        kv_len = len(prefix) * page_size + own_len
        views.append(SeqView(table, kv_len, 1))
        pos = kv_len - 1
        slots.append(table[pos // page_size] * page_size + pos % page_size)
    return views, slots


def _metadata(views, slots, page_size, max_levels):
    order = order_for_sharing(views, page_size)
    levels = plan_levels([views[i] for i in order], page_size, max_levels)
    empty = torch.zeros(0, dtype=torch.int64)
    return AttentionMetadata(
        page_size=page_size,
        slot_mapping=torch.tensor([slots[i] for i in order]),
        copy_src=empty,
        copy_dst=empty,
        levels=levels,
    )


def _caches(num_pages, page_size, seed):
    g = torch.Generator().manual_seed(seed)
    shape = (num_pages, page_size, HK, D)
    return torch.randn(shape, generator=g), torch.randn(shape, generator=g)


def test_buckets():
    assert batch_buckets(1) == [1]
    assert batch_buckets(37) == [1, 2, 4, 8, 16, 24, 32, 37]
    assert batch_buckets(256)[-3:] == [192, 224, 256]
    assert batch_buckets(400)[-4:] == [256, 320, 384, 400]
    with pytest.raises(ValueError):
        batch_buckets(0)


def test_shared_entry_capacity_gives_the_large_tile(graph_attention):
    cap = graph_attention.shared_entry_capacity
    for b in (1, 8, 16):
        assert cap(b, 4) == b  # one 64-row tile holds every row anyway
    for b, g in ((32, 4), (128, 4), (256, 3), (96, 1), (24, 8)):
        e = cap(b, g)
        assert 1 <= e < b
        assert (b - e + 1) * g > 64  # FlashInfer's graph-mode worst case -> the 128-row tile


@pytest.mark.parametrize(
    "page_size,pieces,short", [(1, 1, None), (4, 1, None), (1, 3, 20), (4, 4, 40)]
)
def test_graph_attention_matches_torch_backend(graph_attention, page_size, pieces, short):
    """Steps of 5..48 sequences in buckets of 8 and 48 rows, plain and with 1-3 shared
    levels, one attention object per bucket planned again and again (buffers of a larger
    step must not leak into a smaller one), vs the PyTorch backend on the unpadded rows.
    With `pieces` > 1 each shared entry's keys are cut into parts (some of them empty: the
    short shared parts have fewer pages than parts), and with `short` a step whose last
    level has at most that many tokens runs the short-level wrapper (both kinds occur)."""
    rng = random.Random(page_size * 10 + pieces)
    num_pages = 2400
    scratch = 0
    attns = {
        b: graph_attention.DecodeGraphAttention(
            HQ,
            HK,
            D,
            page_size,
            torch.float32,
            "cpu",
            b,
            3,
            num_pages,
            scratch,
            torch.empty(0),
            max_pages_per_seq=2200,
            shared_pieces=pieces,
            short_last_tokens=short,
        )  # fmt: skip
        for b in (8, 48)
    }
    kinds = set()
    steps = [(5, 1), (8, 2), (37, 4), (48, 3), (33, 2), (41, 1), (6, 4), (3, 3), (44, 4)]
    steps += [(6, 1, True), (7, 2, True), (40, 1, True)]  # long shared prefixes
    seen_shared = set()
    for step, (n, max_levels, *long) in enumerate(steps):
        views, slots = _decode_step(rng, n, page_size, num_pages, long=bool(long))
        meta = _metadata(views, slots, page_size, max_levels)
        seen_shared.add(len(meta.levels) - 1)
        attn = attns[8 if n <= 8 else 48]
        b = attn.batch_size
        layout = attn.layout(meta)
        assert layout is not None
        attn.plan(layout)
        attn.set_slots(meta.slot_mapping, n)
        assert attn.num_shared == len(meta.levels) - 1
        last = meta.levels[-1]  # what is left of each sequence after its shared levels
        pages = (last.kv_indptr[1:] - last.kv_indptr[:-1]).tolist()
        longest = max((p - 1) * page_size + int(n) for p, n in zip(pages, last.kv_last_page_len))
        assert attn.short == (short is not None and longest <= short)
        kinds.add(attn.short)
        g = torch.Generator().manual_seed(step)
        q = torch.randn(b, HQ, D, generator=g)
        k = torch.randn(b, HK, D, generator=g)
        v = torch.randn(b, HK, D, generator=g)
        k_cache, v_cache = _caches(num_pages, page_size, step)
        k_ref, v_ref = k_cache.clone(), v_cache.clone()
        out = attn.forward(q, k, v, k_cache, v_cache)
        ref = TorchAttention(HQ, HK, D)
        ref.plan(meta)
        want = ref.forward(q[:n], k[:n], v[:n], k_ref, v_ref)
        err = (out[:n] - want).abs()
        assert err.max() < 1e-4, f"step {step}: max err {err.max():.3g}, mean {err.mean():.3g}"
        assert torch.isfinite(out[n:]).all(), "padded rows read the scratch page"
        # the real rows' K/V went where the reference put them; padding only to the scratch
        assert torch.equal(k_cache[1:], k_ref[1:]) and torch.equal(v_cache[1:], v_ref[1:])
        if n < b:
            assert torch.equal(k_cache[scratch, 0, :, :], k[b - 1])
    assert seen_shared == {0, 1, 2, 3}
    assert kinds == ({False} if short is None else {True, False})


@pytest.mark.parametrize("page_size,pieces,short_rows", [(1, 1, None), (4, 3, None), (4, 1, 70)])
def test_fused_rope_equals_rope_then_forward(graph_attention, page_size, pieces, short_rows):
    """`rope_and_attend` (RoPE, the parts' query copies and the KV append in one pass) on
    rows not rotated yet gives what the model's own RoPE followed by `forward` gives: the
    same output and the same cache, for steps with 0-3 shared levels; q, k and v (views of
    one projection, as in the model) are left as they were. With `short_rows` the short
    last level is planned for more rows than the bucket's 48 (the rest read scratch)."""
    from cascade_rag.attention.rope_append import rope_append_reference
    from cascade_rag.models.llama import TorchKernels

    rng = random.Random(7 + pieces)
    num_pages, b = 600, 48
    kw = dict(max_pages_per_seq=500, shared_pieces=pieces, short_last_tokens=40)
    fused = graph_attention.DecodeGraphAttention(
        HQ, HK, D, page_size, torch.float32, "cpu", b, 3, num_pages, 0, torch.empty(0),
        fused_rope=True, short_last_rows=short_rows, **kw,
    )  # fmt: skip
    plain = graph_attention.DecodeGraphAttention(
        HQ, HK, D, page_size, torch.float32, "cpu", b, 3, num_pages, 0, torch.empty(0), **kw
    )  # fmt: skip
    assert plain.rope_and_attend is None, "no fused RoPE unless asked"
    inv_freq = 1.0 / 10000 ** (torch.arange(0, D, 2).float() / D)
    angles = torch.arange(900).float()[:, None] * inv_freq
    cos_sin = torch.cat([angles.cos(), angles.sin()], dim=-1)  # [positions, D]
    seen = set()
    for step, (n, max_levels) in enumerate([(37, 1), (48, 2), (20, 4), (45, 3)]):
        views, slots = _decode_step(rng, n, page_size, num_pages)
        meta = _metadata(views, slots, page_size, max_levels)
        seen.add(len(meta.levels) - 1)
        for attn in (fused, plain):
            attn.plan(meta)
        g = torch.Generator().manual_seed(step)
        qkv = torch.randn(b, HQ + 2 * HK, D, generator=g)
        q, k, v = qkv[:, :HQ], qkv[:, HQ : HQ + HK], qkv[:, HQ + HK :]
        positions = torch.randint(0, 900, (b,), generator=g)
        k_cache, v_cache = _caches(num_pages, page_size, step)
        k_ref, v_ref = k_cache.clone(), v_cache.clone()
        before = qkv.clone()
        out = fused.rope_and_attend(positions, cos_sin, q, k, v, k_cache, v_cache).clone()
        assert torch.equal(qkv, before), "the fused op rotated its inputs in place"
        q2, k2 = q.clone(), k.clone()
        TorchKernels().rope_(positions, q2, k2, cos_sin)
        want = plain.forward(q2, k2, v, k_ref, v_ref)
        assert torch.equal(out[:n], want[:n]), f"step {step}"
        assert torch.equal(k_cache, k_ref) and torch.equal(v_cache, v_ref), f"step {step}"
    assert seen == {0, 1, 2, 3}
    assert fused._decodes[True]._fixed == (short_rows or b)  # the stand-in's fixed batch
    # the reference writes every copy of the rotated rows
    q_out = torch.zeros(3 * 4, HQ, D)
    kc, vc = torch.zeros(2, 4, HK, D), torch.zeros(2, 4, HK, D)
    q, k, v = (torch.randn(4, h, D) for h in (HQ, HK, HK))
    rope_append_reference(q, k, v, torch.arange(4), cos_sin, q_out, 3, kc, vc, torch.arange(4))
    assert torch.equal(q_out[:4], q_out[4:8]) and torch.equal(q_out[:4], q_out[8:])
    assert torch.equal(vc.view(-1, HK, D)[:4], v) and torch.equal(q_out[0, :, 0], q[0, :, 0])


@pytest.mark.parametrize("padded,split,want", [(100, 1, 100), (264, 1, 48), (100, 0, 48)])
def test_short_last_rows_come_from_the_planner(graph_attention, monkeypatch, padded, split, want):
    """With fused RoPE the short last level is planned for the rows FlashInfer's split plan
    pads to (its grid size / KV heads), read back from a probe plan, unless that is over
    2.5x the bucket or the plan does not split; the stand-in plays the plan's info."""
    info = [padded, 0, 0, 0, 0, 0, 0, 0, 1, split]
    cls = graph_attention.flashinfer.BatchDecodeWithPagedKVCacheWrapper
    monkeypatch.setattr(cls, "_plan_info", info, raising=False)
    attn = graph_attention.DecodeGraphAttention(
        HQ, HK, D, 4, torch.float32, "cpu", 48, 1, 300, 0, torch.empty(0), fused_rope=True
    )  # fmt: skip
    assert attn._decodes[True]._fixed == want and attn._decodes[False]._fixed == 48


@pytest.mark.parametrize("short", [64, None])
def test_last_level_plan_is_kept_while_page_counts_stay(graph_attention, short):
    """The CUDA-core last level (short) is planned again only when a step's page counts
    differ from its last plan; the steps between (longer last pages; the same page ids
    handed again as the same tensor; other page ids with the same counts) copy what moved
    into the buffers and match the PyTorch backend. The tensor-core level (long) is planned
    every step (its plan reads the lengths too). The stand-in wrappers fail a run whose
    buffers no longer hold what they were planned for."""
    from cascade_rag.attention.metadata import CascadeLevel

    page_size, num_pages, n = 4, 400, 6
    attn = graph_attention.DecodeGraphAttention(
        HQ, HK, D, page_size, torch.float32, "cpu", 8, 1, num_pages, 0, torch.empty(0),
        short_last_tokens=short,
    )  # fmt: skip
    rng = random.Random(5)
    free = iter(rng.sample(range(1, num_pages), num_pages - 1))
    tables = [[next(free)] for _ in range(n)]
    kv_len = 1
    kept_indices = None
    for step in range(12):
        if step == 6:  # other sequences with the same page counts (kv_len 7: 2 pages each)
            tables = [[next(free) for _ in t] for t in tables]
        views = [SeqView(t, kv_len, 1) for t in tables]
        pos = kv_len - 1
        slots = [t[pos // page_size] * page_size + pos % page_size for t in tables]
        meta = _metadata(views, slots, page_size, 1)
        if step == 7:  # the same page ids as the same tensor (what BatchLayout hands then)
            last = meta.levels[-1]
            meta.levels[-1] = CascadeLevel(
                last.qo_indptr, last.kv_indptr, kept_indices, last.kv_last_page_len, True
            )
        kept_indices = meta.levels[-1].kv_indices
        layout = attn.layout(meta)
        assert layout.short == (short is not None)
        attn.plan(layout)
        attn.set_slots(meta.slot_mapping, n)
        g = torch.Generator().manual_seed(step)
        q, k, v = (torch.randn(8, h, D, generator=g) for h in (HQ, HK, HK))
        k_cache, v_cache = _caches(num_pages, page_size, step)
        k_ref, v_ref = k_cache.clone(), v_cache.clone()
        out = attn.forward(q, k, v, k_cache, v_cache)
        ref = TorchAttention(HQ, HK, D)
        ref.plan(meta)
        want = ref.forward(q[:n], k[:n], v[:n], k_ref, v_ref)
        assert (out[:n] - want).abs().max() < 1e-4, f"step {step}"
        kv_len += 1
        if kv_len % page_size == 1:  # the new position opens a page
            for t in tables:
                t.append(next(free))
    # kv_len 1..12: 1, 2 and 3 pages per sequence
    assert attn.num_decode_plans == (3 if short is not None else 12)
    assert attn.num_plans == 12


def test_piece_bounds_cover_every_page_once(graph_attention):
    bounds = graph_attention.piece_bounds(np.array([0, 1, 3, 7, 512]), 4)
    assert (bounds[:, 0] == 0).all() and (bounds[:, -1] == [0, 1, 3, 7, 512]).all()
    assert (np.diff(bounds, axis=1) >= 0).all()
    assert np.diff(bounds[-1]).tolist() == [128] * 4
    pieces = graph_attention.default_shared_pieces
    assert pieces(128, 4, 8, 132) == 4 and pieces(256, 4, 8, 132) == 2
    assert pieces(32, 4, 8, 132) == 1  # would need 16 parts: FlashInfer's own split
    assert pieces(1024, 4, 8, 132) == 1


def test_steps_that_do_not_fit_are_refused(graph_attention):
    rng = random.Random(7)
    page_size, num_pages = 4, 600
    attn = graph_attention.DecodeGraphAttention(
        HQ, HK, D, page_size, torch.float32, "cpu", 32, 1, num_pages, 0, torch.empty(0)
    )
    views, slots = _decode_step(rng, 20, page_size, num_pages)
    meta = _metadata(views, slots, page_size, 2)
    assert attn.layout(meta) is not None
    too_many_levels = _metadata(views, slots, page_size, 4)
    assert len(too_many_levels.levels) > 2 and attn.layout(too_many_levels) is None
    copies = AttentionMetadata(
        page_size, meta.slot_mapping, torch.tensor([5]), torch.tensor([9]), meta.levels
    )
    assert attn.layout(copies) is None
    deltas = AttentionMetadata(
        page_size, meta.slot_mapping, meta.copy_src, meta.copy_dst, meta.levels,
        k_rope_delta=torch.zeros(20, dtype=torch.int64), rope_inv_freq=torch.ones(D // 2),
    )  # fmt: skip
    assert attn.layout(deltas) is None
    big_views, big_slots = _decode_step(rng, 33, page_size, num_pages)
    assert attn.layout(_metadata(big_views, big_slots, page_size, 2)) is None  # > 32 rows
    # a prefill row: two query rows in one entry
    prefill = [SeqView(list(range(1, 4)), 10, 2)]
    levels = plan_levels(prefill, page_size, 1)
    meta2 = AttentionMetadata(page_size, torch.tensor([8, 9]), meta.copy_src, meta.copy_dst, levels)
    assert attn.layout(meta2) is None
    # pairs of sequences with a prefix page of their own: one shared entry per pair
    cap = attn.max_shared_entries  # 16 for 32 rows, group size 4
    free = iter(range(1, num_pages))
    pairs = []
    for _pair in range(16):
        prefix = [next(free)]
        pairs += [SeqView(prefix + [next(free)], page_size + 1, 1) for _ in range(2)]
    for n, fits in ((30, True), (31, False)):  # 15 entries + padding; 16 + padding
        views = pairs[:n]
        meta = _metadata(views, [v.page_table[-1] * page_size for v in views], page_size, 2)
        assert meta.levels[0].num_entries == -(-n // 2) == cap - fits
        assert (attn.layout(meta) is not None) == fits


class _ReplayAgain:
    """CUDA graph stand-in: capture records the function, replay runs it again (so it reads
    the static buffers as they are at replay time, like a graph)."""

    def __init__(self, pool) -> None:
        self.fn = None

    def capture(self, fn) -> None:
        fn()  # the warm-up run of CudaGraph.capture
        self.fn = fn

    def replay(self) -> None:
        self.fn()


def _graph_runner(module, engine, max_batch, **options):
    core = engine._core
    runner = core.runner
    mc = engine.model_config
    pool = runner.pool
    levels = engine.config.levels

    def make_attention(batch_size, scratch_page):
        return module.DecodeGraphAttention(
            mc.num_qo_heads, mc.num_kv_heads, mc.head_dim, pool.page_size, torch.float32,
            "cpu", batch_size, levels - 1, pool.num_pages, scratch_page, torch.empty(0),
            **options,
        )  # fmt: skip

    return DecodeGraphRunner(
        runner.model, pool, make_attention, max_batch, levels - 1, graph_factory=_ReplayAgain
    )


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    from cascade_rag.testing import byte_bpe_tokenizer, save_random_llama

    return save_random_llama(
        tmp_path_factory.mktemp("llama"),
        tokenizer=byte_bpe_tokenizer(300),
        dtype=torch.float32,
        lm_head_scale=30.0,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=HQ,
        num_key_value_heads=HK,
        head_dim=D,
        max_position_embeddings=1024,
    )


@pytest.mark.parametrize("cascade,pieces", [(False, 1), (True, 1), (True, 3)])
def test_replayed_steps_equal_the_eager_engine(graph_attention, llama_dir, cascade, pieces):
    """Engine steps on the CPU: every step is run eagerly (PyTorch backend) and, from the same
    cache state, through the graph runner; logits agree and decode steps replay (13
    sequences: padded to 16; chunks that end inside pages: boundary copies at admission).
    With pieces > 1 shared keys are cut into parts and short last levels run the short-level
    wrapper."""
    from cascade_rag.chunks import ChunkType
    from cascade_rag.engine.sequence import PreparedPrompt
    from cascade_rag.llm import CascadeEngine
    from cascade_rag.sampling import SamplingParams

    rng = random.Random(3)
    kw = dict(cascade_min_shared_tokens=0, max_cascade_levels=3) if cascade else {}
    with CascadeEngine(str(llama_dir), kv_cache_tokens=4096, page_size=4, **kw) as engine:
        vocab = engine.model_config.vocab_size
        system = engine.register_token_chunk([rng.randrange(1, vocab) for _ in range(13)],
                                             ChunkType.SYSTEM_PROMPT)  # fmt: skip
        docs = [engine.register_token_chunk([rng.randrange(1, vocab) for _ in range(n)])
                for n in (9, 14, 6)]  # fmt: skip
        core = engine._core
        options = dict(shared_pieces=pieces, short_last_tokens=64 if pieces > 1 else None)
        graphs = _graph_runner(graph_attention, engine, 16, **options)
        for i in range(13):
            picked = [docs[i % 3]] + ([docs[(i + 1) % 3]] if i % 2 else [])
            query = tuple(rng.randrange(1, vocab) for _ in range(3 + i % 4))
            prompt = PreparedPrompt((system, *picked), query)
            core.add_request(prompt, SamplingParams(max_tokens=8), 8, False)
        runner = core.runner
        caches = runner.pool.kv_caches
        replayed = 0
        for step in range(6):
            plan = core.scheduler.schedule()
            batch = plan.scheduled
            saved = [(k.clone(), v.clone()) for k, v in caches]
            eager = runner.run(batch)
            after_eager = [(k.clone(), v.clone()) for k, v in caches]
            for (k, v), (k0, v0) in zip(caches, saved):
                k.copy_(k0)
                v.copy_(v0)
            before = graphs.num_replays
            got = run_with_graphs(runner, graphs, batch)
            replayed += graphs.num_replays - before
            err = (got - eager).abs().max() / eager.abs().max()  # batch 16 vs 13: rounding
            assert err < 1e-4, f"step {step}: relative max err {err:.3g}"
            scratch = graphs.scratch_page
            for (k, v), (ke, ve) in zip(caches, after_eager):
                k[scratch], v[scratch] = ke[scratch], ve[scratch]
                kv_err = max((k - ke).abs().max(), (v - ve).abs().max())
                assert kv_err < 1e-5, f"step {step}: KV differs by {kv_err:.3g}"
            core.scheduler.finish_step(plan, failed=False)
            for row, entry in enumerate(batch):
                entry.seq.token_ids.append(int(eager[row].argmax()))
        assert replayed == 5, "every step after the prefill replays"
        if cascade:
            assert any(key[1] > 0 for key in graphs._graphs), "no graph with shared levels"
            assert any(key[2] for key in graphs._graphs) == (pieces > 1)
            attn = graphs._attention[16]
            # the runner hands the same shared levels while the batch does not change: each
            # shared wrapper is planned once after its capture, not every step
            assert attn.num_shared_plans < attn.num_plans


def test_graphs_are_off_on_the_cpu(caplog):
    from types import SimpleNamespace

    from cascade_rag.config import EngineConfig

    runner = SimpleNamespace(attn=TorchAttention(HQ, HK, D))
    with caplog.at_level(logging.INFO, logger="cascade_rag.engine.cuda_graph"):
        assert make_decode_graphs(EngineConfig(), runner) is None
    assert "cuda_graphs=True is ignored" in caplog.text and "not CUDA" in caplog.text
    caplog.clear()
    assert make_decode_graphs(EngineConfig(cuda_graphs=False), runner) is None
    assert caplog.text == ""


def test_config_fields():
    from cascade_rag.config import EngineConfig

    assert EngineConfig().cuda_graphs is True
    assert EngineConfig(cuda_graph_max_batch=48).cuda_graph_max_batch == 48
    with pytest.raises(TypeError, match="cuda_graphs"):
        EngineConfig(cuda_graphs="yes")
    with pytest.raises(ValueError, match="cuda_graph_max_batch"):
        EngineConfig(cuda_graph_max_batch=0)
    with pytest.raises(ValueError, match="cuda_graph_capture"):
        EngineConfig(cuda_graph_capture="eager")
    config = EngineConfig(cuda_graph_shared_pieces=4, cuda_graph_short_last_tokens=None)
    assert (config.cuda_graph_shared_pieces, config.cuda_graph_short_last_tokens) == (4, None)
    assert EngineConfig().cuda_graph_short_last_tokens == 512
    assert EngineConfig().cuda_graph_fused_rope is False
    with pytest.raises(TypeError, match="cuda_graph_fused_rope"):
        EngineConfig(cuda_graph_fused_rope=1)
    with pytest.raises(ValueError, match="cuda_graph_shared_pieces"):
        EngineConfig(cuda_graph_shared_pieces=0)
    with pytest.raises(TypeError, match="cuda_graph_short_last_tokens"):
        EngineConfig(cuda_graph_short_last_tokens="512")
