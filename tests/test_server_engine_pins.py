"""Chunk KV management on the engine (what `/v1/chunks` is built on): pinned chains, precompute,
listing and removal.

The KV cache part runs on a one-element page pool with a real registry: pins survive eviction
and `clear()`, are counted per exact chain, and removal takes a chunk's nodes with everything
cached after them, or nothing when any of it is in use. A hypothesis run mixes holds,
releases, requests' pins, evictions and removals and checks that a held chain is never
evicted and that registry references follow the nodes.

The engine part runs the default model: a precomputed chain is served from the cache (its
tokens counted as cached, the answer unchanged), a pinned chain survives `clear_cache()` and a
pool too small for everything, and the operations run on the worker thread while requests
stream.
"""

from __future__ import annotations

import random
import threading

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cascade_rag.chunks import ChunkRegistry
from cascade_rag.composition import ChunkId, Composition
from cascade_rag.engine.kv_cache import ChunkInUseError, ChunkKVCache, PagePool
from cascade_rag.llm import CascadeEngine, EngineClosedError
from cascade_rag.sampling import SamplingParams

# ---- the KV cache ---------------------------------------------------------------------------


def make_cache(num_pages: int = 64, page_size: int = 4):
    registry = ChunkRegistry("test-model|test-tokenizer")
    pool = PagePool(num_pages, page_size, num_layers=1, num_kv_heads=1, head_dim=1)
    return ChunkKVCache(pool, registry), registry


def chunk(registry: ChunkRegistry, seed: int, length: int = 5):
    rng = random.Random(seed)
    return registry.register([rng.randrange(50_000) for _ in range(length)])


def build(kv: ChunkKVCache, chunks) -> list:
    """Create (and mark ready) the nodes of a chain, reusing the ones that exist."""
    node, nodes = kv.root, []
    for c in chunks:
        child = kv.lookup(node, c) or kv.create(node, c)
        kv.mark_ready([child])
        nodes.append(child)
        node = child
    return nodes


def test_hold_chain_needs_the_whole_chain_cached():
    kv, reg = make_cache()
    a, b = chunk(reg, 1), chunk(reg, 2)
    assert kv.hold_chain([a.id, b.id]) is None  # nothing cached: nothing pinned
    build(kv, [a])
    assert kv.hold_chain([a.id, b.id]) is None
    assert kv.root.children[a.id].pins == 0
    build(kv, [a, b])
    assert kv.hold_chain([a.id, b.id]) == 1
    assert [n.holds for n in kv.find_chain([a.id, b.id])] == [1, 1]


def test_held_chain_survives_eviction_and_clear():
    kv, reg = make_cache()
    a, b, c = chunk(reg, 1), chunk(reg, 2), chunk(reg, 3)
    build(kv, [a, b])
    build(kv, [c])
    kv.hold_chain([a.id, b.id])
    kv.clear()
    assert len(kv.find_chain([a.id, b.id])) == 2
    assert kv.find_chain([c.id]) == []  # the unpinned one went
    kv.release_chain([a.id, b.id])
    kv.clear()
    assert kv.find_chain([a.id]) == [] and kv.pool.num_free == kv.pool.num_pages


def test_holds_are_counted_per_exact_chain():
    kv, reg = make_cache()
    a, b = chunk(reg, 1), chunk(reg, 2)
    build(kv, [a, b])
    kv.hold_chain([a.id, b.id])
    kv.hold_chain([a.id, b.id])
    kv.hold_chain([a.id])
    assert kv.held_chains() == {(a.id, b.id): 2, (a.id,): 1}
    assert kv.release_chain([a.id]) == 0
    with pytest.raises(ValueError, match="not pinned"):
        kv.release_chain([a.id])  # the holds left on `a` belong to the longer chain
    assert kv.release_chain([a.id, b.id]) == 1
    assert kv.release_chain([a.id, b.id]) == 0
    with pytest.raises(ValueError, match="not pinned"):
        kv.release_chain([a.id, b.id])
    assert all(n.pins == 0 and n.holds == 0 for n in kv.iter_nodes())


def test_remove_chunk_takes_its_nodes_and_everything_after_them():
    kv, reg = make_cache()
    s, d, e, f = (chunk(reg, i) for i in range(4))
    build(kv, [s, d, e])
    build(kv, [s, e, d, f])  # d cached after two chains, e after s and after d
    build(kv, [s, f])
    before = kv.pool.num_free
    removed, freed = kv.remove_chunk(d.id)
    assert removed == 4  # [s,d], [s,d,e], [s,e,d], [s,e,d,f]
    assert kv.pool.num_free == before + freed and freed > 0
    left = {n.chain for n in kv.node_infos()}
    assert left == {(s.id,), (s.id, e.id), (s.id, f.id)}
    # every removed node gave back its registry reference
    assert reg.refcount(d.id) == 0 and reg.refcount(e.id) == 1 and reg.refcount(f.id) == 1


