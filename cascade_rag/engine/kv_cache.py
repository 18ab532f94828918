"""Paged KV cache with chunk sharing: a page pool plus a prefix tree whose edges are chunks.

Layout. Every layer owns `k` and `v` tensors of shape
    [num_pages, page_size, num_kv_heads, head_dim]
and page `p` of a request's page table holds the KV of the token positions
[p * page_size, (p + 1) * page_size) of that request.

Sharing. A `ChunkNode` is one chunk computed after one exact chain of chunks (its ancestors),
so its KV was computed at the right positions and in the right context (DESIGN.md rules 1-2).
A request whose composition starts with the same chain of chunks reuses the nodes' pages.

Partial pages (DESIGN.md rule 3): chunks rarely end on a page boundary. A node that starts
inside a page owns a *boundary page*: a private copy of the parent's last, partial page,
which the node continues to fill. Tokens are always written to their owner's pages; the copy
of the parent's tail slots is made before attention reads them. A request's page table takes,
for every page index, the page of the deepest owner that covers it, so in every page table
only the last page can be partial. Two requests with the same page id at the same index share
identical KV; that is what the cascade grouping relies on.

This module does bookkeeping only: it allocates, pins and evicts pages and nodes. It never
computes KV (the model runner does) and never decides grouping (the model runner does).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import torch

from cascade_rag.chunks import Chunk, ChunkRegistry


class OutOfPagesError(RuntimeError):
    """The page pool cannot satisfy an allocation, even after evicting unused chunks."""


class PagePool:
    """Fixed pool of KV pages shared by all layers.

    Args:
        num_pages: pages in the pool.
        page_size: token slots per page.
        num_layers, num_kv_heads, head_dim: model shape.
        dtype, device: where the KV lives.
    """

    def __init__(
        self,
        num_pages: int,
        page_size: int,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
    ) -> None:
        if num_pages <= 0 or page_size <= 0:
            raise ValueError(f"num_pages ({num_pages}) and page_size ({page_size}) must be > 0")
        self.num_pages = num_pages
        self.page_size = page_size
        shape = (num_pages, page_size, num_kv_heads, head_dim)
        # kv_caches[layer] = (k, v), each [num_pages, page_size, num_kv_heads, head_dim]
        self.kv_caches = [
            (
                torch.zeros(shape, dtype=dtype, device=device),
                torch.zeros(shape, dtype=dtype, device=device),
            )
            for _ in range(num_layers)
        ]
        self._free: list[int] = list(range(num_pages - 1, -1, -1))
        self._refcount = [0] * num_pages

    @property
    def num_free(self) -> int:
        return len(self._free)

    def alloc(self, n: int) -> list[int]:
        if n > len(self._free):
            raise OutOfPagesError(f"need {n} pages, {len(self._free)} free")
        pages = [self._free.pop() for _ in range(n)]
        for p in pages:
            assert self._refcount[p] == 0, f"page {p} handed out twice"
            self._refcount[p] = 1
        return pages

    def free(self, pages: list[int]) -> None:
        for p in pages:
            assert self._refcount[p] == 1, f"page {p} freed with refcount {self._refcount[p]}"
            self._refcount[p] = 0
            self._free.append(p)

    def is_free(self, page: int) -> bool:
        return self._refcount[page] == 0


_node_ids = itertools.count()


@dataclass(eq=False)
class ChunkNode:
    """One chunk's KV, computed after the exact chain of its ancestors.

    `pages` cover the page indices [start // page_size, ceil(end / page_size)); when `start`
    is not page-aligned, `pages[0]` is this node's boundary page (its first slots are a
    copy of the parent's tail).
    """

    chunk: Chunk | None
    parent: ChunkNode | None
    start: int
    end: int
    pages: list[int]
    children: dict[str, ChunkNode] = field(default_factory=dict)
    pins: int = 0  # running requests that use this node
    ready: bool = True  # False while the step that computes it is running
    last_used: int = 0
    node_id: int = field(default_factory=lambda: next(_node_ids))

    @property
    def num_tokens(self) -> int:
        return self.end - self.start


@dataclass
class KVCacheStats:
    """Counters of the chunk KV cache."""

    num_nodes: int
    cached_tokens: int
    free_pages: int
    total_pages: int
    hit_tokens: int
    miss_tokens: int
    evicted_nodes: int


class ChunkKVCache:
    """The prefix tree of chunk nodes over a `PagePool`.

    Args:
        pool: the page pool.
        registry: the chunk registry; every node holds a reference on its chunk so that a
            chunk with KV is never evicted from the registry.
    """

    def __init__(self, pool: PagePool, registry: ChunkRegistry | None = None) -> None:
        self.pool = pool
        self.page_size = pool.page_size
        self.root = ChunkNode(chunk=None, parent=None, start=0, end=0, pages=[])
        self._registry = registry
        self._clock = itertools.count(1)
        self._num_nodes = 0
        self._cached_tokens = 0
        self.hit_tokens = 0
        self.miss_tokens = 0
        self.evicted_nodes = 0

    # ---- pages -------------------------------------------------------------------------

    def pages_for(self, start: int, end: int) -> int:
        """Pages an owner of positions [start, end) needs (boundary page included)."""
        if end <= start:
            return 0
        return -(-end // self.page_size) - start // self.page_size

    def alloc(self, n: int) -> list[int]:
        """Allocate n pages, evicting unpinned chunk nodes (least recently used first)."""
        if n > self.pool.num_free:
            self.evict(n - self.pool.num_free)
        return self.pool.alloc(n)

    def slot_of(self, owner: ChunkNode, pos: int) -> int:
        """The slot where `owner` holds the KV of position `pos`."""
        assert owner.start <= pos < owner.end
        return owner.pages[
            pos // self.page_size - owner.start // self.page_size
        ] * self.page_size + (pos % self.page_size)

    def boundary_copy(
        self, chain: list[ChunkNode], dst_page: int, start: int
    ) -> list[tuple[int, int]]:
        """Slot pairs (src, dst) that give an owner starting at `start` its boundary page.

        `chain` holds the nodes before `start` (in order); each copied position is taken from
        the node that computed it, never from another boundary copy, so the copies of one
        step do not depend on each other's order (a chunk may start and end inside a page).
        """
        offset = start % self.page_size
        base_dst = dst_page * self.page_size
        pairs = []
        owners = reversed(chain)
        owner = next(owners, None)
        for pos in range(start - 1, start - offset - 1, -1):
            while owner is not None and pos < owner.start:
                owner = next(owners, None)
            assert owner is not None and pos < owner.end, "the chain covers the boundary page"
            pairs.append((self.slot_of(owner, pos), base_dst + pos % self.page_size))
        return pairs[::-1]

    # ---- nodes -------------------------------------------------------------------------

    def lookup(self, parent: ChunkNode, chunk: Chunk) -> ChunkNode | None:
        node = parent.children.get(chunk.id)
        if node is not None:
            if node.chunk.token_ids != chunk.token_ids:  # a caller's chunk, not an invariant
                raise ValueError(
                    f"chunk id collision: {chunk.id!r} is cached for {len(node.chunk)} other "
                    f"tokens than the {len(chunk)} given; build chunks with the engine's "
                    "register_chunk() so ids are content hashes"
                )
            node.last_used = next(self._clock)
        return node

    def create(self, parent: ChunkNode, chunk: Chunk) -> ChunkNode:
        """Create a node for `chunk` after `parent`; its KV is computed by the current step."""
        assert chunk.id not in parent.children
        if self._registry is not None:  # re-registers the chunk if the registry dropped it
            held = self._registry.register(
                chunk.token_ids, chunk.type, chunk.text, chunk.metadata, acquire=True
            )
            if held.id != chunk.id:
                self._registry.release(held.id)
                raise ValueError(
                    f"chunk {chunk.id!r} was not made by this engine's registry (its id here "
                    f"would be {held.id!r}); register it with the engine first"
                )
        start = parent.end
        end = start + len(chunk.token_ids)
        parent.pins += 1  # the allocation below must not evict the parent
        try:
            pages = self.alloc(self.pages_for(start, end))
        except BaseException:
            if self._registry is not None:
                self._registry.release(chunk.id)
            raise
        finally:
            parent.pins -= 1
        node = ChunkNode(
            chunk=chunk,
            parent=parent,
            start=start,
            end=end,
            pages=pages,
            ready=False,
            last_used=next(self._clock),
        )
        parent.children[chunk.id] = node
        self._num_nodes += 1
        self._cached_tokens += node.num_tokens
        return node

    def pin(self, node: ChunkNode) -> None:
        node.pins += 1

    def unpin(self, node: ChunkNode) -> None:
        assert node.pins > 0, "unpin of an unpinned node"
        node.pins -= 1
        node.last_used = next(self._clock)

    def mark_ready(self, nodes: list[ChunkNode]) -> None:
        for node in nodes:
            node.ready = True

    def discard(self, nodes: list[ChunkNode]) -> None:
        """Drop nodes whose computing step failed (deepest first)."""
        for node in sorted(nodes, key=lambda n: -n.start):
            assert not node.ready and node.pins == 0 and not node.children
            self._remove(node)

    def _remove(self, node: ChunkNode) -> None:
        parent = node.parent
        assert parent is not None and parent.children.get(node.chunk.id) is node
        del parent.children[node.chunk.id]
        self.pool.free(node.pages)
        node.pages = []
        self._num_nodes -= 1
        self._cached_tokens -= node.num_tokens
        if self._registry is not None:
            self._registry.release(node.chunk.id)

    def _evictable_leaves(self) -> list[ChunkNode]:
        leaves, stack = [], list(self.root.children.values())
        while stack:
            node = stack.pop()
            if node.children:
                stack.extend(node.children.values())
            elif node.pins == 0 and node.ready:
                leaves.append(node)
        return leaves

    def evict(self, num_pages: int) -> int:
        """Evict least recently used unpinned leaves until `num_pages` pages are freed.

        Pages of pinned nodes (used by running requests) and of their ancestors are never
        freed. Returns the number of pages freed (may be less than asked).
        """
        freed = 0
        while freed < num_pages:
            leaves = self._evictable_leaves()
            if not leaves:
                break
            leaves.sort(key=lambda n: n.last_used)
            for node in leaves:
                freed += len(node.pages)
                self._remove(node)
                self.evicted_nodes += 1
                if freed >= num_pages:
                    break
        return freed

    def clear(self) -> int:
        """Evict every unpinned node; returns pages freed."""
        return self.evict(self.pool.num_pages)

    def stats(self) -> KVCacheStats:
        return KVCacheStats(
            num_nodes=self._num_nodes,
            cached_tokens=self._cached_tokens,
            free_pages=self.pool.num_free,
            total_pages=self.pool.num_pages,
            hit_tokens=self.hit_tokens,
            miss_tokens=self.miss_tokens,
            evicted_nodes=self.evicted_nodes,
        )

    def iter_nodes(self):
        stack = list(self.root.children.values())
        while stack:
            node = stack.pop()
            yield node
            stack.extend(node.children.values())
