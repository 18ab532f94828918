"""PyTorch attention over the paged KV cache with multi-level cascade (CPU path and reference).

`TorchAttention.plan` turns one step's `AttentionMetadata` into a few padded batches over all
levels (query rows, key slots and masks as index tensors on the metadata's device); `forward`,
once per layer, writes the step's new K/V into the cache, applies the boundary-page copies, runs
each batch and merges the partial results of every row with log-sum-exp (`merge_states`).

A batch runs on the CPU through PyTorch's fused flash-attention kernel (one call per batch: the
keys gathered head-major, each kv head's query group folded into its rows, the log-sum-exp
returned for the merge); elsewhere, and with `fused = False` (the reference path the fused one
is tested against), as batched matmuls (one per kv head) around a float32 softmax.

Entries with similar shapes share one padded batch (e.g. all decode rows of a level); the
batches are chosen by dynamic programming over an estimated cost (`_group_items`); long
entries are cut into row chunks so that no batch holds more than `max_block_scores` (row, key)
pairs, and a causal chunk reads only the keys its last row can see.

Where a decode step's time goes on a 2-core CPU (SmolLM2-135M, 8 rows of ~1,040 keys): the
gather of the keys from the cache (DRAM-bound, ~60% of attention), then the kernel; so a shared
entry that reads a chunk's keys once for all its rows pays at a few hundred saved key reads.

Position deltas of reused chunks (`AttentionMetadata.k_rope_delta`, `CascadeLevel.rope_delta`)
are turned into rotation tables once per step by `cascade_rag.attention.rope` and applied to the
gathered query rows of each padded batch and to the new keys before they are written.

Merged entries. An entry of a shared level whose rows are exactly the rows of one entry of the
last level, and which every row reads with the same position delta as the last level, is read
as part of that last-level entry (its keys first, so bottom-right causality is unchanged): one
softmax instead of one more batch and merge. Reuse anywhere gives one such entry per unshifted
segment of each private query group (the anchor, the first chunk); shifted segments stay levels
of their own, with their query rows rotated. Exact-prefix cascade levels never qualify (their
shared entries span several sequences). Results are unchanged beyond rounding.

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
    kv_start: int  # first key, as a position in the step's flat slot list
    kv_len: int  # keys read (causal: only those the last row sees)
    diag: int  # causal: row i of the chunk sees keys j < diag + i + 1; non-causal: kv_len
    level: int = 0  # the level it comes from (its rows' position deltas)


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
    # fused path only: [n*Hkv*K] rows of the cache viewed as [slots*Hkv, d] (head-major gather)
    kv_rows: torch.Tensor | None = None
    # fused path only: [n, 1, g*R, K] float32 0 / -inf, the query group folded into the rows
    fused_bias: torch.Tensor | None = None


@dataclass
class _Merged:
    """Shared-level entries read with the last level: their slots per last-level entry, and
    per shared level the entries to skip there."""

    extra: dict[int, list[int]]
    skipped: list[frozenset[int]]


@dataclass
class _StepPlan:
    device: torch.device
    page_size: int
    num_tokens: int
    slot_mapping: torch.Tensor  # [num_tokens]
    copy_src: torch.Tensor | None  # [num_copies]; None when there are no copies
    copy_dst: torch.Tensor | None
    blocks: list[_Block]  # items of every level, grouped into padded batches
    merge: str  # "identity" (one block, rows 0..n-1 in order), "copy" (each row once), "lse"
    out_rows: torch.Tensor | None  # [num_partials] row of each real output, blocks in order
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
        max_block_scores: most (row, key) pairs in one padded batch; bounds the score (or
            mask) memory by cutting long entries into row chunks.
        block_overhead: cost of one more batch, in (row, key) pairs of the batch cost
            `block_overhead + n * K * (R + key_cost)` that `_group_items` minimises.
        key_cost: cost of gathering one (padded) key, in (row, key) pairs.
        max_block_items: most items one batch may hold (bounds the grouping's work).
        merge_entries: read unshifted single-group entries with the last level (docstring).
        fused: run batches through PyTorch's fused CPU attention kernel where it exists (CPU);
            False selects the matmul path everywhere.

    Example:
        >>> attn = TorchAttention(num_qo_heads=9, num_kv_heads=3, head_dim=64)
        >>> attn.plan(metadata)  # once per step
        >>> out = attn.forward(q, k, v, k_cache, v_cache)  # per layer: [num_tokens, 9, 64]
    """

    max_block_scores: int = 1 << 18  # ~fastest on a 2-core CPU (9 MiB of scores at 9 heads)
    block_overhead: int = 2048
    key_cost: int = 2
    max_block_items: int = 48
    merge_entries: bool = True
    fused: bool = True
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
        inv_freq = metadata.rope_inv_freq
        merged = self._merged_entries(metadata.levels, page_size)
        items: list[_Item] = []
        slot_lists: list[torch.Tensor] = []
        row_deltas: list[torch.Tensor] = []
        base = 0
        for i, lv in enumerate(metadata.levels):
            if i == len(metadata.levels) - 1 and merged is not None:
                level_items, flat_slots = self._last_level_items(lv, page_size, merged)
            else:
                skip = merged.skipped[i] if merged is not None else frozenset()
                level_items, flat_slots = self._level_items(lv, page_size, skip)
            items += [it._replace(kv_start=it.kv_start + base, level=i) for it in level_items]
            slot_lists.append(flat_slots)
            base += flat_slots.numel()
            deltas = _nonzero_or_none(lv.rope_delta)
            row_deltas.append(
                torch.zeros(num_tokens, dtype=torch.int64) if deltas is None else deltas
            )
        flat_slots = torch.cat(slot_lists) if slot_lists else torch.zeros(0, dtype=torch.int64)
        delta_matrix = torch.stack(row_deltas) if row_deltas else None  # [levels, num_tokens]
        if delta_matrix is not None and not bool(delta_matrix.any()):
            delta_matrix = None
        blocks = [
            self._build_block(group, flat_slots, covered, device, delta_matrix, inv_freq)
            for group in self._group_items(items)
        ]
        out_rows = torch.cat([b.out_rows.cpu() for b in blocks]) if blocks else None
        merge = "lse"
        if out_rows is not None and out_rows.numel() == num_tokens:
            b = blocks[0]
            if (
                len(blocks) == 1
                and b.out_src is None
                and bool((out_rows == torch.arange(num_tokens)).all())
            ):
                merge = "identity"
            elif bool((torch.bincount(out_rows, minlength=num_tokens) == 1).all()):
                merge = "copy"
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
            blocks=blocks,
            merge=merge,
            out_rows=None if out_rows is None else out_rows.to(device),
            k_shift=k_shift,
        )

    def _level_items(
        self, level: CascadeLevel, page_size: int, skip: frozenset[int] = frozenset()
    ) -> tuple[list[_Item], torch.Tensor]:
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
            if num_pages == 0 or qo_len == 0 or e in skip:
                continue  # no keys (lse = -inf), no rows, or read with the last level
            if not 1 <= last[e] <= page_size:
                raise ValueError(
                    f"kv_last_page_len[{e}]={last[e]} must be in 1..page_size={page_size} for an "
                    f"entry with pages"
                )
            kv_len = (num_pages - 1) * page_size + last[e]
            items += self._entry_items(qo[e], qo_len, kv[e] * page_size, kv_len, level.causal)
        return items, flat_slots

    def _entry_items(
        self, row_start: int, qo_len: int, kv_start: int, kv_len: int, causal: bool
    ) -> list[_Item]:
        """An entry's rows cut into chunks of at most `max_block_scores` (row, key) pairs."""
        items = []
        rows_per_item = max(1, self.max_block_scores // kv_len)
        for r in range(0, qo_len, rows_per_item):
            num_rows = min(rows_per_item, qo_len - r)
            # causal, bottom-right aligned: entry row i sees keys j <= kv_len - qo_len + i
            diag = kv_len - qo_len + r if causal else kv_len
            item_kv = min(kv_len, diag + num_rows) if causal else kv_len
            if item_kv > 0:
                items.append(_Item(row_start + r, num_rows, kv_start, item_kv, diag))
        return items

    def _merged_entries(self, levels: list[CascadeLevel], page_size: int) -> _Merged | None:
        """Shared-level entries read with the last level (see the module docstring)."""
        if len(levels) < 2 or not self.merge_entries:
            return None
        last = levels[-1]
        qo_last = last.qo_indptr.tolist()
        zeros = torch.zeros(int(qo_last[-1]), dtype=torch.int64)
        last_deltas = zeros if last.rope_delta is None else last.rope_delta.to("cpu", torch.int64)
        entry_of = {(qo_last[e], qo_last[e + 1]): e for e in range(len(qo_last) - 1)}
        extra: dict[int, list[int]] = {}  # last-level entry -> slots read before its own
        skipped: list[frozenset[int]] = []
        for lv in levels[:-1]:
            qo, kv = lv.qo_indptr.tolist(), lv.kv_indptr.tolist()
            last_len = lv.kv_last_page_len.tolist()
            pages = lv.kv_indices.tolist()
            if len(pages) != kv[-1]:
                return None  # malformed: the per-level path raises the error
            deltas = zeros if lv.rope_delta is None else lv.rope_delta.to("cpu", torch.int64)
            skip = set()
            for e in range(len(qo) - 1):
                target = entry_of.get((qo[e], qo[e + 1]))
                num_pages = kv[e + 1] - kv[e]
                if target is None or num_pages <= 0 or qo[e + 1] <= qo[e]:
                    continue
                if not 1 <= last_len[e] <= page_size:
                    return None
                rows = slice(qo[e], qo[e + 1])
                if not torch.equal(deltas[rows], last_deltas[rows]):
                    continue  # read at another offset than the rows' own keys
                kv_len = (num_pages - 1) * page_size + last_len[e]
                slots = extra.setdefault(target, [])
                for p in pages[kv[e] : kv[e + 1]]:
                    slots.extend(range(p * page_size, (p + 1) * page_size))
                del slots[len(slots) - page_size * num_pages + kv_len :]
                skip.add(e)
            skipped.append(frozenset(skip))
        return _Merged(extra, skipped) if extra else None

    def _last_level_items(
        self, level: CascadeLevel, page_size: int, merged: _Merged
    ) -> tuple[list[_Item], torch.Tensor]:
        """The last level's items, each entry reading its merged keys before its own."""
        qo, kv = level.qo_indptr.tolist(), level.kv_indptr.tolist()
        last = level.kv_last_page_len.tolist()
        pages = level.kv_indices.tolist()
        if len(pages) != kv[-1]:
            raise ValueError(f"kv_indices has {len(pages)} pages but kv_indptr[-1] = {kv[-1]}")
        slots: list[int] = []
        items: list[_Item] = []
        offsets = range(page_size)
        for e in range(len(qo) - 1):
            num_pages, qo_len = kv[e + 1] - kv[e], qo[e + 1] - qo[e]
            if num_pages < 0 or qo_len < 0:
                raise ValueError(f"qo_indptr and kv_indptr must be non-decreasing (entry {e})")
            kv_start = len(slots)
            slots += merged.extra.get(e, [])
            if num_pages:
                if not 1 <= last[e] <= page_size:
                    raise ValueError(
                        f"kv_last_page_len[{e}]={last[e]} must be in 1..page_size={page_size} "
                        "for an entry with pages"
                    )
                own = [p * page_size + o for p in pages[kv[e] : kv[e + 1]] for o in offsets]
                slots += own[: (num_pages - 1) * page_size + last[e]]
            if qo_len and len(slots) > kv_start:
                items += self._entry_items(qo[e], qo_len, kv_start, len(slots) - kv_start, True)
        return items, torch.tensor(slots, dtype=torch.int64)

    def _group_items(self, items: list[_Item]) -> list[list[_Item]]:
        """Partition the items into padded batches of least estimated cost.

        Items are sorted by row-count class (1, 2, 3-4, 5-8, ... rows), then by keys (longest
        first); a batch is a run of consecutive items, and the runs are chosen by dynamic
        programming over the cost `block_overhead + n * K * (R + key_cost)` of a batch of n
        items padded to R rows and K keys, looking back at most `max_block_items` items. A
        greedy pass would let every small item pay a little padding (e.g. decode rows padded
        to the row count of a shared entry), which adds up to far more than one more batch.
        """
        items = sorted(items, key=lambda it: (it.num_rows.bit_length(), -it.kv_len, -it.num_rows))
        m = len(items)
        best = [0] * (m + 1)  # best[j]: least cost of the first j items
        start = [0] * (m + 1)  # start[j]: first item of the last batch in that partition
        for j in range(1, m + 1):
            max_rows = max_kv = 0
            best[j] = -1
            for i in range(j - 1, max(-1, j - 1 - self.max_block_items), -1):
                it = items[i]
                max_rows = max(max_rows, it.num_rows)
                max_kv = max(max_kv, it.kv_len)
                n = j - i
                if n > 1 and n * max_rows * max_kv > self.max_block_scores:
                    break  # longer runs only grow
                cost = best[i] + self.block_overhead + n * max_kv * (max_rows + self.key_cost)
                if best[j] < 0 or cost < best[j]:
                    best[j], start[j] = cost, i
        groups: list[list[_Item]] = []
        j = m
        while j > 0:
            groups.append(items[start[j] : j])
            j = start[j]
        return groups[::-1]

    def _build_block(
        self,
        items: list[_Item],
        flat_slots: torch.Tensor,
        covered: torch.Tensor,
        device: torch.device,
        delta_matrix: torch.Tensor | None = None,
        inv_freq: torch.Tensor | None = None,
    ) -> _Block:
        items = sorted(items, key=lambda it: it.row_start)  # row order: often no scatter needed
        row_start, num_rows, kv_start, kv_len, diag, level = (
            torch.tensor(col, dtype=torch.int64)[:, None] for col in zip(*items, strict=True)
        )
        n, max_rows, max_kv = len(items), int(num_rows.max()), int(kv_len.max())
        ri = torch.arange(max_rows)[None, :].minimum(num_rows - 1)  # [n, R]
        kj = torch.arange(max_kv)[None, :].minimum(kv_len - 1)  # [n, K]
        q_rows = row_start + ri
        kv_slots = flat_slots[kv_start + kj]
        # row i sees keys j < diag + i + 1 (non-causal items have diag = kv_len: all keys)
        limit = (diag + ri + 1).clamp(0).minimum(kv_len)
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
        if delta_matrix is not None:  # each padded row's delta in its item's level
            row_deltas = delta_matrix[level, q_rows].reshape(-1)
            if bool(row_deltas.any()):
                q_shift = rope.shift_tables(row_deltas, inv_freq, torch.float32, device)
        kv_rows = fused_bias = None
        if self._fused(device):
            # [n, Hkv, K]: kv head h of key slot s is row s * Hkv + h of the flat cache
            hkv = self.num_kv_heads
            kv_rows = (kv_slots[:, None, :] * hkv + torch.arange(hkv)[None, :, None]).reshape(-1)
            kv_rows = kv_rows.to(device)
            if bias is not None:  # rows of a kv head are (query head of its group, row)
                g = self.group_size
                fused_bias = bias.view(n, 1, 1, max_rows, max_kv).expand(n, 1, g, max_rows, max_kv)
                fused_bias = fused_bias.reshape(n, 1, g * max_rows, max_kv)
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
            kv_rows,
            fused_bias,
        )

    def _fused(self, device: torch.device) -> bool:
        """Whether blocks run through PyTorch's fused CPU attention kernel."""
        return self.fused and _flash_cpu is not None and torch.device(device).type == "cpu"

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

        if not p.blocks:  # no query rows this step
            return q.new_zeros(q.shape)
        qs = q * self.scale
        if p.merge == "identity":
            return self._run_block(p.blocks[0], qs, k_flat, v_flat)[0].to(q.dtype)
        outs, lses = [], []
        for b in p.blocks:
            o_b, lse_b = self._run_block(b, qs, k_flat, v_flat)
            if b.out_src is not None:
                o_b, lse_b = o_b[b.out_src], lse_b[b.out_src]
            outs.append(o_b)
            lses.append(lse_b)
        o_all, lse_all = torch.cat(outs), torch.cat(lses)  # [num_partials, Hq, (d)]
        if p.merge == "copy":  # every row has exactly one partial result
            return q.new_empty(q.shape).index_copy_(0, p.out_rows, o_all.to(q.dtype))
        return _merge_partials(o_all, lse_all, p.out_rows, p.num_tokens).to(q.dtype)

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

    def _run_block(
        self, b: _Block, qs: torch.Tensor, k_flat: torch.Tensor, v_flat: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """o: [n*R, Hq, d], lse: [n*R, Hq] for the block's padded rows."""
        n, r, kk = b.num_items, b.max_rows, b.max_kv
        hkv, g, d = self.num_kv_heads, self.group_size, self.head_dim
        if b.kv_rows is not None:
            return self._run_block_fused(b, qs, k_flat, v_flat)
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

    def _run_block_fused(
        self, b: _Block, qs: torch.Tensor, k_flat: torch.Tensor, v_flat: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The block through PyTorch's fused CPU flash-attention kernel (tiled: no score matrix
        in memory, one exp per score), which also returns the log-sum-exp the merge needs.

        Grouped-query attention without copying keys per query head: the g query heads of a
        kv head are folded into that head's rows ([n, Hkv, g*R, d] against [n, Hkv, K, d]),
        with the mask repeated per query head. The keys are gathered head-major, so the
        kernel reads each item's keys of one head contiguously.
        """
        n, r, kk = b.num_items, b.max_rows, b.max_kv
        hkv, g, d = self.num_kv_heads, self.group_size, self.head_dim
        q_b = rope.rotate(qs.index_select(0, b.q_rows), b.q_shift)  # [n*R, Hq, d]
        q_b = q_b.view(n, r, hkv, g, d).permute(0, 2, 3, 1, 4).reshape(n, hkv, g * r, d)
        k_b = k_flat.view(-1, d).index_select(0, b.kv_rows).view(n, hkv, kk, d)
        v_b = v_flat.view(-1, d).index_select(0, b.kv_rows).view(n, hkv, kk, d)
        mask = b.fused_bias
        if mask is not None and qs.dtype not in (torch.float32, torch.bfloat16):
            mask = mask.to(qs.dtype)  # the kernel takes a float32 mask with float32/bfloat16
        o, lse = _flash_cpu(q_b, k_b, v_b, 0.0, False, attn_mask=mask, scale=1.0)
        o = o.view(n, hkv, g, r, d).permute(0, 3, 1, 2, 4).reshape(n * r, hkv * g, d)
        lse = lse.view(n, hkv, g, r).permute(0, 3, 1, 2).reshape(n * r, hkv * g)
        return o, lse.float()


def _merge_partials(
    o: torch.Tensor, lse: torch.Tensor, rows: torch.Tensor, num_rows: int
) -> torch.Tensor:
    """Merge partial results over disjoint key sets into one per row (log-sum-exp).

    o: [P, H, d] and lse: [P, H] of P partials, `rows[i]` the query row of partial i; every row
    has at least one partial with a finite lse. Returns [num_rows, H, d] float32.
    """
    lse = lse.float()
    top = torch.full((num_rows, lse.shape[1]), float("-inf"), device=lse.device)
    top.scatter_reduce_(0, rows[:, None].expand_as(lse), lse, "amax")
    w = torch.exp(lse - top.clamp(min=_FINITE_MIN).index_select(0, rows))  # [P, H]
    num = torch.zeros(num_rows, *o.shape[1:], device=o.device)
    num.index_add_(0, rows, o.float() * w.unsqueeze(-1))
    den = torch.zeros(num_rows, lse.shape[1], device=lse.device).index_add_(0, rows, w)
    return num / den.unsqueeze(-1)


def _nonzero_or_none(deltas: torch.Tensor | None) -> torch.Tensor | None:
    """Position deltas as a CPU int64 tensor, or None when there are none or all are 0."""
    if deltas is None:
        return None
    deltas = deltas.to("cpu", torch.int64)
    return deltas if bool(deltas.any()) else None


# PyTorch's fused CPU flash attention returning (output, logsumexp); None where unavailable
_flash_cpu = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
