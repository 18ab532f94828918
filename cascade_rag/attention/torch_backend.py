"""PyTorch attention over the paged KV cache with multi-level cascade (CPU path and reference).

`TorchAttention.plan` turns one step's `AttentionMetadata` into a few padded batches per level
(query rows, key slots and masks as index tensors on the metadata's device); `forward`, once per
layer, writes the step's new K/V into the cache, applies the boundary-page copies, runs each
batch as batched matmuls (one per kv head) around a float32 softmax, and merges the levels with
`merge_states`.

Entries of a level with similar shapes share one padded batch (e.g. all decode rows of a level);
long entries are cut into row chunks so that no batch holds more than `max_block_scores`
(row, key) pairs, and a causal chunk reads only the keys its last row can see.

Position deltas of reused chunks (`AttentionMetadata.k_rope_delta`, `CascadeLevel.rope_delta`)
are turned into rotation tables once per step by `cascade_rag.attention.rope` and applied to the
gathered query rows of each padded batch and to the new keys before they are written.

It does not apply RoPE at positions (q and k arrive rotated by the model), allocate pages, or
decide the levels (the model runner does), and it has no custom kernels: it is plain PyTorch on
any device.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch

from cascade_rag.attention import rope
from cascade_rag.attention.metadata import AttentionMetadata, CascadeLevel

# lse of a row that sees no key is -inf; subtracting this instead keeps exp() at 0, not NaN
_FINITE_MIN = torch.finfo(torch.float32).min


def merge_states(
    o_a: torch.Tensor, lse_a: torch.Tensor, o_b: torch.Tensor, lse_b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge two partial attention results over disjoint key sets (log-sum-exp merge).

    Args:
        o_a, o_b: [n, num_heads, head_dim] attention outputs, each normalised over its own keys.
            A row with lse = -inf (no keys) must have a finite o (0).
        lse_a, lse_b: [n, num_heads] natural-log log-sum-exp of the scaled scores of each part.

    Returns:
        (o, lse): o [n, num_heads, head_dim] float32, the attention over the union of the keys;
        lse [n, num_heads] float32. A row empty on both sides gets o = 0, lse = -inf.

    Example:
        >>> o, lse = merge_states(o_shared, lse_shared, o_suffix, lse_suffix)
    """
    if o_a.shape != o_b.shape or lse_a.shape != lse_b.shape or o_a.shape[:-1] != lse_a.shape:
        raise ValueError(
            f"merge_states needs o: [n, heads, d] and lse: [n, heads] alike on both sides, got "
            f"o_a {tuple(o_a.shape)}, lse_a {tuple(lse_a.shape)}, "
            f"o_b {tuple(o_b.shape)}, lse_b {tuple(lse_b.shape)}"
        )
    lse_a, lse_b = lse_a.float(), lse_b.float()
    lse = torch.logaddexp(lse_a, lse_b)
    ref = lse.clamp(min=_FINITE_MIN)
    w_a = torch.exp(lse_a - ref).unsqueeze(-1)
    w_b = torch.exp(lse_b - ref).unsqueeze(-1)
    return o_a.float() * w_a + o_b.float() * w_b, lse


class _Item(NamedTuple):
    """A chunk of one entry's query rows with the keys it reads (before padding)."""

    row_start: int  # first query row
    num_rows: int
    kv_start: int  # first key, as a position in the level's flat slot list
    kv_len: int  # keys read (causal: only those the last row sees)
    diag: int  # causal: row i of the chunk sees keys j < diag + i + 1; non-causal: kv_len


@dataclass
class _Block:
    """n items padded to R rows and K keys each, run as one batched matmul per kv head."""

    num_items: int  # n
    max_rows: int  # R
    max_kv: int  # K
    q_rows: torch.Tensor  # [n*R] query row per padded row (padding repeats the item's last row)
    kv_slots: torch.Tensor  # [n*K] cache slot per padded key (padding repeats the last key)
    bias: torch.Tensor | None  # [1, n, 1, R, K] float32 0 / -inf; None when nothing is masked
    out_src: torch.Tensor | None  # [num_real] positions in n*R of real rows; None: all real
    out_rows: torch.Tensor  # [num_real] query rows they belong to
    q_shift: tuple[torch.Tensor, torch.Tensor] | None  # cos, sin [n*R, d]; None: no deltas


@dataclass
class _LevelPlan:
    blocks: list[_Block]
    is_identity: bool  # one block whose n*R rows are exactly the rows 0..num_tokens-1


