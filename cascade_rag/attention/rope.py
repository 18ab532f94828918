"""Rotary position embedding (RoPE): the rotation itself and position shifts of reused chunk KV.

The model rotates every query and key at its position in the request (`apply_rotary`). A chunk
whose KV is reused at another offset ("reuse anywhere", engine/segments.py) keeps its keys rotated
at the *canonical* positions c..c+n-1 where it was computed; placed at offset d in a request, it
is read with a position delta `delta = d - c`. The attention backends call `shift_tables` and
`rotate` from here, so this module is the one place where those deltas become rotations:

* Query re-rotation. A query row at position p reads such a chunk's keys with its query rotated
  at p - delta instead of p. RoPE scores depend only on the difference of the two rotations,
  (p - delta) - (c + i) = p - (d + i), so the scores are the scores of keys at their true
  positions d + i, exactly (up to rounding). Rotations of one plane compose, R(a) R(b) = R(a + b),
  so the backend rotates the already rotated query by -delta (`shift_tables(deltas)`); a row
  with delta 0 gets cos = 1, sin = 0, which leaves it bit for bit unchanged.
* Why not key re-rotation. Rotating the chunk's keys by delta when placing them is equally
  exact, but it copies the chunk's KV once per offset and request, so requests that hold the same
  chunk at different offsets no longer share its pages, and a kernel can no longer read them once
  for all (cascade at chunk granularity). Query re-rotation costs one elementwise rotation of the
  query rows that read a shifted segment and keeps every chunk's pages shared.
* Recomputed tokens. A token of a reused chunk recomputed in the request's context is computed
  at its true position (the model rotates its key at d + i) but stored in the chunk's segment,
  which is read with the chunk's delta; its key is therefore rotated by -delta before it is
  written (`AttentionMetadata.k_rope_delta`), i.e. stored at its canonical position c + i.

Exact for RoPE whose angle is linear in the position (default and llama3-scaled frequencies: the
scaling only changes `inv_freq`); rotations that also scale cos/sin (YaRN's attention factor)
would not compose and are not supported by the model loader. This module does not decide deltas
(the scheduler does) and holds no state.
"""

from __future__ import annotations

import torch


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """[..., d] -> [..., d]: (-x2, x1) for the halves x1, x2 (transformers' convention)."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x: [num_rows, num_heads, head_dim] by cos, sin: [num_rows, head_dim].

    Example:
        >>> q = apply_rotary(q, cos, sin)  # cos, sin from the model's RotaryEmbedding
    """
    cos = cos.unsqueeze(1)
    sin = sin.unsqueeze(1)
    return (x * cos) + (rotate_half(x) * sin)


def rotate_from_table(
    x: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor
) -> torch.Tensor:
    """x [rows, heads, d] rotated at `positions` [rows] from the model's float32 table
    `cos_sin` [max_positions, d] (cos of the angles, then their sin): the halves x1, x2 of a
    head become x1 cos - x2 sin and x2 cos + x1 sin, computed in float32 (returned so, for
    the caller to round once). The fused path's RoPE in PyTorch (`TorchKernels.rope_`) and
    the reference of the fused RoPE + KV append (attention/rope_append.py).
    """
    half = cos_sin.shape[-1] // 2
    table = cos_sin[positions.long()][:, None]  # [rows, 1, d]
    cos, sin = table[..., :half], table[..., half:]
    x1, x2 = x[..., :half].float(), x[..., half:].float()
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def shift_tables(
    deltas: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype, device: torch.device | str
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [num_rows, head_dim] that rotate rows already rotated at p to p - delta.

    Args:
        deltas: [num_rows] int64 position deltas (0: unchanged).
        inv_freq: [head_dim // 2] float32 RoPE inverse frequencies (the model's).
        dtype: dtype of the rows the tables will rotate.
        device: where the tables go.

    The angles are computed in float64 and rounded once, so a shift adds no more error than
    the model's own float32 tables at position p.

    Example:
        >>> cos, sin = shift_tables(torch.tensor([0, 120]), inv_freq, torch.float32, "cpu")
        >>> q_shifted = apply_rotary(q, cos, sin)  # row 1 now reads as if at p - 120
    """
    if deltas.dim() != 1:
        raise ValueError(f"deltas must be [num_rows], got shape {tuple(deltas.shape)}")
    angles = -deltas.to("cpu", torch.float64)[:, None] * inv_freq.to("cpu", torch.float64)
    emb = torch.cat((angles, angles), dim=-1)
    return emb.cos().to(device=device, dtype=dtype), emb.sin().to(device=device, dtype=dtype)


def rotate(x: torch.Tensor, tables: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
    """x [num_rows, num_heads, head_dim] rotated by `shift_tables` output (x's dtype), or x
    itself when `tables` is None.

    Same rotation as `apply_rotary`, computed on the two halves in place (no `rotate_half`
    copy): about half the memory traffic, which matters where keys are rotated per step.
    """
    if tables is None:
        return x
    cos, sin = tables
    half = x.shape[-1] // 2
    c = cos[:, None, :half].to(x.dtype)  # the tables repeat their first half
    s = sin[:, None, :half].to(x.dtype)
    x1, x2 = x[..., :half], x[..., half:]
    out = torch.empty_like(x)
    lo, hi = out[..., :half], out[..., half:]
    torch.mul(x1, c, out=lo)
    lo.sub_(x2 * s)
    torch.mul(x2, c, out=hi)
    hi.add_(x1 * s)
    return out
