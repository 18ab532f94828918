"""Reuse anywhere in the scheduler, driven by a fake model step: every read is the KV intended.

`FakeAnywhere` runs the real scheduler (with a `RecomputePolicy`) and the real
`ModelRunner.build_metadata`, and replays a step on a fake cache (a dict slot -> marker): every
row writes a marker of the KV it computes at its slot, the step's copies are applied (every
source read before any destination is written, as the backends do), and then every row's reads
are gathered through its segments, each key at the effective position the query sees it at
(the position its key was rotated at, plus the segment's delta).

Markers say what computed the KV: ("node", anchor id, chunk id, position, token) for a chunk
computed at its canonical positions after its anchor, ("redo", seq id, position, token) for a
chunk token recomputed in a request, ("priv", seq id, position, token) for a request's own
tokens. The check: the keys a row at position p reads have the effective positions 0..p, once
each, and at each position the marker the design prescribes (`expected_key`), computed from the
prompt alone. Page ownership (node, private, copy and free pages partition the pool) and pins
are checked after every step, through eviction, preemption and failures.
"""

from __future__ import annotations

import random

import pytest
import torch

from cascade_rag.chunks import Chunk, ChunkRegistry, ChunkType
from cascade_rag.engine.kv_cache import ChunkKVCache, PagePool
from cascade_rag.engine.model_runner import ModelRunner
from cascade_rag.engine.scheduler import Scheduler, StepPlan
from cascade_rag.engine.segments import RecomputePolicy, runs
from cascade_rag.engine.sequence import PreparedPrompt, Sequence, SequenceStatus
from cascade_rag.sampling import SamplingParams

VOCAB = 1000


class WipingPool(PagePool):
    """A PagePool that wipes the fake KV of pages when they are freed."""

    def __init__(self, num_pages: int, page_size: int, fake: dict) -> None:
        super().__init__(num_pages, page_size, num_layers=1, num_kv_heads=1, head_dim=2)
        self.fake = fake

    def free(self, pages: list[int]) -> None:
        super().free(pages)
        for p in pages:
            for o in range(self.page_size):
                self.fake.pop(p * self.page_size + o, None)


def layout(seq: Sequence):
    """(anchor chunk or None, [(chunk, offset)], canonical start) from the prompt alone."""
    chunks = list(seq.prompt.chunks)
    anchor = chunks.pop(0) if chunks and chunks[0].type is ChunkType.SYSTEM_PROMPT else None
    start = len(anchor) if anchor else 0
    placed, pos = [], start
    for c in chunks:
        placed.append((c, pos))
        pos += len(c)
    return anchor, placed, start


def expected_key(seq: Sequence, pos: int, k: int):
    """The marker of the KV a row of `seq` must read at request position `pos`."""
    anchor, placed, start = layout(seq)
    tok = seq.token_ids[pos]
    if anchor is not None and pos < start:
        return ("node", None, anchor.id, pos, tok)
    for chunk, offset in placed:
        if offset <= pos < offset + len(chunk):
            i = pos - offset
            if offset != start and i < k:
                return ("redo", seq.seq_id, start + i, tok)
            return ("node", anchor.id if anchor else None, chunk.id, start + i, tok)
    return ("priv", seq.seq_id, pos, tok)


