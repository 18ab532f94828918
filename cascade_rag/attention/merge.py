"""Merge attention states of several key blocks in one pass: one kernel instead of one per block.

An attention state of a query row is its output `o` (over some set of keys) with the
log-sum-exp `s` of its logits, in base 2 as FlashInfer writes it. Two states over disjoint
key sets merge exactly: with m = max(s1, s2), w_i = 2^(s_i - m),
o = (w1 o1 + w2 o2) / (w1 + w2) and s = m + log2(w1 + w2). A decode step with a shared level
cut into P parts (attention/flashinfer_graph.py) has P + 1 states per row, the last level's and
one per part; merging them one pair at a time costs P kernel launches per layer (about 1.7 us
each on the H200, 64 per step at 4 parts and 16 layers) and rounds `o` to bf16 after each.
`merge_blocks` merges them all at once, in float32, rounding once.

Layout. `blocks_o` [k * rows, heads, dim] and `blocks_s` [k * rows, heads] hold k states per
row, block-major (block j is rows [j * rows, (j + 1) * rows)), as the repeated-query layout of
the parts gives them; `mask` [k, rows] says which blocks hold keys for which row (a block
without keys for a row is skipped whatever it holds: NaN or garbage). With `base` the states
already in `out` / `lse` take part too (the last level's); without, `out` / `lse` are only
written. A row with no keys anywhere gets o = 0 and s = -inf, as FlashInfer's own merge.

On CUDA the merge is a Triton kernel (one program per row, every head at once); elsewhere, and
as the reference the GPU tests compare it with, it is the same arithmetic in PyTorch.
"""

from __future__ import annotations

import torch

try:  # Triton comes with PyTorch's CUDA builds; the CPU build has none
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - CPU installs
    triton = None


def merge_blocks(
    out: torch.Tensor,  # [rows, heads, dim]
    lse: torch.Tensor,  # [rows, heads] float32
    blocks_o: torch.Tensor,  # [k * rows, heads, dim]
    blocks_s: torch.Tensor,  # [k * rows, heads] float32
    mask: torch.Tensor,  # [k, rows] bool
    base: bool = True,
) -> None:
    """Merge the k blocks' states (and, with `base`, the states in `out` / `lse`) into
    `out` / `lse`, in place. See the module docstring."""
    rows, heads, dim = out.shape
    k = mask.shape[0]
    assert blocks_o.shape == (k * rows, heads, dim) and blocks_s.shape == (k * rows, heads)
    assert mask.shape == (k, rows) and lse.shape == (rows, heads)
    if out.is_cuda and triton is not None:
        assert out.is_contiguous() and blocks_o.is_contiguous() and lse.is_contiguous()
        assert blocks_s.is_contiguous() and mask.is_contiguous()
        _merge_kernel[(rows,)](
            out, lse, blocks_o, blocks_s, mask, rows,
            HEADS=heads, DIM=dim, BLOCKS=k, BASE=base,
            BLOCK_H=triton.next_power_of_2(heads), BLOCK_D=triton.next_power_of_2(dim),
        )  # fmt: skip
        return
    merge_blocks_reference(out, lse, blocks_o, blocks_s, mask, base)


def merge_blocks_reference(out, lse, blocks_o, blocks_s, mask, base: bool = True) -> None:
    """`merge_blocks` in PyTorch (float32), on any device."""
    rows, heads, dim = out.shape
    k = mask.shape[0]
    keep = mask.view(k, rows, 1)
    s = torch.where(keep, blocks_s.view(k, rows, heads).float(), -torch.inf)
    o = blocks_o.view(k, rows, heads, dim).float()
    if base:
        s = torch.cat([lse.float().view(1, rows, heads), s])
        o = torch.cat([out.float().view(1, rows, heads, dim), o])
        keep = torch.cat([torch.ones_like(keep[:1]), keep])
    m = s.max(dim=0).values
    m = torch.where(torch.isinf(m), torch.zeros_like(m), m)  # all -inf: weights 0, no NaN
    w = torch.exp2(s - m)  # [k (+1), rows, heads]; masked blocks 0
    total = w.sum(dim=0)
    o = torch.where(keep.unsqueeze(-1), o, 0.0)  # a skipped block's NaN must not leak
    merged = (w.unsqueeze(-1) * o).sum(dim=0) / total.clamp(min=1e-30).unsqueeze(-1)
    merged = torch.where(total.unsqueeze(-1) > 0, merged, 0.0)
    out.copy_(merged.to(out.dtype))
    lse.copy_(torch.where(total > 0, torch.log2(total) + m, -torch.inf))


if triton is not None:

    @triton.jit
    def _merge_kernel(
        out_ptr, lse_ptr, blocks_o_ptr, blocks_s_ptr, mask_ptr, rows,
        HEADS: tl.constexpr, DIM: tl.constexpr, BLOCKS: tl.constexpr, BASE: tl.constexpr,
        BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
    ):  # fmt: skip
        row = tl.program_id(0)
        h = tl.arange(0, BLOCK_H)
        d = tl.arange(0, BLOCK_D)
        hmask = h < HEADS
        hd = hmask[:, None] & (d[None, :] < DIM)
        offs = (row * HEADS + h)[:, None] * DIM + d[None, :]
        if BASE:
            m = tl.load(lse_ptr + row * HEADS + h, mask=hmask, other=-float("inf"))
        else:
            m = tl.full([BLOCK_H], -float("inf"), tl.float32)
        for j in tl.static_range(BLOCKS):  # the largest log-sum-exp among blocks with keys
            keep = tl.load(mask_ptr + j * rows + row).to(tl.int1)
            s_j = tl.load(blocks_s_ptr + (j * rows + row) * HEADS + h, mask=hmask, other=0.0)
            m = tl.maximum(m, tl.where(keep, s_j, -float("inf")))
        m = tl.where(m == -float("inf"), 0.0, m)
        total = tl.zeros([BLOCK_H], tl.float32)
        acc = tl.zeros([BLOCK_H, BLOCK_D], tl.float32)
        if BASE:
            s0 = tl.load(lse_ptr + row * HEADS + h, mask=hmask, other=-float("inf"))
            w0 = tl.exp2(s0 - m)
            o0 = tl.load(out_ptr + offs, mask=hd, other=0.0).to(tl.float32)
            total += w0
            acc += w0[:, None] * o0
        for j in tl.static_range(BLOCKS):
            keep = tl.load(mask_ptr + j * rows + row).to(tl.int1)
            s_j = tl.load(blocks_s_ptr + (j * rows + row) * HEADS + h, mask=hmask, other=0.0)
            w_j = tl.where(keep, tl.exp2(s_j - m), 0.0)
            o_j = tl.load(blocks_o_ptr + j * rows * HEADS * DIM + offs, mask=hd, other=0.0)
            total += w_j
            acc += tl.where(keep, w_j[:, None] * o_j.to(tl.float32), 0.0)
        merged = tl.where(total[:, None] > 0, acc / tl.maximum(total, 1e-30)[:, None], 0.0)
        tl.store(out_ptr + offs, merged.to(out_ptr.dtype.element_ty), mask=hd)
        lse_out = tl.where(total > 0, tl.log2(tl.maximum(total, 1e-30)) + m, -float("inf"))
        tl.store(lse_ptr + row * HEADS + h, lse_out, mask=hmask)
