"""The Triton RoPE + query copies + KV append (attention/rope_append.py) against its PyTorch
form and against FlashInfer's RoPE, on the GPU (skipped without CUDA or Triton): q, k and v as
views of one projection, 1-4 copies, head shapes of Llama-3.2-1B and an odd one."""

from __future__ import annotations

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)
pytest.importorskip("triton", reason="needs Triton (PyTorch's CUDA builds ship it)")

from cascade_rag.attention.rope_append import rope_append, rope_append_reference  # noqa: E402


def _table(positions: int, dim: int) -> torch.Tensor:
    inv_freq = 1.0 / 500000 ** (torch.arange(0, dim, 2, device="cuda").float() / dim)
    angles = torch.arange(positions, device="cuda").float()[:, None] * inv_freq
    return torch.cat([angles.cos(), angles.sin()], dim=-1)


@pytest.mark.parametrize("rows,copies", [(1, 1), (37, 4), (128, 4), (128, 1)])
@pytest.mark.parametrize("hq,hk,dim", [(32, 8, 64), (12, 3, 80)])
def test_triton_rope_append_equals_the_reference(rows, copies, hq, hk, dim):
    g = torch.Generator(device="cuda").manual_seed(rows + copies)
    kw = dict(device="cuda", generator=g)
    qkv = torch.randn(rows, hq + 2 * hk, dim, **kw).to(torch.bfloat16)
    q, k, v = qkv[:, :hq], qkv[:, hq : hq + hk], qkv[:, hq + hk :]
    cos_sin = _table(9000, dim)
    positions = torch.randint(0, 9000, (rows,), **kw)
    num_pages, page_size = 40, 16
    slots = torch.randperm(num_pages * page_size, **kw)[:rows].to(torch.int32)
    caches = [torch.randn(num_pages, page_size, hk, dim, **kw).to(torch.bfloat16) for _ in "kv"]
    want = [c.clone() for c in caches]
    q_out = torch.zeros(copies * rows + 3, hq, dim, dtype=torch.bfloat16, device="cuda")
    q_want = q_out.clone()
    before = qkv.clone()
    rope_append(q, k, v, positions, cos_sin, q_out, copies, *caches, slots)
    rope_append_reference(q, k, v, positions, cos_sin, q_want, copies, *want, slots)
    assert torch.equal(qkv, before)
    assert torch.equal(q_out[copies * rows :], q_want[copies * rows :])  # rows after: untouched
    # float32 arithmetic rounded once to bf16: at most one bf16 step apart (FMA contraction)
    for got, ref in ((q_out, q_want), (caches[0], want[0])):
        diff = (got.float() - ref.float()).abs()
        assert (diff <= ref.float().abs() * 2**-7 + 1e-6).all()
        assert (diff == 0).float().mean() > 0.99
    assert torch.equal(caches[1], want[1])  # values are copied, not computed


def test_rotation_equals_flashinfer_rope():
    """The rotation equals FlashInfer's in-place RoPE from the same table (what the model's
    eager path runs), within one bf16 step."""
    flashinfer = pytest.importorskip("flashinfer")
    rows, hq, hk, dim = 64, 32, 8, 64
    g = torch.Generator(device="cuda").manual_seed(0)
    qkv = torch.randn(rows, hq + 2 * hk, dim, device="cuda", generator=g).to(torch.bfloat16)
    q, k, v = qkv[:, :hq], qkv[:, hq : hq + hk], qkv[:, hq + hk :]
    cos_sin = _table(4096, dim)
    positions = torch.randint(0, 4096, (rows,), device="cuda", generator=g)
    caches = [torch.zeros(rows, 1, hk, dim, dtype=torch.bfloat16, device="cuda") for _ in "kv"]
    q_out = torch.empty(rows, hq, dim, dtype=torch.bfloat16, device="cuda")
    slots = torch.arange(rows, dtype=torch.int32, device="cuda")
    rope_append(q, k, v, positions, cos_sin, q_out, 1, *caches, slots)
    q2, k2 = q.clone(), k.clone()
    flashinfer.apply_rope_with_cos_sin_cache_inplace(positions, q2, k2, dim, cos_sin, True)
    for got, ref in ((q_out, q2), (caches[0].view(rows, hk, dim), k2)):
        diff = (got.float() - ref.float()).abs()
        assert (diff <= ref.float().abs() * 2**-7 + 1e-6).all()
