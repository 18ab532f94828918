"""Reuse anywhere end to end (`EngineConfig(chunk_reuse="anywhere")`), against references.

1. A random-weight Llama (float32) against a transformers reference built by *key* re-rotation:
   each chunk's KV is computed by transformers right after the system prompt, its keys are
   rotated to the chunk's true offset in the request, the first k tokens of every chunk that is
   not first are recomputed by transformers over the cache built so far, and the request's tail
   is run over that cache. The engine (query re-rotation, segments, copy-on-write pages) must give
   the same greedy tokens and first-token log-probabilities, cold and warm, batched and not.
2. The real default model (SmolLM2-135M-Instruct, float32): a chunk that is first after the
   system prompt is exact, so a request whose chunk was computed by another request (where it
   sat elsewhere) equals transformers' full-prefill greedy output token for token.
"""

from __future__ import annotations

import random

import pytest
import torch

from cascade_rag.chunks import ChunkType
from cascade_rag.composition import Composition
from cascade_rag.engine.sequence import PreparedPrompt
from cascade_rag.llm import CascadeEngine
from cascade_rag.sampling import SamplingParams
from cascade_rag.testing import save_random_llama

NEW_TOKENS = 8


@pytest.fixture(scope="module")
def random_llama(tmp_path_factory):
    from transformers import AutoModelForCausalLM

    folder = save_random_llama(
        tmp_path_factory.mktemp("anywhere") / "llama",
        dtype=torch.float32,
        lm_head_scale=30.0,
        hidden_size=96,
        intermediate_size=192,
        num_hidden_layers=3,
        num_attention_heads=6,
        num_key_value_heads=2,
        max_position_embeddings=1024,
    )
    return folder, AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def _rotate_keys(k: torch.Tensor, delta: int, inv_freq: torch.Tensor) -> torch.Tensor:
    """Keys [1, heads, n, d] rotated by +delta positions (transformers' RoPE convention)."""
    angles = delta * inv_freq.double()
    emb = torch.cat((angles, angles)).to(k.dtype)
    half = k.shape[-1] // 2
    rotated_half = torch.cat((-k[..., half:], k[..., :half]), dim=-1)
    return k * emb.cos() + rotated_half * emb.sin()


@torch.inference_mode()
def reference_anywhere(hf, prompt: PreparedPrompt, k: int, inv_freq) -> tuple[list[int], list]:
    """Greedy tokens and per-token log-softmax rows, by key re-rotation in transformers."""
    from transformers import DynamicCache

    system, *chunks = prompt.chunks
    assert system.type is ChunkType.SYSTEM_PROMPT
    s_ids = list(system.token_ids)
    n_layers = hf.config.num_hidden_layers

    def run(ids: list[int], cache):
        return hf(torch.tensor([ids]), past_key_values=cache, use_cache=True)

    cache = DynamicCache()
    run(s_ids, cache)
    pos = len(s_ids)
    for chunk in chunks:
        ids = list(chunk.token_ids)
        canon = DynamicCache()
        run(s_ids + ids, canon)  # the chunk computed right after the system prompt
        delta = pos - len(s_ids)
        redo = 0 if delta == 0 else min(k, len(ids))
        if redo:
            run(ids[:redo], cache)  # recomputed in this request's context, true positions
        for layer in range(n_layers):
            keys = canon.layers[layer].keys[:, :, len(s_ids) + redo :]
            values = canon.layers[layer].values[:, :, len(s_ids) + redo :]
            cache.update(_rotate_keys(keys, delta, inv_freq), values, layer)
        pos += len(ids)
    assert cache.get_seq_length() == pos
    tokens, logprobs = [], []
    logits = run(list(prompt.tail_ids), cache).logits[0, -1]
    for _ in range(NEW_TOKENS):
        logprobs.append(torch.log_softmax(logits.float(), -1))
        tokens.append(int(logits.argmax()))
        logits = run([tokens[-1]], cache).logits[0, -1]
    return tokens, logprobs


