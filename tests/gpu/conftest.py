"""GPU test setup: skip cleanly without CUDA or FlashInfer; random-weight Llama models."""

from __future__ import annotations

import pytest


def pytest_collection_modifyitems(items):
    for item in items:
        item.add_marker(pytest.mark.gpu)


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory):
    """A small random Llama (bf16) whose lm_head is scaled up so greedy margins are wide."""
    from cascade_rag.testing import byte_bpe_tokenizer, save_random_llama

    return save_random_llama(
        tmp_path_factory.mktemp("llama"),
        tokenizer=byte_bpe_tokenizer(600, padded_vocab_size=1024),
        lm_head_scale=30.0,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=8,
        num_key_value_heads=2,
        head_dim=64,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
    )
