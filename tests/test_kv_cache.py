"""PagePool and ChunkKVCache bookkeeping: pages, boundary pages, pins, LRU eviction, refcounts.

Everything runs on a pool with one layer of one-element heads: only page ids matter here. A
fake "cache" (a dict slot -> position) replays the boundary-page scheme of kv_cache.py to show
that the deepest-owner page table reads every position from the right slot. A hypothesis state
machine drives random create/pin/unpin/mark_ready/discard/evict sequences and checks that no page
is both free and owned, that pinned and computing nodes (and their ancestors) survive eviction,
and that registry refcounts follow the nodes.
"""

from __future__ import annotations

import random

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from cascade_rag.chunks import ChunkRegistry
from cascade_rag.engine.kv_cache import ChunkKVCache, ChunkNode, OutOfPagesError, PagePool

PAGE_SIZES = [1, 3, 16]


def make_pool(num_pages: int, page_size: int) -> PagePool:
    return PagePool(num_pages, page_size, num_layers=1, num_kv_heads=1, head_dim=1)


def make_cache(
    num_pages: int, page_size: int, capacity: int = 100_000
) -> tuple[ChunkKVCache, ChunkRegistry]:
    registry = ChunkRegistry("test-model|test-tokenizer", capacity=capacity)
    return ChunkKVCache(make_pool(num_pages, page_size), registry), registry


def chunk_of(registry: ChunkRegistry, length: int, seed: int):
    rng = random.Random(seed)
    return registry.register([rng.randrange(50_000) for _ in range(length)])


def alive(kv: ChunkKVCache) -> list[ChunkNode]:
    return list(kv.iter_nodes())


def ancestors(node: ChunkNode) -> list[ChunkNode]:
    out = []
    while node.parent is not None and node.parent.chunk is not None:
        node = node.parent
        out.append(node)
    return out


def protected(kv: ChunkKVCache) -> set[ChunkNode]:
    """Nodes eviction must keep: pinned or computing nodes and all their ancestors."""
    keep: set[ChunkNode] = set()
    for node in alive(kv):
        if node.pins > 0 or not node.ready:
            keep.add(node)
            keep.update(ancestors(node))
    return keep


def check_cache(kv: ChunkKVCache, registry: ChunkRegistry | None, extra_owned=()) -> None:
    """Page ownership, node geometry, counters and registry refcounts are consistent."""
    pool = kv.pool
    free = list(pool._free)
    assert len(free) == len(set(free)) == pool.num_free, "free list holds a page twice"
    owned: list[int] = list(extra_owned)
    counts: dict[str, int] = {}
    nodes = alive(kv)
    for node in nodes:
        assert node.chunk is not None and node.parent is not None
        assert node.parent.children.get(node.chunk.id) is node
        assert node.start == node.parent.end, "a node starts where its parent ends"
        assert node.end == node.start + len(node.chunk.token_ids)
        assert len(node.pages) == kv.pages_for(node.start, node.end), (
            f"node [{node.start}, {node.end}) has {len(node.pages)} pages, "
            f"pages_for says {kv.pages_for(node.start, node.end)}"
        )
        owned.extend(node.pages)
        counts[node.chunk.id] = counts.get(node.chunk.id, 0) + 1
    assert len(owned) == len(set(owned)), "a page is owned twice"
    both = set(owned) & set(free)
    assert not both, f"pages {sorted(both)} are both free and owned"
    assert all(not pool.is_free(p) for p in owned)
    assert all(pool.is_free(p) for p in free)
    assert len(owned) + len(free) == pool.num_pages, (
        f"{len(owned)} owned + {len(free)} free != {pool.num_pages} pages: a page leaked"
    )
    stats = kv.stats()
    assert stats.num_nodes == len(nodes)
    assert stats.cached_tokens == sum(n.num_tokens for n in nodes)
    assert stats.free_pages == pool.num_free and stats.total_pages == pool.num_pages
    if registry is not None:
        for chunk_id, n in counts.items():
            assert registry.refcount(chunk_id) == n, "one registry reference per node"