@pytest.mark.parametrize("recompute", [0, 5])
@pytest.mark.parametrize("page_size", [1, 8])
@pytest.mark.parametrize("share", [False, True], ids=["own-entries", "chunk-cascade"])
def test_random_llama_equals_key_rerotation_reference(random_llama, recompute, page_size, share):
    """With `share`, every chunk read by several requests of a batch is read through one
    shared entry (cascade at chunk granularity, rows rotated for their own offsets)."""
    folder, hf = random_llama
    rng = random.Random(page_size + recompute)
    inv_freq = hf.model.rotary_emb.inv_freq
    with CascadeEngine(
        str(folder),
        kv_cache_tokens=4096,
        page_size=page_size,
        chunk_reuse="anywhere",
        recompute_tokens=recompute,
        cascade_min_shared_tokens=0 if share else None,
    ) as engine:
        vocab = engine.model_config.vocab_size

        def ids(n: int) -> list[int]:
            return [rng.randrange(1, vocab) for _ in range(n)]

        system = engine.register_token_chunk(ids(21), ChunkType.SYSTEM_PROMPT)
        docs = [engine.register_token_chunk(ids(n)) for n in (13, 40, 7, 16)]
        orders = ([0, 1], [1, 0, 2], [2], [3, 0, 1], [0, 3], [1, 2, 3, 0], [2, 2])
        prompts = [
            PreparedPrompt((system, *(docs[i] for i in order)), tuple(ids(3))) for order in orders
        ]
        params = SamplingParams(max_tokens=NEW_TOKENS, ignore_eos=True, logprobs=1)
        refs = [reference_anywhere(hf, p, recompute, inv_freq) for p in prompts]
        batched = engine.generate(prompts, params)  # cold: nodes created in the same step
        one_by_one = [engine.generate(p, params) for p in prompts]  # warm
        for run, outs in (("batched cold", batched), ("one by one warm", one_by_one)):
            for i, (out, (ref_tokens, ref_logprobs)) in enumerate(zip(outs, refs)):
                assert out.token_ids == ref_tokens, f"{run}: prompt {orders[i]}"
                for t, lp in enumerate(out.logprobs):
                    err = abs(lp.logprob - float(ref_logprobs[t][lp.token_id]))
                    assert err < 1e-4, f"{run}: prompt {orders[i]} token {t}: logprob err {err}"
        stats = engine.stats()
        assert stats.kv_cache.anywhere_hit_tokens > 0
        assert (stats.kv_cache.recomputed_tokens > 0) == (recompute > 0)
        assert (stats.num_cascade_steps > 0) == share  # shared entries span several requests
        assert one_by_one[3].usage.cached_tokens == 21 + 16 + (13 - recompute) + (40 - recompute)
        assert one_by_one[3].usage.recomputed_tokens == 2 * recompute


SYSTEM = "You are a helpful assistant. Answer the question using only the context."
DOCS = [
    "Zorbia is a small island nation in the Lantern Sea. Its capital city is Plum, "
    "which has about forty thousand inhabitants.",
    "The river Quill rises in the Amber Hills and flows through Plum before it reaches "
    "the Lantern Sea.",
    "The Zorbian flag is green with a white star. It was adopted in 1921 after the "
    "islands became independent.",
    "Professor Ada Lind discovered the glowing moss of Amber Hills in 1987. The moss "
    "shines faintly at night.",
]


