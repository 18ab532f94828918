"""The cascade planner: structure of `plan_levels` and numerics of the planned attention.

Structure, for batches built synthetically (random prefix trees of page runs) and through the
real scheduler: every level tiles the query rows in order; only the last level is causal and
holds one entry per sequence ending at its last key; shared-level entries hold only full pages
that precede every query of the entry, at the same page indices in every sequence of the entry;
per sequence, the keys over all levels are exactly [0, kv_len) once each; max_levels=1 is plain
paged attention; sequences that share a page are grouped.

The block-table planner (`plan_layout`, cached across decode steps by `BatchLayout`) gives
exactly `plan_levels`' levels on random scheduler traces with admissions, finishes, preemptions
and page growth, with min_shared_tokens on and off and max_levels 1..4.

Numerics: `TorchAttention` over the planned levels (and over max_levels=1) against a float64
dense causal reference per sequence, on a NaN-filled cache so any read of an unwritten slot shows;
the engine-step check runs the block-table path the engine runs.
"""

from __future__ import annotations

import random

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from cascade_rag.attention.metadata import AttentionMetadata, CascadeLevel
from cascade_rag.attention.torch_backend import TorchAttention
from cascade_rag.chunks import ChunkRegistry
from cascade_rag.engine.cascade_plan import SeqView, order_for_sharing, plan_levels
from cascade_rag.engine.kv_cache import ChunkKVCache, PagePool
from cascade_rag.engine.model_runner import ModelRunner
from cascade_rag.engine.scheduler import Scheduler
from cascade_rag.engine.sequence import PreparedPrompt, Sequence
from cascade_rag.sampling import SamplingParams

NAMESPACE = "fake-model|fake-tokenizer"
NUM_KV_HEADS, GROUP, HEAD_DIM = 2, 2, 8


