"""`merge_blocks` (attention/merge.py) against merging the states one pair at a time.

Pairwise merging is the definition: states over disjoint key sets combine as
o = (2^s1 o1 + 2^s2 o2) / (2^s1 + 2^s2), s = log2(2^s1 + 2^s2) (base-2 log-sum-exp, as
FlashInfer writes it); a block without keys for a row is skipped. On the CPU `merge_blocks` is
its PyTorch form; tests/gpu/test_merge_gpu.py checks the Triton kernel against it.
"""

from __future__ import annotations

import pytest
import torch

from cascade_rag.attention.merge import merge_blocks


def _pairwise(out, lse, blocks_o, blocks_s, mask, base):
    """float64 merge, one block at a time (a row's first kept state starts it without base)."""
    k, rows = mask.shape
    o, s = out.double().clone(), lse.double().clone()
    have = torch.full((rows,), base)
    for j in range(k):
        for r in range(rows):
            if not mask[j, r]:
                continue
            oj, sj = blocks_o[j * rows + r].double(), blocks_s[j * rows + r].double()
            if not have[r]:
                o[r], s[r], have[r] = oj, sj, True
                continue
            m = torch.maximum(s[r], sj)
            w1, w2 = torch.exp2(s[r] - m), torch.exp2(sj - m)
            o[r] = (w1[:, None] * o[r] + w2[:, None] * oj) / (w1 + w2)[:, None]
            s[r] = m + torch.log2(w1 + w2)
    o[~have] = 0.0
    s[~have] = -torch.inf
    return o, s


@pytest.mark.parametrize("base", [True, False])
@pytest.mark.parametrize("k", [1, 3, 5])
def test_merge_blocks_equals_pairwise_merges(base, k):
    g = torch.Generator().manual_seed(k + 10 * base)
    rows, heads, dim = 7, 4, 8
    out = torch.randn(rows, heads, dim, generator=g)
    lse = torch.randn(rows, heads, generator=g) * 4
    blocks_o = torch.randn(k * rows, heads, dim, generator=g)
    blocks_s = torch.randn(k * rows, heads, generator=g) * 4
    mask = torch.rand(k, rows, generator=g) < 0.6
    mask[:, 0] = False  # a row no block reads
    mask[:, 1] = True
    skipped = ~mask.reshape(-1)
    blocks_o[skipped] = torch.nan  # whatever a skipped block holds must not leak
    blocks_s[skipped] = torch.nan
    want_o, want_s = _pairwise(out, lse, blocks_o, blocks_s, mask, base)
    merge_blocks(out, lse, blocks_o, blocks_s, mask, base=base)
    assert torch.isfinite(out).all()
    assert torch.allclose(out.double(), want_o, atol=1e-5)
    finite = torch.isfinite(want_s)
    assert torch.equal(finite, torch.isfinite(lse))
    assert torch.allclose(lse.double()[finite], want_s[finite], atol=1e-5)
    if not base:
        assert (out[0] == 0).all() and torch.isinf(lse[0]).all(), "no keys: o = 0, s = -inf"
