"""TorchAttention against plain causal attention over each sequence's full token sequence.

Each case builds sequences from cascade segments (shared levels, then a per-sequence last
level whose tail is the step's new tokens), scatters the segments into randomly permuted
pages of a NaN-filled cache (so a read of any unwritten slot shows up as NaN), and compares the
backend's output with a float64 reference. Both ways of running a padded batch are checked:
PyTorch's fused CPU attention kernel (the CPU default) and the matmul path (other devices).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cascade_rag.attention import AttentionMetadata, CascadeLevel
from cascade_rag.attention.torch_backend import TorchAttention, _Item, merge_states

HEAD_DIM = 8


@pytest.fixture(autouse=True)
def _one_thread():
    """Shapes here are tiny: intra-op threads only add sync cost (and stall on a busy CPU)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def i64(x: list[int]) -> torch.Tensor:
    return torch.tensor(x, dtype=torch.int64)


def make_level(
    qo_lens: list[int], pages: list[list[int]], kv_lens: list[int], page_size: int, causal: bool
) -> CascadeLevel:
    """A CascadeLevel from per-entry query-row counts, page lists and key counts."""
    qo_indptr, kv_indptr = [0], [0]
    for n, p in zip(qo_lens, pages, strict=True):
        qo_indptr.append(qo_indptr[-1] + n)
        kv_indptr.append(kv_indptr[-1] + len(p))
    last = [n - (len(p) - 1) * page_size if p else 0 for n, p in zip(kv_lens, pages, strict=True)]
    return CascadeLevel(
        qo_indptr=i64(qo_indptr),
        kv_indptr=i64(kv_indptr),
        kv_indices=i64([pg for p in pages for pg in p]),
        kv_last_page_len=i64(last),
        causal=causal,
    )


@dataclass
class Spec:
    """Cascade structure of one step.

    shared: per shared level, (number of sequences, keys) per entry, entries covering the batch
        in order; 0 keys makes an entry with no pages.
    past: per sequence, keys of its last level written in earlier steps.
    qo: per sequence, new tokens (query rows) this step; they end the last level.
    """

    shared: list[list[tuple[int, int]]]
    past: list[int]
    qo: list[int]


@dataclass
class Case:
    metadata: AttentionMetadata
    q: torch.Tensor  # [num_tokens, Hq, d]
    k: torch.Tensor  # [num_tokens, Hkv, d], new tokens
    v: torch.Tensor
    k_cache: torch.Tensor  # [num_pages, page_size, Hkv, d], NaN where nothing was written
    v_cache: torch.Tensor
    expected: torch.Tensor  # [num_tokens, Hq, d] float64


def reference_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float
) -> torch.Tensor:
    """Plain causal attention in float64; the T queries are the last T of the S positions."""
    t, s, group = q.shape[0], k.shape[0], q.shape[1] // k.shape[1]
    k = k.double().repeat_interleave(group, dim=1)  # [S, Hq, d]
    v = v.double().repeat_interleave(group, dim=1)
    scores = torch.einsum("thd,shd->hts", q.double(), k) * scale
    visible = torch.arange(s)[None, :] <= (s - t + torch.arange(t))[:, None]
    probs = scores.masked_fill(~visible, float("-inf")).softmax(-1)
    return torch.einsum("hts,shd->thd", probs, v)


