"""The scheduler driven by a fake model step: page tables, slots and boundary copies are exact.

`FakeEngine` replays what the model runner and the attention backend do with a step, on a
fake cache (a dict slot -> value): it lays the batch out with the real `ModelRunner.build_metadata`
(the block-table path, checked against the slow reference path on every step: same order, slots,
copies and levels), writes, for every new position, a marker of that position's KV at its slot,
applies the boundary copies, and then reads every scheduled sequence's positions [0, kv_len)
through its block-table row (which must equal the page table rebuilt from its nodes).
The marker of position p is (p, hash of the token ids [0, p]): in a real model the KV at p depends
on every token up to p, so a read that finds another sequence's slot is only accepted where that
sequence has the same whole prefix (exact reuse, docs/design.md rule 2). Freed pages are wiped, so a
read of a page that was freed and handed out again shows up too.

After each step the fake samples a token (a function of the sequence's tokens, so the output does
not depend on scheduling) and finishes sequences after `max_tokens` tokens. Page ownership is
checked after every step: node pages, private pages of running sequences and free pages partition
the pool.
"""

from __future__ import annotations

import random
from collections.abc import Sequence as Seq

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from cascade_rag.attention.metadata import AttentionMetadata
from cascade_rag.chunks import Chunk, ChunkRegistry
from cascade_rag.engine.batch_layout import StepInputs
from cascade_rag.engine.kv_cache import ChunkKVCache, PagePool
from cascade_rag.engine.model_runner import ModelRunner
from cascade_rag.engine.scheduler import Scheduler, StepPlan
from cascade_rag.engine.sequence import PreparedPrompt, Sequence, SequenceStatus
from cascade_rag.sampling import SamplingParams

NAMESPACE = "fake-model|fake-tokenizer"
VOCAB = 1000


class TrackingPool(PagePool):
    """A PagePool that wipes the fake KV of pages when they are freed."""

    def __init__(self, num_pages: int, page_size: int, fake: dict[int, tuple[int, int]]) -> None:
        super().__init__(num_pages, page_size, num_layers=1, num_kv_heads=1, head_dim=1)
        self.fake = fake

    def free(self, pages: list[int]) -> None:
        super().free(pages)
        for p in pages:
            for o in range(self.page_size):
                self.fake.pop(p * self.page_size + o, None)


class Markers:
    """marker(seq, p) = (p, hash of token ids [0, p]), memoised per sequence (ids only grow)."""

    def __init__(self) -> None:
        self._hashes: dict[int, list[int]] = {}

    def __call__(self, seq: Sequence, pos: int) -> tuple[int, int]:
        hashes = self._hashes.setdefault(seq.seq_id, [])
        while len(hashes) <= pos:
            prev = hashes[-1] if hashes else 0x5EED
            hashes.append(hash((prev, seq.token_ids[len(hashes)])))
        return pos, hashes[pos]


def solo_pages(kv: ChunkKVCache, prompt: PreparedPrompt, num_tokens: int) -> int:
    """Pages a sequence of `num_tokens` tokens needs when it is alone in the pool."""
    start, pages = 0, 0
    for chunk in prompt.chunks:
        pages += kv.pages_for(start, start + len(chunk.token_ids))
        start += len(chunk.token_ids)
    return pages + kv.pages_for(start, num_tokens)