# ---- PagePool ------------------------------------------------------------------------------


def test_pool_alloc_free_round_trip():
    pool = make_pool(8, 4)
    assert pool.num_free == 8
    a = pool.alloc(3)
    b = pool.alloc(5)
    assert len(set(a + b)) == 8 and sorted(a + b) == list(range(8))
    assert pool.num_free == 0 and not any(pool.is_free(p) for p in range(8))
    with pytest.raises(OutOfPagesError):
        pool.alloc(1)
    pool.free(a)
    assert pool.num_free == 3 and all(pool.is_free(p) for p in a)
    assert pool.alloc(0) == []
    c = pool.alloc(3)
    assert sorted(c) == sorted(a)


def test_pool_failed_alloc_changes_nothing():
    pool = make_pool(4, 2)
    pool.alloc(3)
    with pytest.raises(OutOfPagesError, match="need 2 pages, 1 free"):
        pool.alloc(2)
    assert pool.num_free == 1
    assert len(pool.alloc(1)) == 1


def test_pool_double_free_is_caught():
    pool = make_pool(4, 2)
    pages = pool.alloc(2)
    pool.free(pages)
    with pytest.raises(AssertionError, match="freed with refcount 0"):
        pool.free(pages[:1])


@pytest.mark.parametrize("num_pages, page_size", [(0, 4), (4, 0), (-1, 1)])
def test_pool_rejects_empty_shapes(num_pages, page_size):
    with pytest.raises(ValueError, match="must be > 0"):
        make_pool(num_pages, page_size)


def test_pool_kv_tensors_have_the_paged_layout():
    pool = PagePool(5, 3, num_layers=2, num_kv_heads=2, head_dim=4)
    assert len(pool.kv_caches) == 2
    for k, v in pool.kv_caches:
        assert k.shape == v.shape == (5, 3, 2, 4)


# ---- pages_for and boundary_copy --------------------------------------------------------


