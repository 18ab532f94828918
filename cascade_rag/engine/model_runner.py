"""Run one step: lay out the ragged batch, plan attention once, run the model, sample.

The runner turns the scheduler's `ScheduledSeq`s into flat tensors (input ids, positions,
slots), orders the batch so that sequences sharing pages are contiguous, builds the cascade
levels (or one plain level) into an `AttentionMetadata`, plans the attention backend once and
runs the model, whose layers all reuse that plan. It returns next-token logits per sequence.

Three layouts. Exact prefix reuse with the scheduler's block table (the engine's path) goes
through `BatchLayout` (engine/batch_layout.py): cached cascade structure, O(batch) host work per
decode step, nothing synced before sampling. Without a block table the runner plans with the
slow reference, `plan_levels` over `Sequence.page_table` (tests and benchmarks compare the two).
With reuse anywhere the scheduler hands each sequence's rows as query groups
(engine/segments.py); the runner lays those out in batch order and plans one level per segment
index, with the position deltas the backends rotate by.
It does not choose who runs (scheduler.py) and does not sample (sampling.py).
"""

from __future__ import annotations

import numpy as np
import torch

from cascade_rag.attention import AttentionBackend
from cascade_rag.attention.metadata import AttentionMetadata
from cascade_rag.engine.batch_layout import BatchLayout, StepInputs
from cascade_rag.engine.block_table import BlockTable, to_device
from cascade_rag.engine.cascade_plan import (
    SeqView,
    int64_tensor,
    order_for_sharing,
    plan_levels,
)
from cascade_rag.engine.kv_cache import PagePool
from cascade_rag.engine.scheduler import ScheduledSeq
from cascade_rag.engine.segments import order_groups_for_sharing, plan_segment_levels
from cascade_rag.models.llama import compute_inv_freq