class FakeEngine:
    """Scheduler + real metadata layout + a fake forward pass over a dict cache.

    Args:
        copy_mode: "ordered" applies the step's copies one after another in metadata order;
            "simultaneous" reads every source before writing any destination, as
            `TorchAttention.forward` does (index_select, then index_copy_).
    """

    def __init__(
        self,
        page_size: int,
        num_pages: int,
        max_num_seqs: int = 64,
        max_num_batched_tokens: int = 4096,
        levels: int = 3,
        copy_mode: str = "ordered",
        registry: ChunkRegistry | None = None,
        min_shared_tokens: int = 0,
    ) -> None:
        self.fake: dict[int, tuple[int, int]] = {}
        self.registry = registry or ChunkRegistry(NAMESPACE)
        self.pool = TrackingPool(num_pages, page_size, self.fake)
        self.kv = ChunkKVCache(self.pool, self.registry)
        self.sched = Scheduler(self.kv, max_num_seqs, max_num_batched_tokens)
        # only the step inputs: the block-table path, and the slow reference path
        self.runner = ModelRunner(
            None, self.pool, None, levels, min_shared_tokens, block_table=self.sched.block_table
        )
        self.ref_runner = ModelRunner(None, self.pool, None, levels, min_shared_tokens)
        self.page_size = page_size
        self.copy_mode = copy_mode
        self.marker = Markers()
        self.finished: list[Sequence] = []
        self.failed: list[Sequence] = []
        self.num_steps = 0
        self.first_entries: dict[int, tuple[int, int]] = {}  # seq_id -> (q_start, kv_len)
        self.max_running = 0

    def add(self, prompt: PreparedPrompt, max_tokens: int) -> Sequence:
        seq = Sequence(prompt=prompt, params=SamplingParams(max_tokens=max_tokens))
        self.sched.add(seq)
        return seq

    # -- one step

    def step(self) -> StepPlan:
        running_before = list(self.sched.running)
        plan = self.sched.schedule()
        self.num_steps += 1
        self.check_plan(plan, running_before)
        for seq, exc in plan.failed:
            assert isinstance(exc, Exception), "every failure carries its error"
            self._fail(seq)
        if not plan.scheduled:
            if self.sched.waiting and not self.sched.running:  # as LLMEngine.step does
                self._fail(self.sched.waiting.popleft())
            self.check_ownership()
            return plan
        self.forward(plan)
        self.sched.finish_step(plan, failed=False)
        for entry in plan.scheduled:
            seq = entry.seq
            assert seq.num_kv == len(seq.token_ids)
            seq.token_ids.append(self.sample(seq))
            if seq.num_generated >= seq.max_tokens:
                self.sched.release(seq)
                seq.status = SequenceStatus.FINISHED
                self.finished.append(seq)
        self.check_ownership()
        return plan

    def run(self, max_steps: int = 5000) -> None:
        while self.sched.has_work():
            assert self.num_steps < max_steps, "the scheduler makes no progress"
            self.step()
        self.check_ownership()

    def sample(self, seq: Sequence) -> int:
        return self.marker(seq, len(seq.token_ids) - 1)[1] % VOCAB

    def _fail(self, seq: Sequence) -> None:
        assert solo_pages(self.kv, seq.prompt, len(seq.token_ids)) > self.pool.num_pages, (
            f"sequence {seq.seq_id} failed though it fits alone in {self.pool.num_pages} pages"
        )
        assert not seq.nodes and not seq.private_pages
        seq.status = SequenceStatus.FINISHED
        self.failed.append(seq)

    def forward(self, plan: StepPlan) -> None:
        """Write markers at the slots, apply the copies, read every sequence back."""
        inputs = self.runner.prepare(plan.scheduled)
        assert_same_inputs(inputs, self.ref_runner.prepare(plan.scheduled))
        order, metadata = inputs.order.tolist(), inputs.metadata
        assert sorted(order) == list(range(len(plan.scheduled)))
        slot_mapping = metadata.slot_mapping.tolist()
        src, dst = metadata.copy_src.tolist(), metadata.copy_dst.tolist()
        assert len(set(slot_mapping)) == len(slot_mapping), "two new tokens share a slot"
        assert len(set(dst)) == len(dst), "two copies write one slot"
        assert not set(dst) & set(slot_mapping), "a copy overwrites a token of this step"
        markers = [
            self.marker(plan.scheduled[i].seq, pos)
            for i in order
            for pos in range(plan.scheduled[i].q_start, plan.scheduled[i].kv_len)
        ]
        assert len(markers) == len(slot_mapping)
        for slot, marker in zip(slot_mapping, markers, strict=True):
            assert not self.pool.is_free(slot // self.page_size), "a token written to a free page"
            self.fake[slot] = marker
        if self.copy_mode == "ordered":
            for s, d in zip(src, dst, strict=True):
                self.fake[d] = self.fake.get(s)
        else:
            values = [self.fake.get(s) for s in src]
            for d, v in zip(dst, values, strict=True):
                self.fake[d] = v
        for entry in plan.scheduled:
            self.check_reads(entry)

    # -- checks

    def check_reads(self, entry) -> None:
        seq, size = entry.seq, self.page_size
        bt = self.sched.block_table
        assert entry.row == seq.block_row >= 0
        table = bt.pages(entry.row)
        assert table == seq.page_table(size), "the block-table row is the sequence's page table"
        assert bt.kv_len[entry.row] == entry.kv_len
        assert bt.chain_end[entry.row] == seq.chain_end
        assert len(table) == -(-entry.kv_len // size), "one page per page index, no more"
        assert len(set(table)) == len(table)
        assert entry.qo_len >= 1
        assert entry.slots is None or len(entry.slots) == entry.qo_len
        for pos in range(entry.kv_len):
            page = table[pos // size]
            slot = page * size + pos % size
            got, want = self.fake.get(slot), self.marker(seq, pos)
            assert got == want, (
                f"seq {seq.seq_id} position {pos} (page index {pos // size}, page {page}, "
                f"slot {slot}) holds {got}, expected {want}; q_start={entry.q_start}, "
                f"kv_len={entry.kv_len}, nodes={[(n.start, n.end, n.pages) for n in seq.nodes]}, "
                f"private={seq.private_pages}"
            )

    def check_plan(self, plan: StepPlan, running_before: list[Sequence]) -> None:
        sched = self.sched
        self.max_running = max(self.max_running, len(sched.running))
        assert len(sched.running) <= sched.max_num_seqs
        assert len(plan.scheduled) <= sched.max_num_seqs
        assert len({id(e.seq) for e in plan.scheduled}) == len(plan.scheduled)
        decode = [e for e in plan.scheduled if e.seq in running_before]
        prefill = [e for e in plan.scheduled if e.seq not in running_before]
        for e in decode:
            assert e.qo_len == 1 and e.copies == [], "a running sequence decodes one token"
        for e in prefill:
            self.first_entries.setdefault(e.seq.seq_id, (e.q_start, e.kv_len))
            assert e.q_start <= e.seq.prompt.num_chunk_tokens, "the tail is always computed"
        num_new = sum(e.qo_len for e in plan.scheduled)
        # the first prompt of a step is admitted whatever its size; the others must fit
        assert num_new <= sched.max_num_batched_tokens or len(prefill) <= 1, (
            f"{num_new} new tokens > max_num_batched_tokens={sched.max_num_batched_tokens} "
            f"with {len(prefill)} prompts admitted"
        )
        for seq in plan.preempted:
            # the most recently admitted sequence yields first (vLLM's rule)
            assert running_before.index(seq) >= max(
                (running_before.index(e.seq) for e in plan.scheduled if e.seq in running_before),
                default=-1,
            ), "preemption picked an older sequence while a newer one kept running"
            assert seq.status is SequenceStatus.WAITING and seq in sched.waiting
            assert not seq.nodes and not seq.private_pages and seq.num_kv == 0
        for seq in sched.waiting:
            assert not seq.nodes and not seq.private_pages
        for e in plan.scheduled:
            assert e.seq.status is SequenceStatus.RUNNING and e.seq in sched.running
        assert {id(n) for n in plan.created} <= {id(n) for e in plan.scheduled for n in e.seq.nodes}

    def check_ownership(self) -> None:
        """Node pages, running sequences' private pages and free pages partition the pool."""
        nodes = list(self.kv.iter_nodes())
        owned = [p for n in nodes for p in n.pages]
        private = [p for s in self.sched.running for p in s.private_pages]
        free = list(self.pool._free)
        everything = owned + private + free
        assert len(everything) == len(set(everything)), "a page is held twice"
        assert len(everything) == self.pool.num_pages, (
            f"{len(owned)} node + {len(private)} private + {len(free)} free pages != "
            f"{self.pool.num_pages}: pages leaked"
        )
        rows = [s.block_row for s in self.sched.running]
        assert all(r >= 0 for r in rows) and len(set(rows)) == len(rows), "one row each"
        assert self.sched.block_table.num_used == len(rows), "block-table rows leaked"
        pins: dict[int, int] = {}
        for s in self.sched.running:
            assert s.status is SequenceStatus.RUNNING
            for n in s.nodes:
                pins[id(n)] = pins.get(id(n), 0) + 1
        alive = {id(n) for n in nodes}
        assert set(pins) <= alive, "a running sequence uses an evicted node"
        refs: dict[str, int] = {}
        for n in nodes:
            assert n.pins == pins.get(id(n), 0), "pins == running sequences that use the node"
            assert n.ready, "every node is complete between steps"
            refs[n.chunk.id] = refs.get(n.chunk.id, 0) + 1
        for chunk_id, count in refs.items():
            assert self.registry.refcount(chunk_id) == count


def assert_same_inputs(got: StepInputs, want: StepInputs) -> None:
    """The block-table path's step inputs equal the reference path's (None = the identity)."""
    n = len(want.order)
    assert got.order.tolist() == want.order.tolist(), "batch order"
    assert got.input_ids.tolist() == want.input_ids.tolist(), "input ids"
    assert got.positions.tolist() == want.positions.tolist(), "positions"
    last = [got.last_rows, want.last_rows]
    rows = [list(range(n)) if x is None else x.tolist() for x in last]
    assert rows[0] == rows[1], "rows that give the logits"
    scatter = [list(range(n)) if x is None else x.tolist() for x in (got.scatter, want.scatter)]
    assert scatter[0] == scatter[1], "logits back in batch order"
    assert_same_metadata(got.metadata, want.metadata)


def assert_same_metadata(got: AttentionMetadata, want: AttentionMetadata) -> None:
    """Field by field: the block-table path's metadata equals the reference path's."""
    for name in ("slot_mapping", "copy_src", "copy_dst"):
        assert getattr(got, name).tolist() == getattr(want, name).tolist(), name
    assert len(got.levels) == len(want.levels), "number of levels"
    for i, (a, b) in enumerate(zip(got.levels, want.levels)):
        assert a.causal == b.causal, f"level {i}: causal"
        for name in ("qo_indptr", "kv_indptr", "kv_indices", "kv_last_page_len"):
            x, y = getattr(a, name), getattr(b, name)
            assert x.dtype == y.dtype == torch.int64, f"level {i}: {name} dtype"
            assert x.tolist() == y.tolist(), f"level {i}: {name}"


# ---- workloads ----------------------------------------------------------------------------


def make_chunks(registry: ChunkRegistry, lengths: Seq[int], seed: int = 0) -> list[Chunk]:
    rng = random.Random(seed)
    return [registry.register([rng.randrange(VOCAB) for _ in range(n)]) for n in lengths]


def prompt(chunks: Seq[Chunk], tail: Seq[int]) -> PreparedPrompt:
    return PreparedPrompt(tuple(chunks), tuple(tail))


def rag_prompts(registry: ChunkRegistry, seed: int = 0) -> list[PreparedPrompt]:
    """A system prompt and documents of lengths that do and do not fill pages, in chains that
    share prefixes, the same documents reordered, no documents, and no system prompt."""
    system, *docs = make_chunks(registry, [11, 3, 16, 9, 21, 5, 1, 32, 4, 4], seed)
    rng = random.Random(seed + 1)

    def tail() -> list[int]:
        return [rng.randrange(VOCAB) for _ in range(rng.randint(1, 6))]

    chains = [
        [system, docs[0], docs[1]],
        [system, docs[0], docs[1]],  # the same chain, another query
        [system, docs[0], docs[2]],
        [system, docs[1], docs[0]],  # reordered: other chain, other positions
        [system, docs[2], docs[1], docs[0]],
        [system],
        [system, docs[3], docs[4]],
        [system, docs[4], docs[3]],
        [docs[0], docs[1]],  # no system prompt
        [system, docs[5], docs[5]],  # the same chunk twice in a row
        [system, docs[6]],
        [system, docs[7], docs[1]],  # docs[1] after equally long, different parents:
        [system, docs[8], docs[1]],  # same positions, other KV
        [],
    ]
    return [prompt(chain, tail()) for chain in chains]


# ---- tests --------------------------------------------------------------------------------


@pytest.mark.parametrize("page_size", [1, 5, 16])
def test_shared_and_reordered_chains_read_exact_kv(page_size):
    eng = FakeEngine(page_size, num_pages=2000 // page_size + 50)
    prompts = rag_prompts(eng.registry)
    seqs = [eng.add(p, max_tokens=4) for p in prompts]
    eng.step()  # everything is admitted in one step: later sequences reuse earlier ones' nodes
    assert all(s.status is SequenceStatus.RUNNING for s in seqs)
    system = prompts[0].chunks[0]
    with_system = [s for s in seqs if s.prompt.chunks and s.prompt.chunks[0] == system]
    assert len({id(s.nodes[0]) for s in with_system}) == 1, "one node for the system prompt"
    a, b = seqs[0], seqs[3]  # (S, D0, D1) and (S, D1, D0)
    assert a.nodes[0] is b.nodes[0] and a.nodes[1] is not b.nodes[2]
    assert a.nodes[1].chunk == b.nodes[2].chunk and a.nodes[1].start != b.nodes[2].start
    assert seqs[0].nodes == seqs[1].nodes
    assert seqs[9].nodes[1] is not seqs[9].nodes[2]
    # a chunk node is created once however many sequences of the step use it
    chains = {tuple(c.id for c in p.chunks[: i + 1]) for p in prompts for i in range(len(p.chunks))}
    assert eng.kv.stats().num_nodes == len(chains)
    eng.run()
    assert len(eng.finished) == len(prompts) and not eng.failed
    assert all(s.num_generated == 4 for s in seqs)
    assert all(n.pins == 0 for n in eng.kv.iter_nodes())


@pytest.mark.parametrize("page_size", [1, 5, 16])
def test_cold_then_warm_reuses_every_chunk(page_size):
    eng = FakeEngine(page_size, num_pages=2000 // page_size + 50)
    prompts = rag_prompts(eng.registry, seed=3)
    cold = [eng.add(p, max_tokens=3) for p in prompts]
    eng.run()
    nodes_after_cold = eng.kv.stats().num_nodes
    warm = [eng.add(p, max_tokens=3) for p in prompts]
    eng.run()
    assert eng.kv.stats().num_nodes == nodes_after_cold, "the warm run creates no node"
    for c, w in zip(cold, warm, strict=True):
        assert w.num_cached_tokens == w.prompt.num_chunk_tokens
        assert eng.first_entries[w.seq_id] == (w.prompt.num_chunk_tokens, w.num_prompt_tokens)
        assert w.generated_ids == c.generated_ids, "cache reuse does not change the output"


@pytest.mark.parametrize("page_size", [1, 5, 16])
def test_one_by_one_arrivals_reuse_nodes_of_running_sequences(page_size):
    eng = FakeEngine(page_size, num_pages=2000 // page_size + 50)
    prompts = rag_prompts(eng.registry, seed=5)
    seqs = []
    for p in prompts:  # a new request every step, while the older ones decode
        seqs.append(eng.add(p, max_tokens=5))
        eng.step()
    eng.run()
    assert len(eng.finished) == len(prompts)
    assert seqs[1].num_cached_tokens == prompts[1].num_chunk_tokens


@pytest.mark.parametrize("page_size", [1, 5, 16])
def test_small_pool_evicts_cold_chunks_and_stays_exact(page_size):
    registry = ChunkRegistry(NAMESPACE)
    docs = make_chunks(registry, [7, 13, 4, 20, 9, 16, 3, 11, 5, 17], seed=7)
    rng = random.Random(7)
    prompts = [
        prompt(rng.sample(docs, rng.randint(1, 3)), [rng.randrange(VOCAB)]) for _ in range(30)
    ]
    biggest = max(len(p.token_ids) + 4 for p in prompts)
    eng = FakeEngine(page_size, num_pages=2 * (biggest // page_size + 4), registry=registry)
    for i in range(0, len(prompts), 3):
        for p in prompts[i : i + 3]:
            eng.add(p, max_tokens=3)
        eng.run()
    assert eng.kv.evicted_nodes > 0, "the pool is small enough to evict"
    assert len(eng.finished) == len(prompts) and not eng.failed
    eng.kv.clear()
    assert eng.pool.num_free == eng.pool.num_pages
    assert eng.registry.stats().referenced == 0


@pytest.mark.parametrize("page_size", [1, 5, 16])
def test_small_pool_preempts_and_recomputes_exactly(page_size):
    registry = ChunkRegistry(NAMESPACE)
    system, *docs = make_chunks(registry, [9, 6, 14, 3], seed=11)
    rng = random.Random(11)
    prompts = [
        prompt([system, *rng.sample(docs, 2)], [rng.randrange(VOCAB) for _ in range(3)])
        for _ in range(6)
    ]
    max_tokens = 24
    sizer = ChunkKVCache(PagePool(1, page_size, 1, 1, 1))
    solo = max(solo_pages(sizer, p, len(p.token_ids) + max_tokens) for p in prompts)
    eng = FakeEngine(page_size, num_pages=solo + 2, registry=registry)
    reference = FakeEngine(page_size, num_pages=10_000 // page_size)  # its own registry
    seqs = [eng.add(p, max_tokens) for p in prompts]
    ref = [reference.add(p, max_tokens) for p in prompts]
    eng.run()
    reference.run()
    assert sum(s.num_preemptions for s in seqs) > 0, "the pool is small enough to preempt"
    assert not eng.failed and len(eng.finished) == len(prompts)
    for s, r in zip(seqs, ref, strict=True):
        assert s.generated_ids == r.generated_ids, "preemption does not change the output"
    assert all(n.pins == 0 for n in eng.kv.iter_nodes())
    assert eng.pool.num_free + sum(len(n.pages) for n in eng.kv.iter_nodes()) == eng.pool.num_pages


def test_a_sequence_that_outgrows_the_pool_fails_and_frees_its_pages():
    eng = FakeEngine(page_size=4, num_pages=6)
    (doc,) = make_chunks(eng.registry, [6])
    big = eng.add(prompt([doc], [1, 2]), max_tokens=100)  # 8 prompt tokens, 24 slots
    eng.run()
    assert eng.failed == [big] and big.status is SequenceStatus.FINISHED
    assert 0 < big.num_generated < 100
    assert eng.pool.num_free + sum(len(n.pages) for n in eng.kv.iter_nodes()) == 6
    too_big = eng.add(prompt([doc], list(range(30))), max_tokens=1)  # never fits
    ok = eng.add(prompt([doc], [3]), max_tokens=2)
    eng.run()
    assert too_big in eng.failed and ok in eng.finished


def test_failed_step_discards_the_nodes_it_created():
    eng = FakeEngine(page_size=5, num_pages=64)
    docs = make_chunks(eng.registry, [7, 3, 12])
    warm = eng.add(prompt(docs[:1], [1]), max_tokens=1)
    eng.run()
    assert warm in eng.finished
    seqs = [eng.add(prompt(docs, [2]), 3), eng.add(prompt(docs[:2], [3, 4]), 3)]
    plan = eng.sched.schedule()
    assert len(plan.created) == 2  # docs[1] after docs[0], docs[2] after that
    eng.sched.finish_step(plan, failed=True)
    for s in seqs:
        assert not s.nodes and not s.private_pages and s not in eng.sched.running
    assert eng.kv.stats().num_nodes == 1, "the node complete before the step stays"
    assert eng.pool.num_free == 64 - len(next(eng.kv.iter_nodes()).pages)
    eng.check_ownership()


def test_max_num_seqs_limits_the_running_set():
    eng = FakeEngine(page_size=4, num_pages=400, max_num_seqs=2)
    prompts = rag_prompts(eng.registry, seed=13)
    for p in prompts:
        eng.add(p, max_tokens=3)
    eng.run()
    assert eng.max_running == 2
    assert len(eng.finished) == len(prompts)


def test_max_num_batched_tokens_limits_prefill():
    eng = FakeEngine(page_size=4, num_pages=400, max_num_batched_tokens=25)
    tails = [[i] * 10 for i in range(4)]
    seqs = [eng.add(prompt([], t), max_tokens=3) for t in tails]
    plan = eng.step()
    assert [e.seq for e in plan.scheduled] == seqs[:2], "10 + 10 fit, a third does not"
    plan = eng.step()  # 2 decode tokens + 10 + 10 would be 22 <= 25
    assert [e.seq for e in plan.scheduled] == seqs
    big = eng.add(prompt([], list(range(40))), max_tokens=2)
    eng.run()
    assert big in eng.finished, "a prompt larger than the budget still runs, alone"
    assert eng.first_entries[big.seq_id] == (0, 40)


@pytest.mark.parametrize(
    "page_size, copy_mode",
    [
        (4, "ordered"),
        (4, "simultaneous"),  # 5 | 3 | 2 | tail: no node lies inside one page with a boundary
        (16, "ordered"),
        pytest.param(16, "simultaneous"),
    ],
)
def test_chunks_inside_one_page_chain_boundary_copies(page_size, copy_mode):
    """Short chunks that start and end inside one page: a node and the private pages get
    boundary pages copied from a page that is itself a boundary copy of this step."""
    eng = FakeEngine(page_size, num_pages=64, copy_mode=copy_mode)
    a, b, c = make_chunks(eng.registry, [5, 3, 2])
    eng.add(prompt([a, b, c], [9]), max_tokens=2)
    eng.add(prompt([a, b], [8, 7]), max_tokens=2)  # reuses nodes of the same step
    eng.run()
    assert len(eng.finished) == 2


def test_copy_sources_are_never_copy_destinations_of_the_same_step():
    eng = FakeEngine(page_size=16, num_pages=16)
    a, b = make_chunks(eng.registry, [5, 3])
    eng.add(prompt([a, b], [9, 10]), max_tokens=1)
    plan = eng.sched.schedule()
    _, metadata = eng.runner.build_metadata(plan.scheduled)
    src, dst = set(metadata.copy_src.tolist()), set(metadata.copy_dst.tolist())
    assert not src & dst, f"slots {sorted(src & dst)} are copied into and then copied from"


# ---- property test ------------------------------------------------------------------------


@st.composite
def workloads(draw):
    page_size = draw(st.sampled_from([1, 2, 3, 5, 16]))
    lengths = draw(st.lists(st.integers(1, 20), min_size=1, max_size=6))
    requests = draw(
        st.lists(
            st.tuples(
                st.lists(st.integers(0, len(lengths) - 1), max_size=4),  # chunk chain
                st.integers(1, 5),  # tail length
                st.integers(1, 10),  # max_tokens
                st.integers(0, 3),  # arrival step
            ),
            min_size=2,
            max_size=10,
        )
    )
    return dict(
        page_size=page_size,
        lengths=lengths,
        requests=requests,
        # pages beyond what the largest request needs alone; < 0: it cannot finish
        slack=draw(st.one_of(st.integers(-2, 4), st.integers(5, 60))),
        max_num_seqs=draw(st.integers(1, 6)),
        max_num_batched_tokens=draw(st.integers(1, 64)),
        levels=draw(st.integers(1, 4)),
        min_shared_tokens=draw(st.sampled_from([0, 0, 1, 8, 40])),
        seed=draw(st.integers(0, 2**16)),
    )


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(workloads())
def test_random_workloads_keep_page_tables_exact(w):
    registry = ChunkRegistry(NAMESPACE)
    chunks = make_chunks(registry, w["lengths"], seed=w["seed"])
    rng = random.Random(w["seed"])
    arrivals: dict[int, list[tuple[PreparedPrompt, int]]] = {}
    sizer = ChunkKVCache(PagePool(1, w["page_size"], 1, 1, 1))
    solo = 1
    for chain, tail_len, max_tokens, at in w["requests"]:
        p = prompt([chunks[i] for i in chain], [rng.randrange(VOCAB) for _ in range(tail_len)])
        arrivals.setdefault(at, []).append((p, max_tokens))
        solo = max(solo, solo_pages(sizer, p, len(p.token_ids) + max_tokens))
    eng = FakeEngine(
        w["page_size"],
        max(1, solo + w["slack"]),
        max_num_seqs=w["max_num_seqs"],
        max_num_batched_tokens=w["max_num_batched_tokens"],
        levels=w["levels"],
        registry=registry,
        min_shared_tokens=w["min_shared_tokens"],
    )
    seqs = []
    for t in range(max(arrivals) + 1):
        seqs += [eng.add(p, n) for p, n in arrivals.get(t, [])]
        eng.step()
    eng.run()
    assert len(eng.finished) + len(eng.failed) == len(seqs)
    event(f"preempted: {any(s.num_preemptions for s in seqs)}")
    event(f"evicted: {eng.kv.evicted_nodes > 0}")
    event(f"failed: {bool(eng.failed)}")
    for s in eng.finished:
        assert s.num_generated == s.max_tokens
    eng.kv.clear()
    assert eng.pool.num_free == eng.pool.num_pages, "no page leaks"
    assert eng.registry.stats().referenced == 0


def test_preemption_takes_the_newest_even_when_it_is_the_one_growing():
    """With no free page, the newest running sequence yields, also when it is the one asking."""
    page_size = 4
    eng = FakeEngine(page_size=page_size, num_pages=6)
    a = eng.add(prompt([], [1, 2, 3]), max_tokens=12)
    eng.step()  # a: 3 prompt tokens + 1 generated in its first page
    b = eng.add(prompt([], [4, 5, 6]), max_tokens=12)
    eng.step()
    assert eng.sched.running == [a, b]
    preempted = []
    for _ in range(40):
        if not eng.sched.has_work():
            break
        plan = eng.step()
        preempted.extend(plan.preempted)
        if preempted:
            break
    assert preempted, "the pool is small enough to preempt"
    assert preempted[0] is b, "the older request kept running; the newest yielded"
    assert a.status is SequenceStatus.RUNNING
    eng.run()
    assert not eng.failed and {id(s) for s in eng.finished} == {id(a), id(b)}
