"""Helpers for tests and benchmarks that cannot download anything: an in-memory tokenizer and
random-weight Llama model folders that both this engine and transformers load.

Not used by the engine itself.
"""

from __future__ import annotations

import re
import zlib
from pathlib import Path

import numpy as np
import torch

_CORPUS = [
    "The river flows through the city and into the sea.",
    "Documents are retrieved, then the model answers the question.",
    "Cascade attention reads the shared prefix once per batch.",
] + [f"word{i} token{i * 7} piece{i * 13}" for i in range(2000)]


def byte_bpe_tokenizer(vocab_size: int, padded_vocab_size: int | None = None):
    """A byte-level BPE tokenizer trained in memory; end of sequence "<|eot|>" (id 0).

    `padded_vocab_size` adds plain tokens up to that size, so that every id a model with that
    vocabulary emits can be decoded.
    """
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
    tok.train_from_iterator(_CORPUS, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|eot|>")
    if padded_vocab_size is not None:
        tokenizer.add_tokens([f"<x{i}>" for i in range(len(tokenizer), padded_vocab_size)])
    return tokenizer


def save_random_llama(
    path: str | Path,
    *,
    tokenizer=None,
    lm_head_scale: float = 1.0,
    dtype: torch.dtype = torch.bfloat16,
    device: str = "cpu",
    **config,
) -> Path:
    """Save a Llama model with random weights (seed 0) and a tokenizer as an HF folder.

    Args:
        path: the folder.
        tokenizer: defaults to `byte_bpe_tokenizer(600)`; the model's vocabulary is its size.
        lm_head_scale: multiplies the (untied) LM head, widening greedy margins in tests.
        config: `transformers.LlamaConfig` fields.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    path = Path(path)
    tokenizer = tokenizer if tokenizer is not None else byte_bpe_tokenizer(600)
    config = dict(config, vocab_size=len(tokenizer), eos_token_id=0, bos_token_id=0)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(LlamaConfig(**config))
    if lm_head_scale != 1.0:
        with torch.no_grad():
            model.lm_head.weight.mul_(lm_head_scale)
    model.to(dtype).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


class WordHashEmbedder:
    """Bag of words hashed into 64 dimensions, L2-normalised: ranks passages by shared words.

    A stand-in for the sentence-transformers `Embedder` (same `name`/`dim`/`embed` surface)
    where loading MiniLM would only cost time.
    """

    name = "word-hash-64"
    identity = "word-hash-64"  # content identity: the hashing scheme is the whole model
    dim = 64
    batch_size = 32

    def embed(self, texts: list[str]) -> np.ndarray:
        vectors = np.zeros((len(texts), self.dim), dtype=np.float32)
        for row, text in enumerate(texts):
            for word in re.findall(r"[a-z]+", text.lower()):
                vectors[row, zlib.crc32(word.encode()) % self.dim] += 1.0
        return vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-6)
