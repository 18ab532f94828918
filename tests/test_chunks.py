"""Tests for cascade_rag.chunks: content hashing, dedup, refcounts, LRU eviction, threads."""

from __future__ import annotations

import doctest
import subprocess
import sys
import textwrap
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    invariant,
    precondition,
    rule,
)

from cascade_rag import chunks
from cascade_rag.chunks import (
    Chunk,
    ChunkRegistry,
    ChunkStats,
    ChunkType,
    UnknownChunkError,
    chunk_hash,
    chunk_nbytes,
)

NS = "SmolLM2-135M-Instruct|tokenizer-v1"


def test_docstring_examples() -> None:
    result = doctest.testmod(chunks)
    assert result.attempted > 0 and result.failed == 0


# --- hashing ----------------------------------------------------------------------------------


def test_chunk_type_values_are_lowercase_names() -> None:
    assert [t.value for t in ChunkType] == [t.name.lower() for t in ChunkType]
    assert ChunkType("rag_result") is ChunkType.RAG_RESULT


def test_hash_same_ids_same_hash_across_containers() -> None:
    ids = [1, 2, 3, 50_000]
    h = chunk_hash(ids, NS)
    assert len(h) == 32 and int(h, 16) >= 0
    assert chunk_hash(tuple(ids), NS) == h
    assert chunk_hash(np.array(ids, dtype=np.int32), NS) == h
    assert chunk_hash(np.array(ids, dtype=np.int64), NS) == h
    assert chunk_hash(torch.tensor(ids), NS) == h
    assert chunk_hash([np.int64(i) for i in ids], NS) == h


def test_hash_is_stable_across_processes() -> None:
    # Pinned value: the id must not depend on PYTHONHASHSEED, platform or process.
    assert chunk_hash([1, 2, 3], "ns") == chunk_hash([1, 2, 3], "ns")
    assert chunk_hash([1, 2, 3], "ns") == "cb77c55445d2b0bc84bc333c4b1df4c4"


def test_hash_depends_on_namespace_and_ids() -> None:
    ids = [10, 20, 30]
    assert chunk_hash(ids, NS) != chunk_hash(ids, NS + "-other-tokenizer")
    assert chunk_hash(ids, NS) != chunk_hash([10, 20, 31], NS)
    assert chunk_hash(ids, NS) != chunk_hash([10, 20], NS)
    assert chunk_hash(ids, NS) != chunk_hash([20, 10, 30], NS)
    # Length-prefixed namespace: moving bytes between namespace and ids changes the hash.
    assert chunk_hash([0], "a") != chunk_hash([], "a" + "\0" * 8)


def test_text_and_type_are_not_part_of_identity() -> None:
    registry = ChunkRegistry(NS)
    a = registry.register([5, 6, 7], ChunkType.SYSTEM_PROMPT, text="hello")
    b = registry.register([5, 6, 7], ChunkType.QUERY, text="completely different text")
    assert b is a
    assert a.id == chunk_hash([5, 6, 7], NS)
    assert a.type is ChunkType.SYSTEM_PROMPT and a.text == "hello"  # first registration stays


def test_chunk_dataclass() -> None:
    registry = ChunkRegistry(NS)
    chunk = registry.register([1, 2, 3], "code", text="x = 1", metadata={"source": "a.py"})
    assert len(chunk) == 3
    assert chunk.type is ChunkType.CODE
    assert chunk.token_ids == (1, 2, 3)
    assert chunk.metadata["source"] == "a.py"
    with pytest.raises(TypeError):
        chunk.metadata["source"] = "b.py"  # type: ignore[index]
    with pytest.raises(AttributeError):
        chunk.text = "y"  # type: ignore[misc]
    other = Chunk(chunk.id, ChunkType.CODE, (1, 2, 3), "x = 1", metadata={"source": "b.py"})
    assert other == chunk and hash(other) == hash(chunk)  # metadata excluded from eq/hash
    assert "num_tokens=3" in repr(chunk)
    assert Chunk("x", ChunkType.CONTEXT, (1,)).metadata == {}
    with pytest.raises(ValueError):
        Chunk("x", ChunkType.CONTEXT, ())


