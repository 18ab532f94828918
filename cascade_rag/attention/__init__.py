"""Attention backends over the paged KV cache: PyTorch (CPU, reference) and FlashInfer (GPU)."""

from __future__ import annotations

from typing import Protocol

import torch

from cascade_rag.attention.metadata import AttentionMetadata, CascadeLevel


class AttentionBackend(Protocol):
    """What the model calls: plan once per step, then forward once per layer."""

    def plan(self, metadata: AttentionMetadata) -> None: ...

    def forward(
        self,
        q: torch.Tensor,  # [num_tokens, num_qo_heads, head_dim], RoPE already applied
        k: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim], RoPE already applied
        v: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
        k_cache: torch.Tensor,  # [num_pages, page_size, num_kv_heads, head_dim]
        v_cache: torch.Tensor,
    ) -> torch.Tensor:  # [num_tokens, num_qo_heads, head_dim]
        ...


__all__ = ["AttentionBackend", "AttentionMetadata", "CascadeLevel"]
