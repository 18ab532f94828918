"""The block table and the step layout built from it.

- `BlockTable` against a dict of lists (the slow reference) under random assign / append /
  release sequences that also grow the table; with a separate mirror, the mirror equals the host
  table after every `sync_to_device` (the dirty-entry copies, checked on the CPU).
- `expand_spans` against a per-span numpy gather.
- `BatchLayout` on scheduler traces: the cascade structure is re-planned only when the set of
  sequences changes (admission, finish, preemption), decode steps in between reuse the shared
  levels as they are, and every step's inputs equal the slow reference path's.
- The FlashInfer backend (eager) over those steps, with FlashInfer replaced by the PyTorch
  stand-in (tests/flashinfer_stand_in.py): same output as `TorchAttention`, and a shared level
  that did not change is not planned again.
"""

from __future__ import annotations

import importlib
import random
import sys

import numpy as np
import pytest
import torch
from flashinfer_stand_in import stand_in_module
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cascade_rag.attention.torch_backend import TorchAttention
from cascade_rag.chunks import ChunkRegistry
from cascade_rag.engine.batch_layout import expand_spans
from cascade_rag.engine.block_table import BlockTable
from cascade_rag.engine.kv_cache import ChunkKVCache, PagePool
from cascade_rag.engine.model_runner import ModelRunner
from cascade_rag.engine.scheduler import Scheduler
from cascade_rag.engine.sequence import PreparedPrompt, Sequence
from cascade_rag.sampling import SamplingParams

NAMESPACE = "fake-model|fake-tokenizer"


# ---- BlockTable ---------------------------------------------------------------------------


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(0, 2**16), st.booleans())
def test_block_table_matches_lists_and_its_mirror(seed, mirror):
    rng = random.Random(seed)
    table = BlockTable(page_size=4, device="cpu", num_rows=2, num_cols=3, mirror=mirror)
    rows: dict[int, list[int]] = {}  # the reference: row -> pages
    generations: set[int] = set()
    for _ in range(60):
        op = rng.random()
        if op < 0.3 or not rows:
            runs, end = [], 0
            for _ in range(rng.randint(0, 3)):  # overlapping runs: the later one wins
                first = rng.randint(max(0, end - 1), end)
                pages = [rng.randrange(10_000) for _ in range(rng.randint(0, 5))]
                runs.append((first, pages))
                end = max(end, first + len(pages))
            want: list[int] = []
            for first, pages in runs:
                want[first : first + len(pages)] = pages
            row = table.assign(runs, kv_len=rng.randint(1, 99), chain_end=rng.randint(0, 99))
            assert row not in rows, "a row handed out twice"
            rows[row] = want
            assert table.generation[row] > max(generations, default=0), "a fresh generation"
            generations.add(int(table.generation[row]))
        elif op < 0.8:
            row = rng.choice(list(rows))
            pages = [rng.randrange(10_000) for _ in range(rng.randint(1, 4))]
            table.append(row, pages)
            rows[row] += pages
        else:
            row = rng.choice(list(rows))
            table.release(row)
            del rows[row]
        if rng.random() < 0.5:
            table.sync_to_device()
            for row, pages in rows.items():
                assert table.dev[row, : len(pages)].tolist() == pages, "mirror out of date"
        for row, pages in rows.items():
            assert table.pages(row) == pages
            assert table.num_pages[row] == len(pages)
        assert table.num_used == len(rows)


def test_release_twice_is_caught():
    table = BlockTable(page_size=4, device="cpu")
    row = table.assign([(0, [1, 2])], kv_len=5, chain_end=0)
    table.release(row)
    with pytest.raises(AssertionError):
        table.release(row)


# ---- expand_spans -------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 2**16))
def test_expand_spans_gathers_the_spans(seed):
    rng = np.random.default_rng(seed)
    num_rows, num_cols = int(rng.integers(1, 6)), int(rng.integers(1, 9))
    table = torch.from_numpy(rng.integers(0, 1000, (num_rows, num_cols)).astype(np.int32))
    spans = []
    for _ in range(int(rng.integers(0, 7))):
        row = int(rng.integers(num_rows))
        start = int(rng.integers(num_cols))
        spans.append((row, start, int(rng.integers(0, num_cols - start + 1))))
    counts = np.array([c for _, _, c in spans], np.int64)
    indptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    bases = np.array([r * num_cols + s for r, s, _ in spans], np.int64) - indptr[:-1]
    got = expand_spans(table, torch.from_numpy(bases), torch.from_numpy(counts), int(indptr[-1]))
    want = [p for r, s, c in spans for p in table[r, s : s + c].tolist()]
    assert got.dtype == torch.int64 and got.tolist() == want


# ---- BatchLayout over scheduler traces ----------------------------------------------------


def _driver(page_size: int, num_pages: int, levels: int, min_shared: int = 0):
    registry = ChunkRegistry(NAMESPACE)
    pool = PagePool(num_pages, page_size, 1, 1, 1)
    sched = Scheduler(ChunkKVCache(pool, registry), 64, max_num_batched_tokens=4096)
    fast = ModelRunner(None, pool, None, levels, min_shared, block_table=sched.block_table)
    ref = ModelRunner(None, pool, None, levels, min_shared)
    return registry, sched, fast, ref


def _same(fast, ref, batch, rows=None) -> None:
    a, b = fast.prepare(batch, rows), ref.prepare(batch)
    assert a.order.tolist() == b.order.tolist()
    assert a.metadata.slot_mapping.tolist() == b.metadata.slot_mapping.tolist()
    assert a.input_ids.tolist() == b.input_ids.tolist()
    assert a.positions.tolist() == b.positions.tolist()
    assert len(a.metadata.levels) == len(b.metadata.levels)
    for x, y in zip(a.metadata.levels, b.metadata.levels):
        assert x.causal == y.causal
        for name in ("qo_indptr", "kv_indptr", "kv_indices", "kv_last_page_len"):
            assert getattr(x, name).tolist() == getattr(y, name).tolist(), name
    return a