@pytest.fixture(autouse=True)
def _one_thread():
    """Shapes here are tiny: intra-op threads only add sync cost."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---- the structural checker ---------------------------------------------------------------


def entries(level: CascadeLevel):
    """(qo_start, qo_end, pages, last_page_len) per entry."""
    qo, kv = level.qo_indptr.tolist(), level.kv_indptr.tolist()
    idx, last = level.kv_indices.tolist(), level.kv_last_page_len.tolist()
    return [(qo[e], qo[e + 1], idx[kv[e] : kv[e + 1]], last[e]) for e in range(len(last))]


def check_levels(
    views: list[SeqView],
    levels: list[CascadeLevel],
    page_size: int,
    max_levels: int,
    min_shared_tokens: int = 0,
) -> None:
    offsets = [0]
    for v in views:
        offsets.append(offsets[-1] + v.qo_len)
    num_rows = offsets[-1]
    assert 1 <= len(levels) <= max_levels
    assert levels[-1].causal and not any(lv.causal for lv in levels[:-1]), "causal: last only"
    keys: list[list[int]] = [[] for _ in views]  # positions each sequence reads, all levels
    for li, level in enumerate(levels):
        qo = level.qo_indptr.tolist()
        kv = level.kv_indptr.tolist()
        assert qo[0] == 0 and qo[-1] == num_rows, f"level {li} does not cover every row"
        assert all(a < b for a, b in zip(qo, qo[1:])), f"level {li}: rows out of order"
        assert kv[0] == 0 and kv[-1] == level.kv_indices.numel()
        assert all(a <= b for a, b in zip(kv, kv[1:]))
        if not level.causal:
            assert level.kv_indices.numel() > 0, f"shared level {li} has no keys: drop it"
        for q_lo, q_hi, pages, last in entries(level):
            assert q_lo in offsets and q_hi in offsets, "an entry holds whole sequences"
            members = list(range(offsets.index(q_lo), offsets.index(q_hi)))
            if not pages:
                assert last == 0
                continue
            assert 1 <= last <= page_size
            if level.causal:
                assert len(members) == 1, "the causal level has one entry per sequence"
                (i,) = members
                v = views[i]
                n_keys = (len(pages) - 1) * page_size + last
                first = v.kv_len - n_keys  # bottom-right aligned: ends at the last key
                assert first % page_size == 0
                assert v.page_table[first // page_size :] == pages
                assert first <= v.kv_len - v.qo_len, "the causal level holds all query keys"
                keys[i] += range(first, v.kv_len)
                continue
            assert last == page_size, "shared levels hold full pages only"
            starts = set()
            for i in members:
                v = views[i]
                assert pages[0] in v.page_table, "a shared page the sequence does not have"
                start = v.page_table.index(pages[0])
                assert v.page_table[start : start + len(pages)] == pages, "not shared"
                end = (start + len(pages)) * page_size
                assert end <= v.kv_len - v.qo_len, "a shared key does not precede all queries"
                starts.add(start)
                keys[i] += range(start * page_size, end)
            assert len(starts) == 1, "a shared entry's pages sit at the same page indices"
            saved = (len(members) - 1) * len(pages) * page_size
            assert saved >= min_shared_tokens, f"a shared entry saving {saved} key reads"
    for i, v in enumerate(views):
        assert sorted(keys[i]) == list(range(v.kv_len)), (
            f"sequence {i} reads keys {sorted(keys[i])} over all levels, expected "
            f"[0, {v.kv_len}) once each"
        )


def check_plain(views: list[SeqView], page_size: int) -> None:
    (level,) = plan_levels(views, page_size, max_levels=1)
    assert level.causal and level.num_entries == len(views)
    for v, (q_lo, q_hi, pages, last) in zip(views, entries(level), strict=True):
        assert q_hi - q_lo == v.qo_len and pages == v.page_table
        assert (len(pages) - 1) * page_size + last == v.kv_len


def shareable(v: SeqView, page_size: int) -> list[int]:
    return v.page_table[: v.num_shareable_pages(page_size)]


def check_grouping(views: list[SeqView], levels: list[CascadeLevel], page_size: int) -> None:
    """In sharing order, sequences with the same first shareable page meet in a shared entry
    with pages at level 0."""
    if len(levels) < 2:
        return
    offsets = [0]
    for v in views:
        offsets.append(offsets[-1] + v.qo_len)
    level0 = entries(levels[0])
    for i in range(len(views)):
        for j in range(i + 1, len(views)):
            a, b = shareable(views[i], page_size), shareable(views[j], page_size)
            if not a or not b or a[0] != b[0]:
                continue
            assert any(
                q_lo <= offsets[i] and offsets[j + 1] <= q_hi and pages and pages[0] == a[0]
                for q_lo, q_hi, pages, _ in level0
            ), f"sequences {i} and {j} share page {a[0]} but no shared entry covers both"


def check_all(
    views: list[SeqView], page_size: int, max_levels: int, min_shared_tokens: int = 0
) -> None:
    order = order_for_sharing(views, page_size)
    assert sorted(order) == list(range(len(views)))
    ordered = [views[i] for i in order]
    keys = [tuple(shareable(v, page_size)) for v in ordered]
    assert keys == sorted(keys), "sharing order sorts by shareable pages"
    for batch in (views, ordered):  # any order is correct; sharing order also groups
        levels = plan_levels(batch, page_size, max_levels, min_shared_tokens=min_shared_tokens)
        check_levels(batch, levels, page_size, max_levels, min_shared_tokens)
    check_grouping(ordered, plan_levels(ordered, page_size, max_levels), page_size)
    check_plain(views, page_size)


# ---- synthetic batches ----------------------------------------------------------------------


@st.composite
def batches(draw, max_pages: int = 128):
    """SeqViews over a random tree of shared full-page runs, each with private pages."""
    page_size = draw(st.sampled_from([1, 2, 4, 16]))
    free = list(range(max_pages))
    random.Random(draw(st.integers(0, 2**16))).shuffle(free)

    def fresh(n: int) -> list[int]:
        return [free.pop() for _ in range(n)]

    families: list[list[int]] = [[]]
    for _ in range(draw(st.integers(0, 5))):
        base = draw(st.sampled_from(families))
        families.append(base + fresh(draw(st.integers(1, 3))))
    views = []
    for _ in range(draw(st.integers(1, 8))):
        prefix = draw(st.sampled_from(families))
        own = draw(st.integers(1, 2 * page_size + 2))  # tokens after the shared prefix
        kv_len = len(prefix) * page_size + own
        qo_len = draw(st.integers(1, kv_len))  # may reach back into shared pages
        views.append(SeqView(prefix + fresh(-(-own // page_size)), kv_len, qo_len))
    return page_size, views


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batches(), st.integers(1, 5), st.sampled_from([0, 0, 1, 8, 40]))
def test_synthetic_batches_plan_valid_levels(batch, max_levels, min_shared_tokens):
    page_size, views = batch
    check_all(views, page_size, max_levels, min_shared_tokens)


def test_min_shared_tokens_turns_cascade_off_where_it_does_not_pay():
    size = 4
    views = [SeqView([10, 11, 12, 30], 15, 1), SeqView([10, 11, 12, 31], 14, 1)]
    views += [SeqView([10, 11, 32], 10, 1)]
    # (3 - 1) * 2 pages * 4 = 16 key reads saved by [10, 11]; (2 - 1) * 1 * 4 = 4 by [12]
    for m, shared in [(0, [[10, 11], [12]]), (5, [[10, 11]]), (16, [[10, 11]]), (17, [])]:
        levels = plan_levels(views, size, max_levels=3, min_shared_tokens=m)
        check_levels(views, levels, size, 3, m)
        got = [pages for lv in levels[:-1] for _, _, pages, _ in entries(lv) if pages]
        assert got == shared, f"min_shared_tokens={m}"
    (plain,) = plan_levels(views, size, max_levels=3, min_shared_tokens=10**6)
    (ref,) = plan_levels(views, size, max_levels=1)
    for a, b in zip(entries(plain), entries(ref), strict=True):
        assert a == b, "no sharing that pays: one plain level"


def test_shared_prefix_is_read_once_per_group():
    size = 4
    # two families: pages 10, 11 then 12 | 13; and page 20
    views = [
        SeqView([10, 11, 12, 30], 15, 1),
        SeqView([20, 31], 6, 2),
        SeqView([10, 11, 13, 32], 16, 3),
        SeqView([10, 11, 12, 33], 14, 2),
        SeqView([20, 34], 5, 1),
        SeqView([35], 3, 3),
    ]
    order = order_for_sharing(views, size)
    ordered = [views[i] for i in order]
    levels = plan_levels(ordered, size, max_levels=3)
    check_levels(ordered, levels, size, 3)
    check_grouping(ordered, levels, size)
    shared = [pages for lv in levels[:-1] for _, _, pages, _ in entries(lv) if pages]
    assert sorted(map(tuple, shared)) == [(10, 11), (12,), (20,)]
    # with two levels the second split (12 vs 13) goes to the causal level
    levels = plan_levels(ordered, size, max_levels=2)
    check_levels(ordered, levels, size, 2)
    shared = [pages for _, _, pages, _ in entries(levels[0]) if pages]
    assert sorted(map(tuple, shared)) == [(10, 11), (20,)]


def test_partial_and_query_pages_never_shared():
    size = 4
    # same pages, but the second sequence's queries start inside page 11: only page 10 shares
    views = [SeqView([10, 11, 12], 12, 1), SeqView([10, 11, 13], 10, 5)]
    levels = plan_levels(views, size, max_levels=3)
    check_levels(views, levels, size, 3)
    assert [pages for _, _, pages, _ in entries(levels[0])] == [[10]]


def test_empty_batch_plans_empty_levels():
    levels = plan_levels([], 4, max_levels=3)
    assert all(lv.num_entries == 0 for lv in levels) and levels[-1].causal


# ---- batches through the scheduler ----------------------------------------------------------


class SchedulerBatches:
    """Drives the real scheduler (no model) and yields each step's ScheduledSeqs."""

    def __init__(self, page_size: int, num_pages: int, max_num_seqs: int = 16) -> None:
        self.registry = ChunkRegistry(NAMESPACE)
        self.pool = PagePool(num_pages, page_size, 1, NUM_KV_HEADS, HEAD_DIM)
        self.kv = ChunkKVCache(self.pool, self.registry)
        self.sched = Scheduler(self.kv, max_num_seqs, max_num_batched_tokens=4096)
        self.page_size = page_size
        self.block_table = self.sched.block_table

    def prompts(self, lengths: list[int], n: int, seed: int) -> list[PreparedPrompt]:
        rng = random.Random(seed)
        chunks = [self.registry.register([rng.randrange(1000) for _ in range(k)]) for k in lengths]
        system, docs = chunks[0], chunks[1:]
        out = []
        for _ in range(n):
            chain = ([system] if rng.random() < 0.8 else []) + rng.sample(
                docs, rng.randint(0, min(3, len(docs)))
            )
            tail = tuple(rng.randrange(1000) for _ in range(rng.randint(1, 4)))
            out.append(PreparedPrompt(tuple(chain), tail))
        return out

    def steps(self, prompts: list[PreparedPrompt], max_tokens: int, arrivals_per_step: int):
        pending = list(prompts)
        while pending or self.sched.has_work():
            for _ in range(arrivals_per_step):
                if pending:
                    self.sched.add(
                        Sequence(
                            prompt=pending.pop(0), params=SamplingParams(max_tokens=max_tokens)
                        )
                    )
            plan = self.sched.schedule()
            assert not plan.failed and plan.scheduled
            yield plan.scheduled
            self.sched.finish_step(plan, failed=False)
            for e in plan.scheduled:
                e.seq.token_ids.append(hash(tuple(e.seq.token_ids)) % 1000)
                if e.seq.num_generated >= max_tokens:
                    self.sched.release(e.seq)