def build_case(
    spec: Spec,
    page_size: int,
    num_kv_heads: int,
    group: int,
    copies: bool = False,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> Case:
    """Random K/V/Q for `spec` in a NaN-filled paged cache, with metadata and reference.

    With `copies`, (1) the first tokens of each last-level page list live on another page and
    must be copied into place (a boundary page), and (2) the new tokens of every other sequence
    are written to staging slots and copied into place, so copies must run after the writes.
    """
    gen = torch.Generator().manual_seed(seed)
    batch, hkv, d = len(spec.qo), num_kv_heads, HEAD_DIM

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).to(dtype)

    def npages(n: int) -> int:
        return -(-n // page_size)

    num_pages = sum(npages(n) for lv in spec.shared for _, n in lv)
    num_pages += sum(npages(p + n) for p, n in zip(spec.past, spec.qo, strict=True))
    num_pages += batch + sum(npages(n) for n in spec.qo)  # boundary sources, staging
    free = torch.randperm(num_pages, generator=gen).tolist()
    k_cache = torch.full((num_pages, page_size, hkv, d), float("nan"), dtype=dtype)
    v_cache = k_cache.clone()
    k_flat, v_flat = k_cache.view(-1, hkv, d), v_cache.view(-1, hkv, d)

    def alloc(n: int) -> tuple[list[int], list[int]]:
        pages = [free.pop() for _ in range(npages(n))]
        return pages, [pg * page_size + o for pg in pages for o in range(page_size)][:n]

    seq_k: list[list[torch.Tensor]] = [[] for _ in range(batch)]
    seq_v: list[list[torch.Tensor]] = [[] for _ in range(batch)]
    levels = []
    for entries in spec.shared:
        first, qo_lens, page_lists, kv_lens = 0, [], [], []
        for num_seqs, n in entries:
            kk, vv = randn(n, hkv, d), randn(n, hkv, d)
            pages, slots = alloc(n)
            k_flat[slots], v_flat[slots] = kk, vv
            for b in range(first, first + num_seqs):
                seq_k[b].append(kk)
                seq_v[b].append(vv)
            qo_lens.append(sum(spec.qo[first : first + num_seqs]))
            page_lists.append(pages)
            kv_lens.append(n)
            first += num_seqs
        assert first == batch
        levels.append(make_level(qo_lens, page_lists, kv_lens, page_size, causal=False))

    slot_mapping, copy_src, copy_dst, page_lists, kv_lens = [], [], [], [], []
    new_k, new_v, qs, expected = [], [], [], []
    hq = hkv * group
    for b, (past, qo) in enumerate(zip(spec.past, spec.qo, strict=True)):
        n = past + qo
        kk, vv = randn(n, hkv, d), randn(n, hkv, d)
        pages, slots = alloc(n)
        stored = list(slots[:past])
        if copies and past:
            src_page = free.pop()
            for i in range(min(past, page_size)):  # boundary page: tokens live elsewhere
                stored[i] = src_page * page_size + slots[i] % page_size
                copy_src.append(stored[i])
                copy_dst.append(slots[i])
        k_flat[stored], v_flat[stored] = kk[:past], vv[:past]
        new_slots = slots[past:]
        if copies and b % 2:  # staged write: copies must run after the new K/V is written
            staging = alloc(qo)[1]
            copy_src += staging
            copy_dst += new_slots
            new_slots = staging
        slot_mapping += new_slots
        new_k.append(kk[past:])
        new_v.append(vv[past:])
        page_lists.append(pages)
        kv_lens.append(n)
        q = randn(qo, hq, d)
        qs.append(q)
        full_k, full_v = torch.cat(seq_k[b] + [kk]), torch.cat(seq_v[b] + [vv])
        expected.append(reference_attention(q, full_k, full_v, 1 / math.sqrt(d)))
    levels.append(make_level(spec.qo, page_lists, kv_lens, page_size, causal=True))
    metadata = AttentionMetadata(
        page_size=page_size,
        slot_mapping=i64(slot_mapping),
        copy_src=i64(copy_src),
        copy_dst=i64(copy_dst),
        levels=levels,
    )
    return Case(
        metadata, torch.cat(qs), torch.cat(new_k), torch.cat(new_v), k_cache, v_cache,
        torch.cat(expected),
    )  # fmt: skip


def run_case(case: Case, attn: TorchAttention) -> torch.Tensor:
    attn.plan(case.metadata)
    return attn.forward(case.q, case.k, case.v, case.k_cache, case.v_cache)


def assert_close(out: torch.Tensor, expected: torch.Tensor, atol: float, what: str = "") -> None:
    assert out.shape == expected.shape, f"{what}: shape {tuple(out.shape)}"
    assert bool(torch.isfinite(out).all()), f"{what}: non-finite output (read an unwritten slot?)"
    err = (out.double() - expected).abs()
    max_err, mean_err = float(err.max()), float(err.mean())
    assert max_err <= atol, f"{what}: max abs err {max_err:.3e}, mean abs err {mean_err:.3e}"


def random_spec(rng: random.Random, num_levels: int, batch: int, decode: bool, ps: int) -> Spec:
    """Lengths up to a few pages that rarely fill one; the first entry of a later shared level
    (group-shared) has no pages."""
    qo = [1] * batch if decode else [rng.randint(1, 6) for _ in range(batch)]
    shared_max = 3 * ps + 2
    if num_levels == 1:
        return Spec([], [rng.randint(0, shared_max) for _ in range(batch)], qo)
    shared = [[(batch, rng.randint(1, shared_max))]]  # one prefix shared by all
    if num_levels == 3:
        sizes, left = [], batch
        while left:
            sizes.append(rng.randint(1, left))
            left -= sizes[-1]
        shared.append(
            [(s, 0 if i == 0 else rng.randint(1, shared_max)) for i, s in enumerate(sizes)]
        )
    return Spec(shared, [rng.randint(0, ps + 2) for _ in range(batch)], qo)


def make_attention(hq: int, hkv: int, fused: bool = True, **kw) -> TorchAttention:
    attn = TorchAttention(hq, hkv, HEAD_DIM, **kw)
    attn.fused = fused
    return attn


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "matmul"])
@pytest.mark.parametrize("group", [1, 3, 4])
@pytest.mark.parametrize("page_size", [1, 4, 16])
@pytest.mark.parametrize("decode", [False, True], ids=["prefill", "decode"])
@pytest.mark.parametrize("num_levels", [1, 2, 3])
def test_matches_reference(
    num_levels: int, decode: bool, page_size: int, group: int, fused: bool
) -> None:
    rng = random.Random(f"{num_levels}-{decode}-{page_size}-{group}")
    for batch in range(1, 9):
        spec = random_spec(rng, num_levels, batch, decode, page_size)
        case = build_case(spec, page_size, 2, group, copies=batch % 2 == 0, seed=batch)
        out = run_case(case, make_attention(2 * group, 2, fused))
        assert_close(out, case.expected, 2e-5, f"batch={batch} {spec}")


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "matmul"])
@pytest.mark.parametrize("max_block_scores", [1, 7, 64])
@pytest.mark.parametrize("block_overhead", [0, 10**9])
def test_row_chunks_and_batching(max_block_scores: int, block_overhead: int, fused: bool) -> None:
    # small blocks cut entries into row chunks (causal chunks read fewer keys); a huge
    # overhead pads everything that fits into one batch
    spec = Spec([[(5, 13)], [(2, 0), (3, 9)]], past=[3, 0, 7, 1, 2], qo=[5, 1, 9, 3, 2])
    case = build_case(spec, page_size=4, num_kv_heads=2, group=3, copies=True)
    attn = make_attention(6, 2, fused)
    attn.max_block_scores, attn.block_overhead = max_block_scores, block_overhead
    assert_close(run_case(case, attn), case.expected, 2e-5)


