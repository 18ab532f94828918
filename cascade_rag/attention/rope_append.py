"""RoPE, the query copies of a cascade step's shared parts and the KV append, in one pass.

A decode step of the graph path (attention/flashinfer_graph.py) did three things per layer
before attending: rotate q and k in place (FlashInfer's RoPE kernel), copy the rotated query
rows once per part of the shared levels (the parts are entries of their own over a copy of the
rows), and write k and v into the paged cache (FlashInfer's append). `rope_append` does them
in one kernel launch that reads q, k and v once: it writes the rotated query rows to `q_out`,
`copies` times, and the rotated key and the value of each row to that row's KV slot. On the
H200 at 128 rows the three launches took about 2.1 + 3.9 + 2.5 us per layer (RoPE and append
from a kernel profile of a whole step, the copy measured alone); this kernel's own time has
not been measured yet.

The rotation is RoPE's "neox" form over the whole head (the halves x1, x2 of a head become
x1 cos - x2 sin and x2 cos + x1 sin), computed in float32 from the model's float32 cos/sin
table (`LlamaModel.cos_sin`: cos of the angles, then their sin) and rounded once to the
input dtype, as `TorchKernels.rope_` computes it (`rope.rotate_from_table`, also this module's
reference); a GPU test compares it with FlashInfer's RoPE kernel, which the eager path runs.

On CUDA it is a Triton kernel (one program per row, every head at once); elsewhere, and as
the reference the GPU tests compare it with, the same arithmetic in PyTorch.
"""

from __future__ import annotations

import torch

from cascade_rag.attention.rope import rotate_from_table

try:  # Triton comes with PyTorch's CUDA builds; the CPU build has none
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - CPU installs
    triton = None


