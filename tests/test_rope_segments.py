"""Reuse anywhere at the attention level: shifted segments equal keys at their true positions.

A chunk's keys are stored rotated at canonical positions (where it was computed, right after
the system prompt) in pages of its own; placed at another offset, query rows read it with their
queries re-rotated by the segment's delta (`cascade_rag.attention.rope`). The reference is plain
attention in float64 over the same keys rotated at their true positions in the request, which is
exact when the chunk's KV does not depend on what precedes it (random K/V here). Recomputed
tokens (written with `k_rope_delta` into a private copy of the chunk's first page) are checked
the same way, and so is the slot content they leave in the cache.
"""

from __future__ import annotations

import pytest
import torch

from cascade_rag.attention import rope
from cascade_rag.attention.metadata import AttentionMetadata, CascadeLevel
from cascade_rag.attention.torch_backend import TorchAttention
from cascade_rag.engine.cascade_plan import int64_tensor
from cascade_rag.engine.segments import QueryGroup, Segment, plan_segment_levels, segment_slots

HEAD_DIM = 32
HKV, GROUP = 2, 3
HQ = HKV * GROUP
INV_FREQ = 1.0 / (10000.0 ** (torch.arange(0, HEAD_DIM, 2).float() / HEAD_DIM))


def rotate_at(x: torch.Tensor, positions: list[int]) -> torch.Tensor:
    """x [n, h, d] rotated at `positions` exactly as the model does (float32 tables)."""
    freqs = torch.tensor(positions).float()[:, None] * INV_FREQ
    emb = torch.cat((freqs, freqs), dim=-1)
    return rope.apply_rotary(x, emb.cos(), emb.sin())


def dense(q, k, v, visible) -> torch.Tensor:
    """Float64 attention: q [T, Hq, d], k/v [S, Hkv, d], visible [T, S] bool."""
    k = k.double().repeat_interleave(GROUP, dim=1)
    v = v.double().repeat_interleave(GROUP, dim=1)
    scores = torch.einsum("thd,shd->hts", q.double(), k) / HEAD_DIM**0.5
    probs = scores.masked_fill(~visible, float("-inf")).softmax(-1)
    return torch.einsum("hts,shd->thd", probs, v)