def _batch_cost(attn: TorchAttention, group: list[_Item]) -> int:
    rows = max(it.num_rows for it in group)
    keys = max(it.kv_len for it in group)
    return attn.block_overhead + len(group) * keys * (rows + attn.key_cost)


def _padded(group: list[_Item]) -> int:
    return len(group) * max(it.num_rows for it in group) * max(it.kv_len for it in group)


def _greedy_groups(attn: TorchAttention, items: list[_Item]) -> list[list[_Item]]:
    """The earlier greedy rule, over the planner's item order: join the open batch while its
    padded size stays within the item's own size plus `block_overhead`."""
    groups: list[list[_Item]] = []
    for it in sorted(items, key=lambda it: (it.num_rows.bit_length(), -it.kv_len, -it.num_rows)):
        if groups:
            padded = _padded(groups[-1] + [it])
            own = it.num_rows * it.kv_len
            fits = padded <= attn.max_block_scores
            if fits and padded <= _padded(groups[-1]) + own + attn.block_overhead:
                groups[-1].append(it)
                continue
        groups.append([it])
    return groups


@settings(max_examples=80, deadline=None)
@given(
    shapes=st.lists(st.tuples(st.integers(1, 40), st.integers(1, 700)), min_size=1, max_size=60),
    max_block_scores=st.sampled_from([64, 5000, 1 << 18]),
)
def test_grouping_is_a_partition_no_worse_than_greedy(shapes, max_block_scores) -> None:
    attn = TorchAttention(9, 3, 64)
    attn.max_block_scores = max_block_scores
    items = [_Item(i, r, 0, k, k) for i, (r, k) in enumerate(shapes)]
    groups = attn._group_items(items)
    assert sorted(it.row_start for g in groups for it in g) == list(range(len(items)))
    for g in groups:
        assert len(g) == 1 or _padded(g) <= max_block_scores
        assert len(g) <= attn.max_block_items
    cost = sum(_batch_cost(attn, g) for g in groups)
    assert cost <= sum(_batch_cost(attn, [it]) for it in items)
    # the least cost over runs of consecutive items: no worse than the greedy rule's runs
    if len(items) <= attn.max_block_items:
        assert cost <= sum(_batch_cost(attn, g) for g in _greedy_groups(attn, items))


