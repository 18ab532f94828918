"""Group a step's sequences into cascade levels by the KV pages they share.

Two sequences that hold the same page id at the same page index share that page's KV
(kv_cache.py guarantees it), so the grouping works on page tables alone: sort sequences by
their page tables, then recursively split the batch at the longest common run of pages.
Each shared run becomes one entry of a shared (non-causal) level that all the group's
queries read once; whatever a sequence does not share goes to the last, causal level.

Only *full* pages that precede every query of a sequence may sit in a shared level (a
shared level is not causal and a partial page would be read as full).

Two planners make the same levels. `plan_levels` works on whole page tables: the slow
reference, O(pages) per step. `plan_layout` works on chains of chunk nodes and gives the levels
as spans of block-table rows (engine/block_table.py): which sequence's row holds an entry's
pages, from which page index, how many. Two sequences hold the same page at an index exactly
where both hold the same node there (private pages and the pages of different nodes are
distinct), so the run two sequences share is the full pages before the end of the deepest node
their chains have in common; this costs O(batch * chain depth) and nothing per page. Its output
depends only on the order, the chains, the query lengths and the shareable full pages of the
chains, so it stays valid while sequences only decode: the model runner re-plans only when
those change and moves the last level's lengths in between (engine/batch_layout.py).

This module builds index lists only; it does not touch the cache or compute attention.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from cascade_rag.attention.metadata import CascadeLevel
from cascade_rag.engine.kv_cache import ChunkNode


@dataclass
class SeqView:
    """What the planner needs to know of one sequence in the step.

    page_table: page per page index over [0, kv_len); qo_len: new query rows (the last
    positions); kv_len: keys after this step's writes; group_key: optional cheap sort key
    under which sequences that share pages come out next to each other (the engine passes
    its chain of chunk-node ids); by default the shareable pages themselves.
    """

    page_table: list[int]
    kv_len: int
    qo_len: int
    group_key: tuple | None = None

    def num_shareable_pages(self, page_size: int) -> int:
        return (self.kv_len - self.qo_len) // page_size


def order_for_sharing(seqs: list[SeqView], page_size: int) -> list[int]:
    """A batch order in which sequences sharing page runs are contiguous."""

    def key(i: int) -> tuple:
        s = seqs[i]
        if s.group_key is not None:
            return s.group_key
        return tuple(s.page_table[: s.num_shareable_pages(page_size)])

    return sorted(range(len(seqs)), key=key)


def int64_tensor(values: list[int], device: torch.device | str = "cpu") -> torch.Tensor:
    """A list of ints as an int64 tensor (through numpy: ~4x faster than torch.tensor on the
    page lists of large batches)."""
    return torch.from_numpy(np.array(values, dtype=np.int64)).to(device)


def _common_prefix(a: list[int], b: list[int], start: int, limit: int) -> int:
    """Length of the common run of a and b from `start`, at most `limit - start`."""
    if a[start:limit] == b[start:limit]:  # the usual case, compared in C
        return limit - start
    n = start
    while a[n] == b[n]:
        n += 1
    return n - start


def plan_levels(
    seqs: list[SeqView],
    page_size: int,
    max_levels: int,
    device: torch.device | str = "cpu",
    min_shared_tokens: int = 0,
) -> list[CascadeLevel]:
    """Cascade levels for `seqs`, taken in the given order (query rows are laid out so).

    Args:
        seqs: sequences in batch order (use `order_for_sharing` first).
        page_size: slots per page.
        max_levels: 1 gives plain attention (one causal level, one entry per sequence);
            n > 1 gives up to n - 1 shared levels plus the causal level.
        min_shared_tokens: a shared entry is made only if it saves at least this many key
            reads per step ((group size - 1) * shared tokens); below that the keys stay in the
            sequences' own levels. This is where cascade is turned off when it would not pay.
    Returns:
        levels, the last one causal; every level covers every query row. Shared levels that
        end up with no keys are left out, so no sharing at all gives one plain level.
    """
    assert max_levels >= 1
    q_offsets = [0]
    for s in seqs:
        q_offsets.append(q_offsets[-1] + s.qo_len)
    shareable = [s.page_table[: s.num_shareable_pages(page_size)] for s in seqs]
    # entries[level] = list of (qo_start, qo_end, pages, last_page_len)
    entries: list[list[tuple[int, int, list[int], int]]] = [[] for _ in range(max_levels)]
    last = max_levels - 1

    def emit_last(i: int, start_page: int) -> None:
        s = seqs[i]
        pages = s.page_table[start_page:]
        last_len = s.kv_len - (len(s.page_table) - 1) * page_size
        assert pages and 0 < last_len <= page_size, "the last level holds the query's own keys"
        entries[last].append((q_offsets[i], q_offsets[i + 1], pages, last_len))

    def split(group: list[int], at: int) -> list[list[int]]:
        """Consecutive runs of `group` with the same shareable page at index `at`."""
        runs: list[list[int]] = []
        prev = None
        for i in group:
            key = shareable[i][at] if at < len(shareable[i]) else None
            if runs and key is not None and key == prev:
                runs[-1].append(i)
            else:
                runs.append([i])
            prev = key
        return runs

    def visit(group: list[int], level: int, start_page: int) -> None:
        if level == last:
            for i in group:
                emit_last(i, start_page)
            return
        q_lo, q_hi = q_offsets[group[0]], q_offsets[group[-1] + 1]
        if len(group) == 1:
            entries[level].append((q_lo, q_hi, [], 0))
            visit(group, level + 1, start_page)
            return
        first = shareable[group[0]]
        limit = min(len(shareable[i]) for i in group)
        lcp = limit - start_page
        for i in group[1:]:
            if lcp <= 0:
                break
            lcp = _common_prefix(first, shareable[i], start_page, start_page + lcp)
        lcp = max(lcp, 0)
        if lcp == 0:
            for sub in split(group, start_page):
                visit(sub, level, start_page)
            return
        if (len(group) - 1) * lcp * page_size < min_shared_tokens:
            # not worth a shared entry here: let subgroups that share more try this level
            subs = split(group, start_page + lcp)
            if len(subs) > 1:
                for sub in subs:
                    visit(sub, level, start_page)
            else:
                entries[level].append((q_lo, q_hi, [], 0))
                visit(group, level + 1, start_page)
            return
        pages = first[start_page : start_page + lcp]
        entries[level].append((q_lo, q_hi, pages, page_size))
        for sub in split(group, start_page + lcp):
            visit(sub, level + 1, start_page + lcp)

    if seqs:
        visit(list(range(len(seqs))), 0, 0)
    kept = [e for e in entries[:last] if any(pages for _, _, pages, _ in e)] + [entries[last]]
    return [_to_level(e, causal=(lv == len(kept) - 1), device=device) for lv, e in enumerate(kept)]


def _to_level(entries, causal: bool, device) -> CascadeLevel:
    qo_indptr, kv_indptr, kv_indices, last_lens = [0], [0], [], []
    for q_lo, q_hi, pages, last_len in entries:
        assert q_lo == qo_indptr[-1], "entries tile the query rows in order"
        qo_indptr.append(q_hi)
        kv_indices.extend(pages)
        kv_indptr.append(len(kv_indices))
        last_lens.append(last_len)

    def t(x):
        return int64_tensor(x, device)

    return CascadeLevel(
        qo_indptr=t(qo_indptr),
        kv_indptr=t(kv_indptr),
        kv_indices=t(kv_indices),
        kv_last_page_len=t(last_lens),
        causal=causal,
    )


# ---- the same levels from chunk chains ---------------------------------------------------


@dataclass
class LayoutEntry:
    """One entry of a shared level: query rows [qo_start, qo_end) read `num_pages` full pages
    of sequence `seq`'s page table from index `page_start` (seq = -1: no pages)."""

    qo_start: int
    qo_end: int
    seq: int
    page_start: int
    num_pages: int


