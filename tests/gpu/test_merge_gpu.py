"""The Triton merge of attention states (attention/merge.py) against its PyTorch form, on the GPU
(skipped without CUDA or Triton): bf16 outputs, 32 heads of 64, 1-5 blocks, with and without
the base state, masked blocks holding NaN."""

from __future__ import annotations

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)
pytest.importorskip("triton", reason="needs Triton (PyTorch's CUDA builds ship it)")

from cascade_rag.attention.merge import merge_blocks, merge_blocks_reference  # noqa: E402


@pytest.mark.parametrize("base", [True, False])
@pytest.mark.parametrize("k,heads,dim", [(1, 32, 64), (4, 32, 64), (5, 12, 80)])
def test_triton_merge_equals_the_reference(base, k, heads, dim):
    g = torch.Generator(device="cuda").manual_seed(k)
    rows = 130
    kw = dict(device="cuda", generator=g)
    out = torch.randn(rows, heads, dim, **kw).to(torch.bfloat16)
    lse = torch.randn(rows, heads, **kw) * 8
    blocks_o = torch.randn(k * rows, heads, dim, **kw).to(torch.bfloat16)
    blocks_s = torch.randn(k * rows, heads, **kw) * 8
    mask = torch.rand(k, rows, **kw) < 0.7
    mask[:, 0] = False
    skipped = ~mask.reshape(-1)
    blocks_o[skipped] = torch.nan
    blocks_s[skipped] = torch.nan
    want_o, want_s = out.clone(), lse.clone()
    merge_blocks_reference(want_o, want_s, blocks_o, blocks_s, mask, base=base)
    merge_blocks(out, lse, blocks_o, blocks_s, mask, base=base)
    assert torch.isfinite(out).all()
    assert (out.float() - want_o.float()).abs().max() < 1e-2  # bf16 rounding of one store
    finite = torch.isfinite(want_s)
    assert torch.equal(finite, torch.isfinite(lse))
    assert (lse[finite] - want_s[finite]).abs().max() < 1e-4