def test_decode_rows_are_not_padded_to_a_shared_entry() -> None:
    # a decode step of reuse anywhere: one shared entry read by 8 rows, 24 one-row entries
    attn = TorchAttention(9, 3, 64)
    items = [_Item(0, 8, 0, 101, 101)] + [_Item(i, 1, 0, 30 + i, 30 + i) for i in range(24)]
    groups = attn._group_items(items)
    one_row = [g for g in groups if any(it.num_rows == 1 for it in g)]
    assert all(max(it.num_rows for it in g) == 1 for g in one_row), groups


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_matches_reference_random(data: st.DataObject) -> None:
    batch = data.draw(st.integers(1, 8), label="batch")
    page_size = data.draw(st.sampled_from([1, 2, 3, 4, 16]), label="page_size")
    group = data.draw(st.sampled_from([1, 2, 3, 4]), label="group")
    num_kv_heads = data.draw(st.integers(1, 2), label="num_kv_heads")
    decode = data.draw(st.booleans(), label="decode")
    qo = (
        [1] * batch
        if decode
        else data.draw(st.lists(st.integers(1, 6), min_size=batch, max_size=batch))
    )
    shared = []
    for _ in range(data.draw(st.integers(0, 2), label="shared levels")):
        sizes, left = [], batch
        while left:
            sizes.append(data.draw(st.integers(1, left)))
            left -= sizes[-1]
        shared.append([(s, data.draw(st.integers(0, 20))) for s in sizes])
    min_past = 0 if any(n for lv in shared for _, n in lv) else 1
    past = data.draw(st.lists(st.integers(min_past, 20), min_size=batch, max_size=batch))
    spec = Spec(shared, past, qo)
    case = build_case(spec, page_size, num_kv_heads, group, copies=data.draw(st.booleans()))
    attn = make_attention(num_kv_heads * group, num_kv_heads, data.draw(st.booleans(), "fused"))
    attn.max_block_scores = data.draw(st.sampled_from([1, 5, 64, 1 << 18]), label="max_scores")
    assert_close(run_case(case, attn), case.expected, 2e-5, str(spec))