def rope_append(
    q: torch.Tensor,  # [rows, qo_heads, dim], rows of stride q.stride(0) (a view of qkv)
    k: torch.Tensor,  # [rows, kv_heads, dim]
    v: torch.Tensor,  # [rows, kv_heads, dim]
    positions: torch.Tensor,  # [rows] int, each row's position
    cos_sin: torch.Tensor,  # [max_positions, dim] float32: cos (dim / 2), then sin
    q_out: torch.Tensor,  # [>= copies * rows, qo_heads, dim], contiguous
    copies: int,
    k_cache: torch.Tensor,  # [num_pages, page_size, kv_heads, dim], contiguous
    v_cache: torch.Tensor,
    slots: torch.Tensor,  # [rows] int: the KV slot of each row (page * page_size + offset)
) -> None:
    """Rotate q and k at `positions`; write the rotated query rows into blocks
    [j * rows, (j + 1) * rows) of `q_out` for j < `copies`, the rotated keys into `k_cache`
    and the values into `v_cache` at `slots`. q, k and v are left as they are."""
    rows, qo_heads, dim = q.shape
    kv_heads = k.shape[1]
    assert dim % 2 == 0 and cos_sin.shape[-1] == dim and cos_sin.dtype == torch.float32
    assert q_out.shape[0] >= copies * rows and q_out.is_contiguous()
    assert k_cache.is_contiguous() and v_cache.is_contiguous()
    assert q.stride(2) == k.stride(2) == v.stride(2) == 1
    assert q.stride(1) == k.stride(1) == v.stride(1) == dim
    if q.is_cuda and triton is not None:
        _rope_append_kernel[(rows,)](
            q, k, v, positions, cos_sin, q_out, k_cache, v_cache, slots, rows,
            q.stride(0), k.stride(0), v.stride(0),
            QO_HEADS=qo_heads, KV_HEADS=kv_heads, HALF=dim // 2, COPIES=copies,
            BLOCK_QH=triton.next_power_of_2(qo_heads),
            BLOCK_KH=triton.next_power_of_2(kv_heads),
            BLOCK_HALF=triton.next_power_of_2(dim // 2),
        )  # fmt: skip
        return
    rope_append_reference(q, k, v, positions, cos_sin, q_out, copies, k_cache, v_cache, slots)


def rope_append_reference(q, k, v, positions, cos_sin, q_out, copies, k_cache, v_cache, slots):
    """`rope_append` in PyTorch, on any device."""
    rows = q.shape[0]
    q_rot = rotate_from_table(q, positions, cos_sin).to(q_out.dtype)
    q_out[: copies * rows].view(copies, *q.shape).copy_(q_rot.expand(copies, *q.shape))
    kv_heads, dim = k.shape[1:]
    at = slots.long()
    k_rot = rotate_from_table(k, positions, cos_sin)
    k_cache.view(-1, kv_heads, dim)[at] = k_rot.to(k_cache.dtype)
    v_cache.view(-1, kv_heads, dim)[at] = v.to(v_cache.dtype)


if triton is not None:

    @triton.jit
    def _rope_append_kernel(
        q_ptr, k_ptr, v_ptr, pos_ptr, cos_sin_ptr, q_out_ptr, k_cache_ptr, v_cache_ptr, slot_ptr,
        rows, q_row_stride, k_row_stride, v_row_stride,
        QO_HEADS: tl.constexpr, KV_HEADS: tl.constexpr, HALF: tl.constexpr,
        COPIES: tl.constexpr, BLOCK_QH: tl.constexpr, BLOCK_KH: tl.constexpr,
        BLOCK_HALF: tl.constexpr,
    ):  # fmt: skip
        row = tl.program_id(0)
        pos = tl.load(pos_ptr + row).to(tl.int64)
        d = tl.arange(0, BLOCK_HALF)[None, :]
        dmask = d < HALF
        c = tl.load(cos_sin_ptr + pos * (2 * HALF) + d, mask=dmask, other=0.0)
        s = tl.load(cos_sin_ptr + pos * (2 * HALF) + HALF + d, mask=dmask, other=0.0)
        dim = 2 * HALF
        qh = tl.arange(0, BLOCK_QH)[:, None]
        qm = (qh < QO_HEADS) & dmask
        q_src = q_ptr + row.to(tl.int64) * q_row_stride + qh * dim + d
        x1 = tl.load(q_src, mask=qm, other=0.0).to(tl.float32)
        x2 = tl.load(q_src + HALF, mask=qm, other=0.0).to(tl.float32)
        o1 = (x1 * c - x2 * s).to(q_out_ptr.dtype.element_ty)
        o2 = (x2 * c + x1 * s).to(q_out_ptr.dtype.element_ty)
        for j in tl.static_range(COPIES):
            dst = q_out_ptr + (j * rows + row).to(tl.int64) * (QO_HEADS * dim) + qh * dim + d
            tl.store(dst, o1, mask=qm)
            tl.store(dst + HALF, o2, mask=qm)
        slot = tl.load(slot_ptr + row).to(tl.int64)
        kh = tl.arange(0, BLOCK_KH)[:, None]
        km = (kh < KV_HEADS) & dmask
        k_src = k_ptr + row.to(tl.int64) * k_row_stride + kh * dim + d
        y1 = tl.load(k_src, mask=km, other=0.0).to(tl.float32)
        y2 = tl.load(k_src + HALF, mask=km, other=0.0).to(tl.float32)
        k_dst = k_cache_ptr + slot * (KV_HEADS * dim) + kh * dim + d
        tl.store(k_dst, (y1 * c - y2 * s).to(k_cache_ptr.dtype.element_ty), mask=km)
        tl.store(k_dst + HALF, (y2 * c + y1 * s).to(k_cache_ptr.dtype.element_ty), mask=km)
        v_src = v_ptr + row.to(tl.int64) * v_row_stride + kh * dim + d
        v_dst = v_cache_ptr + slot * (KV_HEADS * dim) + kh * dim + d
        tl.store(v_dst, tl.load(v_src, mask=km, other=0.0), mask=km)
        tl.store(v_dst + HALF, tl.load(v_src + HALF, mask=km, other=0.0), mask=km)