@pytest.mark.parametrize("levels", [1, 2, 4])
def test_decode_steps_reuse_the_cascade_structure(levels):
    page_size = 4
    registry, sched, fast, ref = _driver(page_size, 2000, levels)
    rng = random.Random(levels)
    system = registry.register([rng.randrange(1000) for _ in range(13)])
    docs = [registry.register([rng.randrange(1000) for _ in range(n)]) for n in (9, 16, 7)]
    chains = [[system, docs[0]], [system, docs[0]], [system, docs[1]], [system], [docs[2]]]
    seqs = []
    for chain in chains:
        tail = tuple(rng.randrange(1000) for _ in range(3))
        seq = Sequence(prompt=PreparedPrompt(tuple(chain), tail), params=SamplingParams())
        sched.add(seq)
        seqs.append(seq)
    layout = fast.batch_layout
    shared_ids = None
    last_counts, kept = None, 0
    for step in range(12):
        if step == 8:  # one finishes: the next step plans again
            sched.release(seqs[1])
        plan = sched.schedule()
        assert (plan.all_decode_rows is not None) == (step > 0), "decode entries made at once"
        replans, gathers = layout.num_replans, layout.num_page_gathers
        inputs = _same(fast, ref, plan.scheduled, plan.all_decode_rows)
        counts = inputs.metadata.levels[-1].kv_indptr.tolist()
        if layout.num_replans == replans and counts == last_counts:
            # no re-plan and no page opened: the last level's page ids are kept as they were
            assert layout.num_page_gathers == gathers, f"step {step} gathered pages again"
            kept += 1
        last_counts = counts
        if step in (0, 1, 8):  # admission, first decode (query rows change), a finish
            assert layout.num_replans == replans + 1, f"step {step} must re-plan"
            shared_ids = [id(lv) for lv in inputs.metadata.levels[:-1]]
        else:
            assert layout.num_replans == replans, f"decode step {step} re-planned"
            assert [id(lv) for lv in inputs.metadata.levels[:-1]] == shared_ids
        if levels > 1:
            assert len(inputs.metadata.levels) > 1, "the chains share pages"
        sched.finish_step(plan, failed=False)
        for e in plan.scheduled:
            e.seq.token_ids.append(rng.randrange(1000))
    assert kept >= 2, "some decode steps open no page"


# ---- the FlashInfer backend's plan over these steps (stand-in kernels) ---------------------


@pytest.fixture
def flashinfer_backend(monkeypatch):
    """The flashinfer_backend module imported against the FlashInfer stand-in."""
    name = "cascade_rag.attention.flashinfer_backend"
    monkeypatch.setitem(sys.modules, "flashinfer", stand_in_module())
    saved = sys.modules.pop(name, None)
    yield importlib.import_module(name)
    sys.modules.pop(name, None)
    if saved is not None:
        sys.modules[name] = saved


def test_flashinfer_plan_keeps_unchanged_shared_levels(flashinfer_backend):
    hq, hk, d, page_size = 8, 2, 16, 4
    registry = ChunkRegistry(NAMESPACE)
    pool = PagePool(400, page_size, 1, hk, d)
    sched = Scheduler(ChunkKVCache(pool, registry), 16, max_num_batched_tokens=4096)
    runner = ModelRunner(None, pool, None, 3, 0, block_table=sched.block_table)
    fi = flashinfer_backend.FlashInferAttention(hq, hk, d, page_size, torch.float32, "cpu", 3)
    ref = TorchAttention(hq, hk, d)
    rng = random.Random(0)
    gen = torch.Generator().manual_seed(0)
    k_cache, v_cache = pool.kv_caches[0]
    k_cache.normal_(generator=gen)
    v_cache.normal_(generator=gen)
    system = registry.register([rng.randrange(1000) for _ in range(13)])
    docs = [registry.register([rng.randrange(1000) for _ in range(n)]) for n in (9, 16)]
    for chain in ([system, docs[0]], [system, docs[0]], [system, docs[1]], [system], [docs[1]]):
        tail = tuple(rng.randrange(1000) for _ in range(3))
        sched.add(Sequence(prompt=PreparedPrompt(tuple(chain), tail), params=SamplingParams()))
    shared_plans = []
    for step in range(8):
        plan = sched.schedule()
        replans = runner.batch_layout.num_replans
        inputs = runner.prepare(plan.scheduled)
        meta = inputs.metadata
        n = meta.num_tokens
        q = torch.randn(n, hq, d, generator=gen)
        k, v = torch.randn(n, hk, d, generator=gen), torch.randn(n, hk, d, generator=gen)
        caches = (k_cache.clone(), v_cache.clone())
        fi.plan(meta)
        out = fi.forward(q, k, v, *caches)
        ref.plan(meta)
        want = ref.forward(q, k, v, k_cache, v_cache)  # writes this step's K/V for good
        err = (out - want).abs().max()
        assert err < 1e-4, f"step {step}: max err {err:.3g}"
        plans = [w.num_plans for w in fi._prefill[1 : len(meta.levels)]]
        if step > 1:  # decode steps after the first: the same shared levels, not planned again
            assert runner.batch_layout.num_replans == replans
            assert plans == shared_plans[-1], f"step {step}: an unchanged level was re-planned"
        shared_plans.append(plans)
        sched.finish_step(plan, failed=False)
        for e in plan.scheduled:
            e.seq.token_ids.append(rng.randrange(1000))
    assert len(meta.levels) > 1 and fi._decode.num_plans == 7, "decode kernel on decode steps"
