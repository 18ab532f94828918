"""Reuse anywhere: chunk KV placed at any offset, one attention segment per chunk.

With `EngineConfig.chunk_reuse="anywhere"` a chunk's KV is computed once, right after the
request's *anchor* (its system prompt chunk, or nothing when the prompt has none), at the
canonical positions c..c+n-1 that follow the anchor, and it is reused wherever the chunk
appears: placed at offset d, it is read with the position delta d - c (query re-rotation, see
`cascade_rag.attention.rope`, which also says why keys are not re-rotated instead). So a chunk
node is keyed by (anchor node, chunk id) in the KV cache's tree and the tree is two levels deep:
anchors, then chunks. The first chunk after the anchor sits at its canonical offset (delta 0),
so its KV is exactly what full prefill computes.

Layout. In this mode every owner of KV (chunk node or a request's private tokens) keeps its
tokens from slot 0 of its first page (`ChunkKVCache(segment_layout=True)`), so each is a
FlashInfer-style page list in which only the last page is partial (docs/design.md rule 3, "one
level per partial chunk"). A request's attention is a list of segments: the anchor (delta 0), each
placed chunk (its delta), and its private tokens (causal, delta 0), merged with log-sum-exp as
cascade levels are.

Selective recomputation. What reuse loses is a chunk's attention to the chunks before it in
this request. For every chunk placed away from its canonical offset, `RecomputePolicy` picks
tokens to recompute in the request's context (EPIC: the first k tokens). A recomputed token's
query is computed at its true position over everything before it; its K/V is stored, with the
key rotated back to the canonical position, in a private copy of the chunk's page that holds it
(copy-on-write), so the chunk's segment stays one page list: private copies where tokens were
recomputed, the node's shared pages everywhere else.

Query groups. One step computes, per sequence, up to three kinds of contiguous row groups:
`fill` rows of chunk nodes it creates (canonical positions, attending the anchor), `recompute`
rows (true positions, attending the anchor, the chunks before, and their own chunk causally),
and `private` rows (the prompt tail and generated tokens). Every group reads non-causal shared
segments whose keys all precede its rows, and one causal segment that holds its own keys;
`plan_segment_levels` lays groups out as cascade levels (shared segment i in level i, the causal
segment in the last level).

Cascade at chunk granularity. Attention over a segment does not depend on the order of the
segments, and a chunk's shared pages hold the same KV in every request that reads them, at
whatever offset. With sharing on, each group's shared segments are sorted by their pages, the
groups are ordered so that groups reading the same pages are adjacent, and consecutive groups
whose i-th segment is the same page list read it through one entry of level i (the rows keep
their own deltas): the chunk's keys are read once for all of them. A placed chunk with private
copied pages carries its split into private and shared runs (`Segment.parts`); the split is
used only where its shared run is read by other groups of the step and sharing it pays (a
split costs one more segment). An entry is shared only where it saves at least
`min_shared_tokens` key reads ((rows' groups - 1) * keys), as for exact-prefix cascade.

This module holds the data types, the recomputation choice and the level planner; the scheduler
admits sequences with them, and it does not compute attention (the backends do).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import torch

from cascade_rag.attention.metadata import CascadeLevel
from cascade_rag.engine.cascade_plan import int64_tensor
from cascade_rag.engine.kv_cache import ChunkNode

RECOMPUTE_MODES = ("first",)


@dataclass(frozen=True)
class RecomputePolicy:
    """Which tokens of a chunk placed away from its canonical offset are recomputed in context.

    Args:
        num_tokens: most tokens recomputed per placed chunk (0: none, pure reuse).
        mode: "first": the chunk's first `num_tokens` tokens (EPIC); they carry the chunk's
            attention sink and its junction with the text before it.

    Example:
        >>> RecomputePolicy(16).select(chunk_len=120)
        [0, 1, ..., 15]
    """

    num_tokens: int = 24
    mode: str = "first"

    def __post_init__(self) -> None:
        if isinstance(self.num_tokens, bool) or not isinstance(self.num_tokens, int):
            raise TypeError(f"num_tokens must be an int >= 0, got {self.num_tokens!r}")
        if self.num_tokens < 0:
            raise ValueError(f"num_tokens={self.num_tokens} must be >= 0")
        if self.mode not in RECOMPUTE_MODES:
            raise ValueError(f"mode={self.mode!r} is not one of {RECOMPUTE_MODES}")

    def select(self, chunk_len: int) -> list[int]:
        """Chunk token indices to recompute, increasing."""
        return list(range(min(self.num_tokens, chunk_len)))


@dataclass
class Segment:
    """A page list read by query rows as one attention segment.

    pages: page ids, every page full except the last; num_keys: keys in the list (the last
    page holds num_keys - (len(pages) - 1) * page_size); delta: rows read these keys with
    their queries rotated at (position - delta).
    """

    pages: list[int]
    num_keys: int
    delta: int = 0
    parts: list[Segment] | None = None  # the same keys as runs of private / shared pages

    def truncated(self, num_keys: int, page_size: int) -> Segment:
        """The first `num_keys` keys of this segment."""
        assert 0 < num_keys <= self.num_keys
        return Segment(self.pages[: -(-num_keys // page_size)], num_keys, self.delta)


@dataclass
class Placement:
    """A chunk node placed at `offset` in a sequence.

    cow: page index in `node.pages` -> the sequence's private copy of that page (pages that
    hold recomputed tokens); recompute: chunk token indices recomputed in context.
    """

    node: ChunkNode
    offset: int
    cow: dict[int, int] = field(default_factory=dict)
    recompute: list[int] = field(default_factory=list)

    @property
    def delta(self) -> int:
        return self.offset - self.node.start

    @property
    def num_tokens(self) -> int:
        return self.node.num_tokens

    def segment(self) -> Segment:
        pages = [self.cow.get(i, p) for i, p in enumerate(self.node.pages)]
        return Segment(pages, self.node.num_tokens, self.delta)

    def shared_segment(self, page_size: int, split: bool) -> Segment:
        """The placement's segment as other rows read it; with `split` and private copied
        pages, its runs of private and of shared pages as `parts` (each a valid page list)."""
        whole = self.segment()
        if not split or not self.cow:
            return whole
        parts: list[Segment] = []
        n, pages = self.node.num_tokens, self.node.pages
        start = 0
        for i in range(1, len(pages) + 1):
            if i == len(pages) or (i in self.cow) != (start in self.cow):
                run = [self.cow.get(j, pages[j]) for j in range(start, i)]
                parts.append(Segment(run, min(n, i * page_size) - start * page_size, self.delta))
                start = i
        whole.parts = parts
        return whole

    def slot(self, index: int, page_size: int) -> int:
        """Slot of chunk token `index` in this placement's segment."""
        page = index // page_size
        return self.cow.get(page, self.node.pages[page]) * page_size + index % page_size


