"""Attention metadata: what one engine step asks every layer's attention to do.

The model runner builds one `AttentionMetadata` per step (plan once per step) and the
attention backend reads it in every layer (run per layer). Names follow FlashInfer's
paged-KV vocabulary so this code reads side by side with its documentation.

Paged layout: each layer's cache is a pair of tensors
    k_cache, v_cache: [num_pages, page_size, num_kv_heads, head_dim]
and a "slot" is the flat index `page * page_size + offset`.

A step's query tokens are flattened into one ragged batch of `num_tokens` rows. Attention
is split into cascade levels. Each level is a list of entries; an entry pairs a contiguous
range of query rows (`qo_indptr`) with a page list (`kv_indptr` into `kv_indices`) whose
pages are all full except the last one, which holds `kv_last_page_len` valid slots.
Every level covers every query row exactly once (an entry may have an empty page list).
Only the last level is causal (aligned bottom-right: the last query row of an entry sees
every key of that entry); shared levels hold only keys that precede all of their queries.
The output of a query row is the log-sum-exp merge of its results over all levels.

Where the tensors live. The model runner gives `qo_indptr`, `kv_indptr` and `kv_last_page_len`
as CPU tensors (pinned when the cache is on CUDA): planners read them on the host without
waiting for the device. `kv_indices`, `slot_mapping`, `copy_src` and `copy_dst` may live on the
cache's device (the engine gathers the page ids there from its block table). Between steps whose
batch shares pages the same way, the engine passes the very same shared-level `CascadeLevel`
objects again (only the last level is new each step), so a backend may keep what it planned for
a level by identity; nobody mutates a level after building it.

Position deltas (reuse anywhere, see `cascade_rag.attention.rope`): a level may carry one delta
per query row (`rope_delta`); the row then reads that level's keys with its query rotated at
(position - delta). A row's K may likewise be stored shifted (`k_rope_delta`). Both are None in
exact-prefix steps, where every key sits at its true position.

This module holds data only; it does not decide grouping (the scheduler/model runner do)
and does not compute attention (the backends do).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class CascadeLevel:
    """One level of multi-level cascade attention.

    Attributes:
        qo_indptr: [num_entries + 1] int64, query-row ranges of the entries (cover all rows).
        kv_indptr: [num_entries + 1] int64, ranges into `kv_indices` per entry.
        kv_indices: [kv_indptr[-1]] int64, page ids (on the host or the cache's device).
        kv_last_page_len: [num_entries] int64, valid slots of each entry's last page
            (1..page_size for a non-empty entry, 0 for an entry with no pages).
        causal: True for the last level only.
        rope_delta: [num_tokens] int64 or None: each query row reads this level's keys with
            its query rotated at (position - rope_delta[row]); None means 0 for every row.
    """

    qo_indptr: torch.Tensor
    kv_indptr: torch.Tensor
    kv_indices: torch.Tensor
    kv_last_page_len: torch.Tensor
    causal: bool
    rope_delta: torch.Tensor | None = None

    @property
    def num_entries(self) -> int:
        return int(self.qo_indptr.numel()) - 1

    def kv_lens(self, page_size: int) -> torch.Tensor:
        """[num_entries] number of keys per entry."""
        num_pages = self.kv_indptr[1:] - self.kv_indptr[:-1]
        full = (num_pages - 1).clamp(min=0) * page_size
        return torch.where(num_pages > 0, full + self.kv_last_page_len, torch.zeros_like(full))


@dataclass
class AttentionMetadata:
    """Everything the attention of one step needs, built once and reused by all layers.

    Attributes:
        page_size: slots per page.
        slot_mapping: [num_tokens] int64, slot where each new token's K/V is written (on the
            host or the cache's device).
        copy_src, copy_dst: [num_copies] int64 slots; after the new K/V is written and before
            attention, slot `copy_src[i]` is copied to `copy_dst[i]` (boundary pages: a chunk
            that starts inside a page gets its own copy of the tokens before it on that page).
        levels: cascade levels; `levels[-1].causal` is True and no other level is causal.
            Plain (non-cascade) attention is the single-level case.
        k_rope_delta: [num_tokens] int64 or None: the new K of row i is rotated by
            -k_rope_delta[i] before it is written (stored at its canonical position in a
            reused chunk's segment); None means 0 for every row.
        rope_inv_freq: [head_dim // 2] float32, the model's RoPE frequencies; needed when a
            level has `rope_delta` or `k_rope_delta` is set.
    """

    page_size: int
    slot_mapping: torch.Tensor
    copy_src: torch.Tensor
    copy_dst: torch.Tensor
    levels: list[CascadeLevel]
    k_rope_delta: torch.Tensor | None = None
    rope_inv_freq: torch.Tensor | None = None

    @property
    def num_tokens(self) -> int:
        return int(self.slot_mapping.numel())

    def __post_init__(self) -> None:
        assert self.levels, "at least one level"
        assert self.levels[-1].causal and not any(lv.causal for lv in self.levels[:-1])
        for lv in self.levels:
            assert int(lv.qo_indptr[-1]) == self.num_tokens, "every level covers every query row"
            assert lv.rope_delta is None or lv.rope_delta.shape == (self.num_tokens,)
        assert self.k_rope_delta is None or self.k_rope_delta.shape == (self.num_tokens,)
        if self.has_rope_deltas:
            assert self.rope_inv_freq is not None, "position deltas need the RoPE frequencies"

    @property
    def has_rope_deltas(self) -> bool:
        return self.k_rope_delta is not None or any(lv.rope_delta is not None for lv in self.levels)
