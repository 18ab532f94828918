"""Paged KV cache with chunk sharing: a page pool plus a prefix tree whose edges are chunks.

Layout. Every layer owns `k` and `v` tensors of shape
    [num_pages, page_size, num_kv_heads, head_dim]
and page `p` of a request's page table holds the KV of the token positions
[p * page_size, (p + 1) * page_size) of that request.

Sharing. A `ChunkNode` is one chunk computed after one exact chain of chunks (its ancestors),
so its KV was computed at the right positions and in the right context (docs/design.md rules 1-2).
A request whose composition starts with the same chain of chunks reuses the nodes' pages.

Partial pages (docs/design.md rule 3): chunks rarely end on a page boundary. A node that starts
inside a page owns a *boundary page*: a private copy of the parent's last, partial page,
which the node continues to fill. Tokens are always written to their owner's pages; the copy
of the parent's tail slots is made before attention reads them. A request's page table takes,
for every page index, the page of the deepest owner that covers it, so in every page table
only the last page can be partial. Two requests with the same page id at the same index share
identical KV; that is what the cascade grouping relies on.

Pinned chains. A node's KV is only valid after its exact chain, so what can be kept from
eviction is a chain: `hold_chain(chunk_ids)` pins every node of [chunk 1, ..., chunk n] (the
system prompt chunk first, as a request composes it) until `release_chain`, counting how many
times each chain is held. Eviction already never frees a pinned node or an ancestor of one.

Segment layout (reuse anywhere, engine/segments.py): with `segment_layout=True` every owner
keeps its tokens from slot 0 of its first page instead of at their position's page index, so
each chunk node is a page list of its own (only its last page partial) that can be read at any
offset; there are no boundary pages then.

This module does bookkeeping only: it allocates, pins and evicts pages and nodes. It never
computes KV (the model runner does) and never decides grouping (the model runner does).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import torch

from cascade_rag.chunks import Chunk, ChunkRegistry, ChunkType


class OutOfPagesError(RuntimeError):
    """The page pool cannot satisfy an allocation, even after evicting unused chunks."""


class ChunkInUseError(RuntimeError):
    """A chunk's KV cannot be removed: a pinned chain or a running request uses it."""


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
    holds: int = 0  # pinned chains through this node (`hold_chain`); included in `pins`

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
    anywhere_hit_tokens: int = 0  # of hit_tokens: chunks read away from their canonical offset
    recomputed_tokens: int = 0  # tokens of reused chunks recomputed in context (anywhere)
    disk_hit_tokens: int = 0  # of hit_tokens: chunks loaded from the disk store

    @property
    def exact_hit_tokens(self) -> int:
        """Hit tokens served at the position where they were computed (exact prefix)."""
        return self.hit_tokens - self.anywhere_hit_tokens


@dataclass(frozen=True)
class ChunkNodeInfo:
    """A snapshot of one chunk node (`ChunkKVCache.node_infos`).

    Attributes:
        chunk_id: the node's chunk.
        chunk_type: its `ChunkType` value ("rag_result", "system_prompt", ...).
        chain: chunk ids from the root to this node, this one last: the exact chain its KV
            was computed after.
        start: position of the chunk's first token in every request that reuses the node.
        num_tokens: the chunk's tokens.
        num_pages: pages the node owns (its boundary page included).
        pins: pinned chains that go through the node (`hold_chain`).
        users: running requests that use the node now.
        ready: False while the step that computes it runs.
    """

    chunk_id: str
    chunk_type: str
    chain: tuple[str, ...]
    start: int
    num_tokens: int
    num_pages: int
    pins: int
    users: int
    ready: bool


