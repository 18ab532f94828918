"""A step's inputs from the block table, with host work that does not grow with the context.

Exact prefix reuse. `BatchLayout.build(batch)` turns the scheduler's entries into the flat
inputs of the model (input ids, positions, slots) and the step's `AttentionMetadata`:

- Cached cascade plan. The levels' structure (`cascade_plan.plan_layout`: the batch order and
  which sequences share which run of chain pages) is re-planned only when the step's sequences
  (rows and row generations), their query lengths or the shareable pages of their chains
  change: admission, finish, preemption. Between changes the shared levels are reused as they
  are (the same `CascadeLevel` objects, so a backend may keep what it planned for them) and only
  the last level moves: each sequence's page count and last-page length.
- Host arrays, O(batch). Lengths come from the block table's per-row numpy arrays by vectorized
  indexing; a decode entry's slot is table[row, pos // page_size] * page_size + pos % page_size.
  No Python loop runs over pages or tokens on the decode path.
- Device, no sync. One packed non-blocking copy per step (slots, input ids, positions, and the
  spans of the last level); the last level's `kv_indices` are gathered from the device block
  table (`expand_spans`: repeat_interleave with the output size known on the host). The
  host-side index tensors (qo_indptr, kv_indptr, kv_last_page_len) stay CPU tensors, pinned
  when the cache is on CUDA.

Steps with prompts (admission) take the same path; their slots, copies and input ids are
gathered per entry, which costs what computing their prompt tokens costs anyway. Not here:
reuse anywhere (engine/segments.py) and the slow reference (`plan_levels` over
`Sequence.page_table`), both driven by model_runner.py.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from cascade_rag.attention.metadata import AttentionMetadata, CascadeLevel
from cascade_rag.engine.block_table import BlockTable, host_tensor, to_device
from cascade_rag.engine.cascade_plan import plan_layout
from cascade_rag.engine.scheduler import ScheduledSeq


@dataclass
class StepInputs:
    """Everything a forward pass needs, on the cache's device where the model reads it.

    Attributes:
        order: [n] batch order: query row group i of the step belongs to batch[order[i]].
        metadata: the step's attention metadata.
        input_ids, positions: [num_tokens] int64.
        last_rows: [n] int64 row whose hidden state gives sequence order[i]'s logits; None
            when that is row i (a decode step).
        scatter: [n] int64 `order` on the device, None when the order is the batch order
            (then logits come out in batch order as they are).
    """

    order: np.ndarray
    metadata: AttentionMetadata
    input_ids: torch.Tensor
    positions: torch.Tensor
    last_rows: torch.Tensor | None
    scatter: torch.Tensor | None


@dataclass
class HostInputs:
    """A step's host-side arrays (`BatchLayout.host_inputs`), before anything is copied."""

    plan: _CachedPlan
    packed: np.ndarray  # [3 * num_tokens + 2 * n] int64: slots, ids, positions, bases, counts
    num_tokens: int
    total_pages: int  # pages of the last level
    kv_indptr: np.ndarray  # [n + 1] int64, last level
    kv_last_page_len: np.ndarray  # [n] int64, last level
    copies: list[tuple[int, int]]
    last_rows: np.ndarray | None
    rows: np.ndarray  # [n] int64 block-table rows, batch order


@dataclass
class _CachedPlan:
    key: np.ndarray  # [3 * n]: row generations, query lengths, shareable chain pages
    order: np.ndarray  # [n] int64
    last_page_start: np.ndarray  # [n] int64, in batch order
    shared: list[CascadeLevel]
    qo_indptr: torch.Tensor  # [n + 1] int64 (CPU), the last level's
    scatter: torch.Tensor | None


def expand_spans(
    table: torch.Tensor, bases: torch.Tensor, counts: torch.Tensor, total: int
) -> torch.Tensor:
    """Page ids of spans of block-table rows, concatenated, computed where `table` lives.

    Args:
        table: [num_rows, num_cols] int32 block table (device mirror).
        bases: [num_spans] int64, span i's flat table index of its first page minus its offset
            in the output (row * num_cols + page_start - kv_indptr[i]).
        counts: [num_spans] int64 pages per span (kv_indptr[i + 1] - kv_indptr[i]).
        total: counts.sum(), known on the host (so nothing waits for the device).
    Returns:
        [total] int64 page ids.
    """
    per_page = torch.repeat_interleave(bases, counts, output_size=total)
    flat = per_page + torch.arange(total, device=table.device)
    return table.view(-1).index_select(0, flat).long()