def test_remove_chunk_refuses_kv_in_use_and_changes_nothing():
    kv, reg = make_cache()
    s, d, e = (chunk(reg, i) for i in range(3))
    nodes = build(kv, [s, d, e])
    kv.hold_chain([s.id, d.id, e.id])
    snapshot = kv.node_infos()
    with pytest.raises(ChunkInUseError, match="pinned"):
        kv.remove_chunk(d.id)  # its child e is in a pinned chain
    assert kv.node_infos() == snapshot
    kv.release_chain([s.id, d.id, e.id])
    kv.pin(nodes[2])  # a running request
    with pytest.raises(ChunkInUseError, match="running requests"):
        kv.remove_chunk(d.id)
    kv.unpin(nodes[2])
    assert kv.remove_chunk(d.id)[0] == 2
    assert kv.remove_chunk("0" * 32) == (0, 0)  # nothing cached for an unknown id


def test_node_infos_list_parents_first_with_pins_and_users():
    kv, reg = make_cache()
    s, d = chunk(reg, 0, length=3), chunk(reg, 1, length=6)
    nodes = build(kv, [s, d])
    kv.hold_chain([s.id, d.id])
    kv.pin(nodes[0])
    infos = kv.node_infos()
    assert [i.chain for i in infos] == [(s.id,), (s.id, d.id)]
    first, second = infos
    assert (first.start, first.num_tokens, first.pins, first.users) == (0, 3, 1, 1)
    assert (second.start, second.num_tokens, second.pins, second.users) == (3, 6, 1, 0)
    assert second.num_pages == kv.pages_for(3, 9) and second.ready


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.sampled_from("bhrpuex"), st.integers(0, 7)), max_size=40))
def test_random_operations_never_evict_a_held_chain(ops):
    kv, reg = make_cache(num_pages=24, page_size=3)
    pieces = [chunk(reg, i, length=1 + i % 5) for i in range(4)]
    chains = [[pieces[i % 4] for i in range(k, k + 1 + k % 3)] for k in range(8)]
    held: dict[tuple, int] = {}
    running: list = []
    for op, k in ops:
        chain = chains[k]
        ids = tuple(c.id for c in chain)
        try:
            if op == "b":
                build(kv, chain)
            elif op == "h" and kv.hold_chain(ids) is not None:
                held[ids] = held.get(ids, 0) + 1
            elif op == "r" and held.get(ids):
                kv.release_chain(ids)
                held[ids] -= 1
            elif op == "p" and len(kv.find_chain(ids)) == len(ids):
                node = kv.find_chain(ids)[-1]
                kv.pin(node)
                running.append(node)
            elif op == "u" and running:
                kv.unpin(running.pop())
            elif op == "e":
                kv.evict(k * 3)
            elif op == "x":
                kv.remove_chunk(chain[-1].id)
        except ChunkInUseError:
            pass
        except Exception as exc:  # noqa: BLE001 - out of pages is allowed when all is pinned
            assert type(exc).__name__ == "OutOfPagesError", exc
        for key, count in held.items():
            if count:
                assert len(kv.find_chain(key)) == len(key), "a held chain lost KV"
        assert {k: v for k, v in held.items() if v} == kv.held_chains()
        owned = [p for n in kv.iter_nodes() for p in n.pages]
        assert len(owned) == len(set(owned)) and not any(kv.pool.is_free(p) for p in owned)
        refs = {}
        for n in kv.iter_nodes():
            refs[n.chunk.id] = refs.get(n.chunk.id, 0) + 1
        for c in pieces:
            assert reg.refcount(c.id) == refs.get(c.id, 0)


# ---- the engine -----------------------------------------------------------------------------

SYSTEM = "Answer from the context in a few words."
DOC = (
    "Zorbia is a small island nation in the Lantern Sea. Its capital city is Plum, which has "
    "about forty thousand inhabitants. The river Quill flows through Plum."
)
OTHER = "Ventoria is a mountain country. Its capital is Ashgrove, a city of bridges and mills."


@pytest.fixture(scope="module")
def engine(default_model):
    with CascadeEngine(default_model, kv_cache_tokens=2048, max_model_len=512) as eng:
        yield eng


def ask(engine, doc_id: str, query: str = "What is the capital of Zorbia?", n: int = 8):
    prompt = Composition(query=query, chunks=[ChunkId(doc_id)], system=SYSTEM)
    return engine.generate(prompt, SamplingParams(max_tokens=n))


