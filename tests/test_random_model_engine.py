"""The engine on a second model (random-weight Llama with its own tokenizer, loaded from an HF
folder) equals transformers' greedy output token for token on the CPU in float32."""

from __future__ import annotations

import random

import torch

from cascade_rag.chunks import ChunkType
from cascade_rag.engine.sequence import PreparedPrompt
from cascade_rag.llm import CascadeEngine
from cascade_rag.sampling import SamplingParams
from cascade_rag.testing import save_random_llama


def test_random_llama_folder_matches_transformers(tmp_path):
    from transformers import AutoModelForCausalLM

    folder = save_random_llama(
        tmp_path / "llama",
        dtype=torch.float32,
        lm_head_scale=30.0,
        hidden_size=96,
        intermediate_size=192,
        num_hidden_layers=3,
        num_attention_heads=6,
        num_key_value_heads=2,
        max_position_embeddings=1024,
    )
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    rng = random.Random(0)
    with CascadeEngine(str(folder), kv_cache_tokens=4096, page_size=8) as engine:
        vocab = engine.model_config.vocab_size
        system = engine.register_token_chunk(
            [rng.randrange(1, vocab) for _ in range(21)], ChunkType.SYSTEM_PROMPT
        )
        docs = [engine.register_token_chunk([rng.randrange(1, vocab) for _ in range(n)])
                for n in (13, 40, 7)]  # fmt: skip
        prompts = [
            PreparedPrompt((system, *(docs[i] for i in order)), (rng.randrange(1, vocab),) * 3)
            for order in ([0, 1], [0, 1, 2], [1, 0], [2], [0, 1])
        ]
        params = SamplingParams(max_tokens=12, ignore_eos=True)
        for run in ("cold", "warm"):
            outs = engine.generate(prompts, params)
            for i, (p, out) in enumerate(zip(prompts, outs)):
                ids = torch.tensor([p.token_ids])
                with torch.inference_mode():
                    ref = hf.generate(
                        ids,
                        attention_mask=torch.ones_like(ids),
                        max_new_tokens=12,
                        min_new_tokens=12,
                        do_sample=False,
                        pad_token_id=0,
                    )
                assert out.token_ids == ref[0, ids.shape[1] :].tolist(), f"{run} prompt {i}"
        assert engine.stats().kv_cache.hit_tokens > 0