class BatchLayout:
    """Builds exact-prefix steps from the block table (see the module docstring).

    Args:
        table: the scheduler's block table.
        page_size: slots per page.
        max_levels: 1 = plain attention; n > 1 = up to n - 1 shared levels.
        min_shared_tokens: as for `plan_levels`.
    """

    def __init__(
        self, table: BlockTable, page_size: int, max_levels: int, min_shared_tokens: int
    ) -> None:
        self.table = table
        self.page_size = page_size
        self.max_levels = max_levels
        self.min_shared_tokens = min_shared_tokens
        self.device = table.device
        self._pin = self.device.type == "cuda"
        self._plan: _CachedPlan | None = None
        self._no_copies = torch.zeros(0, dtype=torch.int64, device=self.device)
        self.num_replans = 0
        # the last level's page ids of the last step, kept while its pages do not change
        self._last_pages: tuple[_CachedPlan, np.ndarray, np.ndarray, torch.Tensor] | None = None
        self.num_page_gathers = 0

    def set_min_shared_tokens(self, value: int) -> None:
        """Change when a shared entry pays (the cached plan is dropped)."""
        self.min_shared_tokens = value
        self._plan = None

    def build(
        self, batch: list[ScheduledSeq], rows: np.ndarray | None = None, with_ids: bool = True
    ) -> StepInputs:
        """The step's inputs (host work O(batch) for a decode step); see `host_inputs`."""
        return self.device_inputs(self.host_inputs(batch, rows, with_ids))

    # ---- host ------------------------------------------------------------------------------

    def host_inputs(
        self, batch: list[ScheduledSeq], rows: np.ndarray | None = None, with_ids: bool = True
    ) -> HostInputs:
        """Host arrays of the step; re-plans the cascade structure only when its key moved.

        `rows`: the entries' block-table rows when every entry is a decode entry (the
        scheduler's `StepPlan.all_decode_rows`), so they are not read entry by entry.
        `with_ids` False (a decode step whose every input token is a placeholder gathered on
        the device, overlap) leaves the input ids zero instead of reading the last tokens.
        """
        table, size, n = self.table, self.page_size, len(batch)
        decode = rows is not None
        if rows is None:
            rows = np.array([b.row for b in batch], np.int64)
            # one new row each, in its private pages
            decode = all(b.slots is None for b in batch)
        kv_len = table.kv_len[rows]
        q_start = kv_len - 1 if decode else np.array([b.q_start for b in batch], np.int64)
        qo_len = kv_len - q_start
        caps = np.minimum(q_start, table.chain_end[rows]) // size
        # a generation names a row's occupant (its chain): with the query rows and the
        # shareable pages it fixes the whole cascade structure
        key = np.concatenate([table.generation[rows], qo_len, caps])
        plan = self._plan
        if plan is None or plan.key.shape != key.shape or not np.array_equal(plan.key, key):
            plan = self._plan = self._replan(batch, rows, qo_len, caps, key)
        order = plan.order
        rows_o, kv_o = rows[order], kv_len[order]
        num_pages = (kv_o + size - 1) // size
        counts = num_pages - plan.last_page_start
        kv_indptr = np.zeros(n + 1, np.int64)
        np.cumsum(counts, out=kv_indptr[1:])
        last_len = kv_o - (num_pages - 1) * size
        bases = rows_o * table.num_cols + plan.last_page_start - kv_indptr[:-1]
        copies: list[tuple[int, int]] = []
        last_rows = None
        if decode:
            pos = kv_o - 1
            slots = table.host[rows_o, pos // size].astype(np.int64) * size + pos % size
            if with_ids:
                last_ids = np.fromiter((b.seq.token_ids[-1] for b in batch), np.int64, n)[order]
            else:
                last_ids = np.zeros(n, np.int64)
            packed = np.concatenate([slots, last_ids, pos, bases, counts])
            num_tokens = n
        else:
            slots_l: list[int] = []
            ids: list[int] = []
            positions: list[int] = []
            for i in order.tolist():
                b = batch[i]
                if b.slots is None:
                    pos = b.kv_len - 1
                    slots_l.append(int(table.host[b.row, pos // size]) * size + pos % size)
                else:
                    slots_l.extend(b.slots)
                copies.extend(b.copies)
                ids.extend(b.seq.token_ids[b.q_start : b.kv_len])
                positions.extend(range(b.q_start, b.kv_len))
            num_tokens = len(slots_l)
            assert len(ids) == num_tokens, "one slot per new position"
            packed = np.concatenate(
                [np.array(x, np.int64) for x in (slots_l, ids, positions)] + [bases, counts]
            )
            last_rows = np.cumsum(qo_len[order]) - 1
        return HostInputs(
            plan, packed, num_tokens, int(kv_indptr[-1]), kv_indptr, last_len, copies, last_rows,
            rows_o,
        )  # fmt: skip

    def _replan(
        self,
        batch: list[ScheduledSeq],
        rows: np.ndarray,
        qo_len: np.ndarray,
        caps: np.ndarray,
        key: np.ndarray,
    ) -> _CachedPlan:
        """The cascade structure of this set of sequences (O(batch * chain depth))."""
        self.num_replans += 1
        n = len(batch)
        order = self._sharing_order(batch) if self.max_levels > 1 else list(range(n))
        order_np = np.array(order, np.int64)
        rows_o = rows[order_np]
        host = self.table.host
        layout = plan_layout(
            [batch[i].seq.nodes for i in order],
            caps[order_np].tolist(),
            qo_len[order_np].tolist(),
            lambda i, p: int(host[rows_o[i], p]),
            self.page_size,
            self.max_levels,
            self.min_shared_tokens,
        )
        shared = [self._shared_level(entries, rows_o) for entries in layout.shared]
        qo_indptr = np.zeros(n + 1, np.int64)
        np.cumsum(qo_len[order_np], out=qo_indptr[1:])
        identity = order == list(range(n))
        return _CachedPlan(
            key=key,
            order=order_np,
            last_page_start=np.array(layout.last_page_start, np.int64),
            shared=shared,
            qo_indptr=host_tensor(qo_indptr, self._pin),
            scatter=None if identity else to_device(order_np, self.device),
        )

    @staticmethod
    def _sharing_order(batch: list[ScheduledSeq]) -> list[int]:
        """`order_for_sharing`'s order (by the chains' node ids), sorting each distinct chain
        once: sequences with one chain share its last node."""
        lasts = [b.seq.nodes[-1] if b.seq.nodes else None for b in batch]
        keys = {}
        for last, b in zip(lasts, batch):
            if id(last) not in keys:
                keys[id(last)] = tuple(x.node_id for x in b.seq.nodes)
        rank = {c: r for r, c in enumerate(sorted(keys, key=keys.__getitem__))}
        return sorted(range(len(batch)), key=lambda i: rank[id(lasts[i])])

    def _shared_level(self, entries, rows_o: np.ndarray) -> CascadeLevel:
        """A shared level as tensors; its pages read once from the host table."""
        host, size = self.table.host, self.page_size
        qo = np.array([e.qo_start for e in entries] + [entries[-1].qo_end], np.int64)
        counts = np.array([e.num_pages for e in entries], np.int64)
        kv_indptr = np.zeros(len(entries) + 1, np.int64)
        np.cumsum(counts, out=kv_indptr[1:])
        pages = [host[rows_o[e.seq], e.page_start : e.page_start + e.num_pages] for e in entries]
        kv_indices = np.concatenate(pages).astype(np.int64)
        return CascadeLevel(
            qo_indptr=host_tensor(qo, self._pin),
            kv_indptr=host_tensor(kv_indptr, self._pin),
            kv_indices=to_device(kv_indices, self.device),
            kv_last_page_len=host_tensor(np.where(counts > 0, size, 0), self._pin),
            causal=False,
        )

    # ---- device ----------------------------------------------------------------------------

    def _last_level_pages(
        self, host: HostInputs, bases: torch.Tensor, counts: torch.Tensor
    ) -> torch.Tensor:
        """The last level's page ids on the device: the last step's tensor again when the
        step has the same cascade plan, rows and page counts (a row's pages change only by
        growing, which changes its count, or by a new occupant, which changes the plan), else
        gathered from the device block table. The tensor is never written after it is made."""
        kept = self._last_pages
        if (
            kept is not None
            and kept[0] is host.plan
            and np.array_equal(kept[1], host.rows)
            and np.array_equal(kept[2], host.kv_indptr)
        ):
            return kept[3]
        pages = expand_spans(self.table.dev, bases, counts, host.total_pages)
        self._last_pages = (host.plan, host.rows, host.kv_indptr, pages)
        self.num_page_gathers += 1
        return pages

    def device_inputs(self, host: HostInputs) -> StepInputs:
        """Copy the packed arrays (one non-blocking copy), gather the last level's pages on
        the device, wrap everything as the step's metadata."""
        self.table.sync_to_device()
        plan, t = host.plan, host.num_tokens
        n = len(plan.order)
        packed = to_device(host.packed, self.device)
        slots, ids, positions = packed[:t], packed[t : 2 * t], packed[2 * t : 3 * t]
        bases, counts = packed[3 * t : 3 * t + n], packed[3 * t + n :]
        last = CascadeLevel(
            qo_indptr=plan.qo_indptr,
            kv_indptr=host_tensor(host.kv_indptr, self._pin),
            kv_indices=self._last_level_pages(host, bases, counts),
            kv_last_page_len=host_tensor(host.kv_last_page_len, self._pin),
            causal=True,
        )
        if host.copies:
            pairs = to_device(np.array(host.copies, np.int64).T.copy(), self.device)
            copy_src, copy_dst = pairs[0], pairs[1]
        else:
            copy_src = copy_dst = self._no_copies
        metadata = AttentionMetadata(
            page_size=self.page_size,
            slot_mapping=slots,
            copy_src=copy_src,
            copy_dst=copy_dst,
            levels=[*plan.shared, last],
        )
        last_rows = None if host.last_rows is None else to_device(host.last_rows, self.device)
        return StepInputs(plan.order, metadata, ids, positions, last_rows, plan.scatter)