def test_writes_and_copies_land_in_their_slots() -> None:
    spec = Spec([[(3, 6)]], past=[2, 5, 0], qo=[3, 1, 2])
    case = build_case(spec, page_size=4, num_kv_heads=2, group=2, copies=True)
    md = case.metadata
    assert md.copy_src.numel() > 0
    want_k, want_v = case.k_cache.clone(), case.v_cache.clone()
    wk, wv = want_k.view(-1, 2, HEAD_DIM), want_v.view(-1, 2, HEAD_DIM)
    for row, slot in enumerate(md.slot_mapping.tolist()):
        wk[slot], wv[slot] = case.k[row], case.v[row]
    for src, dst in zip(md.copy_src.tolist(), md.copy_dst.tolist(), strict=True):
        wk[dst], wv[dst] = wk[src].clone(), wv[src].clone()
    run_case(case, TorchAttention(4, 2, HEAD_DIM))
    torch.testing.assert_close(case.k_cache, want_k, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(case.v_cache, want_v, rtol=0, atol=0, equal_nan=True)


def test_repeated_forward_reuses_plan() -> None:
    # layers share one plan: a second forward on another cache gives the same answer
    spec = Spec([[(4, 7)]], past=[1, 2, 3, 0], qo=[1, 1, 1, 1])
    case = build_case(spec, page_size=4, num_kv_heads=1, group=3)
    attn = TorchAttention(3, 1, HEAD_DIM)
    attn.plan(case.metadata)
    k2, v2 = case.k_cache.clone(), case.v_cache.clone()
    out1 = attn.forward(case.q, case.k, case.v, case.k_cache, case.v_cache)
    out2 = attn.forward(case.q, case.k, case.v, k2, v2)
    assert torch.equal(out1, out2)
    assert_close(out1, case.expected, 2e-5)


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "matmul"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_dtype(dtype: torch.dtype, fused: bool) -> None:
    spec = Spec([[(3, 10)], [(1, 0), (2, 5)]], past=[2, 3, 1], qo=[4, 1, 2])
    case = build_case(spec, page_size=4, num_kv_heads=2, group=3, copies=True, dtype=dtype)
    out = run_case(case, make_attention(6, 2, fused))
    assert out.dtype == dtype
    assert_close(out, case.expected, 5e-2 if dtype == torch.bfloat16 else 1e-2)


def test_custom_scale() -> None:
    spec = Spec([], past=[5, 2], qo=[2, 3])
    case = build_case(spec, page_size=4, num_kv_heads=1, group=1)
    attn = TorchAttention(1, 1, HEAD_DIM, scale=0.5 / math.sqrt(HEAD_DIM))
    # halving the scale is the same as halving q
    attn.plan(case.metadata)
    out = attn.forward(case.q, case.k, case.v, case.k_cache, case.v_cache)
    ref = TorchAttention(1, 1, HEAD_DIM)
    ref.plan(case.metadata)
    want = ref.forward(case.q * 0.5, case.k, case.v, case.k_cache, case.v_cache)
    assert_close(out, want.double(), 1e-6)


def _partial_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
    """(o, lse) of unmasked attention of q [n, H, d] over k, v [S, H, d], float64."""
    s = torch.einsum("nhd,shd->nhs", q.double(), k.double())
    lse = s.logsumexp(-1)
    return torch.einsum("nhs,shd->nhd", (s - lse[..., None]).exp(), v.double()), lse


@pytest.mark.parametrize("split", [1, 5, 11])
def test_merge_states_equals_attention_over_union(split: int) -> None:
    gen = torch.Generator().manual_seed(split)
    q, k, v = (torch.randn(shape, generator=gen) for shape in [(4, 3, 8), (12, 3, 8), (12, 3, 8)])
    o_a, lse_a = _partial_attention(q, k[:split], v[:split])
    o_b, lse_b = _partial_attention(q, k[split:], v[split:])
    o, lse = merge_states(o_a.float(), lse_a.float(), o_b.float(), lse_b.float())
    o_ref, lse_ref = _partial_attention(q, k, v)
    assert o.dtype == torch.float32 and lse.dtype == torch.float32
    assert_close(o, o_ref, 1e-5)
    assert_close(lse, lse_ref, 1e-5)


def test_merge_states_empty_sides() -> None:
    o = torch.randn(2, 3, 4)
    lse = torch.randn(2, 3)
    zero, empty = torch.zeros_like(o), torch.full_like(lse, float("-inf"))
    for m_o, m_lse in [merge_states(o, lse, zero, empty), merge_states(zero, empty, o, lse)]:
        torch.testing.assert_close(m_o, o)
        torch.testing.assert_close(m_lse, lse)
    m_o, m_lse = merge_states(zero, empty, zero, empty)
    assert bool((m_o == 0).all()) and bool((m_lse == float("-inf")).all())
    with pytest.raises(ValueError, match="merge_states"):
        merge_states(o, lse, o[:1], lse[:1])


def test_bad_arguments_raise() -> None:
    with pytest.raises(ValueError, match="multiple"):
        TorchAttention(5, 2, HEAD_DIM)
    with pytest.raises(ValueError, match="positive"):
        TorchAttention(4, 0, HEAD_DIM)
    spec = Spec([], past=[2], qo=[1])
    case = build_case(spec, page_size=4, num_kv_heads=1, group=2)
    attn = TorchAttention(2, 1, HEAD_DIM)
    with pytest.raises(RuntimeError, match="before plan"):
        attn.forward(case.q, case.k, case.v, case.k_cache, case.v_cache)
    attn.plan(case.metadata)
    with pytest.raises(ValueError, match="expected q"):
        attn.forward(case.q[:, :1], case.k, case.v, case.k_cache, case.v_cache)
    with pytest.raises(ValueError, match="k_cache"):
        kc = case.k_cache.view(-1, 2, 1, HEAD_DIM)
        attn.forward(case.q, case.k, case.v, kc, kc)
    bad = case.metadata
    bad.levels[0].kv_last_page_len = i64([5])
    with pytest.raises(ValueError, match="kv_last_page_len"):
        attn.plan(bad)
    bad.levels[0].kv_indices = i64([])
    with pytest.raises(ValueError, match="kv_indices"):
        attn.plan(bad)


def test_step_without_tokens() -> None:
    level = CascadeLevel(i64([0]), i64([0]), i64([]), i64([]), causal=True)
    attn = TorchAttention(2, 1, HEAD_DIM)
    attn.plan(AttentionMetadata(4, i64([]), i64([]), i64([]), [level]))
    cache = torch.zeros(2, 4, 1, HEAD_DIM)
    out = attn.forward(*(torch.zeros(0, h, HEAD_DIM) for h in (2, 1, 1)), cache, cache.clone())
    assert out.shape == (0, 2, HEAD_DIM)


def test_row_without_keys_is_an_invariant_violation() -> None:
    # one shared level with no pages and a last level whose entry has fewer keys than rows:
    # the first row sees nothing anywhere
    levels = [
        make_level([2], [[]], [0], 4, causal=False),
        make_level([2], [[0]], [1], 4, causal=True),
    ]
    md = AttentionMetadata(4, i64([0, 1]), i64([]), i64([]), levels)
    with pytest.raises(AssertionError, match="see no key"):
        TorchAttention(1, 1, HEAD_DIM).plan(md)