def test_precompute_serves_the_chain_from_the_cache(engine):
    engine.clear_cache()
    doc = engine.register_chunk(DOC)
    cold = ask(engine, doc.id)  # reference: computed in the request
    engine.clear_cache()
    info = engine.precompute([doc], system=SYSTEM)
    chain = engine.prepare(Composition(query="x", chunks=[doc], system=SYSTEM)).chunks
    assert info.chunk_ids == tuple(c.id for c in chain)  # as a request composes it
    assert len(chain) == 2  # the system prompt chunk, then the document
    assert info.chunk_ids[1] == doc.id and info.computed_tokens == info.num_tokens > 0
    assert engine.precompute([doc], system=SYSTEM).computed_tokens == 0
    warm = ask(engine, doc.id)
    assert warm.usage.cached_tokens == info.num_tokens
    assert warm.token_ids == cold.token_ids


def test_pin_survives_clear_cache_and_a_full_pool(default_model):
    with CascadeEngine(default_model, kv_cache_tokens=384, max_model_len=384) as eng:
        doc = eng.register_chunk(DOC)
        info = eng.pin([ChunkId(doc.id)], system=SYSTEM)
        assert info.pins == 1 and info.computed_tokens == info.num_tokens
        assert eng.clear_cache() == 0
        fillers = [f"Filler passage {i}: " + OTHER * 2 for i in range(6)]
        for text in fillers:  # each needs pages: unpinned KV is evicted to make room
            eng.generate(Composition(query="Capital?", chunks=[text]), SamplingParams(max_tokens=2))
        assert eng.stats().kv_cache.evicted_nodes > 0
        assert ask(eng, doc.id, n=2).usage.cached_tokens == info.num_tokens
        nodes = {n.chain: n for n in eng.cached_chunks()}
        assert nodes[info.chunk_ids].pins == 1 and nodes[info.chunk_ids].users == 0
        assert eng.pinned_chains() == {info.chunk_ids: 1}
        assert eng.unpin([doc], system=SYSTEM).pins == 0
        eng.clear_cache()
        assert ask(eng, doc.id, n=2).usage.cached_tokens == 0


def test_pin_counts_and_unpin_errors(engine):
    doc = engine.register_chunk(OTHER)
    assert engine.pin([doc], system=SYSTEM).pins == 1
    assert engine.pin([doc], system=SYSTEM).pins == 2
    assert engine.unpin([doc], system=SYSTEM).pins == 1
    with pytest.raises(ValueError, match="not pinned"):
        engine.unpin([doc], system="Another system prompt.")  # another chain
    assert engine.unpin([doc], system=SYSTEM).pins == 0
    with pytest.raises(ValueError, match="not pinned"):
        engine.unpin([doc], system=SYSTEM)
    with pytest.raises(TypeError, match="list"):
        engine.pin(doc)
    with pytest.raises(ValueError, match="context"):
        engine.pin(["word " * 600])


def test_delete_chunk_drops_its_kv_unless_pinned(engine):
    engine.clear_cache()
    doc = engine.register_chunk(DOC)
    engine.pin([doc], system=SYSTEM)
    with pytest.raises(ChunkInUseError):
        engine.delete_chunk(doc.id)
    engine.unpin([doc], system=SYSTEM)
    ask(engine, doc.id, query="Which river?")
    assert any(n.chunk_id == doc.id for n in engine.cached_chunks())
    assert engine.delete_chunk(doc.id) > 0
    assert not any(n.chunk_id == doc.id for n in engine.cached_chunks())
    assert ask(engine, doc.id).usage.cached_tokens < len(doc)  # computed again


def test_chunk_operations_run_between_steps_while_requests_stream(engine):
    doc = engine.register_chunk(DOC)
    texts, errors = [], []

    def stream():
        try:
            prompt = Composition(query="Tell me about Plum.", chunks=[ChunkId(doc.id)])
            params = SamplingParams(max_tokens=24, ignore_eos=True)
            texts.append("".join(d.text for d in engine.stream(prompt, params)))
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=stream) for _ in range(3)]
    for t in threads:
        t.start()
    seen_users = 0
    for _ in range(5):
        seen_users = max(seen_users, max((n.users for n in engine.cached_chunks()), default=0))
        engine.pin([doc], system=SYSTEM)
        engine.unpin([doc], system=SYSTEM)
    for t in threads:
        t.join()
    assert not errors and len(texts) == 3 and len(set(texts)) == 1
    assert engine.stats().num_running == 0
    assert all(n.users == 0 for n in engine.cached_chunks())


def test_closed_engine_refuses_chunk_operations(default_model):
    eng = CascadeEngine(default_model, kv_cache_tokens=512, max_model_len=256)
    doc = eng.register_chunk(DOC)
    eng.close()
    with pytest.raises(EngineClosedError):
        eng.pin([doc])
    with pytest.raises(EngineClosedError):
        eng.cached_chunks()