@dataclass
class CascadeLayout:
    """`plan_layout`'s levels: the shared levels' entries, then per sequence (in batch order)
    the first page index of its own entry in the last, causal level (its pages run to the end
    of its page table)."""

    shared: list[list[LayoutEntry]]
    last_page_start: list[int]


def plan_layout(
    chains: list[list[ChunkNode]],
    caps: list[int],
    qo_lens: list[int],
    page_at: Callable[[int, int], int],
    page_size: int,
    max_levels: int,
    min_shared_tokens: int = 0,
) -> CascadeLayout:
    """`plan_levels`' levels for the same batch, planned from chunk chains (module docstring).

    Args:
        chains: per sequence in batch order, its chunk nodes from the root (compared by
            identity: the same node object is the same KV).
        caps: per sequence, the full pages of its chain that precede all its query rows:
            min(q_start // page_size, chain_end // page_size).
        qo_lens: per sequence, its query rows.
        page_at: page_at(i, p) is sequence i's page at page index p (read only for p below
            caps[i]).
        page_size, max_levels, min_shared_tokens: as for `plan_levels`.
    Returns:
        the layout; shared levels with no pages are left out, as `plan_levels` does.
    """
    assert max_levels >= 1
    q_offsets = [0]
    for n in qo_lens:
        q_offsets.append(q_offsets[-1] + n)
    shared: list[list[LayoutEntry]] = [[] for _ in range(max_levels - 1)]
    last_start = [0] * len(chains)
    last = max_levels - 1

    memo: dict[tuple[int, int], int] = {}

    def common(a: int, b: int) -> int:
        """Full pages sequences a and b hold alike: those before their deepest common node's
        end (at that index each has its own boundary or next page). O(1) for one chain,
        once per pair of distinct chains otherwise."""
        chain_a, chain_b = chains[a], chains[b]
        if not chain_a or not chain_b:
            return 0
        last_a, last_b = chain_a[-1], chain_b[-1]
        if last_a is last_b:  # a node is one chain: the same chain
            return last_a.end // page_size
        key = (id(last_a), id(last_b))
        if key not in memo:
            end = 0
            for x, y in zip(chain_a, chain_b):
                if x is not y:
                    break
                end = x.end
            memo[key] = end // page_size
        return memo[key]

    def split(group: list[int], at: int) -> list[list[int]]:
        """Consecutive runs of `group` with the same shareable page at index `at`."""
        out: list[list[int]] = []
        prev = None
        for i in group:
            key = page_at(i, at) if at < caps[i] else None
            if out and key is not None and key == prev:
                out[-1].append(i)
            else:
                out.append([i])
            prev = key
        return out

    def visit(group: list[int], level: int, start: int) -> None:
        if level == last:
            for i in group:
                last_start[i] = start
            return
        q_lo, q_hi = q_offsets[group[0]], q_offsets[group[-1] + 1]
        if len(group) == 1:
            shared[level].append(LayoutEntry(q_lo, q_hi, -1, 0, 0))
            visit(group, level + 1, start)
            return
        first = group[0]
        end = min(caps[i] for i in group)
        for i in group[1:]:
            if end <= start:
                break
            end = min(end, common(first, i))
        lcp = max(end - start, 0)
        if lcp == 0:
            for sub in split(group, start):
                visit(sub, level, start)
            return
        if (len(group) - 1) * lcp * page_size < min_shared_tokens:
            subs = split(group, start + lcp)
            if len(subs) > 1:
                for sub in subs:
                    visit(sub, level, start)
            else:
                shared[level].append(LayoutEntry(q_lo, q_hi, -1, 0, 0))
                visit(group, level + 1, start)
            return
        shared[level].append(LayoutEntry(q_lo, q_hi, first, start, lcp))
        for sub in split(group, start + lcp):
            visit(sub, level + 1, start + lcp)

    if chains:
        visit(list(range(len(chains))), 0, 0)
    kept = [lv for lv in shared if any(e.num_pages for e in lv)]
    return CascadeLayout(kept, last_start)