@pytest.mark.parametrize("page_size", PAGE_SIZES)
def test_pages_for_counts_the_page_indices_an_owner_touches(page_size):
    kv, _ = make_cache(4, page_size)
    for start in range(0, 40):
        for end in range(start, start + 40):
            touched = {pos // page_size for pos in range(start, end)}
            assert kv.pages_for(start, end) == len(touched), (start, end)
    assert kv.pages_for(5, 3) == 0


@pytest.mark.parametrize("page_size", PAGE_SIZES)
def test_boundary_copy_covers_the_slots_before_start_on_its_page(page_size):
    kv, registry = make_cache(64, page_size)
    for n in range(1, 3 * page_size + 2):
        kv.clear()
        parent = kv.create(kv.root, chunk_of(registry, n, seed=n))
        pairs = kv.boundary_copy([parent], dst_page=99, start=n)
        offset = n % page_size
        src = [kv.slot_of(parent, pos) for pos in range(n - offset, n)]
        assert pairs == [(s, 99 * page_size + o) for s, o in zip(src, range(offset))]
        if offset == 0:
            assert pairs == [], "a page-aligned owner has no boundary page"
        kv.discard([parent])


CHAINS = [
    [1, 1, 1, 1],
    [2, 3, 5],
    [3, 3, 3, 3],
    [16, 16, 1],
    [5, 16, 7, 2, 33],
    [17, 1, 15, 32],
    [1, 2, 1, 30, 4],
]


@pytest.mark.parametrize("page_size", PAGE_SIZES)
@pytest.mark.parametrize("lengths", CHAINS, ids=lambda ls: "-".join(map(str, ls)))
def test_chain_boundary_pages_give_exact_page_tables(page_size, lengths):
    """Write each node's positions into its own pages, copy its boundary slots from the
    parent's last page, then read every position through the deepest-owner page table."""
    kv, registry = make_cache(128, page_size)
    fake: dict[int, int] = {}  # slot -> position whose KV it holds
    parent = kv.root
    chain = []
    for i, n in enumerate(lengths):
        node = kv.create(parent, chunk_of(registry, n, seed=i))
        assert (node.start, node.end) == (parent.end, parent.end + n)
        assert not node.ready and node.pins == 0
        assert len(node.pages) == kv.pages_for(node.start, node.end)
        for pos in range(node.start, node.end):  # the step writes into the owner's pages
            page = node.pages[pos // page_size - node.start // page_size]
            fake[page * page_size + pos % page_size] = pos
        if node.start % page_size:
            for s, d in kv.boundary_copy(chain, node.pages[0], node.start):
                fake[d] = fake[s]
        else:
            assert kv.boundary_copy(chain, 0, node.start) == []
        chain.append(node)
        parent = node
    kv.mark_ready(chain)
    table: list[int] = []
    for node in chain:  # as Sequence.page_table does
        table[node.start // page_size :] = node.pages
    total = sum(lengths)
    assert len(table) == -(-total // page_size)
    assert len(set(table)) == len(table), "a page table holds a page once"
    for pos in range(total):
        slot = table[pos // page_size] * page_size + pos % page_size
        assert fake.get(slot) == pos, f"position {pos} reads slot {slot} = {fake.get(slot)}"
    check_cache(kv, registry)


# ---- nodes: create, lookup, pin, discard ------------------------------------------------


def test_create_lookup_and_same_chunk_under_two_parents():
    kv, registry = make_cache(16, 4)
    a, b = chunk_of(registry, 5, 1), chunk_of(registry, 3, 2)
    na = kv.create(kv.root, a)
    nb = kv.create(kv.root, b)
    nab = kv.create(na, b)  # b after a: other positions, other KV, another node
    assert nab is not nb and nab.start == 5 and nb.start == 0
    assert registry.refcount(b.id) == 2 and registry.refcount(a.id) == 1
    assert kv.lookup(kv.root, a) is na
    assert kv.lookup(na, b) is nab
    assert kv.lookup(nb, a) is None
    before = na.last_used
    assert kv.lookup(kv.root, a) is na and na.last_used > before, "lookup touches the node"
    check_cache(kv, registry)


def test_pin_unpin_counts_and_unpin_of_unpinned_is_caught():
    kv, registry = make_cache(8, 4)
    node = kv.create(kv.root, chunk_of(registry, 3, 0))
    kv.pin(node)
    kv.pin(node)
    assert node.pins == 2
    before = node.last_used
    kv.unpin(node)
    assert node.pins == 1 and node.last_used > before, "unpin marks the node used"
    kv.unpin(node)
    with pytest.raises(AssertionError, match="unpin of an unpinned node"):
        kv.unpin(node)


def test_discard_frees_pages_and_releases_registry_refs():
    kv, registry = make_cache(8, 4)
    a, b = chunk_of(registry, 6, 0), chunk_of(registry, 3, 1)
    na = kv.create(kv.root, a)
    nb = kv.create(na, b)
    assert kv.pool.num_free == 8 - 2 - 2  # b starts inside a page: a boundary page
    kv.discard([na, nb])  # any order: deepest first
    assert kv.pool.num_free == 8 and alive(kv) == [] and kv.root.children == {}
    assert registry.refcount(a.id) == 0 and registry.refcount(b.id) == 0
    assert kv.stats().num_nodes == 0 and kv.stats().cached_tokens == 0


def test_create_reregisters_a_chunk_the_registry_dropped():
    kv, registry = make_cache(8, 4, capacity=1)
    a = chunk_of(registry, 3, 0)
    chunk_of(registry, 3, 1)  # capacity 1: evicts the unreferenced a
    assert a.id not in registry
    node = kv.create(kv.root, a)
    assert a.id in registry and registry.refcount(a.id) == 1
    kv.mark_ready([node])
    kv.clear()
    assert registry.refcount(a.id) == 0


# ---- eviction -----------------------------------------------------------------------------


def test_evict_takes_leaves_lru_first():
    kv, registry = make_cache(8, 16)
    nodes = [kv.create(kv.root, chunk_of(registry, 3, i)) for i in range(4)]
    kv.mark_ready(nodes)
    kv.lookup(kv.root, nodes[0].chunk)  # order by last use: 1, 2, 3, 0
    order = []
    for _ in range(4):
        before = set(alive(kv))
        assert kv.evict(1) == 1
        (gone,) = before - set(alive(kv))
        order.append(nodes.index(gone))
        check_cache(kv, registry)
    assert order == [1, 2, 3, 0]
    assert kv.evict(1) == 0, "nothing left to evict"
    assert kv.stats().evicted_nodes == 4


def test_evict_frees_parents_only_after_their_children():
    kv, registry = make_cache(16, 16)
    p = kv.create(kv.root, chunk_of(registry, 2, 0))
    c1 = kv.create(p, chunk_of(registry, 2, 1))
    c2 = kv.create(c1, chunk_of(registry, 2, 2))
    x = kv.create(kv.root, chunk_of(registry, 2, 3))
    kv.mark_ready([p, c1, c2, x])
    p.last_used = 0  # the parents are the least recently used...
    c1.last_used = 1
    gone_order = []
    while alive(kv):
        before = set(alive(kv))
        kv.evict(1)
        (gone,) = before - set(alive(kv))
        assert not gone.children, "only leaves are evicted"
        gone_order.append(gone)
    # ...yet each goes only once its children are gone
    assert gone_order.index(c2) < gone_order.index(c1) < gone_order.index(p)
    assert kv.pool.num_free == 16


@pytest.mark.parametrize("page_size", PAGE_SIZES)
def test_evict_never_frees_pinned_or_computing_nodes_or_their_ancestors(page_size):
    kv, registry = make_cache(1000, page_size)
    rng = random.Random(page_size)
    nodes = []
    for i in range(30):
        parent = rng.choice([kv.root, *nodes])
        chunk = chunk_of(registry, rng.randint(1, 20), 100 + i)
        if chunk.id not in parent.children:
            nodes.append(kv.create(parent, chunk))
    kv.mark_ready([n for n in nodes if rng.random() < 0.8])
    for n in nodes:
        if rng.random() < 0.2:
            kv.pin(n)
    keep = protected(kv)
    assert keep and len(keep) < len(nodes), "the case pins some nodes and not others"
    kept_pages = {p for n in keep for p in n.pages}
    evictable_pages = sum(len(n.pages) for n in nodes if n not in keep)
    freed = kv.clear()
    assert set(alive(kv)) == keep, "clear evicts everything that is not protected"
    assert {p for n in alive(kv) for p in n.pages} == kept_pages
    assert freed == evictable_pages
    check_cache(kv, registry)


def test_evict_returns_pages_freed_which_may_fall_short():
    kv, registry = make_cache(10, 4)
    a = kv.create(kv.root, chunk_of(registry, 8, 0))  # 2 pages
    b = kv.create(kv.root, chunk_of(registry, 5, 1))  # 2 pages
    kv.mark_ready([a, b])
    kv.pin(b)
    assert kv.evict(3) == 2, "only a is evictable"
    assert alive(kv) == [b]
    assert kv.evict(1) == 0
    assert kv.evict(0) == 0


def test_alloc_evicts_unpinned_nodes_and_fails_when_everything_is_pinned():
    kv, registry = make_cache(4, 4)
    a = kv.create(kv.root, chunk_of(registry, 8, 0))  # 2 pages
    b = kv.create(kv.root, chunk_of(registry, 8, 1))  # 2 pages
    kv.mark_ready([a, b])
    kv.pin(b)
    a_pages = list(a.pages)
    pages = kv.alloc(2)  # evicts a
    assert alive(kv) == [b] and sorted(pages) == sorted(a_pages)
    kv.pool.free(pages)
    with pytest.raises(OutOfPagesError):
        kv.alloc(3)  # b is pinned: 2 free pages only
    assert alive(kv) == [b]
    check_cache(kv, registry)


def test_registry_refcounts_follow_creation_and_eviction():
    kv, registry = make_cache(32, 3)
    a, b = chunk_of(registry, 4, 0), chunk_of(registry, 5, 1)
    na = kv.create(kv.root, a)
    naa = kv.create(na, a)  # the same chunk twice in a row
    nb = kv.create(kv.root, b)
    nab = kv.create(na, b)
    assert registry.refcount(a.id) == 2 and registry.refcount(b.id) == 2
    kv.mark_ready([na, naa, nb, nab])
    nb.last_used = -1
    kv.evict(1)  # nb: the LRU leaf
    assert registry.refcount(b.id) == 1 and registry.refcount(a.id) == 2
    kv.clear()
    assert registry.refcount(a.id) == 0 and registry.refcount(b.id) == 0
    assert registry.stats().referenced == 0
    # unreferenced again: the registry may evict them now
    assert set(registry.evict_unreferenced()) == {a.id, b.id}


def test_create_never_evicts_its_own_parent():
    kv, registry = make_cache(1, 16)
    a = kv.create(kv.root, chunk_of(registry, 5, 0))  # the only page
    kv.mark_ready([a])
    try:
        b = kv.create(a, chunk_of(registry, 3, 1))  # needs a page: evicts a?
    except OutOfPagesError:
        return  # refusing is fine too
    assert kv.root.children.get(a.chunk.id) is a, "the parent was evicted under its child"
    assert b in alive(kv)
    check_cache(kv, registry)


# ---- state machine ----------------------------------------------------------------------


CHUNK_LENGTHS = [1, 2, 3, 5, 8, 13, 16, 17]


class KVCacheMachine(RuleBasedStateMachine):
    """Random create/lookup/pin/unpin/mark_ready/discard/evict sequences over a small pool.

    As the scheduler does, a child is created only under the root or a pinned parent.
    """

    @initialize(page_size=st.sampled_from(PAGE_SIZES), pool_tokens=st.integers(24, 160))
    def setup(self, page_size: int, pool_tokens: int) -> None:
        self.kv, self.registry = make_cache(-(-pool_tokens // page_size) + 1, page_size)
        self.chunks = [chunk_of(self.registry, n, i) for i, n in enumerate(CHUNK_LENGTHS)]
        self.pins: dict[int, int] = {}  # node_id -> pins we took

    # -- helpers

    def nodes(self) -> list[ChunkNode]:
        return sorted(alive(self.kv), key=lambda n: n.node_id)

    def check_survivors(self, keep: set[ChunkNode]) -> None:
        now = set(alive(self.kv))
        lost = [(n.start, n.end, n.pins, n.ready) for n in keep - now]
        assert not lost, f"protected nodes were evicted: {lost}"

    # -- rules

    @rule(data=st.data())
    def create(self, data) -> None:
        self._create(data)

    @rule(data=st.data())
    def create_then_compute(self, data) -> None:
        """A step that creates a node and completes (the common case: many ready nodes)."""
        node = self._create(data)
        if node is not None:
            self.kv.mark_ready([node])

    def _create(self, data) -> ChunkNode | None:
        parents = [self.kv.root] + [n for n in self.nodes() if n.pins > 0]
        parent = data.draw(st.sampled_from(parents), label="parent")
        chunk = data.draw(st.sampled_from(self.chunks), label="chunk")
        if chunk.id in parent.children:
            node = parent.children[chunk.id]
            before = node.last_used
            assert self.kv.lookup(parent, chunk) is node and node.last_used > before
            return None
        keep = protected(self.kv) | ({parent} if parent.chunk is not None else set())
        free_before = self.kv.pool.num_free
        try:
            node = self.kv.create(parent, chunk)
        except OutOfPagesError:
            self.check_survivors(keep)
            assert chunk.id not in parent.children
            return None
        self.check_survivors(keep)
        assert parent.children[chunk.id] is node and not node.ready and node.pins == 0
        assert len(node.pages) == self.kv.pages_for(node.start, node.end)
        if free_before >= len(node.pages):
            assert self.kv.pool.num_free == free_before - len(node.pages), "evicted needlessly"
        return node

    @precondition(lambda self: self.kv.stats().num_nodes > 0)
    @rule(data=st.data())
    def pin(self, data) -> None:
        nodes = self.nodes()
        if nodes:
            node = data.draw(st.sampled_from(nodes), label="pin")
            self.kv.pin(node)
            self.pins[node.node_id] = self.pins.get(node.node_id, 0) + 1

    @precondition(lambda self: self.kv.stats().num_nodes > 0)
    @rule(data=st.data())
    def unpin(self, data) -> None:
        nodes = [n for n in self.nodes() if n.pins > 0]
        if nodes:
            node = data.draw(st.sampled_from(nodes), label="unpin")
            self.kv.unpin(node)
            self.pins[node.node_id] -= 1

    @precondition(lambda self: self.kv.stats().num_nodes > 0)
    @rule(data=st.data())
    def mark_ready(self, data) -> None:
        computing = [n for n in self.nodes() if not n.ready]
        if computing:
            chosen = data.draw(st.lists(st.sampled_from(computing), unique=True), label="ready")
            self.kv.mark_ready(chosen)
            assert all(n.ready for n in chosen)

    @precondition(lambda self: self.kv.stats().num_nodes > 0)
    @rule(data=st.data())
    def discard(self, data) -> None:
        """Drop a computing subtree that nobody pins, as a failed step does."""

        def droppable(n: ChunkNode) -> bool:
            return not n.ready and n.pins == 0 and all(droppable(c) for c in n.children.values())

        roots = [n for n in self.nodes() if droppable(n)]
        if not roots:
            return
        top = data.draw(st.sampled_from(roots), label="discard")
        subtree, stack = [], [top]
        while stack:
            n = stack.pop()
            subtree.append(n)
            stack.extend(n.children.values())
        free_before = self.kv.pool.num_free
        pages = sum(len(n.pages) for n in subtree)
        self.kv.discard(subtree[::-1] if data.draw(st.booleans()) else subtree)
        assert self.kv.pool.num_free == free_before + pages
        assert not set(subtree) & set(alive(self.kv))

    @precondition(lambda self: self.kv.stats().num_nodes > 0)
    @rule(data=st.data())
    def evict(self, data) -> None:
        num_pages = data.draw(st.integers(0, self.kv.pool.num_pages // 3 + 1), label="evict")
        keep = protected(self.kv)
        before = self.nodes()
        children = {n: list(n.children.values()) for n in before}
        leaves = sorted(
            (n for n in before if not n.children and n.pins == 0 and n.ready),
            key=lambda n: n.last_used,
        )
        free_before = self.kv.pool.num_free
        freed = self.kv.evict(num_pages)
        after = set(alive(self.kv))
        gone = [n for n in before if n not in after]
        self.check_survivors(keep)
        assert freed == sum(self.kv.pages_for(n.start, n.end) for n in gone)
        assert self.kv.pool.num_free == free_before + freed
        if freed < num_pages:
            assert not any(not n.children and n.pins == 0 and n.ready for n in after), (
                "evict stopped short while an evictable leaf was left"
            )
        # the first round takes the least recently used leaves: a prefix of `leaves`
        first_round = [n in gone for n in leaves]
        assert first_round == sorted(first_round, reverse=True), "leaves are evicted LRU-first"
        for n in gone:  # a parent goes only with all its children
            assert all(c in gone for c in children[n])

    # -- invariants

    @invariant()
    def consistent(self) -> None:
        if not hasattr(self, "kv"):
            return
        check_cache(self.kv, self.registry)
        for node in alive(self.kv):
            assert node.pins == self.pins.get(node.node_id, 0)
            assert node.pins >= 0


TestKVCacheMachine = KVCacheMachine.TestCase
TestKVCacheMachine.settings = settings(
    max_examples=100,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