class FakeAnywhere:
    def __init__(
        self,
        page_size: int,
        num_pages: int,
        recompute: int,
        max_num_seqs: int = 64,
        max_num_batched_tokens: int = 4096,
        split: bool = False,
    ) -> None:
        self.fake: dict[int, tuple] = {}
        self.registry = ChunkRegistry("fake-model|fake-tokenizer")
        self.pool = WipingPool(num_pages, page_size, self.fake)
        self.kv = ChunkKVCache(self.pool, self.registry, segment_layout=True)
        self.k = recompute
        self.sched = Scheduler(
            self.kv,
            max_num_seqs,
            max_num_batched_tokens,
            RecomputePolicy(recompute),
            split_segments=split,
        )
        self.runner = ModelRunner(None, self.pool, None, 3)  # only build_metadata
        self.runner.inv_freq = torch.ones(1)
        self.page_size = page_size
        self.finished: list[Sequence] = []
        self.failed: list[Sequence] = []
        self.num_steps = 0
        self.rows_read = 0

    def add(self, prompt: PreparedPrompt, max_tokens: int) -> Sequence:
        seq = Sequence(prompt=prompt, params=SamplingParams(max_tokens=max_tokens))
        self.sched.add(seq)
        return seq

    def run(self, max_steps: int = 5000) -> None:
        while self.sched.has_work():
            assert self.num_steps < max_steps, "the scheduler makes no progress"
            self.step()

    def step(self) -> StepPlan:
        plan = self.sched.schedule()
        self.num_steps += 1
        for seq, exc in plan.failed:
            assert isinstance(exc, Exception)
            assert not seq.nodes and not seq.private_pages and not seq.cow_pages
            seq.status = SequenceStatus.FINISHED
            self.failed.append(seq)
        if not plan.scheduled:
            if self.sched.waiting and not self.sched.running:
                self.failed.append(self.sched.waiting.popleft())
            self.check_ownership()
            return plan
        self.forward(plan)
        self.sched.finish_step(plan, failed=False)
        for entry in plan.scheduled:
            seq = entry.seq
            assert seq.num_kv == len(seq.token_ids)
            seq.token_ids.append(hash((seq.seq_id, len(seq.token_ids))) % VOCAB)
            if seq.num_generated >= seq.max_tokens:
                self.sched.release(seq)
                seq.status = SequenceStatus.FINISHED
                self.finished.append(seq)
        self.check_ownership()
        return plan

    def forward(self, plan: StepPlan) -> None:
        size = self.page_size
        order, metadata = self.runner.build_metadata(plan.scheduled)
        assert order == list(range(len(plan.scheduled)))
        slot_mapping = metadata.slot_mapping.tolist()
        src, dst = metadata.copy_src.tolist(), metadata.copy_dst.tolist()
        assert len(set(slot_mapping)) == len(slot_mapping), "two new tokens share a slot"
        assert len(set(dst)) == len(dst), "two copies write one slot"
        assert not set(dst) & set(slot_mapping), "a copy overwrites a token of this step"
        node_of_slot = {
            pg * size + o: n for n in plan.created for pg in n.pages for o in range(size)
        }
        written = []
        for entry in plan.scheduled:
            seq = entry.seq
            for gi, g in enumerate(entry.groups):
                last = gi == len(entry.groups) - 1
                for pos, tok, slot in zip(g.positions, g.token_ids, g.slots, strict=True):
                    assert not self.pool.is_free(slot // size), "a token written to a free page"
                    k_pos = pos - g.k_delta
                    if last:
                        assert g.k_delta == 0 and tok == seq.token_ids[pos]
                        marker = ("priv", seq.seq_id, k_pos, tok)
                    elif g.k_delta:
                        marker = ("redo", seq.seq_id, k_pos, tok)
                    else:
                        node = node_of_slot[slot]  # fill rows write a node this step creates
                        assert node in seq.nodes
                        anchor = node.parent.chunk.id if node.parent.chunk else None
                        marker = ("node", anchor, node.chunk.id, k_pos, tok)
                    written.append((slot, marker))
        for slot, marker in written:
            self.fake[slot] = marker
        values = [self.fake.get(s) for s in src]
        for d, v in zip(dst, values, strict=True):
            self.fake[d] = v
        for entry in plan.scheduled:
            for g in entry.groups:
                self.check_group(entry.seq, g, g is entry.groups[-1], node_of_slot)

    def keys_of(self, seg, num_keys: int) -> list[tuple[int, tuple]]:
        size, out = self.page_size, []
        for i in range(num_keys):
            marker = self.fake.get(seg.pages[i // size] * size + i % size)
            assert marker is not None, "a read of a slot nobody wrote"
            out.append((marker[-2] + seg.delta, marker))
        return out

    def check_group(self, seq: Sequence, g, is_private: bool, node_of_slot: dict) -> None:
        n = len(g.positions)
        shared = [kv for seg in g.shared for kv in self.keys_of(seg, seg.num_keys)]
        for r, pos in enumerate(g.positions):
            own = self.keys_of(g.own, g.own.num_keys - n + r + 1)
            reads = sorted(shared + own)
            got_pos = [p for p, _ in reads]
            assert got_pos == list(range(pos + 1)), (
                f"seq {seq.seq_id} row at {pos} sees positions {got_pos}"
            )
            if is_private or g.k_delta:  # rows at their true position in the request
                for p, marker in reads:
                    want = expected_key(seq, p, self.k)
                    assert marker == want, f"seq {seq.seq_id} row {pos} key {p}: {marker} != {want}"
            else:  # a chunk node computed after its anchor: canonical positions
                node = node_of_slot[g.slots[r]]
                for p, marker in reads:
                    if p < node.start:
                        assert marker[:3] == ("node", None, node.parent.chunk.id)
                    else:
                        assert marker[1:3] == (
                            node.parent.chunk.id if node.parent.chunk else None,
                            node.chunk.id,
                        )
            self.rows_read += 1

    def check_ownership(self) -> None:
        nodes = list(self.kv.iter_nodes())
        owned = [p for n in nodes for p in n.pages]
        private = [p for s in self.sched.running for p in s.private_pages + s.cow_pages]
        free = list(self.pool._free)
        everything = owned + private + free
        assert len(everything) == len(set(everything)), "a page is held twice"
        assert len(everything) == self.pool.num_pages, "pages leaked"
        pins: dict[int, int] = {}
        for s in self.sched.running:
            for n in s.nodes:
                pins[id(n)] = pins.get(id(n), 0) + 1
        for n in nodes:
            assert n.pins == pins.get(id(n), 0)
            assert n.ready
            assert n.parent is self.kv.root or n.parent.parent is self.kv.root, "two levels"
        for s in self.sched.waiting:
            assert not s.nodes and not s.private_pages and not s.cow_pages


def make_prompts(registry: ChunkRegistry, seed: int, num: int = 24) -> list[PreparedPrompt]:
    rng = random.Random(seed)

    def chunk(n: int, type=ChunkType.RAG_RESULT) -> Chunk:
        return registry.register([rng.randrange(VOCAB) for _ in range(n)], type=type)

    systems = [chunk(n, ChunkType.SYSTEM_PROMPT) for n in (11, 16)]
    docs = [chunk(n) for n in (3, 16, 9, 21, 5, 1, 32, 4, 17)]
    prompts = []
    for _ in range(num):
        chain = rng.sample(docs, rng.randint(0, 4))
        if rng.random() < 0.85:
            chain.insert(0, rng.choice(systems))
        if chain and rng.random() < 0.1:
            chain.append(chain[-1])  # the same chunk twice
        tail = tuple(rng.randrange(VOCAB) for _ in range(rng.randint(1, 6)))
        prompts.append(PreparedPrompt(tuple(chain), tail))
    return prompts


@pytest.mark.parametrize("page_size", [1, 4, 16])
@pytest.mark.parametrize("recompute", [0, 2, 5, 40])
@pytest.mark.parametrize("split", [False, True], ids=["whole", "split"])
def test_batched_and_one_by_one_reads_are_the_intended_kv(page_size, recompute, split):
    """`split`: placed chunks' private copied pages and shared pages are separate segments
    (cascade at chunk granularity), and the planner shares every repeated page list."""
    engine = FakeAnywhere(page_size, num_pages=4096 // page_size, recompute=recompute, split=split)
    prompts = make_prompts(engine.registry, seed=page_size + recompute)
    for p in prompts[:12]:  # one batch, cold
        engine.add(p, max_tokens=3)
    engine.run()
    for p in prompts[12:]:  # one at a time, warm
        engine.add(p, max_tokens=2)
        engine.run()
    assert len(engine.finished) == len(prompts) and not engine.failed
    stats = engine.kv.stats()
    # recompute=40 redoes every placed chunk (none is longer than 32 tokens)
    assert (stats.anywhere_hit_tokens > 0) == (recompute < 32)
    assert stats.hit_tokens > stats.anywhere_hit_tokens
    assert (stats.recomputed_tokens > 0) == (recompute > 0)
    assert engine.rows_read > 0


def test_cached_recomputed_and_private_counts():
    """Usage counts: cached = reused chunk tokens not recomputed; recomputed = first-k of each
    chunk placed away from its canonical offset, whether its node was cached or new."""
    engine = FakeAnywhere(4, num_pages=256, recompute=3)
    reg = engine.registry
    system = reg.register(list(range(100, 110)), type=ChunkType.SYSTEM_PROMPT)
    a, b, c = (reg.register(list(range(s, s + n))) for s, n in ((200, 7), (300, 12), (400, 2)))
    first = engine.add(PreparedPrompt((system, a, b), (1, 2)), max_tokens=1)
    engine.run()
    assert first.num_cached_tokens == 0 and first.num_recomputed_tokens == 3  # b is placed
    second = engine.add(PreparedPrompt((system, b, c, a), (1, 2, 3)), max_tokens=1)
    engine.run()
    # system 10 + b 12 (first, canonical) + a 7 - 3 recomputed; c is new (2 tokens, 2 redone)
    assert second.num_cached_tokens == 10 + 12 + 4
    assert second.num_recomputed_tokens == 3 + 2
    stats = engine.kv.stats()
    assert stats.anywhere_hit_tokens == 4 and stats.exact_hit_tokens == 22
    assert stats.recomputed_tokens == 8


@pytest.mark.parametrize("page_size", [1, 4])
def test_small_pool_evicts_and_preempts_and_stays_exact(page_size):
    engine = FakeAnywhere(page_size, num_pages=160 // page_size, recompute=3, max_num_seqs=6)
    prompts = make_prompts(engine.registry, seed=7, num=30)
    seqs = [engine.add(p, max_tokens=12) for p in prompts]
    engine.run()
    assert len(engine.finished) == len(prompts)
    assert engine.kv.evicted_nodes > 0, "the pool was meant to force eviction"
    assert sum(s.num_preemptions for s in seqs) > 0, "the pool was meant to force preemption"


def test_runs_of_indices():
    assert runs([]) == []
    assert runs([0, 1, 2, 5, 6, 9]) == [(0, 3), (5, 7), (9, 10)]
