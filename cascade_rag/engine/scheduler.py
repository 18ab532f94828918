"""Continuous batching over the chunk KV cache.

Every step runs one forward pass over a ragged batch: each running sequence contributes its
one pending token (decode) and newly admitted sequences contribute the prompt tokens that
are not already cached (prefill); a sequence joins the batch as soon as it fits and leaves
as soon as it finishes. Admission walks the chunk prefix tree: cached nodes are pinned and
reused, missing nodes are created and computed by the admitting sequence, and nodes created
by an earlier sequence of the same step are reused too (all K/V of a layer is written before
that layer's attention runs). When pages run out the cache evicts unused chunk nodes; when
that is not enough the most recently admitted running sequence (possibly the one asking) is
preempted and recomputed later.

Failures are attributed to one sequence wherever they can be: an error while admitting or
growing a sequence fails that sequence alone (`StepPlan.failed`). A sequence marked `isolate`
(its batch failed in the model and the culprit is not known yet) runs its next step alone, so
a request that cannot run fails by itself and the others get the output they would have had
alone.

Block table (exact prefix reuse). Every running sequence holds a row of the scheduler's
`BlockTable` (block_table.py): written whole at admission, appended to when the sequence grows
into a new page, given back when it is released. A decode entry carries only its row; the model
runner reads page ids, slots and lengths from the table, so a decode step costs the same host
work at any context length.

With a `RecomputePolicy` (reuse anywhere, engine/segments.py) admission places every chunk
after the anchor at any offset: the chunk's node under the anchor is reused or created (and
computed at its canonical positions by the admitting sequence), the tokens the policy picks are
recomputed in context into private copies of their pages, and the step's rows are given as
query groups with their segments instead of one range per sequence.

The scheduler decides who runs and which positions each writes where; it does not build
attention metadata or run the model (model_runner.py does).
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from cascade_rag.chunks import ChunkType
from cascade_rag.engine.block_table import BlockTable
from cascade_rag.engine.kv_cache import ChunkKVCache, ChunkNode, OutOfPagesError
from cascade_rag.engine.segments import (
    Placement,
    QueryGroup,
    RecomputePolicy,
    Segment,
    runs,
    segment_slots,
)
from cascade_rag.engine.sequence import Sequence, SequenceStatus

logger = logging.getLogger(__name__)


@dataclass
class ScheduledSeq:
    """One sequence's share of a step.

    Attributes:
        seq: the sequence.
        q_start: first position computed by this step (positions [q_start, len(token_ids))).
        slots: [num_new] flat cache slot where each new position's K/V is written; None for
            a decode entry, whose one slot is read from its block-table row
            (row[pos // page_size] * page_size + pos % page_size, for the whole batch at once).
        copies: (src_slot, dst_slot) boundary-page copies to make before attention.
        row: exact prefix reuse: the sequence's row in the scheduler's `BlockTable` (its page
            per page index after this step's growth); -1 with reuse anywhere.
        groups: reuse anywhere only: the step's query rows of this sequence as groups with
            their segments (the last row of the last group gives the logits); `slots` and
            `row` are then unused and the private rows are [q_start, kv_len).
        num_extra_rows: reuse anywhere: rows computed besides the private ones (chunk nodes
            this sequence creates, recomputed chunk tokens).
    """

    seq: Sequence
    q_start: int
    slots: list[int] | None
    copies: list[tuple[int, int]]
    row: int = -1
    groups: list[QueryGroup] | None = None
    num_extra_rows: int = 0

    @property
    def kv_len(self) -> int:
        return len(self.seq.token_ids)

    @property
    def qo_len(self) -> int:
        return self.kv_len - self.q_start


@dataclass
class StepPlan:
    """What one step computes.

    `created`: nodes it computes for the first time; `preempted`: sequences sent back to
    wait; `failed`: sequences that cannot continue, each with its error (alone, it outgrew the
    page pool, or admitting it raised). `num_decode`: the first entries of `scheduled` are
    decode entries of running sequences (one new position each), the rest admit prompts;
    `decode_rows` ([num_decode] int64) their block-table rows when the scheduler made them all
    at once (`Scheduler._decode_all`), else None.
    """

    scheduled: list[ScheduledSeq]
    created: list[ChunkNode]
    preempted: list[Sequence]
    failed: list[tuple[Sequence, BaseException]]
    num_decode: int = 0
    decode_rows: np.ndarray | None = None

    @property
    def all_decode_rows(self) -> np.ndarray | None:
        """The entries' block-table rows if every entry is a decode entry made at once."""
        rows = self.decode_rows
        return rows if rows is not None and len(rows) == len(self.scheduled) else None


class Scheduler:
    """FCFS continuous-batching scheduler.

    Args:
        kv: the chunk KV cache.
        max_num_seqs: most sequences running at once.
        max_num_batched_tokens: most new tokens per step. The first prompt admitted in a
            step is admitted whatever its size (so a long prompt is never starved); further
            prompts join only while the step stays within the budget.
        recompute: None for exact prefix reuse; a policy for reuse anywhere (the cache must
            then use the segment layout).
        load_chunk: reuse anywhere: fills a new node's pages from a disk store, True if it
            did (the node is then not computed); an exception counts as False (logged).
        split_segments: reuse anywhere: give placed chunks with private copied pages their
            split into private and shared runs, so cascade can share the shared part.
    """

    def __init__(
        self,
        kv: ChunkKVCache,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        recompute: RecomputePolicy | None = None,
        load_chunk: Callable[[ChunkNode], bool] | None = None,
        split_segments: bool = False,
    ) -> None:
        assert (recompute is not None) == kv.segment_layout, "reuse anywhere <=> segment layout"
        self.recompute = recompute
        self.load_chunk = load_chunk
        self.split_segments = split_segments
        self.kv = kv
        self.page_size = kv.page_size
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        caches = kv.pool.kv_caches
        device = caches[0][0].device if caches else torch.device("cpu")
        # exact prefix reuse: a row per running sequence, read by the model runner
        self.block_table = (
            BlockTable(self.page_size, device, num_rows=max_num_seqs + 1)
            if recompute is None
            else None
        )

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # ---- one step ----------------------------------------------------------------------

    def schedule(self) -> StepPlan:
        """Choose the sequences of the next step and reserve their pages."""
        preempted: list[Sequence] = []
        failed: list[tuple[Sequence, BaseException]] = []
        created: list[ChunkNode] = []
        if self.waiting and self.waiting[0].isolate:
            entry = self._admit_alone(self.waiting[0], created, failed)
            if entry is not None:
                return StepPlan([entry], created, preempted, failed)
            if not failed:  # no room yet: let the running sequences finish first
                return self._schedule_running(preempted, failed)

        plan = self._schedule_running(preempted, failed)
        decode = plan.scheduled
        if not self.waiting:
            return plan
        prefill: list[ScheduledSeq] = []
        budget = self.max_num_batched_tokens - len(decode)
        while self.waiting and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if seq.isolate:
                break  # runs alone in a step of its own
            if prefill and self._new_tokens_if_admitted(seq) > budget:
                break
            try:
                entry = self._admit(seq, created)
            except Exception as exc:  # noqa: BLE001 - this sequence fails alone
                self.waiting.popleft()
                failed.append((seq, exc))
                continue
            if entry is None:
                break
            self.waiting.popleft()
            self.running.append(seq)
            prefill.append(entry)
            budget -= entry.qo_len
        return StepPlan(decode + prefill, created, preempted, failed, len(decode), plan.decode_rows)

    def _schedule_running(
        self, preempted: list[Sequence], failed: list[tuple[Sequence, BaseException]]
    ) -> StepPlan:
        """Decode entries for the running sequences (each needs room for its pending token)."""
        if self.block_table is not None and not preempted and not failed:
            plan = self._decode_all()
            if plan is not None:
                return plan
        decode: list[ScheduledSeq] = []
        for seq in list(self.running):
            if seq.status is not SequenceStatus.RUNNING:
                continue  # preempted while making room for another sequence
            try:
                while not self._grow(seq):
                    victim = self._newest_running(exclude=seq)
                    if victim is None:  # alone and still no page: it outgrew the pool
                        self.release(seq)
                        failed.append((seq, OutOfPagesError(self.too_big(seq))))
                        break
                    self._preempt(victim)
                    preempted.append(victim)
                    if victim is seq:
                        break
                else:
                    decode.append(self._decode_entry(seq))
            except Exception as exc:  # noqa: BLE001 - this sequence fails alone
                if seq.status is SequenceStatus.RUNNING:
                    self.release(seq)
                failed.append((seq, exc))
        decode = [d for d in decode if d.seq.status is SequenceStatus.RUNNING]
        return StepPlan(decode, [], preempted, failed, len(decode))

    def _decode_all(self) -> StepPlan | None:
        """Every running sequence's decode entry at once (exact prefix reuse): the usual step.

        Rows and lengths are read as arrays; `_grow` runs only for the sequences whose new
        position opens a page (their row's pages cover fewer positions than their tokens).
        Returns None, having changed nothing but pages it could allocate (which the general
        loop then finds in place), when that loop must run: a sequence that is not one token
        ahead of its KV or holds no row, or a page that is not free (preemption).
        """
        running = self.running
        n = len(running)
        if not n:
            return None
        table = self.block_table
        running_ = SequenceStatus.RUNNING
        rows = np.fromiter(
            (s.block_row if s.status is running_ else -1 for s in running), np.int64, n
        )
        lens = np.fromiter((len(s.token_ids) for s in running), np.int64, n)
        if rows.min() < 0 or not np.array_equal(table.kv_len[rows] + 1, lens):
            return None
        for i in np.flatnonzero(table.num_pages[rows] * self.page_size < lens).tolist():
            if not self._grow(running[i]):
                return None
        table.kv_len[rows] = lens
        decode = [
            ScheduledSeq(seq, pos, None, [], row)
            for seq, pos, row in zip(running, (lens - 1).tolist(), rows.tolist())
        ]
        return StepPlan(decode, [], [], [], n, rows)

    def _admit_alone(
        self,
        seq: Sequence,
        created: list[ChunkNode],
        failed: list[tuple[Sequence, BaseException]],
    ) -> ScheduledSeq | None:
        """Admit an isolated sequence into a step of its own (the running ones skip it)."""
        try:
            entry = self._admit(seq, created)
        except Exception as exc:  # noqa: BLE001 - this sequence fails alone
            self.waiting.popleft()
            failed.append((seq, exc))
            return None
        if entry is None:
            if not self.running:  # nothing will ever free pages for it
                self.waiting.popleft()
                failed.append((seq, OutOfPagesError(self.too_big(seq))))
            return None
        self.waiting.popleft()
        self.running.append(seq)
        return entry

    def requeue_isolated(self, seqs: list[Sequence]) -> None:
        """Send the released sequences of a failed step back to wait, each to run alone next.

        Their KV is recomputed (prompt and generated tokens), as after a preemption.
        """
        for seq in reversed(seqs):
            seq.status = SequenceStatus.WAITING
            seq.isolate = True
            self.waiting.appendleft(seq)

    def too_big(self, seq: Sequence) -> str:
        pool = self.kv.pool
        return (
            f"request {seq.seq_id} ({len(seq.token_ids)} tokens) does not fit in the KV pool "
            f"({pool.num_pages} pages of {pool.page_size} tokens); raise "
            "EngineConfig.kv_cache_tokens"
        )

    def finish_step(self, plan: StepPlan, failed: bool) -> None:
        """After the forward pass: publish or drop the nodes the step computed."""
        if failed:
            for entry in plan.scheduled:
                self.release(entry.seq)
            self.kv.discard(plan.created)
        else:
            self.kv.mark_ready(plan.created)
            for entry in plan.scheduled:
                seq = entry.seq
                seq.num_kv = len(seq.token_ids)
                seq.isolate = False

    def release(self, seq: Sequence) -> None:
        """Unpin a sequence's nodes and free its private pages (finish, abort, failure)."""
        for node in seq.nodes:
            self.kv.unpin(node)
        self.kv.pool.free(seq.private_pages)
        self.kv.pool.free(seq.cow_pages)
        if seq.block_row >= 0:
            self.block_table.release(seq.block_row)
            seq.block_row = -1
        seq.nodes, seq.private_pages, seq.num_kv = [], [], 0
        seq.placements, seq.cow_pages = [], []
        if seq in self.running:
            self.running.remove(seq)

    # ---- helpers -----------------------------------------------------------------------

    def _grow(self, seq: Sequence) -> bool:
        """Make sure the private pages cover every position; False if no page is free."""
        start = seq.private_start if self.recompute is not None else seq.chain_end
        need = self.kv.pages_for(start, len(seq.token_ids)) - len(seq.private_pages)
        if need <= 0:
            return True
        try:
            pages = self.kv.alloc(need)
        except OutOfPagesError:
            return False
        seq.private_pages.extend(pages)
        if seq.block_row >= 0:
            self.block_table.append(seq.block_row, pages)
        return True

    def _decode_entry(self, seq: Sequence) -> ScheduledSeq:
        pos = len(seq.token_ids) - 1
        assert seq.num_kv == pos, "a running sequence has exactly one pending token"
        if self.recompute is not None:
            return ScheduledSeq(seq, pos, [], [], groups=[self._private_group(seq, pos)])
        self.block_table.kv_len[seq.block_row] = pos + 1
        return ScheduledSeq(seq, pos, None, [], seq.block_row)

    def _newest_running(self, exclude: Sequence) -> Sequence | None:
        """The most recently admitted running sequence: `exclude` itself if it is the newest
        (it then yields its pages to the older ones, as in vLLM), None if it runs alone."""
        for seq in reversed(self.running):
            if seq.status is SequenceStatus.RUNNING:
                if seq is exclude:
                    others = [s for s in self.running if s is not seq]
                    return seq if any(s.status is SequenceStatus.RUNNING for s in others) else None
                return seq
        return None

    def _preempt(self, seq: Sequence) -> None:
        self.release(seq)
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.waiting.appendleft(seq)

    def _new_tokens_if_admitted(self, seq: Sequence) -> int:
        if self.recompute is not None:  # an estimate: missing chunks, recompute, private
            anchor, chunks = self._anchor_and_rest(seq)
            parent = self.kv.root.children.get(anchor.id) if anchor is not None else self.kv.root
            new = len(seq.token_ids) - seq.prompt.num_chunk_tokens
            for i, chunk in enumerate(chunks):
                cached = parent is not None and chunk.id in parent.children
                new += len(self.recompute.select(len(chunk))) if i else 0
                new += 0 if cached else len(chunk)
            if anchor is not None and parent is None:
                new += len(anchor)
            return new
        node, end = self.kv.root, 0
        for chunk in seq.prompt.chunks:
            child = node.children.get(chunk.id)
            if child is None:
                break
            node, end = child, child.end
        return len(seq.token_ids) - end

    def _admit(self, seq: Sequence, created: list[ChunkNode]) -> ScheduledSeq | None:
        """Pin/create the chain and allocate private pages; None (nothing held) if no room."""
        if self.recompute is not None:
            return self._admit_anywhere(seq, created)
        node, nodes, mine = self.kv.root, [], []
        q_start = None
        try:
            for chunk in seq.prompt.chunks:
                child = self.kv.lookup(node, chunk)
                if child is None:
                    child = self.kv.create(node, chunk)
                    mine.append(child)
                    if q_start is None:
                        q_start = child.start
                self.kv.pin(child)
                nodes.append(child)
                node = child
            seq.nodes = nodes
            seq.private_pages = self.kv.alloc(self.kv.pages_for(node.end, len(seq.token_ids)))
        except BaseException as exc:
            for n in nodes:
                self.kv.unpin(n)
            self.kv.discard(mine)
            if seq.private_pages:
                self.kv.pool.free(seq.private_pages)
            seq.nodes, seq.private_pages = [], []
            if isinstance(exc, OutOfPagesError):
                return None
            raise
        if q_start is None:
            q_start = node.end
        created.extend(mine)
        seq.status = SequenceStatus.RUNNING
        if seq.num_cached_tokens is None:
            seq.num_cached_tokens = q_start
            self.kv.hit_tokens += q_start
            self.kv.miss_tokens += seq.num_prompt_tokens - q_start

        copies: list[tuple[int, int]] = []
        for i, n in enumerate(nodes):
            if n in mine and n.start % self.page_size:
                copies.extend(self.kv.boundary_copy(nodes[:i], n.pages[0], n.start))
        if seq.private_pages and node.end % self.page_size:
            copies.extend(self.kv.boundary_copy(nodes, seq.private_pages[0], node.end))
        slots = self._owner_slots(seq, mine, q_start, len(seq.token_ids))
        size = self.page_size
        # the page table once: chain pages (deeper nodes over their parents' boundary pages),
        # then the private pages; decode steps only append to it
        runs = [(n.start // size, n.pages) for n in nodes]
        runs.append((node.end // size, seq.private_pages))
        seq.block_row = self.block_table.assign(runs, len(seq.token_ids), node.end)
        return ScheduledSeq(seq, q_start, slots, copies, seq.block_row)

    def _owner_slots(self, seq: Sequence, mine: list[ChunkNode], lo: int, hi: int) -> list[int]:
        """Slots of positions [lo, hi) in the pages of the owner that computes them."""
        size = self.page_size
        owners = [(n.start, n.end, n.pages) for n in mine]
        owners.append((seq.chain_end, len(seq.token_ids), seq.private_pages))
        slots: list[int] = []
        for start, end, pages in owners:
            first = start // size
            for pos in range(max(start, lo), min(end, hi)):
                slots.append(pages[pos // size - first] * size + pos % size)
        assert len(slots) == hi - lo, "every new position has exactly one owner"
        return slots

    # ---- reuse anywhere ----------------------------------------------------------------

    @staticmethod
    def _anchor_and_rest(seq: Sequence):
        """(the anchor chunk or None, the chunks placed after it)."""
        chunks = seq.prompt.chunks
        if chunks and chunks[0].type is ChunkType.SYSTEM_PROMPT:
            return chunks[0], chunks[1:]
        return None, chunks

    def _admit_anywhere(self, seq: Sequence, created: list[ChunkNode]) -> ScheduledSeq | None:
        """Place the chunks after the anchor, pick recomputed tokens, allocate private pages.

        Returns None (holding nothing) when the pool has no room.
        """
        kv, size = self.kv, self.page_size
        anchor_chunk, chunks = self._anchor_and_rest(seq)
        mine: list[ChunkNode] = []
        nodes: list[ChunkNode] = []
        placements: list[Placement] = []
        cow_pages: list[int] = []
        first_admission = seq.num_cached_tokens is None
        hit = anywhere_hit = 0

        def get(parent: ChunkNode, chunk) -> tuple[ChunkNode, bool]:
            node = kv.lookup(parent, chunk)
            fresh = node is None
            if fresh:
                node = kv.create(parent, chunk)
                if self._load(node):
                    fresh = False
                else:
                    mine.append(node)
            kv.pin(node)
            nodes.append(node)
            return node, fresh

        try:
            anchor, pos = kv.root, 0
            if anchor_chunk is not None:
                anchor, fresh = get(kv.root, anchor_chunk)
                placements.append(Placement(anchor, 0))
                hit += 0 if fresh else anchor.num_tokens
                pos = anchor.end
            for chunk in chunks:
                node, fresh = get(anchor, chunk)
                placement = Placement(node, pos)
                if placement.delta:
                    placement.recompute = self.recompute.select(node.num_tokens)
                    for page in sorted({i // size for i in placement.recompute}):
                        placement.cow[page] = kv.alloc(1)[0]
                        cow_pages.append(placement.cow[page])
                if not fresh:
                    reused = node.num_tokens - len(placement.recompute)
                    hit += reused
                    anywhere_hit += reused if placement.delta else 0
                placements.append(placement)
                pos += len(chunk)
            seq.private_start = pos
            seq.private_pages = kv.alloc(kv.pages_for(pos, len(seq.token_ids)))
        except BaseException as exc:
            for n in nodes:
                kv.unpin(n)
            kv.discard(mine)
            kv.pool.free(cow_pages)
            if seq.private_pages:
                kv.pool.free(seq.private_pages)
            seq.private_pages = []
            if isinstance(exc, OutOfPagesError):
                return None
            raise
        created.extend(mine)
        seq.nodes, seq.placements, seq.cow_pages = nodes, placements, cow_pages
        seq.status = SequenceStatus.RUNNING
        recomputed = sum(len(p.recompute) for p in placements)
        if first_admission:
            seq.num_cached_tokens = hit
            seq.num_recomputed_tokens = recomputed
            kv.hit_tokens += hit
            kv.miss_tokens += seq.num_prompt_tokens - hit
            kv.anywhere_hit_tokens += anywhere_hit
            kv.recomputed_tokens += recomputed

        groups: list[QueryGroup] = []
        anchor_shared = [placements[0].node] if anchor_chunk is not None else []
        for node in mine:  # chunk nodes computed at their canonical positions
            shared = [] if node.parent is kv.root else [_node_segment(anchor_shared[0])]
            groups.append(
                QueryGroup(
                    positions=list(range(node.start, node.end)),
                    token_ids=list(node.chunk.token_ids),
                    slots=segment_slots(node.pages, 0, node.num_tokens, size),
                    shared=shared,
                    own=_node_segment(node),
                )
            )
        copies: list[tuple[int, int]] = []
        segments = [p.segment() for p in placements]
        readable = [p.shared_segment(size, self.split_segments) for p in placements]
        for j, p in enumerate(placements):
            if not p.recompute:
                continue
            redo = set(p.recompute)
            for page, dst in p.cow.items():  # the node's slots that are not recomputed
                for i in range(page * size, min((page + 1) * size, p.num_tokens)):
                    if i not in redo:
                        copies.append((p.node.pages[page] * size + i % size, dst * size + i % size))
            tokens = p.node.chunk.token_ids
            for a, b in runs(p.recompute):
                groups.append(
                    QueryGroup(
                        positions=list(range(p.offset + a, p.offset + b)),
                        token_ids=list(tokens[a:b]),
                        slots=[p.slot(i, size) for i in range(a, b)],
                        shared=readable[:j],
                        own=segments[j].truncated(b, size),
                        k_delta=p.delta,
                    )
                )
        num_extra = sum(len(g.positions) for g in groups)
        groups.append(self._private_group(seq, seq.private_start))
        return ScheduledSeq(
            seq=seq,
            q_start=seq.private_start,
            slots=[],
            copies=copies,
            groups=groups,
            num_extra_rows=num_extra,
        )

    def _load(self, node: ChunkNode) -> bool:
        """Fill a new node from the disk store (ready at once); False: compute it."""
        if self.load_chunk is None:
            return False
        try:
            loaded = self.load_chunk(node)
        except Exception as exc:  # noqa: BLE001 - a bad entry is computed instead
            logger.warning("chunk %s: not loaded from the KV store: %s", node.chunk.id, exc)
            return False
        if loaded:
            node.ready = True
            self.kv.disk_hit_tokens += node.num_tokens
        return loaded

    def _private_group(self, seq: Sequence, q_start: int) -> QueryGroup:
        """Rows [q_start, len(token_ids)) of the private segment, reading every placement."""
        end, first = len(seq.token_ids), seq.private_start
        return QueryGroup(
            positions=list(range(q_start, end)),
            token_ids=seq.token_ids[q_start:end],
            slots=segment_slots(seq.private_pages, q_start - first, end - first, self.page_size),
            shared=[p.shared_segment(self.page_size, self.split_segments) for p in seq.placements],
            own=Segment(seq.private_pages, end - first),
        )


def _node_segment(node: ChunkNode) -> Segment:
    return Segment(node.pages, node.num_tokens)
