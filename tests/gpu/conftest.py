"""GPU test setup: skip cleanly without CUDA or FlashInfer; random-weight Llama models."""

from __future__ import annotations

import pytest
import torch


def pytest_collection_modifyitems(items):
    for item in items:
        item.add_marker(pytest.mark.gpu)


def make_tokenizer():
    """A small byte-level BPE tokenizer built in memory (no download)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    text = [
        "The river flows through the city and into the sea.",
        "Documents are retrieved, then the model answers the question.",
        "Cascade attention reads the shared prefix once per batch.",
    ] * 20
    tok.train_from_iterator(text, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")


def make_model_dir(path, *, lm_head_scale: float = 1.0, **config):
    """Save a random-weight Llama model (bf16) with a tokenizer into `path`; return path."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = make_tokenizer()
    cfg = dict(
        vocab_size=1024,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=8,
        num_key_value_heads=2,
        head_dim=64,
        max_position_embeddings=4096,
        rope_theta=10000.0,
        eos_token_id=0,
        bos_token_id=0,
        tie_word_embeddings=False,
    )
    cfg.update(config)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**cfg))
    with torch.no_grad():
        # larger logits margins: greedy choices that bf16 rounding does not flip
        model.lm_head.weight.mul_(lm_head_scale)
    model.to(torch.bfloat16).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory):
    """A small random Llama (bf16) whose lm_head is scaled up so greedy margins are wide."""
    return make_model_dir(tmp_path_factory.mktemp("llama"), lm_head_scale=30.0)