@dataclass
class _StepPlan:
    device: torch.device
    page_size: int
    num_tokens: int
    slot_mapping: torch.Tensor  # [num_tokens]
    copy_src: torch.Tensor | None  # [num_copies]; None when there are no copies
    copy_dst: torch.Tensor | None
    levels: list[_LevelPlan]  # levels with at least one non-empty entry
    k_shift: tuple[torch.Tensor, torch.Tensor] | None  # cos, sin [num_tokens, d] for new keys


class TorchAttention:
    """Paged, multi-level cascade attention in plain PyTorch (satisfies `AttentionBackend`).

    Args:
        num_qo_heads: query heads; a multiple of `num_kv_heads` (grouped-query attention:
            query head h reads kv head h // (num_qo_heads // num_kv_heads)).
        num_kv_heads: key/value heads.
        head_dim: size of each head.
        scale: score scale; default 1 / sqrt(head_dim).

    Attributes:
        max_block_scores: most (row, key) pairs in one padded batch; bounds the score memory
            (times num_qo_heads * 4 bytes) by cutting long entries into row chunks.
        block_overhead: cost of one more batch, in (row, key) pairs: two items share a padded
            batch when the padding costs less than this.

    Example:
        >>> attn = TorchAttention(num_qo_heads=9, num_kv_heads=3, head_dim=64)
        >>> attn.plan(metadata)  # once per step
        >>> out = attn.forward(q, k, v, k_cache, v_cache)  # per layer: [num_tokens, 9, 64]
    """

    max_block_scores: int = 1 << 18  # ~fastest on a 2-core CPU (9 MiB of scores at 9 heads)
    block_overhead: int = 2048
    # A shared cascade level pays here only when it saves more key reads per layer than this
    # (2-core CPU, SmolLM2-135M: 8 requests sharing an 1,100-token prefix ran 15-20% faster
    # with cascade, 8 requests sharing 100-650-token runs 13% slower; read by the planner).
    min_shared_tokens: int = 4096

    def __init__(
        self, num_qo_heads: int, num_kv_heads: int, head_dim: int, scale: float | None = None
    ) -> None:
        if min(num_qo_heads, num_kv_heads, head_dim) <= 0:
            raise ValueError(
                f"head counts and head_dim must be positive, got num_qo_heads={num_qo_heads}, "
                f"num_kv_heads={num_kv_heads}, head_dim={head_dim}"
            )
        if num_qo_heads % num_kv_heads:
            raise ValueError(
                f"num_qo_heads={num_qo_heads} must be a multiple of num_kv_heads={num_kv_heads}"
            )
        self.num_qo_heads = num_qo_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.group_size = num_qo_heads // num_kv_heads
        self.scale = 1.0 / math.sqrt(head_dim) if scale is None else float(scale)
        self._plan: _StepPlan | None = None

    # ---- plan: once per step -------------------------------------------------------------

    def plan(self, metadata: AttentionMetadata) -> None:
        """Precompute the index tensors and masks that every layer of this step reuses.

        Args:
            metadata: the step's metadata. Its index tensors may live anywhere; the plan's go to
                `metadata.slot_mapping.device`, which must be the cache's device.

        Raises:
            ValueError: malformed levels (decreasing indptr, kv_indices of the wrong length,
                kv_last_page_len outside 1..page_size for an entry with pages).
        """
        page_size = metadata.page_size
        num_tokens = metadata.num_tokens
        device = metadata.slot_mapping.device
        covered = torch.zeros(num_tokens, dtype=torch.bool)  # rows that see a key somewhere
        levels = []
        inv_freq = metadata.rope_inv_freq
        for level in metadata.levels:
            items, flat_slots = self._level_items(level, page_size)
            deltas = _nonzero_or_none(level.rope_delta)
            blocks = [
                self._build_block(
                    group, flat_slots, level.causal, covered, device, deltas, inv_freq
                )
                for group in self._group_items(items)
            ]
            if blocks:
                b = blocks[0]
                is_identity = (
                    len(blocks) == 1
                    and b.out_src is None
                    and b.out_rows.numel() == num_tokens
                    and bool((b.out_rows.cpu() == torch.arange(num_tokens)).all())
                )
                levels.append(_LevelPlan(blocks, is_identity))
        uncovered = covered.logical_not().nonzero().flatten().tolist()
        assert not uncovered, f"query rows {uncovered} see no key in any level"
        has_copies = metadata.copy_src.numel() > 0
        if metadata.copy_src.shape != metadata.copy_dst.shape:
            raise ValueError(
                f"copy_src {tuple(metadata.copy_src.shape)} and copy_dst "
                f"{tuple(metadata.copy_dst.shape)} must have the same shape"
            )
        k_deltas = _nonzero_or_none(metadata.k_rope_delta)
        k_shift = None
        if k_deltas is not None:
            k_shift = rope.shift_tables(k_deltas, inv_freq, torch.float32, device)
        self._plan = _StepPlan(
            device=device,
            page_size=page_size,
            num_tokens=num_tokens,
            slot_mapping=metadata.slot_mapping.to(device=device, dtype=torch.int64),
            copy_src=metadata.copy_src.to(device=device, dtype=torch.int64) if has_copies else None,
            copy_dst=metadata.copy_dst.to(device=device, dtype=torch.int64) if has_copies else None,
            levels=levels,
            k_shift=k_shift,
        )

    def _level_items(self, level: CascadeLevel, page_size: int) -> tuple[list[_Item], torch.Tensor]:
        """Cut a level's non-empty entries into row chunks; also return its flat slot list."""
        qo = level.qo_indptr.tolist()
        kv = level.kv_indptr.tolist()
        last = level.kv_last_page_len.tolist()
        # flat_slots: [num_pages_of_level * page_size], entry e's keys start at kv[e] * page_size
        pages = level.kv_indices.to("cpu", torch.int64)
        if pages.numel() != kv[-1]:
            raise ValueError(f"kv_indices has {pages.numel()} pages but kv_indptr[-1] = {kv[-1]}")
        flat_slots = (pages[:, None] * page_size + torch.arange(page_size)).reshape(-1)
        items = []
        for e in range(level.num_entries):
            num_pages, qo_len = kv[e + 1] - kv[e], qo[e + 1] - qo[e]
            if num_pages < 0 or qo_len < 0:
                raise ValueError(f"qo_indptr and kv_indptr must be non-decreasing (entry {e})")
            if num_pages == 0 or qo_len == 0:
                continue  # no keys (lse = -inf) or no rows
            if not 1 <= last[e] <= page_size:
                raise ValueError(
                    f"kv_last_page_len[{e}]={last[e]} must be in 1..page_size={page_size} for an "
                    f"entry with pages"
                )
            kv_len = (num_pages - 1) * page_size + last[e]
            rows_per_item = max(1, self.max_block_scores // kv_len)
            for r in range(0, qo_len, rows_per_item):
                num_rows = min(rows_per_item, qo_len - r)
                # causal, bottom-right aligned: entry row i sees keys j <= kv_len - qo_len + i
                diag = kv_len - qo_len + r if level.causal else kv_len
                item_kv = min(kv_len, diag + num_rows) if level.causal else kv_len
                if item_kv > 0:
                    items.append(_Item(qo[e] + r, num_rows, kv[e] * page_size, item_kv, diag))
        return items, flat_slots

    def _group_items(self, items: list[_Item]) -> list[list[_Item]]:
        """Greedily share padded batches between items of similar size (longest keys first)."""
        groups: list[list[_Item]] = []
        cost = max_rows = 0
        for it in sorted(items, key=lambda it: (-it.kv_len, -it.num_rows)):
            if groups:
                # keys are sorted, so the group's K is its first item's kv_len
                rows = max(max_rows, it.num_rows)
                merged = (len(groups[-1]) + 1) * rows * groups[-1][0].kv_len
                own = it.num_rows * it.kv_len
                if merged <= cost + own + self.block_overhead and merged <= self.max_block_scores:
                    groups[-1].append(it)
                    cost, max_rows = merged, rows
                    continue
            groups.append([it])
            cost, max_rows = it.num_rows * it.kv_len, it.num_rows
        return groups

    def _build_block(
        self,
        items: list[_Item],
        flat_slots: torch.Tensor,
        causal: bool,
        covered: torch.Tensor,
        device: torch.device,
        deltas: torch.Tensor | None = None,
        inv_freq: torch.Tensor | None = None,
    ) -> _Block:
        items = sorted(items, key=lambda it: it.row_start)  # row order: often no scatter needed
        row_start, num_rows, kv_start, kv_len, diag = (
            torch.tensor(col, dtype=torch.int64)[:, None] for col in zip(*items, strict=True)
        )
        n, max_rows, max_kv = len(items), int(num_rows.max()), int(kv_len.max())
        ri = torch.arange(max_rows)[None, :].minimum(num_rows - 1)  # [n, R]
        kj = torch.arange(max_kv)[None, :].minimum(kv_len - 1)  # [n, K]
        q_rows = row_start + ri
        kv_slots = flat_slots[kv_start + kj]
        limit = (diag + ri + 1).clamp(0).minimum(kv_len) if causal else kv_len.expand(n, max_rows)
        mask = torch.arange(max_kv)[None, None, :] < limit[:, :, None]  # [n, R, K]
        bias = None
        if not bool(mask.all()):
            bias = torch.zeros(mask.shape).masked_fill_(~mask, float("-inf"))
            bias = bias.view(1, n, 1, max_rows, max_kv).to(device)
        real = torch.arange(max_rows)[None, :] < num_rows  # [n, R]
        out_rows = q_rows[real]
        covered[out_rows[limit[real] > 0]] = True
        out_src = None if bool(real.all()) else real.reshape(-1).nonzero().flatten().to(device)
        q_shift = None
        if deltas is not None:
            row_deltas = deltas[q_rows.reshape(-1)]
            if bool(row_deltas.any()):
                q_shift = rope.shift_tables(row_deltas, inv_freq, torch.float32, device)
        return _Block(
            n,
            max_rows,
            max_kv,
            q_rows.reshape(-1).to(device),
            kv_slots.reshape(-1).to(device),
            bias,
            out_src,
            out_rows.to(device),
            q_shift,
        )

    # ---- forward: once per layer ---------------------------------------------------------

    def forward(
        self,
        q: torch.Tensor,  # [num_tokens, num_qo_heads, head_dim], RoPE already applied
        k: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim], RoPE already applied
        v: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
        k_cache: torch.Tensor,  # [num_pages, page_size, num_kv_heads, head_dim]
        v_cache: torch.Tensor,
    ) -> torch.Tensor:  # [num_tokens, num_qo_heads, head_dim], q's dtype
        """Write k/v into the cache, apply the planned copies, and attend over all levels.

        The cache is updated in place: first `k`/`v` at `slot_mapping`, then the copies
        `copy_src -> copy_dst`, then attention reads it. Scores and outputs are computed in
        q's dtype, softmax and the merge of levels in float32.
        """
        p = self._plan
        if p is None:
            raise RuntimeError("TorchAttention.forward called before plan(metadata)")
        self._check_shapes(p, q, k, v, k_cache, v_cache)
        num_slots = k_cache.shape[0] * k_cache.shape[1]
        k_flat = k_cache.view(num_slots, self.num_kv_heads, self.head_dim)  # [slots, Hkv, d]
        v_flat = v_cache.view(num_slots, self.num_kv_heads, self.head_dim)
        k_flat.index_copy_(0, p.slot_mapping, rope.rotate(k, p.k_shift))
        v_flat.index_copy_(0, p.slot_mapping, v)
        if p.copy_src is not None:
            k_flat.index_copy_(0, p.copy_dst, k_flat.index_select(0, p.copy_src))
            v_flat.index_copy_(0, p.copy_dst, v_flat.index_select(0, p.copy_src))

        if not p.levels:  # no query rows this step
            return q.new_zeros(q.shape)
        qs = q * self.scale
        o, lse = self._run_level(p.levels[0], qs, k_flat, v_flat)
        for level in p.levels[1:]:
            o, lse = merge_states(o, lse, *self._run_level(level, qs, k_flat, v_flat))
        return o.to(q.dtype)

    def _check_shapes(self, p: _StepPlan, q, k, v, k_cache, v_cache) -> None:
        hq, hkv, d = self.num_qo_heads, self.num_kv_heads, self.head_dim
        if (
            q.shape != (p.num_tokens, hq, d)
            or k.shape != (p.num_tokens, hkv, d)
            or v.shape != k.shape
        ):
            raise ValueError(
                f"expected q [{p.num_tokens}, {hq}, {d}] and k, v [{p.num_tokens}, {hkv}, {d}] "
                f"(num_tokens from the plan), got q {tuple(q.shape)}, k {tuple(k.shape)}, "
                f"v {tuple(v.shape)}"
            )
        cache_shape = (p.page_size, hkv, d)
        if k_cache.dim() != 4 or k_cache.shape[1:] != cache_shape or v_cache.shape != k_cache.shape:
            raise ValueError(
                f"expected k_cache, v_cache [num_pages, {p.page_size}, {hkv}, {d}], got "
                f"{tuple(k_cache.shape)} and {tuple(v_cache.shape)}"
            )
        if k_cache.device != p.device:
            raise ValueError(
                f"cache is on {k_cache.device} but the metadata was planned on {p.device}; "
                f"build the metadata on the cache's device"
            )

    def _run_level(
        self, lp: _LevelPlan, qs: torch.Tensor, k_flat: torch.Tensor, v_flat: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """o: [num_tokens, Hq, d] in qs's dtype, lse: [num_tokens, Hq] float32 (-inf: no keys)."""
        if lp.is_identity:
            return self._run_block(lp.blocks[0], qs, k_flat, v_flat)
        o = qs.new_zeros(qs.shape)
        lse = torch.full(qs.shape[:2], float("-inf"), device=qs.device)
        for b in lp.blocks:
            o_b, lse_b = self._run_block(b, qs, k_flat, v_flat)
            if b.out_src is not None:
                o_b, lse_b = o_b[b.out_src], lse_b[b.out_src]
            o.index_copy_(0, b.out_rows, o_b)
            lse.index_copy_(0, b.out_rows, lse_b)
        return o, lse

    def _run_block(
        self, b: _Block, qs: torch.Tensor, k_flat: torch.Tensor, v_flat: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """o: [n*R, Hq, d], lse: [n*R, Hq] for the block's padded rows."""
        n, r, kk = b.num_items, b.max_rows, b.max_kv
        hkv, g, d = self.num_kv_heads, self.group_size, self.head_dim
        if n == 1 and r > 1 and _flash_cpu is not None and qs.device.type == "cpu":
            return self._run_block_flash(b, qs, k_flat, v_flat)
        # query head h reads kv head h // g: fold the group into the rows of each kv head
        q_b = rope.rotate(qs.index_select(0, b.q_rows), b.q_shift).view(n, r, hkv, g, d)
        q_b = q_b.permute(2, 0, 3, 1, 4).reshape(hkv, n, g * r, d)
        k_b = k_flat.index_select(0, b.kv_slots).view(n, kk, hkv, d)
        v_b = v_flat.index_select(0, b.kv_slots).view(n, kk, hkv, d)
        # one bmm per kv head reads the gathered K/V in place (strided); permuting them to
        # [n, Hkv, K, d] first would copy every key, which dominates decode
        s = qs.new_empty(hkv, n, g * r, kk)
        for h in range(hkv):
            torch.bmm(q_b[h], k_b[:, :, h].transpose(1, 2), out=s[h])
        s = s.float()  # [Hkv, n, g*R, K]
        if b.bias is not None:
            s.view(hkv, n, g, r, kk).add_(b.bias)
        lse = torch.logsumexp(s, dim=-1)  # [Hkv, n, g*R]
        p = s.sub_(lse.clamp(min=_FINITE_MIN).unsqueeze(-1)).exp_().to(qs.dtype)
        o = qs.new_empty(hkv, n, g * r, d)
        for h in range(hkv):
            torch.bmm(p[h], v_b[:, :, h], out=o[h])
        o = o.view(hkv, n, g, r, d).permute(1, 3, 0, 2, 4).reshape(n * r, hkv * g, d)
        lse = lse.view(hkv, n, g, r).permute(1, 3, 0, 2).reshape(n * r, hkv * g)
        return o, lse

    def _run_block_flash(
        self, b: _Block, qs: torch.Tensor, k_flat: torch.Tensor, v_flat: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One entry's row band through PyTorch's fused CPU flash-attention kernel (tiled, no
        score matrix in memory), which also returns the log-sum-exp the merge needs."""
        r, kk = b.max_rows, b.max_kv
        hq, hkv, g, d = self.num_qo_heads, self.num_kv_heads, self.group_size, self.head_dim
        q_b = rope.rotate(qs.index_select(0, b.q_rows), b.q_shift)
        q_b = q_b.transpose(0, 1).unsqueeze(0)  # [1, Hq, R, d]

        def heads(flat: torch.Tensor) -> torch.Tensor:  # [1, Hq, K, d], kv head per q head
            x = flat.index_select(0, b.kv_slots).view(kk, hkv, 1, d).expand(kk, hkv, g, d)
            return x.reshape(kk, hq, d).transpose(0, 1).unsqueeze(0)

        mask = None if b.bias is None else b.bias.view(r, kk).to(qs.dtype)
        o, lse = _flash_cpu(
            q_b, heads(k_flat), heads(v_flat), 0.0, False, attn_mask=mask, scale=1.0
        )
        return o[0].transpose(0, 1), lse[0].transpose(0, 1).float()


def _nonzero_or_none(deltas: torch.Tensor | None) -> torch.Tensor | None:
    """Position deltas as a CPU int64 tensor, or None when there are none or all are 0."""
    if deltas is None:
        return None
    deltas = deltas.to("cpu", torch.int64)
    return deltas if bool(deltas.any()) else None


# PyTorch's fused CPU flash attention returning (output, logsumexp); None where unavailable
_flash_cpu = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