class ModelRunner:
    """Runs the model over the paged KV cache.

    Args:
        model: a `LlamaForCausalLM` (forward(input_ids, positions, kv_caches, attn) -> hidden,
            compute_logits(hidden) -> logits).
        pool: the page pool whose `kv_caches` the model reads and writes.
        attn: the attention backend.
        max_cascade_levels: 1 = plain attention; n > 1 = cascade with up to n - 1 shared levels.
        min_shared_tokens: a shared entry must save this many key reads (default: the
            backend's `min_shared_tokens`, else 0).
        block_table: the scheduler's block table (exact prefix reuse): steps are built from
            it by `BatchLayout`; None plans with the slow reference.
    """

    def __init__(
        self,
        model,
        pool: PagePool,
        attn: AttentionBackend,
        max_cascade_levels: int,
        min_shared_tokens: int | None = None,
        block_table: BlockTable | None = None,
    ) -> None:
        self.model = model
        self.pool = pool
        self.attn = attn
        self.max_cascade_levels = max_cascade_levels
        # cascade only where it pays: by default the backend knows its cost of an extra level
        if min_shared_tokens is None:
            min_shared_tokens = getattr(attn, "min_shared_tokens", 0)
        self.batch_layout = (
            None
            if block_table is None
            else BatchLayout(block_table, pool.page_size, max_cascade_levels, min_shared_tokens)
        )
        self.min_shared_tokens = min_shared_tokens
        self.num_cascade_steps = 0  # steps that ran with at least one shared level
        self.graphs = None  # decode CUDA graphs (engine/cuda_graph.py), set by the engine
        # CUDA event after the last step's attention plan: plans write pinned host buffers
        # whose copies to the device run in stream order, so the next plan waits for it
        self._planned = None
        self.pending: tuple[torch.Tensor, list[tuple[int, int]]] | None = None  # see `run`
        self.device = pool.kv_caches[0][0].device
        # float32 RoPE frequencies for the position deltas of reuse anywhere
        self.inv_freq = compute_inv_freq(model.config) if model is not None else None

    @property
    def min_shared_tokens(self) -> int:
        return self._min_shared_tokens

    @min_shared_tokens.setter
    def min_shared_tokens(self, value: int) -> None:
        self._min_shared_tokens = value
        if self.batch_layout is not None:
            self.batch_layout.set_min_shared_tokens(value)

    def prepare(
        self, batch: list[ScheduledSeq], rows: np.ndarray | None = None, with_ids: bool = True
    ) -> StepInputs:
        """The step's inputs on the cache's device: ids, positions, metadata, logit rows.

        `rows` and `with_ids` as for `BatchLayout.host_inputs` (exact prefix reuse only).
        """
        if batch and batch[0].groups is None and self.batch_layout is not None:
            inputs = self.batch_layout.build(batch, rows, with_ids)
            self.num_cascade_steps += len(inputs.metadata.levels) > 1
            return inputs
        order, metadata = self._build_listed_metadata(batch)
        input_ids, positions, last_rows = self._layout(batch, order)
        scatter = None if order == list(range(len(batch))) else int64_tensor(order, self.device)
        return StepInputs(
            order=np.array(order, np.int64),
            metadata=metadata,
            input_ids=int64_tensor(input_ids, self.device),
            positions=int64_tensor(positions, self.device),
            last_rows=int64_tensor(last_rows, self.device),
            scatter=scatter,
        )

    def build_metadata(self, batch: list[ScheduledSeq]) -> tuple[list[int], AttentionMetadata]:
        """Batch order (indices into `batch`) and the step's attention metadata."""
        inputs = self.prepare(batch)
        return inputs.order.tolist(), inputs.metadata

    def _build_listed_metadata(
        self, batch: list[ScheduledSeq]
    ) -> tuple[list[int], AttentionMetadata]:
        """Reuse anywhere, or exact prefix reuse planned with the slow reference."""
        if batch and batch[0].groups is not None:
            return self._build_segment_metadata(batch)
        return self.build_reference_metadata(batch)

    def build_reference_metadata(
        self, batch: list[ScheduledSeq]
    ) -> tuple[list[int], AttentionMetadata]:
        """Exact prefix reuse the slow way: every page table rebuilt from the chunk nodes
        (`Sequence.page_table`) and planned by `plan_levels` (O(pages) per step); the
        reference that `BatchLayout` is tested against."""
        size = self.pool.page_size
        tables = [b.seq.page_table(size) for b in batch]
        if self.max_cascade_levels > 1:
            views = [
                SeqView(t, b.kv_len, b.qo_len, tuple(n.node_id for n in b.seq.nodes))
                for t, b in zip(tables, batch)
            ]
            order = order_for_sharing(views, size)
        else:  # plain attention: no grouping, no sort
            views = [SeqView(t, b.kv_len, b.qo_len) for t, b in zip(tables, batch)]
            order = list(range(len(batch)))
        levels = plan_levels(
            [views[i] for i in order],
            size,
            self.max_cascade_levels,
            device="cpu",  # index lists: backends move what their kernels read
            min_shared_tokens=self.min_shared_tokens,
        )
        self.num_cascade_steps += len(levels) > 1
        slots: list[int] = []
        copies: list[tuple[int, int]] = []
        for i in order:
            b = batch[i]
            if b.slots is None:  # decode: the one new position's slot in its page table
                pos = b.kv_len - 1
                slots.append(tables[i][pos // size] * size + pos % size)
            else:
                slots.extend(b.slots)
            copies.extend(b.copies)
        metadata = AttentionMetadata(
            page_size=size,
            slot_mapping=int64_tensor(slots, self.device),
            copy_src=int64_tensor([c[0] for c in copies], self.device),
            copy_dst=int64_tensor([c[1] for c in copies], self.device),
            levels=levels,
        )
        return order, metadata

    def _build_segment_metadata(
        self, batch: list[ScheduledSeq]
    ) -> tuple[list[int], AttentionMetadata]:
        """Reuse anywhere: the query groups of every sequence, one level per segment index;
        with cascade, groups reading the same chunk pages share entries (segments.py)."""
        layout = [(i, g) for i, b in enumerate(batch) for g in b.groups]
        share = self.max_cascade_levels > 1
        if share:
            groups = [g for _, g in layout]
            order = order_groups_for_sharing(groups, self.min_shared_tokens)
            layout = [layout[j] for j in order]
        self._group_layout = layout  # row order of this step (read by `_layout`)
        groups = [g for _, g in layout]
        levels = plan_segment_levels(
            groups,
            self.pool.page_size,
            device="cpu",
            min_shared_tokens=self.min_shared_tokens if share else None,
        )
        self.num_cascade_steps += share and self._spans_groups(levels, groups)
        slots = [s for g in groups for s in g.slots]
        copies = [c for b in batch for c in b.copies]
        k_deltas = [g.k_delta for g in groups for _ in g.positions]
        metadata = AttentionMetadata(
            page_size=self.pool.page_size,
            slot_mapping=int64_tensor(slots, self.device),
            copy_src=int64_tensor([c[0] for c in copies], self.device),
            copy_dst=int64_tensor([c[1] for c in copies], self.device),
            levels=levels,
            k_rope_delta=int64_tensor(k_deltas) if any(k_deltas) else None,
            rope_inv_freq=self.inv_freq,
        )
        return list(range(len(batch))), metadata

    @staticmethod
    def _spans_groups(levels, groups) -> bool:
        """Whether a shared level has an entry over the rows of more than one group."""
        bounds = {0}
        n = 0
        for g in groups:
            n += len(g.positions)
            bounds.add(n)
        for lv in levels[:-1]:
            qo = lv.qo_indptr.tolist()
            counts = lv.kv_indptr.tolist()
            for e in range(len(qo) - 1):
                if counts[e + 1] > counts[e]:
                    inner = [b for b in bounds if qo[e] < b < qo[e + 1]]
                    if inner:
                        return True
        return False

    def _layout(self, batch: list[ScheduledSeq], order: list[int]):
        """Flat input ids, positions, and the row of each sequence's logits (batch order)."""
        input_ids: list[int] = []
        positions: list[int] = []
        last_rows: list[int] = []
        if batch and batch[0].groups is not None:  # reuse anywhere: the planned group order
            last_rows = [0] * len(batch)
            for i, g in self._group_layout:
                input_ids.extend(g.token_ids)
                positions.extend(g.positions)
                if g is batch[i].groups[-1]:  # the private group: its last row gives logits
                    last_rows[i] = len(input_ids) - 1
            return input_ids, positions, last_rows
        for i in order:
            b = batch[i]
            if b.groups is not None:
                for g in b.groups:
                    input_ids.extend(g.token_ids)
                    positions.extend(g.positions)
            else:
                input_ids.extend(b.seq.token_ids[b.q_start : b.kv_len])
                positions.extend(range(b.q_start, b.kv_len))
            last_rows.append(len(input_ids) - 1)
        return input_ids, positions, last_rows

    @torch.inference_mode()
    def run(self, batch: list[ScheduledSeq], rows: np.ndarray | None = None) -> torch.Tensor:
        """Forward the step; returns float32 logits [len(batch), vocab] in `batch` order.

        Nothing here waits for the device: host-to-device copies are non-blocking and no
        device tensor is read back before the caller samples. With `pending` set (overlap,
        engine/llm_engine.py: (the previous step's sampled ids on the device, [(j, i)])),
        entry j's last input token is a placeholder on the host and is ids[i], gathered on
        the device; the engine sets it for the one call. Pending rows None: every entry is a
        decode entry whose token is ids[j] (the previous step ran these very sequences).
        `rows`: the scheduler's `StepPlan.all_decode_rows`, or None.
        """
        all_pending = self.pending is not None and self.pending[1] is None
        inputs = self.prepare(batch, rows, with_ids=not all_pending)
        if self.pending is not None:
            self._gather_pending(batch, inputs, *self.pending)
        if self._planned is not None:  # the last plan's copies out of pinned host buffers
            self._planned.synchronize()  # are made (the step before the previous one ran)
        if self.graphs is not None and self.graphs.can_run(inputs.metadata, len(batch)):
            logits_sorted = self.graphs.run(
                inputs.input_ids, inputs.positions, inputs.metadata, inputs.last_rows
            )
            self._planned = getattr(self.graphs, "planned", None)
        else:
            self.attn.plan(inputs.metadata)
            self._planned = _record_event(self.device)
            hidden = self.model(inputs.input_ids, inputs.positions, self.pool.kv_caches, self.attn)
            if inputs.last_rows is not None:
                hidden = hidden[inputs.last_rows]
            logits_sorted = self.model.compute_logits(hidden)
        if inputs.scatter is None:
            return logits_sorted
        logits = torch.empty_like(logits_sorted)
        logits[inputs.scatter] = logits_sorted
        return logits

    def _gather_pending(
        self,
        batch: list[ScheduledSeq],
        inputs: StepInputs,
        ids: torch.Tensor,
        rows: list[tuple[int, int]] | None,
    ) -> None:
        """Overwrite the placeholder input ids of `rows` ((entry, index into `ids`)) with the
        previous step's sampled ids, on the device (one small copy of host indices); rows
        None: entry j's one input row takes ids[j] (one gather in batch order, no copy)."""
        if rows is None:
            assert inputs.input_ids.shape[0] == len(batch), "one input row per decode entry"
            src = ids if inputs.scatter is None else ids.index_select(0, inputs.scatter)
            inputs.input_ids.copy_(src)
            return
        last = self._last_input_rows(batch, inputs)
        index = np.array([[last[j] for j, _ in rows], [i for _, i in rows]], np.int64)
        index = to_device(index, self.device)
        inputs.input_ids.index_copy_(0, index[0], ids.index_select(0, index[1]))

    def _last_input_rows(self, batch: list[ScheduledSeq], inputs: StepInputs) -> np.ndarray:
        """[len(batch)] flat input row of each entry's last position (its newest token)."""
        n = len(batch)
        last = np.empty(n, np.int64)
        if batch and batch[0].groups is not None:  # reuse anywhere: the planned group order
            row = 0
            for i, g in self._group_layout:
                row += len(g.positions)
                if g is batch[i].groups[-1]:
                    last[i] = row - 1
            return last
        order = inputs.order
        qo_len = np.fromiter((b.kv_len - b.q_start for b in batch), np.int64, n)
        last[order] = np.cumsum(qo_len[order]) - 1
        return last


def _record_event(device: torch.device):
    """A CUDA event recorded now on the current stream (None elsewhere)."""
    if device.type != "cuda":
        return None
    event = torch.cuda.Event()
    event.record()
    return event