@pytest.mark.parametrize("page_size", [1, 3, 16])
@pytest.mark.parametrize("seed", [0, 1])
def test_scheduler_batches_plan_valid_levels(page_size, seed):
    driver = SchedulerBatches(page_size, num_pages=4000 // page_size)
    lengths = [13, 5, 16, 2, 21, 9, 33]
    prompts = driver.prompts(lengths, n=12, seed=seed)
    grouped = 0
    for batch in driver.steps(prompts, max_tokens=4, arrivals_per_step=3):
        views = [SeqView(e.seq.page_table(page_size), e.kv_len, e.qo_len) for e in batch]
        for max_levels in (1, 2, 4):
            check_all(views, page_size, max_levels)
        levels = plan_levels([views[i] for i in order_for_sharing(views, page_size)], page_size, 4)
        grouped += sum(1 for _, _, pages, _ in entries(levels[0]) if pages)
    assert grouped > 0, "the workload shares pages"


# ---- the block-table planner against plan_levels ------------------------------------------


def level_fields(levels: list[CascadeLevel]) -> list[tuple]:
    return [
        (
            lv.causal,
            lv.qo_indptr.tolist(),
            lv.kv_indptr.tolist(),
            lv.kv_indices.tolist(),
            lv.kv_last_page_len.tolist(),
        )
        for lv in levels
    ]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.sampled_from([1, 2, 3, 16]),
    st.integers(1, 4),
    st.sampled_from([0, 0, 4, 64]),
    st.integers(0, 2**16),
)
def test_cached_layout_gives_the_levels_of_plan_levels(page_size, max_levels, min_shared, seed):
    """Random traces: arrivals, finishes at random lengths, a pool small enough to preempt and
    evict; each step's levels from the block table equal plan_levels' over the page tables."""
    rng = random.Random(seed)
    driver = SchedulerBatches(page_size, num_pages=rng.randint(60, 400) // page_size + 12)
    fast = ModelRunner(None, driver.pool, None, max_levels, min_shared, driver.block_table)
    sched = driver.sched
    prompts = driver.prompts([13, 5, 16, 2, 21, 9, 33], n=16, seed=seed)
    pending = list(prompts)
    num_steps = replans = preempted = 0
    while (pending or sched.has_work()) and num_steps < 300:
        for _ in range(rng.choice([0, 0, 1, 2])):
            if pending:
                params = SamplingParams(max_tokens=rng.randint(1, 12))
                sched.add(Sequence(prompt=pending.pop(), params=params))
        plan = sched.schedule()
        preempted += len(plan.preempted)
        num_steps += 1
        for seq, _ in plan.failed:  # outgrew the small pool
            assert seq.block_row == -1 and not seq.nodes
        if not plan.scheduled:
            if sched.waiting and not sched.running:
                sched.waiting.popleft()
            continue
        before = fast.batch_layout.num_replans
        order, metadata = fast.build_metadata(plan.scheduled)
        replans += fast.batch_layout.num_replans - before
        views = [
            SeqView(
                e.seq.page_table(page_size),
                e.kv_len,
                e.qo_len,
                tuple(n.node_id for n in e.seq.nodes),
            )
            for e in plan.scheduled
        ]
        want_order = (
            order_for_sharing(views, page_size) if max_levels > 1 else list(range(len(views)))
        )
        assert order == want_order
        want = plan_levels(
            [views[i] for i in order], page_size, max_levels, min_shared_tokens=min_shared
        )
        assert level_fields(metadata.levels) == level_fields(want), f"step {num_steps}"
        sched.finish_step(plan, failed=False)
        for e in plan.scheduled:
            e.seq.token_ids.append(rng.randrange(1000))
            if e.seq.num_generated >= e.seq.max_tokens:
                sched.release(e.seq)
    event(f"preempted: {preempted > 0}")
    event(f"evicted: {driver.kv.evicted_nodes > 0}")
    event(f"shared levels: {max_levels > 1 and fast.num_cascade_steps > 0}")
    assert replans < num_steps or num_steps < 4, "decode steps reuse the cached structure"


# ---- numerics -------------------------------------------------------------------------------


def reference_attention(q, k, v, scale):
    """Causal attention in float64; the T queries are the last T of the S keys.

    q: [T, Hq, d]; k, v: [S, Hkv, d] -> [T, Hq, d]
    """
    t, s, group = q.shape[0], k.shape[0], q.shape[1] // k.shape[1]
    k = k.double().repeat_interleave(group, dim=1)
    v = v.double().repeat_interleave(group, dim=1)
    scores = torch.einsum("thd,shd->hts", q.double(), k) * scale
    visible = torch.arange(s)[None, :] <= (s - t + torch.arange(t))[:, None]
    probs = scores.masked_fill(~visible, float("-inf")).softmax(-1)
    return torch.einsum("hts,shd->thd", probs, v)


def assert_close(out: torch.Tensor, ref: torch.Tensor, what: str, atol: float = 2e-5) -> None:
    num_bad = int((~torch.isfinite(out)).sum())
    assert num_bad == 0, f"{what}: {num_bad} non-finite outputs (an unwritten slot was read)"
    err = (out.double() - ref).abs()
    assert float(err.max()) <= atol, (
        f"{what}: max abs err {float(err.max()):.3g}, mean {float(err.mean()):.3g}"
    )


def slots_of(v: SeqView, page_size: int, lo: int, hi: int) -> list[int]:
    return [v.page_table[p // page_size] * page_size + p % page_size for p in range(lo, hi)]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batches(max_pages=96), st.integers(2, 4), st.integers(0, 2**16))
def test_planned_attention_matches_dense_reference(batch, max_levels, seed):
    page_size, views = batch
    gen = torch.Generator().manual_seed(seed)
    num_pages = 96
    hq = NUM_KV_HEADS * GROUP
    truth_k = torch.randn(num_pages * page_size, NUM_KV_HEADS, HEAD_DIM, generator=gen)
    truth_v = torch.randn(num_pages * page_size, NUM_KV_HEADS, HEAD_DIM, generator=gen)
    ordered = [views[i] for i in order_for_sharing(views, page_size)]
    num_rows = sum(v.qo_len for v in ordered)
    q = torch.randn(num_rows, hq, HEAD_DIM, generator=gen)
    new_slots = [s for v in ordered for s in slots_of(v, page_size, v.kv_len - v.qo_len, v.kv_len)]
    new_slots_t = torch.tensor(new_slots, dtype=torch.int64)
    attn = TorchAttention(hq, NUM_KV_HEADS, HEAD_DIM)
    outs = {}
    for levels_asked in (1, max_levels):
        # NaN except the keys written before this step; new keys arrive through forward
        k_cache = torch.full((num_pages, page_size, NUM_KV_HEADS, HEAD_DIM), float("nan"))
        v_cache = k_cache.clone()
        for v in ordered:
            old = torch.tensor(slots_of(v, page_size, 0, v.kv_len - v.qo_len), dtype=torch.int64)
            k_cache.view(-1, NUM_KV_HEADS, HEAD_DIM)[old] = truth_k[old]
            v_cache.view(-1, NUM_KV_HEADS, HEAD_DIM)[old] = truth_v[old]
        metadata = AttentionMetadata(
            page_size=page_size,
            slot_mapping=new_slots_t,
            copy_src=torch.zeros(0, dtype=torch.int64),
            copy_dst=torch.zeros(0, dtype=torch.int64),
            levels=plan_levels(ordered, page_size, levels_asked),
        )
        attn.plan(metadata)
        outs[levels_asked] = attn.forward(
            q, truth_k[new_slots_t], truth_v[new_slots_t], k_cache, v_cache
        )
    row = 0
    for i, v in enumerate(ordered):
        keys = torch.tensor(slots_of(v, page_size, 0, v.kv_len), dtype=torch.int64)
        ref = reference_attention(q[row : row + v.qo_len], truth_k[keys], truth_v[keys], attn.scale)
        for levels_asked, out in outs.items():
            assert_close(
                out[row : row + v.qo_len],
                ref,
                f"sequence {i} (kv_len={v.kv_len}, qo_len={v.qo_len}), max_levels={levels_asked}",
            )
        row += v.qo_len


def run_engine_steps(
    page_size: int, lengths: list[int], max_levels: int, seed: int, expect_shared: bool = True
) -> int:
    """The scheduler, the real metadata (with boundary copies) and TorchAttention over a pool
    whose cache persists across steps; each step's output against the dense reference. The K/V
    of position p is a fixed random vector picked by the hash of the tokens [0, p]."""
    driver = SchedulerBatches(page_size, num_pages=2000 // page_size + 64)
    attn = TorchAttention(NUM_KV_HEADS * GROUP, NUM_KV_HEADS, HEAD_DIM)
    runner = ModelRunner(None, driver.pool, attn, max_levels, block_table=driver.block_table)
    runner.min_shared_tokens = 0  # share every page that can be shared
    k_cache, v_cache = driver.pool.kv_caches[0]
    k_cache.fill_(float("nan"))
    v_cache.fill_(float("nan"))
    gen = torch.Generator().manual_seed(seed)
    table_k = torch.randn(4096, NUM_KV_HEADS, HEAD_DIM, generator=gen)
    table_v = torch.randn(4096, NUM_KV_HEADS, HEAD_DIM, generator=gen)

    def kv_rows(ids: list[int]) -> torch.Tensor:
        rows, h = [], 0x5EED
        for t in ids:
            h = hash((h, t))
            rows.append(h % 4096)
        return torch.tensor(rows, dtype=torch.int64)

    prompts = driver.prompts(lengths, n=8, seed=seed)
    num_steps = num_shared = 0
    for batch in driver.steps(prompts, max_tokens=3, arrivals_per_step=4):
        order, metadata = runner.build_metadata(batch)
        ordered = [batch[i] for i in order]
        num_shared += sum(int(lv.kv_indices.numel() > 0) for lv in metadata.levels[:-1])
        q = torch.randn(metadata.num_tokens, attn.num_qo_heads, HEAD_DIM, generator=gen)
        new_rows = torch.cat([kv_rows(e.seq.token_ids)[e.q_start : e.kv_len] for e in ordered])
        attn.plan(metadata)
        out = attn.forward(q, table_k[new_rows], table_v[new_rows], k_cache, v_cache)
        row = 0
        for e in ordered:
            rows = kv_rows(e.seq.token_ids)
            ref = reference_attention(
                q[row : row + e.qo_len], table_k[rows], table_v[rows], attn.scale
            )
            assert_close(
                out[row : row + e.qo_len],
                ref,
                f"step {num_steps}, seq {e.seq.seq_id} (q_start={e.q_start}, kv_len={e.kv_len}, "
                f"copies={len(e.copies)}), max_levels={max_levels}",
            )
            row += e.qo_len
        num_steps += 1
    assert num_steps > 3
    if expect_shared:
        assert (num_shared > 0) == (max_levels > 1), "the workload exercises shared levels"
    return num_steps


@pytest.mark.parametrize("max_levels", [1, 3])
@pytest.mark.parametrize(
    "page_size, lengths",
    [
        (1, [5, 3, 2, 7, 1]),  # page size 1: no boundary pages at all
        (4, [6, 4, 9, 5, 13]),  # chunks >= page size: boundary copies read written slots only
        (7, [10, 7, 8, 15, 9]),
    ],
)
def test_engine_steps_match_dense_reference(page_size, lengths, max_levels):
    run_engine_steps(page_size, lengths, max_levels, seed=page_size)


@pytest.mark.parametrize("max_levels", [1, 3])
def test_engine_steps_with_chunks_inside_one_page_match_dense_reference(max_levels):
    # 18 tokens in all: at most one full page, so shared levels need not appear
    run_engine_steps(16, [5, 3, 2, 7, 1], max_levels, seed=0, expect_shared=False)