def test_shift_tables_compose_with_the_rotation():
    """Rotating at p, then by -delta, equals rotating at p - delta; delta 0 is bit-exact."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(6, 3, HEAD_DIM, generator=gen)
    positions = [5, 40, 300, 1000, 2047, 7]
    deltas = torch.tensor([0, 13, 250, 999, 1024, 0])
    shifted = rope.rotate(
        rotate_at(x, positions), rope.shift_tables(deltas, INV_FREQ, x.dtype, "cpu")
    )
    want = rotate_at(x, [p - int(d) for p, d in zip(positions, deltas)])
    err = (shifted - want).abs()
    assert err.max() < 2e-4, f"max {err.max():.2e} mean {err.mean():.2e}"
    assert torch.equal(shifted[0], rotate_at(x, positions)[0])  # delta 0: unchanged bit for bit
    with pytest.raises(ValueError, match=r"\[num_rows\]"):
        rope.shift_tables(torch.zeros(2, 2, dtype=torch.int64), INV_FREQ, x.dtype, "cpu")


@pytest.mark.parametrize("page_size", [1, 4, 16])
@pytest.mark.parametrize("recompute", [0, 3])
@pytest.mark.parametrize("merge", [True, False], ids=["merged", "per-level"])
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "matmul"])
def test_shifted_chunk_segments_equal_keys_at_true_positions(page_size, recompute, merge, fused):
    """[system | A | B | private] where B was computed right after the system prompt.

    B's keys sit at canonical positions 11.. (delta 13 in this request); A is first after the
    system prompt (delta 0). Private rows are causal over their own keys. With `recompute`, the
    first tokens of B are recomputed rows at true positions: their keys are rotated back to
    canonical positions on write (into a private copy of B's first pages) and they read B
    causally; the private rows then see the recomputed keys instead of the stale ones.
    """
    gen = torch.Generator().manual_seed(page_size * 10 + recompute)
    n_sys, n_a, n_b, n_tail = 11, 13, 9, 5
    a_at, b_at, tail_at = n_sys, n_sys + n_a, n_sys + n_a + n_b
    b_canon = n_sys  # B was computed right after the system prompt

    def raw(n: int, h: int = HKV) -> torch.Tensor:
        return torch.randn(n, h, HEAD_DIM, generator=gen)

    k_sys, k_a, k_b, k_tail = raw(n_sys), raw(n_a), raw(n_b), raw(n_tail)
    v_sys, v_a, v_b, v_tail = raw(n_sys), raw(n_a), raw(n_b), raw(n_tail)
    k_redo, v_redo, q_redo = raw(recompute), raw(recompute), raw(recompute, HQ)
    q_tail = raw(n_tail, HQ)

    num_pages = 64
    k_cache = torch.full((num_pages, page_size, HKV, HEAD_DIM), float("nan"))
    v_cache = k_cache.clone()
    free = torch.randperm(num_pages, generator=gen).tolist()

    def pages_for(n: int) -> list[int]:
        return [free.pop() for _ in range(-(-n // page_size))]

    def store(pages: list[int], k: torch.Tensor, v: torch.Tensor, positions: list[int]) -> None:
        slots = torch.tensor(segment_slots(pages, 0, k.shape[0], page_size))
        k_cache.view(-1, HKV, HEAD_DIM)[slots] = rotate_at(k, positions)
        v_cache.view(-1, HKV, HEAD_DIM)[slots] = v

    p_sys, p_a, p_b, p_tail = pages_for(n_sys), pages_for(n_a), pages_for(n_b), pages_for(n_tail)
    store(p_sys, k_sys, v_sys, list(range(n_sys)))
    store(p_a, k_a, v_a, list(range(a_at, a_at + n_a)))
    store(p_b, k_b, v_b, list(range(b_canon, b_canon + n_b)))  # canonical, not b_at

    delta = b_at - b_canon
    seg_sys, seg_a = Segment(p_sys, n_sys), Segment(p_a, n_a)
    groups, copies, b_pages = [], [], list(p_b)
    if recompute:
        for page in range(-(-recompute // page_size)):  # copy-on-write of B's first pages
            b_pages[page] = free.pop()
            for i in range(page * page_size, min((page + 1) * page_size, n_b)):
                if i >= recompute:
                    copies.append(
                        (
                            p_b[page] * page_size + i % page_size,
                            b_pages[page] * page_size + i % page_size,
                        )
                    )
        seg_b = Segment(b_pages, n_b, delta)
        groups.append(
            QueryGroup(
                positions=list(range(b_at, b_at + recompute)),
                token_ids=[0] * recompute,
                slots=segment_slots(b_pages, 0, recompute, page_size),
                shared=[seg_sys, seg_a],
                own=seg_b.truncated(recompute, page_size),
                k_delta=delta,
            )
        )
    seg_b = Segment(b_pages, n_b, delta)
    groups.append(
        QueryGroup(
            positions=list(range(tail_at, tail_at + n_tail)),
            token_ids=[0] * n_tail,
            slots=segment_slots(p_tail, 0, n_tail, page_size),
            shared=[seg_sys, seg_a, seg_b],
            own=Segment(p_tail, n_tail),
        )
    )
    levels = plan_segment_levels(groups, page_size)
    assert [lv.rope_delta is not None for lv in levels] == [False, False, True, bool(recompute)]
    positions = [p for g in groups for p in g.positions]
    k_deltas = [g.k_delta for g in groups for _ in g.positions]
    metadata = AttentionMetadata(
        page_size=page_size,
        slot_mapping=int64_tensor([s for g in groups for s in g.slots]),
        copy_src=int64_tensor([c[0] for c in copies]),
        copy_dst=int64_tensor([c[1] for c in copies]),
        levels=levels,
        k_rope_delta=int64_tensor(k_deltas) if any(k_deltas) else None,
        rope_inv_freq=INV_FREQ,
    )
    attn = TorchAttention(HQ, HKV, HEAD_DIM)
    attn.max_block_scores = 64  # several row chunks and padded batches
    attn.merge_entries = merge  # unshifted segments read with the causal level, or alone
    attn.fused = fused  # padded batches through the fused CPU kernel or the matmul path
    attn.plan(metadata)
    # partial results per row: merged, the system prompt and A join the private rows' causal
    # entry and B (shifted) stays apart; the recomputed rows read their own keys shifted, so
    # the system prompt and A stay apart for them
    partials = attn._plan.out_rows.numel() if attn._plan.out_rows is not None else 0
    assert partials == 3 * recompute + (2 if merge else 4) * n_tail
    q = rotate_at(torch.cat([q_redo, q_tail]), positions)
    k = rotate_at(torch.cat([k_redo, k_tail]), positions)
    out = attn.forward(q, k, torch.cat([v_redo, v_tail]), k_cache, v_cache)

    # reference: every key at its true position; B's first `recompute` keys are the new ones
    k_b_true = torch.cat([k_redo, k_b[recompute:]])
    v_b_true = torch.cat([v_redo, v_b[recompute:]])
    true_k = torch.cat([
        rotate_at(k_sys, list(range(n_sys))),
        rotate_at(k_a, list(range(a_at, a_at + n_a))),
        rotate_at(k_b_true, list(range(b_at, b_at + n_b))),
        rotate_at(k_tail, list(range(tail_at, tail_at + n_tail))),
    ])  # fmt: skip
    true_v = torch.cat([v_sys, v_a, v_b_true, v_tail])
    key_pos = torch.arange(true_k.shape[0])
    visible = key_pos[None, :] <= torch.tensor(positions)[:, None]
    want = dense(q, true_k, true_v, visible)
    err = (out.double() - want).abs()
    assert err.max() < 1e-4, f"max {err.max():.2e} mean {err.mean():.2e}"

    if recompute:  # recomputed keys are stored at their canonical positions in the copy
        slots = torch.tensor(segment_slots(b_pages, 0, recompute, page_size))
        stored = k_cache.view(-1, HKV, HEAD_DIM)[slots]
        want_k = rotate_at(k_redo, list(range(b_canon, b_canon + recompute)))
        assert (stored - want_k).abs().max() < 1e-5
        # the chunk's own pages are shared: untouched by the request
        node_slots = torch.tensor(segment_slots(p_b, 0, n_b, page_size))
        node_k = k_cache.view(-1, HKV, HEAD_DIM)[node_slots]
        assert torch.equal(node_k, rotate_at(k_b, list(range(b_canon, b_canon + n_b))))


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "matmul"])
def test_a_segment_read_at_two_offsets_in_one_entry(fused):
    """One entry of rows from two requests holding the same chunk at different offsets (one
    kernel call for the chunk, each row rotated by its own delta) equals the reference."""
    gen = torch.Generator().manual_seed(7)
    page_size, n = 4, 10
    k = torch.randn(n, HKV, HEAD_DIM, generator=gen)
    v = torch.randn(n, HKV, HEAD_DIM, generator=gen)
    k_cache = torch.zeros(8, page_size, HKV, HEAD_DIM)
    v_cache = torch.zeros_like(k_cache)
    pages = [5, 2, 7]
    slots = torch.tensor(segment_slots(pages, 0, n, page_size))
    canon = 3
    k_cache.view(-1, HKV, HEAD_DIM)[slots] = rotate_at(k, list(range(canon, canon + n)))
    v_cache.view(-1, HKV, HEAD_DIM)[slots] = v
    offsets = [3, 40]  # request 0: canonical offset; request 1: 37 positions later
    positions = [offsets[0] + n + 2, offsets[1] + n + 5]
    q_raw = torch.randn(2, HQ, HEAD_DIM, generator=gen)
    # level 0: one entry, both rows over the chunk's pages (non-causal: the keys precede
    # them); level 1 (causal): each row's own new key, on pages 0 and 1
    shared = CascadeLevel(
        qo_indptr=int64_tensor([0, 2]),
        kv_indptr=int64_tensor([0, 3]),
        kv_indices=int64_tensor(pages),
        kv_last_page_len=int64_tensor([n - 2 * page_size]),
        causal=False,
        rope_delta=int64_tensor([o - canon for o in offsets]),
    )
    own = CascadeLevel(
        qo_indptr=int64_tensor([0, 1, 2]),
        kv_indptr=int64_tensor([0, 1, 2]),
        kv_indices=int64_tensor([0, 1]),
        kv_last_page_len=int64_tensor([1, 1]),
        causal=True,
    )
    metadata = AttentionMetadata(
        page_size=page_size,
        slot_mapping=int64_tensor([0, page_size]),
        copy_src=int64_tensor([]),
        copy_dst=int64_tensor([]),
        levels=[shared, own],
        rope_inv_freq=INV_FREQ,
    )
    attn = TorchAttention(HQ, HKV, HEAD_DIM)
    attn.fused = fused
    attn.plan(metadata)
    q = rotate_at(q_raw, positions)
    k_own = torch.randn(2, HKV, HEAD_DIM, generator=gen)
    v_own = torch.randn(2, HKV, HEAD_DIM, generator=gen)
    out = attn.forward(q, rotate_at(k_own, positions), v_own, k_cache, v_cache)
    for r, off in enumerate(offsets):
        keys = torch.cat(
            [
                rotate_at(k, list(range(off, off + n))),
                rotate_at(k_own[r : r + 1], positions[r : r + 1]),
            ]
        )
        values = torch.cat([v, v_own[r : r + 1]])
        want = dense(q[r : r + 1], keys, values, torch.ones(1, n + 1, dtype=torch.bool))
        err = (out[r : r + 1].double() - want).abs().max()
        assert err < 1e-5, f"row {r}: max {err:.2e}"