# --- registration -----------------------------------------------------------------------------


def test_dedup_and_hit_miss_counts() -> None:
    registry = ChunkRegistry(NS)
    a = registry.register([1, 2, 3])
    b = registry.register([4, 5])
    assert registry.register(np.array([1, 2, 3])) is a
    assert registry.register((4, 5)) is b
    assert registry.register([4, 5]) is b
    assert registry.stats() == ChunkStats(
        num_chunks=2,
        num_tokens=5,
        num_bytes=chunk_nbytes(a) + chunk_nbytes(b),
        hits=3,
        misses=2,
        evictions=0,
        referenced=0,
    )
    assert len(registry) == 2
    assert a.id in registry and b.id in registry and "0" * 32 not in registry


def test_bad_arguments() -> None:
    registry = ChunkRegistry(NS)
    with pytest.raises(ValueError, match="empty"):
        registry.register([])
    with pytest.raises(TypeError, match="ints"):
        registry.register([1, 2.0, 3])
    with pytest.raises(TypeError, match="ints"):
        registry.register([1, True])
    with pytest.raises(TypeError, match="tokenize"):
        registry.register("some text")
    with pytest.raises(TypeError):
        registry.register(torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match="-1"):
        registry.register([1, -1])
    with pytest.raises(ValueError, match="chunk type"):
        registry.register([1], type="document")
    with pytest.raises(ValueError, match="capacity"):
        ChunkRegistry(NS, capacity=0)
    with pytest.raises(ValueError, match="capacity_bytes"):
        ChunkRegistry(NS, capacity_bytes=0)
    with pytest.raises(ValueError, match="capacity_bytes"):
        ChunkRegistry(NS, capacity_bytes=1.5e6)
    with pytest.raises(TypeError, match="text"):
        registry.register([1], text=b"bytes")
    with pytest.raises(TypeError, match="metadata"):
        registry.register([1], metadata=[("source", "a")])
    with pytest.raises(ValueError, match="namespace"):
        ChunkRegistry("")
    with pytest.raises(ValueError, match="max_count"):
        registry.evict_unreferenced(-1)
    assert registry.stats().misses == 0 and len(registry) == 0