def test_chunk_first_after_system_prompt_equals_full_prefill(default_model):
    """Chunks computed by other requests (where they sat second or third) and reused first
    after the system prompt give transformers' greedy output token for token; so does a
    request admitted in the same batch as the one that computes its chunk."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(default_model.model_dir, dtype=torch.float32).eval()
    greedy = SamplingParams(max_tokens=20)

    def hf_greedy(ids: list[int]) -> list[int]:
        with torch.inference_mode():
            out = hf.generate(
                torch.tensor([ids]),
                attention_mask=torch.ones(1, len(ids), dtype=torch.int64),
                max_new_tokens=20,
                do_sample=False,
                pad_token_id=hf.config.eos_token_id,
            )
        return out[0, len(ids) :].tolist()

    def comp(docs: list[int], query: str) -> Composition:
        return Composition(query=query, chunks=[DOCS[d] for d in docs], system=SYSTEM)

    with CascadeEngine(
        default_model, kv_cache_tokens=8192, chunk_reuse="anywhere", recompute_tokens=16
    ) as engine:
        warmup = [comp([3, 0, 1], "Who discovered the moss?"), comp([2, 3], "When?")]
        same_batch = comp([3], "Who discovered the glowing moss?")  # 3 computed by warmup[0]
        outs = engine.generate([*warmup, same_batch], greedy)
        assert outs[2].token_ids == hf_greedy(engine.prepare(same_batch).token_ids)
        for docs, query in (
            ([0], "What is the capital of Zorbia?"),
            ([1, 0], "Where does the river Quill flow?"),
            ([2], "What colour is the Zorbian flag?"),
        ):
            c = comp(docs, query)
            out = engine.generate(c, greedy)
            prepared = engine.prepare(c)
            if len(docs) == 1:  # the reused chunk is first after the system prompt: exact
                assert out.token_ids == hf_greedy(prepared.token_ids), (docs, out.text)
                assert out.usage.cached_tokens == prepared.num_chunk_tokens
                assert out.usage.recomputed_tokens == 0
            else:  # doc 0 placed second: its first 16 tokens recomputed in context
                assert out.usage.recomputed_tokens == 16
                assert out.usage.cached_tokens == prepared.num_chunk_tokens - 16
        stats = engine.stats().kv_cache
        assert stats.anywhere_hit_tokens > 0 and stats.exact_hit_tokens > 0


def test_config_fields_are_checked():
    from cascade_rag.config import EngineConfig

    assert EngineConfig().chunk_reuse == "prefix"  # exact prefix reuse stays the default
    assert EngineConfig(chunk_reuse="anywhere", recompute_tokens=0).recompute_tokens == 0
    with pytest.raises(ValueError, match="chunk_reuse='everywhere' is not one of"):
        EngineConfig(chunk_reuse="everywhere")
    with pytest.raises(ValueError, match="recompute_tokens=-1 is out of range"):
        EngineConfig(recompute_tokens=-1)
    with pytest.raises(TypeError, match="recompute_tokens must be an int"):
        EngineConfig(recompute_tokens=True)
    with pytest.raises(ValueError, match="recompute_mode='best' is not one of"):
        EngineConfig(recompute_mode="best")
    with pytest.raises(ValueError, match="enable_chunk_cache=False"):
        EngineConfig(chunk_reuse="anywhere", enable_chunk_cache=False)


def test_precompute_and_pin_place_chunks_under_the_system_prompt(random_llama):
    """`precompute`/`pin` of [system, a, b] compute a and b once after the system prompt; a
    request with the chunks in another order is then served from them (less the recompute)."""
    folder, _ = random_llama
    rng = random.Random(3)
    with CascadeEngine(
        str(folder), kv_cache_tokens=2048, chunk_reuse="anywhere", recompute_tokens=4
    ) as engine:
        vocab = engine.model_config.vocab_size
        system = engine.register_token_chunk(
            [rng.randrange(1, vocab) for _ in range(10)], ChunkType.SYSTEM_PROMPT
        )
        a, b = (
            engine.register_token_chunk([rng.randrange(1, vocab) for _ in range(n)])
            for n in (12, 9)
        )
        info = engine.precompute([a, b], system=system)
        assert info.computed_tokens > 0
        assert engine.precompute([a, b], system=system).computed_tokens == 0
        assert engine.pin([b, a], system=system).computed_tokens == 0  # same nodes
        chains = {n.chain for n in engine.cached_chunks()}
        assert chains == {(system.id,), (system.id, a.id), (system.id, b.id)}
        out = engine.generate(PreparedPrompt((system, b, a), (5, 6)), SamplingParams(max_tokens=2))
        assert out.usage.cached_tokens == 10 + 9 + 12 - 4
        assert out.usage.recomputed_tokens == 4
        engine.clear_cache()
        assert len(engine.cached_chunks()) == 3  # pinned: kept
        engine.unpin([b, a], system=system)