@dataclass
class QueryGroup:
    """Contiguous query rows of one sequence that read the same segments.

    positions: each row's position for the model's RoPE (canonical for fill rows, true
    otherwise); token_ids: the rows' tokens; slots: where each row's K/V is written;
    k_delta: the rows' keys are stored rotated by -k_delta (recomputed tokens of a placed
    chunk); shared: segments whose keys all precede every row (non-causal); own: the segment
    that holds the rows' own keys as its last len(positions) keys (causal, bottom-right).
    """

    positions: list[int]
    token_ids: list[int]
    slots: list[int]
    shared: list[Segment]
    own: Segment
    k_delta: int = 0

    def __post_init__(self) -> None:
        n = len(self.positions)
        assert n > 0 and len(self.token_ids) == n and len(self.slots) == n
        assert self.own.num_keys >= n, "the causal segment holds the rows' own keys"


def segment_slots(pages: list[int], start: int, end: int, page_size: int) -> list[int]:
    """Slots of segment indices [start, end) of a page list in segment layout."""
    return [pages[i // page_size] * page_size + i % page_size for i in range(start, end)]


def runs(indices: list[int]) -> list[tuple[int, int]]:
    """[start, end) runs of consecutive values of an increasing list."""
    out: list[tuple[int, int]] = []
    for i in indices:
        if out and out[-1][1] == i:
            out[-1] = (out[-1][0], i + 1)
        else:
            out.append((i, i + 1))
    return out


def _key(seg: Segment) -> tuple[int, int, int]:
    """Identifies a segment's keys: pages are owned, so the first page and the extent do."""
    return seg.pages[0], len(seg.pages), seg.num_keys


def order_groups_for_sharing(groups: list[QueryGroup], min_shared_tokens: int) -> list[int]:
    """Prepare the groups for sharing (in place) and return a group order in which groups
    reading the same pages are adjacent.

    A segment with `parts` is replaced by them where one of its parts is read by other groups
    enough to pay (`min_shared_tokens`); then each group's shared segments are sorted by their
    pages (attention does not depend on their order).
    """
    readers = Counter(_key(p) for g in groups for s in g.shared for p in (s.parts or [s]))

    def pays(seg: Segment) -> bool:
        return (readers[_key(seg)] - 1) * seg.num_keys >= max(min_shared_tokens, 1)

    for g in groups:
        shared = []
        for s in g.shared:
            split = s.parts is not None and any(pays(p) for p in s.parts)
            shared.extend(s.parts if split else [s])
        g.shared = sorted(shared, key=_key)
    return sorted(range(len(groups)), key=lambda i: [_key(s) for s in groups[i].shared])


def plan_segment_levels(
    groups: list[QueryGroup],
    page_size: int,
    device: torch.device | str = "cpu",
    min_shared_tokens: int | None = None,
) -> list[CascadeLevel]:
    """Cascade levels for query groups laid out in the given order.

    Level i holds every group's i-th shared segment (an empty entry for a group with fewer),
    the last level every group's own segment, causal. A level's `rope_delta` gives each row
    the delta of the segment it reads there (None when all are 0). Shared levels are left out
    when no group has that many segments. With `min_shared_tokens` (sharing on), consecutive
    groups whose i-th segment is the same page list share one entry of level i where that
    saves at least `min_shared_tokens` key reads (use `order_groups_for_sharing` first).
    """
    num_shared = max((len(g.shared) for g in groups), default=0)
    levels = [
        _level([g.shared[i] if i < len(g.shared) else None for g in groups], groups, page_size,
               causal=False, device=device, min_shared_tokens=min_shared_tokens)
        for i in range(num_shared)
    ]  # fmt: skip
    levels.append(_level([g.own for g in groups], groups, page_size, causal=True, device=device))
    return levels


def _level(
    segs: list[Segment | None],
    groups: list[QueryGroup],
    page_size: int,
    causal: bool,
    device: torch.device | str,
    min_shared_tokens: int | None = None,
) -> CascadeLevel:
    runs: list[list[int]] = []  # consecutive groups that read this level through one entry
    for i, seg in enumerate(segs):
        prev = segs[runs[-1][0]] if runs else None
        if (
            min_shared_tokens is not None
            and seg is not None
            and prev is not None
            and seg.num_keys
            and prev.pages == seg.pages
            and prev.num_keys == seg.num_keys
        ):
            runs[-1].append(i)
        else:
            runs.append([i])
    if min_shared_tokens is not None:  # a shared entry must pay for itself
        runs = [
            part
            for run in runs
            for part in (
                [run]
                if len(run) == 1 or (len(run) - 1) * segs[run[0]].num_keys >= min_shared_tokens
                else [[i] for i in run]
            )
        ]
    qo_indptr, kv_indptr, kv_indices, last_lens, deltas = [0], [0], [], [], []
    for run in runs:
        seg = segs[run[0]]
        for i in run:  # each row keeps the delta of its own group's segment
            rows = len(groups[i].positions)
            own = segs[i]
            deltas.extend([own.delta if own is not None and own.num_keys else 0] * rows)
        qo_indptr.append(qo_indptr[-1] + sum(len(groups[i].positions) for i in run))
        if seg is None or seg.num_keys == 0:
            kv_indptr.append(len(kv_indices))
            last_lens.append(0)
            continue
        assert len(seg.pages) == -(-seg.num_keys // page_size), "pages cover exactly the keys"
        kv_indices.extend(seg.pages)
        kv_indptr.append(len(kv_indices))
        last_lens.append(seg.num_keys - (len(seg.pages) - 1) * page_size)
    return CascadeLevel(
        qo_indptr=int64_tensor(qo_indptr, device),
        kv_indptr=int64_tensor(kv_indptr, device),
        kv_indices=int64_tensor(kv_indices, device),
        kv_last_page_len=int64_tensor(last_lens, device),
        causal=causal,
        rope_delta=int64_tensor(deltas, device) if any(deltas) else None,
    )
