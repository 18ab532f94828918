"""End-to-end: the engine's greedy output equals Hugging Face transformers' token for token.

The real default model (SmolLM2-135M-Instruct, float32, CPU). Every composition is checked
against `transformers` greedy `generate` on the very same token ids (docs/design.md rule 4), with
the chunk cache cold and warm, cascade on and off, batch sizes 1 to 16, and page sizes that
make chunks end inside pages.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from cascade_rag.composition import ChunkId, Composition
from cascade_rag.llm import CascadeEngine
from cascade_rag.sampling import SamplingParams

MAX_NEW = 20

SYSTEMS = [
    "You are a helpful assistant. Answer the question using only the context.",
    "Answer in one short sentence, using the documents given.",
]
DOCS = [
    "Zorbia is a small island nation in the Lantern Sea. Its capital city is Plum, "
    "which has about forty thousand inhabitants.",
    "The river Quill rises in the Amber Hills and flows through Plum before it reaches "
    "the Lantern Sea.",
    "The Zorbian flag is green with a white star. It was adopted in 1921 after the "
    "islands became independent.",
    "The main export of Zorbia is blue salt, which is dried on the eastern beaches and "
    "shipped to the mainland.",
    "Professor Ada Lind discovered the glowing moss of Amber Hills in 1987. The moss "
    "shines faintly at night.",
    "The Plum Railway opened in 1899. It has a single line of twelve kilometres between "
    "the harbour and the hills.",
]
QUERIES = [
    "What is the capital of Zorbia?",
    "Where does the river Quill flow?",
    "What colour is the Zorbian flag?",
    "What does Zorbia export?",
    "Who discovered the glowing moss?",
    "When did the Plum Railway open?",
    "How long is the railway line?",
    "When was the flag adopted?",
]

# (system index, doc indices, query index): shared system prompts, shared documents,
# the same documents in other orders, single and no documents.
CASES = [
    (0, [0, 1, 2], 0),
    (0, [0, 1, 2], 1),
    (0, [0, 1, 3], 3),
    (0, [2, 1, 0], 2),
    (0, [1, 0, 2], 0),
    (0, [4, 5], 4),
    (0, [5, 4], 5),
    (0, [5, 4], 6),
    (1, [0, 1, 2], 0),
    (1, [2, 3], 7),
    (1, [3, 2], 3),
    (1, [4], 4),
    (1, [], 0),
    (0, [0, 1, 2, 3, 4, 5], 6),
    (0, [0, 1, 2, 3, 4, 5], 2),
    (1, [5, 3, 1], 5),
]


def compositions(engine: CascadeEngine) -> list[Composition]:
    return [
        Composition(query=QUERIES[q], chunks=[DOCS[d] for d in docs], system=SYSTEMS[s])
        for s, docs, q in CASES
    ]


@pytest.fixture(scope="module")
def hf_model(default_model):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(default_model.model_dir, dtype=torch.float32)
    return model.eval()


_reference_cache: dict[tuple[int, ...], list[int]] = {}


def hf_greedy(hf_model, ids: list[int], max_new: int = MAX_NEW) -> list[int]:
    key = (max_new, *ids)
    if key not in _reference_cache:
        with torch.inference_mode():
            out = hf_model.generate(
                torch.tensor([ids]),
                attention_mask=torch.ones(1, len(ids), dtype=torch.int64),
                max_new_tokens=max_new,
                do_sample=False,
                pad_token_id=hf_model.config.eos_token_id,
            )
        _reference_cache[key] = out[0, len(ids) :].tolist()
    return _reference_cache[key]


def make_engine(default_model, **kw) -> CascadeEngine:
    kw.setdefault("kv_cache_tokens", 16384)
    return CascadeEngine(default_model, **kw)


def check_same(engine, hf_model, prompts, outputs, label: str) -> None:
    for i, (prompt, out) in enumerate(zip(prompts, outputs)):
        ids = engine.prepare(prompt).token_ids
        ref = hf_greedy(hf_model, ids)
        assert out.token_ids == ref, (
            f"{label}: prompt {i} differs from transformers\n engine: {out.token_ids}\n"
            f" hf:     {ref}"
        )


GREEDY = SamplingParams(max_tokens=MAX_NEW)


@pytest.mark.parametrize(
    "options",
    [
        # cascade_min_shared_tokens=0: shared levels wherever requests share a page, so the
        # cascade path is exercised even on these short prompts
        dict(cascade=True, page_size=16, cascade_min_shared_tokens=0),
        dict(cascade=False, page_size=16),
        dict(cascade=True, page_size=7, max_cascade_levels=4, cascade_min_shared_tokens=0),
        dict(cascade=True, page_size=1, max_cascade_levels=2, cascade_min_shared_tokens=0),
        dict(enable_chunk_cache=False, page_size=16),
    ],
    ids=["cascade-p16", "plain-p16", "cascade-p7-4lv", "cascade-p1-2lv", "no-cache"],
)
def test_batch16_cold_then_warm(default_model, hf_model, options):
    """16 compositions in one batch on a cold cache, then again on the warm cache."""
    with make_engine(default_model, **options) as engine:
        prompts = compositions(engine)
        cold = engine.generate(prompts, GREEDY)
        check_same(engine, hf_model, prompts, cold, f"cold {options}")
        warm = engine.generate(prompts, GREEDY)
        check_same(engine, hf_model, prompts, warm, f"warm {options}")
        cascade_steps = engine.stats().num_cascade_steps
        if options.get("cascade_min_shared_tokens") == 0:
            assert cascade_steps > 0, "no step used a shared level"
        else:
            assert cascade_steps == 0
        if options.get("enable_chunk_cache", True):
            # warm: every chunk is cached, only the query tail is computed
            for p, out in zip(prompts, warm):
                prepared = engine.prepare(p)
                assert out.usage.cached_tokens == prepared.num_chunk_tokens
            assert engine.stats().kv_cache.num_nodes > 0
        else:
            assert all(out.usage.cached_tokens == 0 for out in warm)
            assert engine.stats().kv_cache.num_nodes == 0


@pytest.mark.parametrize("batch_size", [1, 2, 5])
def test_small_batches_sequential(default_model, hf_model, batch_size):
    """Batches of 1, 2 and 5 in sequence: later batches reuse what earlier ones cached."""
    with make_engine(default_model, page_size=16, cascade_min_shared_tokens=0) as engine:
        prompts = compositions(engine)[:10]
        for start in range(0, len(prompts), batch_size):
            batch = prompts[start : start + batch_size]
            check_same(engine, hf_model, batch, engine.generate(batch, GREEDY), f"bs{batch_size}")
        assert engine.stats().kv_cache.hit_tokens > 0


def test_registered_chunk_ids_and_chunk_objects(default_model, hf_model):
    """Compositions that name chunks by id or pass Chunk objects give the same tokens."""
    with make_engine(default_model) as engine:
        chunks = [engine.register_chunk(d) for d in DOCS[:3]]
        by_id = Composition(query=QUERIES[0], chunks=[ChunkId(c.id) for c in chunks])
        by_obj = Composition(query=QUERIES[0], chunks=chunks)
        by_text = Composition(query=QUERIES[0], chunks=DOCS[:3])
        outs = engine.generate([by_id, by_obj, by_text], GREEDY)
        assert engine.prepare(by_id).token_ids == engine.prepare(by_text).token_ids
        check_same(engine, hf_model, [by_id, by_obj, by_text], outs, "chunk ids")
        assert outs[0].token_ids == outs[1].token_ids == outs[2].token_ids


def test_plain_prompts_and_messages_reuse_prefixes(default_model, hf_model):
    """Plain text and chat messages are cut into chunks without changing their tokens."""
    context = "\n".join(DOCS) + "\n"
    prompts = [
        f"{context}\nQuestion: {QUERIES[0]}\nAnswer:",
        f"{context}\nQuestion: {QUERIES[4]}\nAnswer:",
        [
            {"role": "system", "content": SYSTEMS[0]},
            {"role": "user", "content": f"{context}\n{QUERIES[2]}"},
        ],
        [
            {"role": "system", "content": SYSTEMS[0]},
            {"role": "user", "content": f"{context}\n{QUERIES[5]}"},
        ],
    ]
    with make_engine(default_model, auto_chunk_min_tokens=16) as engine:
        tok = engine.tokenizer
        assert engine.prepare(prompts[0]).token_ids == tok.encode(prompts[0])
        first = engine.generate(prompts[::2], GREEDY)
        second = engine.generate(prompts[1::2], GREEDY)
        check_same(engine, hf_model, prompts[::2], first, "plain cold")
        check_same(engine, hf_model, prompts[1::2], second, "plain warm")
        assert all(out.usage.cached_tokens > 100 for out in second)


def test_preemption_under_a_small_pool(default_model, hf_model):
    """A pool too small for the whole batch preempts and recomputes; outputs stay exact."""
    with make_engine(
        default_model, kv_cache_tokens=60 * 8, page_size=8, cascade_min_shared_tokens=0
    ) as engine:
        prompts = [
            Composition(query=QUERIES[q], chunks=[DOCS[d]], system=SYSTEMS[0])
            for q, d in itertools.islice(zip(range(8), itertools.cycle(range(6))), 8)
        ]
        outs = engine.generate(prompts, SamplingParams(max_tokens=MAX_NEW, ignore_eos=True))
        stats = engine.stats()
        assert stats.num_preemptions > 0, "the pool was meant to force preemption"
        for i, (p, out) in enumerate(zip(prompts, outs)):
            ids = engine.prepare(p).token_ids
            # ignore_eos: compare up to transformers' own end of sequence
            ref = hf_greedy(hf_model, ids)
            assert out.token_ids[: len(ref)] == ref, f"prompt {i} differs after preemption"
        assert (
            stats.kv_cache.free_pages + sum(len(n.pages) for n in engine._core.kv.iter_nodes())
            == stats.kv_cache.total_pages
        ), "no page leaked"