class ChunkKVCache:
    """The prefix tree of chunk nodes over a `PagePool`.

    Args:
        pool: the page pool.
        registry: the chunk registry; every node holds a reference on its chunk so that a
            chunk with KV is never evicted from the registry.
    """

    def __init__(
        self, pool: PagePool, registry: ChunkRegistry | None = None, segment_layout: bool = False
    ) -> None:
        self.pool = pool
        self.page_size = pool.page_size
        self.segment_layout = segment_layout  # tokens from slot 0 of an owner's first page
        self.root = ChunkNode(chunk=None, parent=None, start=0, end=0, pages=[])
        self._registry = registry
        self._clock = itertools.count(1)
        self._num_nodes = 0
        self._cached_tokens = 0
        self.hit_tokens = 0
        self.miss_tokens = 0
        self.evicted_nodes = 0
        self.anywhere_hit_tokens = 0
        self.recomputed_tokens = 0
        self.disk_hit_tokens = 0
        self._held: dict[tuple[str, ...], int] = {}  # chain of chunk ids -> times held

    # ---- pages -------------------------------------------------------------------------

    def pages_for(self, start: int, end: int) -> int:
        """Pages an owner of positions [start, end) needs (boundary page included)."""
        if end <= start:
            return 0
        if self.segment_layout:
            return -(-(end - start) // self.page_size)
        return -(-end // self.page_size) - start // self.page_size

    def alloc(self, n: int) -> list[int]:
        """Allocate n pages, evicting unpinned chunk nodes (least recently used first)."""
        if n > self.pool.num_free:
            self.evict(n - self.pool.num_free)
        return self.pool.alloc(n)

    def slot_of(self, owner: ChunkNode, pos: int) -> int:
        """The slot where `owner` holds the KV of position `pos`."""
        assert owner.start <= pos < owner.end
        if self.segment_layout:
            i = pos - owner.start
            return owner.pages[i // self.page_size] * self.page_size + i % self.page_size
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
            held = node.chunk  # the same object (a registry's chunk): nothing to compare
            if held is not chunk and held.token_ids != chunk.token_ids:  # a caller's chunk
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
            anywhere_hit_tokens=self.anywhere_hit_tokens,
            recomputed_tokens=self.recomputed_tokens,
            disk_hit_tokens=self.disk_hit_tokens,
        )

    def iter_nodes(self):
        stack = list(self.root.children.values())
        while stack:
            node = stack.pop()
            yield node
            stack.extend(node.children.values())

    # ---- pinned chains and removal (called by the engine's worker thread only) ----------

    def find_chain(self, chunk_ids: list[str] | tuple[str, ...]) -> list[ChunkNode]:
        """The ready nodes along `chunk_ids` from the root, up to the first missing one.

        The chain's KV is fully cached when the list is as long as `chunk_ids`. In the
        segment layout (reuse anywhere) the nodes are those a request of this chain uses: its
        first chunk, then every other chunk under the first if that is a system prompt (the
        anchor), else under the root.
        """
        node, nodes = self.root, []
        for i, chunk_id in enumerate(chunk_ids):
            child = node.children.get(chunk_id)
            if child is None or not child.ready:
                break
            nodes.append(child)
            if not self.segment_layout:
                node = child
            elif i == 0 and child.chunk.type is ChunkType.SYSTEM_PROMPT:
                node = child  # the anchor: every chunk after it is its child
        return nodes

    def hold_chain(self, chunk_ids: list[str] | tuple[str, ...]) -> int | None:
        """Pin the chain's nodes until `release_chain`; returns how often it is held now.

        Returns None (and pins nothing) when the chain's KV is not fully cached: compute it
        first. A held node is never evicted, and neither are its ancestors.
        """
        key = tuple(chunk_ids)
        if not key:
            raise ValueError("hold_chain() needs at least one chunk id")
        nodes = self.find_chain(key)
        if len(nodes) < len(key):
            return None
        for node in nodes:
            node.pins += 1
            node.holds += 1
        self._held[key] = self._held.get(key, 0) + 1
        return self._held[key]

    def release_chain(self, chunk_ids: list[str] | tuple[str, ...]) -> int:
        """Undo one `hold_chain` of this exact chain; returns how often it stays held.

        Raises:
            ValueError: the chain is not held (it was never pinned, or unpinned as often).
        """
        key = tuple(chunk_ids)
        count = self._held.get(key, 0)
        if count == 0:
            raise ValueError(
                f"the chain of {len(key)} chunk(s) ending with {key[-1] if key else None!r} is "
                "not pinned; pin it first (unpin takes the same system prompt and chunks)"
            )
        nodes = self.find_chain(key)
        assert len(nodes) == len(key), "a held chain is never evicted"
        for node in nodes:
            assert node.holds > 0 and node.pins >= node.holds, "holds are counted in pins"
            node.holds -= 1
            node.pins -= 1
            node.last_used = next(self._clock)
        if count == 1:
            del self._held[key]
        else:
            self._held[key] = count - 1
        return count - 1

    def held_chains(self) -> dict[tuple[str, ...], int]:
        """Every held chain and how often it is held."""
        return dict(self._held)

    def remove_chunk(self, chunk_id: str) -> tuple[int, int]:
        """Remove every node of `chunk_id` and the nodes after it (whose KV was computed
        after it); returns (nodes removed, pages freed).

        Raises:
            ChunkInUseError: one of those nodes is pinned, used by a running request or being
                computed; nothing is removed then.
        """
        doomed: dict[int, ChunkNode] = {}
        stack = [n for n in self.iter_nodes() if n.chunk.id == chunk_id]
        while stack:
            node = stack.pop()
            if node.node_id not in doomed:
                doomed[node.node_id] = node
                stack.extend(node.children.values())
        busy = [n for n in doomed.values() if n.pins or not n.ready]
        if busy:
            held = sum(n.holds for n in busy)
            raise ChunkInUseError(
                f"chunk {chunk_id!r} has KV in use: {len(busy)} of its {len(doomed)} cached "
                f"node(s) are pinned ({held} pin(s)) or used by running requests; unpin its "
                "chains, or retry when the requests finish"
            )
        freed = 0
        for node in sorted(doomed.values(), key=lambda n: -n.start):  # children first
            freed += len(node.pages)
            self._remove(node)
        return len(doomed), freed

    def node_infos(self) -> list[ChunkNodeInfo]:
        """A snapshot of every node, parents before children."""
        infos: list[ChunkNodeInfo] = []
        stack = [(n, ()) for n in reversed(list(self.root.children.values()))]
        while stack:
            node, before = stack.pop()
            chain = (*before, node.chunk.id)
            infos.append(
                ChunkNodeInfo(
                    chunk_id=node.chunk.id,
                    chunk_type=node.chunk.type.value,
                    chain=chain,
                    start=node.start,
                    num_tokens=node.num_tokens,
                    num_pages=len(node.pages),
                    pins=node.holds,
                    users=node.pins - node.holds,
                    ready=node.ready,
                )
            )
            stack.extend((c, chain) for c in reversed(list(node.children.values())))
        return infos