def test_collision_detected(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(chunks, "chunk_hash", lambda token_ids, namespace: "f" * 32)
    registry = ChunkRegistry(NS)
    a = registry.register([1, 2, 3])
    assert registry.register([1, 2, 3]) is a  # a true hit is still a hit
    with pytest.raises(RuntimeError, match="collision"):
        registry.register([1, 2, 4])
    assert registry.get("f" * 32).token_ids == (1, 2, 3)
    assert registry.stats().hits == 1 and registry.stats().misses == 1


def test_unknown_id_error_message() -> None:
    registry = ChunkRegistry(NS)
    for method in (registry.get, registry.acquire, registry.release, registry.refcount):
        with pytest.raises(UnknownChunkError) as excinfo:
            method("deadbeef")
        assert isinstance(excinfo.value, KeyError)
        message = str(excinfo.value)
        assert "'deadbeef'" in message and "register" in message
    with pytest.raises(KeyError):
        registry.get("deadbeef")


# --- references and eviction ------------------------------------------------------------------


def test_refcounts() -> None:
    registry = ChunkRegistry(NS)
    a = registry.register([1, 2])
    assert registry.refcount(a.id) == 0
    assert registry.acquire(a.id) is a
    registry.acquire(a.id)
    assert registry.refcount(a.id) == 2 and registry.stats().referenced == 1
    registry.release(a.id)
    registry.release(a.id)
    assert registry.refcount(a.id) == 0 and registry.stats().referenced == 0
    with pytest.raises(RuntimeError, match="refcount is already 0"):
        registry.release(a.id)
    assert registry.refcount(a.id) == 0


def test_lru_order_get_refreshes_recency() -> None:
    evicted: list[str] = []
    registry = ChunkRegistry(NS, capacity=3, on_evict=evicted.append)
    a, b, c = (registry.register([i]) for i in (1, 2, 3))
    registry.get(a.id)  # order now b, c, a
    d = registry.register([4])
    assert evicted == [b.id]
    registry.register([3])  # a hit refreshes c: order a, d, c
    registry.register([5])
    assert evicted == [b.id, a.id]
    assert set(registry.evict_unreferenced(max_count=1)) == {d.id}
    assert evicted[-1] == d.id and c.id in registry
    assert registry.stats().evictions == 3


def test_release_counts_as_use() -> None:
    registry = ChunkRegistry(NS, capacity=2)
    a, b = registry.register([1]), registry.register([2])
    registry.acquire(a.id)
    registry.release(a.id)  # a is now more recent than b
    registry.register([3])
    assert a.id in registry and b.id not in registry


def test_eviction_never_removes_referenced_chunks() -> None:
    registry = ChunkRegistry(NS, capacity=2)
    a, b = registry.register([1]), registry.register([2])
    registry.acquire(a.id)  # a is the LRU chunk but referenced
    c = registry.register([3])
    assert a.id in registry and b.id not in registry and c.id in registry
    assert registry.evict_unreferenced() == [c.id]
    assert list(registry.evict_unreferenced()) == [] and a.id in registry


def test_register_with_acquire() -> None:
    registry = ChunkRegistry(NS, capacity=1)
    a = registry.register([1], acquire=True)
    b = registry.register([2], acquire=True)  # a is referenced: both stay
    assert registry.refcount(a.id) == registry.refcount(b.id) == 1
    assert registry.register([1], acquire=True) is a and registry.refcount(a.id) == 2
    assert registry.stats() == ChunkStats(
        num_chunks=2,
        num_tokens=2,
        num_bytes=chunk_nbytes(a) + chunk_nbytes(b),
        hits=1,
        misses=2,
        evictions=0,
        referenced=2,
    )


def test_capacity_exceeded_when_all_referenced() -> None:
    registry = ChunkRegistry(NS, capacity=2)
    held = [registry.register([i]) for i in range(2)]
    for chunk in held:
        registry.acquire(chunk.id)
    new = [registry.register([i]) for i in range(10, 13)]
    # Each registration keeps its own chunk; the previous new one is unreferenced and goes.
    assert len(registry) == 3 and new[-1].id in registry and new[0].id not in registry
    registry.acquire(new[-1].id)
    registry.register([20])
    assert len(registry) == 4 and registry.stats().referenced == 3
    for chunk in held:
        registry.release(chunk.id)
    registry.release(new[-1].id)
    assert len(registry) == 4  # releasing does not evict
    registry.register([21])  # the next registration brings it back within capacity
    assert len(registry) == 2


def test_byte_cap_evicts_lru_unreferenced_chunks() -> None:
    one = chunk_nbytes(Chunk("x", ChunkType.CONTEXT, tuple(range(300, 310))))
    assert one == 600 + 36 * 10
    evicted: list[str] = []
    registry = ChunkRegistry(NS, capacity=100, on_evict=evicted.append, capacity_bytes=3 * one)
    assert registry.capacity_bytes == 3 * one
    a, b, c = (registry.register(range(300 + 10 * i, 310 + 10 * i)) for i in range(3))
    assert registry.stats().num_bytes == 3 * one and evicted == []
    registry.acquire(a.id)  # a is the LRU chunk but referenced
    d = registry.register(range(400, 410))
    assert evicted == [b.id] and registry.stats().num_bytes == 3 * one
    # text and metadata count too: this chunk is worth more than one plain chunk
    e = registry.register(range(500, 510), text="x" * one, metadata={"source": "a.md"})
    assert chunk_nbytes(e) > 2 * one
    assert evicted == [b.id, c.id, d.id] and set(registry._chunks) == {a.id, e.id}
    assert registry.stats().num_bytes == chunk_nbytes(a) + chunk_nbytes(e)
    # a chunk larger than the whole cap is still returned (and kept until the next one)
    big = registry.register(range(10_000, 10_000 + 4 * one // 36))
    assert big.id in registry and a.id in registry and e.id not in registry
    registry.register([7])
    assert big.id not in registry and registry.stats().evictions == 5
    registry.release(a.id)
    assert registry.stats().num_bytes == sum(chunk_nbytes(ch) for ch in registry._chunks.values())


def test_count_cap_still_applies_with_a_byte_cap() -> None:
    registry = ChunkRegistry(NS, capacity=2, capacity_bytes=10**9)
    a, b, c = (registry.register([i]) for i in range(3))
    assert a.id not in registry and b.id in registry and c.id in registry


# --- chunks from elsewhere: chunk_for and adopt ---------------------------------------------


def test_chunk_for_registers_nothing() -> None:
    registry = ChunkRegistry(NS)
    chunk = registry.chunk_for([1, 2, 3], ChunkType.QUERY, text="q", metadata={"k": 1})
    assert chunk.id == chunk_hash([1, 2, 3], NS) and chunk.type is ChunkType.QUERY
    assert chunk.id not in registry and len(registry) == 0
    assert registry.stats().misses == registry.stats().hits == 0
    held = registry.register([1, 2, 3], ChunkType.CONTEXT)
    assert held.id == chunk.id and registry.chunk_for([1, 2, 3]) is held
    assert registry.stats().hits == 0  # chunk_for does not count as use
    with pytest.raises(ValueError, match="empty"):
        registry.chunk_for([])


def test_adopt_hand_built_chunks_with_one_id() -> None:
    """Two hand-built chunks named "doc-42" with different tokens never share an id."""
    registry = ChunkRegistry(NS)
    first = Chunk("doc-42", ChunkType.RAG_RESULT, (1, 2, 3), "one", {"source": "a.md"})
    second = Chunk("doc-42", ChunkType.RAG_RESULT, (4, 5, 6), "two")
    a, b = registry.adopt(first), registry.adopt(second)
    assert a.id == chunk_hash([1, 2, 3], NS) and b.id == chunk_hash([4, 5, 6], NS)
    assert a.id != b.id and "doc-42" not in registry
    assert (a.type, a.text, a.metadata["source"]) == (ChunkType.RAG_RESULT, "one", "a.md")
    assert registry.adopt(first) is a and registry.get(a.id) is a
    assert registry.stats().misses == 2 and registry.stats().hits == 1


def test_adopt_chunks_from_another_registry() -> None:
    other = ChunkRegistry(NS + "-other-model")
    mine = ChunkRegistry(NS)
    foreign = other.register([9, 8, 7], ChunkType.SYSTEM_PROMPT, text="sys")
    adopted = mine.adopt(foreign, acquire=True)
    assert adopted.id == chunk_hash([9, 8, 7], NS) != foreign.id
    assert adopted.type is ChunkType.SYSTEM_PROMPT and adopted.text == "sys"
    assert mine.refcount(adopted.id) == 1 and foreign.id not in mine
    assert mine.adopt(adopted) is adopted  # already ours: a hit


def test_adopt_refuses_an_id_held_for_other_tokens() -> None:
    registry = ChunkRegistry(NS)
    real = registry.register([1, 2, 3])
    forged = Chunk(real.id, ChunkType.CONTEXT, (6, 6, 6))
    for register in (True, False):
        with pytest.raises(ValueError, match="other tokens"):
            registry.adopt(forged, register=register)
    assert len(registry) == 1 and registry.stats().misses == 1
    with pytest.raises(TypeError, match="Chunk"):
        registry.adopt([1, 2, 3])
    with pytest.raises(ValueError, match="register=True"):
        registry.adopt(real, register=False, acquire=True)


def test_adopt_without_registering() -> None:
    registry = ChunkRegistry(NS)
    hand = Chunk("doc-1", ChunkType.CODE, (5, 6), "x = 1")
    planned = registry.adopt(hand, register=False)
    assert planned.id == chunk_hash([5, 6], NS) and planned.type is ChunkType.CODE
    assert len(registry) == 0
    assert registry.adopt(planned) == planned and planned.id in registry


def test_guards_hold_under_python_dash_o() -> None:
    """Collision and bookkeeping guards are exceptions, not asserts: they hold under -O."""
    script = textwrap.dedent(
        """
        import sys
        from cascade_rag import chunks
        from cascade_rag.chunks import Chunk, ChunkRegistry, ChunkType

        assert False, "asserts must be off under -O"  # noqa: B011 (proves -O is on)
        registry = ChunkRegistry("ns")
        a = registry.adopt(Chunk("doc-42", ChunkType.RAG_RESULT, (1, 2, 3)))
        b = registry.adopt(Chunk("doc-42", ChunkType.RAG_RESULT, (4, 5, 6)))
        if a.id == b.id:
            sys.exit("two token runs share an id")
        def refused(call):
            try:
                call()
            except (ValueError, RuntimeError):
                return True
            return False
        if not refused(lambda: registry.adopt(Chunk(a.id, ChunkType.CONTEXT, (7,)))):
            sys.exit("a forged id was adopted")
        if not refused(lambda: registry.release(a.id)):
            sys.exit("release below zero was accepted")
        chunks.chunk_hash = lambda token_ids, namespace: a.id
        if not refused(lambda: registry.register([8, 9])):
            sys.exit("a hash collision was accepted")
        if registry.get(a.id).token_ids != (1, 2, 3):
            sys.exit("the held chunk changed")
        print("ok")
        """
    )
    result = subprocess.run(
        [sys.executable, "-O", "-c", script], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stdout + result.stderr


def test_on_evict_callback_runs_after_removal_and_may_reenter() -> None:
    seen: list[tuple[str, bool, int]] = []

    def on_evict(chunk_id: str) -> None:
        seen.append((chunk_id, chunk_id in registry, len(registry)))

    registry = ChunkRegistry(NS, capacity=1, on_evict=on_evict)
    a = registry.register([1])
    b = registry.register([2])
    assert seen == [(a.id, False, 1)]
    registry.evict_unreferenced()
    assert seen[-1] == (b.id, False, 0)


# --- threads ----------------------------------------------------------------------------------


@pytest.fixture
def fast_thread_switches():
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    yield
    sys.setswitchinterval(old)


def run_threads(worker, num_threads: int) -> None:
    """Runs worker(0..num_threads-1) on their own threads; re-raises a worker's exception."""
    with ThreadPoolExecutor(max_workers=num_threads) as pool:
        for future in [pool.submit(worker, t) for t in range(num_threads)]:
            future.result()


@pytest.mark.usefixtures("fast_thread_switches")
def test_concurrent_register_acquire_release() -> None:
    num_threads, num_rounds = 8, 200
    shared_ids = [[100, i] for i in range(5)]
    registry = ChunkRegistry(NS)
    barrier = threading.Barrier(num_threads, timeout=30)
    seen_ids: list[set[str]] = [set() for _ in range(num_threads)]

    def worker(t: int) -> None:
        barrier.wait()
        for r in range(num_rounds):
            shared = registry.register(shared_ids[r % len(shared_ids)])
            own = registry.register([t, r])
            for chunk in (shared, own):
                registry.acquire(chunk.id)
                assert registry.get(chunk.id) is chunk
                assert registry.refcount(chunk.id) >= 1
                seen_ids[t].add(chunk.id)
            registry.release(shared.id)
            registry.release(own.id)

    run_threads(worker, num_threads)

    stats = registry.stats()
    distinct = set().union(*seen_ids)
    assert len(distinct) == len(shared_ids) + num_threads * num_rounds
    assert stats.misses == len(distinct) == len(registry) == stats.num_chunks
    assert stats.hits + stats.misses == 2 * num_threads * num_rounds
    assert stats.num_tokens == 2 * len(distinct) and stats.evictions == 0
    assert stats.referenced == 0
    assert all(registry.refcount(chunk_id) == 0 for chunk_id in distinct)


@pytest.mark.usefixtures("fast_thread_switches")
def test_concurrent_eviction_never_drops_held_chunks() -> None:
    num_threads, num_rounds, capacity = 8, 200, 16
    evicted: list[str] = []
    registry = ChunkRegistry(NS, capacity=capacity, on_evict=evicted.append)
    barrier = threading.Barrier(num_threads, timeout=30)

    def worker(t: int) -> None:
        barrier.wait()
        for r in range(num_rounds):
            if r % 2:
                chunk = registry.register([t, r % 40], acquire=True)
            else:
                # Separate calls: another thread's registration may evict the chunk in
                # between, which the caller sees as UnknownChunkError.
                while True:
                    chunk = registry.register([t, r % 40])
                    try:
                        registry.acquire(chunk.id)
                        break
                    except UnknownChunkError:
                        continue
            registry.register([1000 + t, r])  # churn that forces evictions
            assert chunk.id in registry  # held chunks survive any eviction
            assert registry.get(chunk.id) is chunk
            registry.release(chunk.id)

    run_threads(worker, num_threads)

    stats = registry.stats()
    assert stats.referenced == 0
    assert stats.evictions == len(evicted) > 0
    assert stats.misses - stats.evictions == len(registry) == stats.num_chunks
    assert len(registry) <= capacity + num_threads  # each register keeps its own new chunk
    assert stats.num_tokens == 2 * len(registry)
    registry.register([5000])
    assert len(registry) <= capacity


# --- random operation sequences ---------------------------------------------------------------


class RegistryMachine(RuleBasedStateMachine):
    """Drives a small registry against a plain model of refcounts and LRU order."""

    chunk_ids = Bundle("chunk_ids")

    def __init__(self) -> None:
        super().__init__()
        self.capacity = 4
        # 3 one-token chunks, or 2 chunks of up to 3 tokens: both caps come into play
        self.capacity_bytes = 3 * (600 + 36)
        self.evicted: list[str] = []
        self.registry = ChunkRegistry(
            "machine-ns",
            self.capacity,
            on_evict=self.evicted.append,
            capacity_bytes=self.capacity_bytes,
        )
        self.refcounts: dict[str, int] = {}  # model: every held id -> count
        self.lru: list[str] = []  # model: unreferenced ids, least recently used first
        self.tokens: dict[str, tuple[int, ...]] = {}
        self.hits = self.misses = 0

    def _nbytes(self, chunk_ids: list[str]) -> int:
        return sum(600 + 36 * len(self.tokens[i]) for i in chunk_ids)

    def _touch(self, chunk_id: str) -> None:
        if chunk_id in self.lru:
            self.lru.remove(chunk_id)
            self.lru.append(chunk_id)

    def _expect_evicted(self, expected: list[str]) -> None:
        assert self.evicted == expected, (self.evicted, expected)
        for chunk_id in expected:
            assert self.refcounts.pop(chunk_id) == 0
            self.lru.remove(chunk_id)
        self.evicted.clear()

    @rule(
        target=chunk_ids,
        token_ids=st.lists(st.integers(0, 3), min_size=1, max_size=3),
        chunk_type=st.sampled_from(ChunkType),
        acquire=st.booleans(),
    )
    def register(self, token_ids: list[int], chunk_type: ChunkType, acquire: bool) -> str:
        chunk = self.registry.register(token_ids, chunk_type, acquire=acquire)
        assert chunk.token_ids == tuple(token_ids)
        if chunk.id in self.refcounts:
            self.hits += 1
            self._touch(chunk.id)
            assert self.evicted == []
        else:
            self.misses += 1
            self.tokens[chunk.id] = chunk.token_ids
            held = [*self.refcounts, chunk.id]
            expected = []
            for candidate in self.lru:
                if len(held) <= self.capacity and self._nbytes(held) <= self.capacity_bytes:
                    break
                expected.append(candidate)
                held.remove(candidate)
            self._expect_evicted(expected)
            self.refcounts[chunk.id] = 0
            self.lru.append(chunk.id)
            others = [i for i in self.refcounts if i != chunk.id]
            within = len(self.registry) <= self.capacity and (
                self.registry.stats().num_bytes <= self.capacity_bytes
            )
            assert within or all(self.refcounts[i] for i in others)
        if acquire:
            if self.refcounts[chunk.id] == 0:
                self.lru.remove(chunk.id)
            self.refcounts[chunk.id] += 1
        return chunk.id

    @rule(chunk_id=chunk_ids)
    def get(self, chunk_id: str) -> None:
        if chunk_id in self.refcounts:
            assert self.registry.get(chunk_id).token_ids == self.tokens[chunk_id]
            self._touch(chunk_id)
        else:
            with pytest.raises(UnknownChunkError):
                self.registry.get(chunk_id)

    @rule(chunk_id=chunk_ids)
    def acquire(self, chunk_id: str) -> None:
        if chunk_id in self.refcounts:
            self.registry.acquire(chunk_id)
            if self.refcounts[chunk_id] == 0:
                self.lru.remove(chunk_id)
            self.refcounts[chunk_id] += 1
        else:
            with pytest.raises(UnknownChunkError):
                self.registry.acquire(chunk_id)

    @precondition(lambda self: any(self.refcounts.values()))
    @rule(data=st.data())
    def release(self, data: st.DataObject) -> None:
        held = sorted(i for i, n in self.refcounts.items() if n > 0)
        chunk_id = data.draw(st.sampled_from(held))
        self.registry.release(chunk_id)
        self.refcounts[chunk_id] -= 1
        if self.refcounts[chunk_id] == 0:
            self.lru.append(chunk_id)

    @rule(max_count=st.none() | st.integers(0, 3))
    def evict_unreferenced(self, max_count: int | None) -> None:
        expected = list(self.lru if max_count is None else self.lru[:max_count])
        assert self.registry.evict_unreferenced(max_count) == expected
        self._expect_evicted(expected)

    @rule(chunk_id=consumes(chunk_ids))
    def forget(self, chunk_id: str) -> None:
        """Keeps the bundle small so that stale and live ids both come up."""

    @invariant()
    def matches_model(self) -> None:
        stats = self.registry.stats()
        assert all(n >= 0 for n in self.refcounts.values())
        assert len(self.registry) == stats.num_chunks == len(self.refcounts)
        assert stats.num_tokens == sum(len(self.tokens[i]) for i in self.refcounts)
        assert stats.num_bytes == self._nbytes(list(self.refcounts))
        assert stats.referenced == sum(1 for n in self.refcounts.values() if n > 0)
        assert (stats.hits, stats.misses) == (self.hits, self.misses)
        assert stats.misses - stats.evictions == stats.num_chunks
        for chunk_id, count in self.refcounts.items():
            assert chunk_id in self.registry
            assert self.registry.refcount(chunk_id) == count


TestRegistryMachine = RegistryMachine.TestCase
TestRegistryMachine.settings = settings(
    max_examples=150,
    stateful_step_count=40,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
