"""Shared pieces of the GPU benchmarks: a random-weight Llama-3.2-1B-shaped model folder, timing.

No weights can be downloaded on the GPU machine, and speed does not depend on weight values, so
the benchmarks build the model from a config with random bf16 weights. The tokenizer is a small
byte-level BPE built in memory; prompts are token ids, identical for every system compared.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch

LLAMA_1B_SHAPE = dict(
    hidden_size=2048,
    intermediate_size=8192,
    num_hidden_layers=16,
    num_attention_heads=32,
    num_key_value_heads=8,
    head_dim=64,
    max_position_embeddings=131072,
    rope_theta=500000.0,
    rms_norm_eps=1e-5,
    tie_word_embeddings=True,
)


def make_tokenizer(vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|eot|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    words = [f"word{i} token{i * 7} piece{i * 13}" for i in range(4000)]
    tok.train_from_iterator(words, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|eot|>")


def make_model_dir(path: str | Path, vocab_size: int = 128256) -> Path:
    """Random Llama-3.2-1B-shaped model (bf16, Llama 3's vocabulary size) plus tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    path = Path(path)
    if (path / "config.json").exists():
        return path
    tokenizer = make_tokenizer(4096)
    # pad the vocabulary with plain added tokens so every id the model emits decodes
    tokenizer.add_tokens([f"<x{i}>" for i in range(len(tokenizer), vocab_size)])
    vocab = len(tokenizer)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, eos_token_id=0, bos_token_id=0, **LLAMA_1B_SHAPE)
    with torch.device("cuda"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def out_dir() -> Path:
    path = Path(os.environ.get("OUT", "bench-results"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def write_json(name: str, data: dict) -> Path:
    data = dict(data, gpu=torch.cuda.get_device_name(), torch=torch.__version__)
    path = out_dir() / name
    path.write_text(json.dumps(data, indent=2))
    return path


class Timer:
    """Wall-clock seconds of a block, with the GPU synchronized on both ends."""

    def __enter__(self):
        torch.cuda.synchronize()
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        torch.cuda.synchronize()
        self.seconds = time.perf_counter() - self.start
