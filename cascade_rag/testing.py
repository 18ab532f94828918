"""Helpers for tests and benchmarks that cannot download anything: an in-memory tokenizer and
random-weight Llama model folders that both this engine and transformers load.

`save_random_llama` writes plain random weights. Their greedy tokens sit on near ties (the top
two logits of some step differ by less than bfloat16 rounding), so two correct implementations
disagree after a few tokens. `save_peaked_llama` writes a random model with a built-in
mechanism whose greedy choice leads by a wide margin at every step and still depends on the
context (see its docstring); `greedy_margins` measures that margin with transformers.

Not used by the engine itself.
"""

from __future__ import annotations

import json
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


# ---- a peaked random model ---------------------------------------------------------------------

# Fractions of the vocabulary that are trigger tokens of level 1, 2, 3 (rarer for higher levels,
# so the highest level present varies for contexts of a few hundred to a few thousand tokens).
_TRIGGER_FRACTIONS = (1 / 64, 1 / 512, 1 / 4096)
_LEVEL_SCORE = 24.0  # attention-score gap between trigger levels: e^-24 leaks nothing
PEAKED_MECHANISM_FILE = "peaked_mechanism.json"


def save_peaked_llama(
    path: str | Path,
    *,
    tokenizer=None,
    margin: float = 8.0,
    noise: float = 0.02,
    trigger_fractions: tuple[float, ...] = _TRIGGER_FRACTIONS,
    dtype: torch.dtype = torch.bfloat16,
    device: str = "cpu",
    seed: int = 0,
    **config,
) -> Path:
    """Save a random Llama whose greedy top logit leads by about `margin` at every step.

    Random weights alone give near ties (the top two logits of some step differ by less than
    bfloat16 rounding, and scaling the LM head or the final norm scales the rounding with
    the gap), so two correct implementations part after a few tokens. This model carries a
    mechanism, written into its weights, that decides each greedy token by a wide margin and
    still depends on the whole context:

    - Every token id t has a group g(t) (one residual dimension per group), a trigger level
      l(t) in 0..K (0: not a trigger; a few ids per level, rarer for higher levels) and a
      constant dimension in its embedding.
    - Layer 0, query head 0 (with its KV head) attends by trigger level: a constant query on
      the slowest RoPE pair (positions barely rotate it) against keys of l(t) * 24 score
      units, so its attention is one-hot on the highest level L present in the context (the
      prompt, shared chunks included, and the tokens generated so far); its values are
      onehot(l(t)), so the head writes onehot(L) into K+1 residual dimensions.
    - The LM head scores token j by `margin` * ([group(j) == g(current token)] +
      [class(j) == L]), where each (group, class) pair is one live token id, so the greedy
      token is the pair (g(t), L) and leads every other token by `margin`.

    Everything else is random: the other heads, the MLPs and all later layers run HF's random
    init, their output projections rescaled so that together they add about `noise` (rms per
    residual dimension) to the residual stream; the embedding and the LM head carry random
    parts too. So every kernel computes real numbers whose errors move the logits a little
    but never the greedy tokens, while a wrong attention read (a shared level lost, read twice
    or from another request, a bad merge of levels) changes L and with it the tokens. The
    tokens do not see errors small against `margin`, nor RoPE positions.

    `peaked_greedy` predicts the greedy tokens from the mechanism alone (saved beside the
    weights as peaked_mechanism.json); `greedy_margins` measures the real lead.

    Args:
        path: the folder (HF format: config.json, model.safetensors, tokenizer files).
        tokenizer: defaults to `byte_bpe_tokenizer(600)`; its size is the model's vocabulary.
            Id 0 (end of sequence) is never a greedy token.
        margin: the designed logit lead.
        noise: rms per residual dimension added by the random sublayers (0: none).
        trigger_fractions: fraction of the vocabulary at each trigger level 1..K (at least one
            id per level).
        dtype, device: the saved weights' dtype and the device used to build them.
        seed: for the random weights, the token assignment and the noise calibration.
        config: `transformers.LlamaConfig` fields (tie_word_embeddings is forced off;
            rope_theta defaults to 500000 so the slowest RoPE pair stays slow).

    Raises:
        ValueError: hidden_size or head_dim too small for the mechanism.

    Example:
        >>> folder = save_peaked_llama(tmp / "peaked", hidden_size=64, intermediate_size=128,
        ...     num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)  # doctest: +SKIP
        >>> peaked_greedy(folder, prompt_ids, 64) == hf_greedy_tokens  # doctest: +SKIP
        True
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    path = Path(path)
    tokenizer = tokenizer if tokenizer is not None else byte_bpe_tokenizer(600)
    vocab = len(tokenizer)
    config = dict(config, vocab_size=vocab, eos_token_id=0, bos_token_id=0)
    config["tie_word_embeddings"] = False
    config.setdefault("rope_theta", 500000.0)
    llama_config = LlamaConfig(**config)
    hidden = llama_config.hidden_size
    head_dim = getattr(llama_config, "head_dim", None) or hidden // llama_config.num_attention_heads
    num_classes = len(trigger_fractions) + 1  # level 0 and the K trigger levels
    reserved = 2 * num_classes + 1  # token level one-hot, attended level one-hot, constant
    num_groups = min(hidden - reserved, (vocab - 1) // num_classes)
    if num_groups < 2 or head_dim < num_classes or head_dim % 2:
        raise ValueError(
            f"hidden_size={hidden}, head_dim={head_dim} and vocab={vocab} leave {num_groups} "
            f"groups for {num_classes} levels; use hidden_size >= {reserved + 2}, an even "
            f"head_dim >= {num_classes} and a vocabulary of at least {2 * num_classes + 1}"
        )
    # residual dimensions: [groups | token level one-hot | attended level one-hot | constant | free]
    level_dim = num_groups
    attended_dim = num_groups + num_classes
    const_dim = num_groups + 2 * num_classes

    gen = torch.Generator().manual_seed(seed)
    ids = torch.randperm(vocab - 1, generator=gen) + 1  # never id 0 (end of sequence)
    group_of = torch.randint(0, num_groups, (vocab,), generator=gen)
    level_of = torch.zeros(vocab, dtype=torch.long)
    start = 0
    for level, fraction in enumerate(trigger_fractions, start=1):
        count = max(1, round(vocab * fraction))
        level_of[ids[start : start + count]] = level
        start += count
    # live[group, class]: the token id greedy decoding picks for that pair
    live = (torch.randperm(vocab - 1, generator=gen)[: num_groups * num_classes] + 1).view(
        num_groups, num_classes
    )

    torch.manual_seed(seed)
    with torch.device(device):
        model = LlamaForCausalLM(llama_config)
    tokens = torch.arange(vocab, device=device)
    with torch.no_grad():
        # RMS-normalized size of the designed dims: 3 ones at layer 0's input, 4 at the final
        # norm (the token's 3 plus the attended level); the noise shrinks both a little.
        kappa_in, kappa_out = (hidden / 3) ** 0.5, (hidden / 4) ** 0.5
        emb = model.model.embed_tokens.weight
        emb.normal_(0.0, noise)
        emb[tokens, group_of.to(device)] += 1.0
        emb[tokens, level_dim + level_of.to(device)] += 1.0
        emb[:, const_dim] += 1.0
        attn = model.model.layers[0].self_attn
        slow = head_dim // 2 - 1  # slowest RoPE pair (rotate-half layout: dims slow, slow + d/2)
        w_qk = (_LEVEL_SCORE * head_dim**0.5) ** 0.5 / kappa_in
        q, k, v, o = (attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight,
                      attn.o_proj.weight)  # fmt: skip
        for w in (q[:head_dim], k[:head_dim], v[:head_dim], o[:, :head_dim]):
            w.zero_()
        q[slow, const_dim] = w_qk
        for level in range(num_classes):
            k[slow, level_dim + level] = level * w_qk
            v[level, level_dim + level] = 1.0 / kappa_in
            o[attended_dim + level, level] = 1.0
        head = model.lm_head.weight
        head.normal_(0.0, margin / 32 / hidden**0.5)  # dead tokens' logits ~ N(0, margin/32)
        rows = live.flatten().to(device)
        lead = margin / kappa_out
        head[rows, torch.arange(num_groups, device=device).repeat_interleave(num_classes)] += lead
        head[rows, attended_dim + torch.arange(num_classes, device=device).repeat(num_groups)] += (
            lead
        )
        _calibrate_noise(model, noise, reserved_until=const_dim + 1, head_dim=head_dim, gen=gen)
    model.to(dtype).save_pretrained(path)
    tokenizer.save_pretrained(path)
    mechanism = dict(
        margin=margin,
        group_of=group_of.tolist(),
        level_of=level_of.tolist(),
        live=live.tolist(),
    )
    (path / PEAKED_MECHANISM_FILE).write_text(json.dumps(mechanism))
    return path


def _calibrate_noise(model, noise: float, reserved_until: int, head_dim: int, gen) -> None:
    """Rescale each layer's random output projections so its attention and its MLP each add
    `noise / sqrt(2 * num_layers)` rms to the free residual dimensions, layer by layer in one
    forward pass over random tokens (a hook scales the weights and the output it returns, so
    later layers are calibrated on the residual they will really see)."""
    layers = model.model.layers
    target = noise / (2 * len(layers)) ** 0.5

    def hook(module, args, output, designed_cols: int = 0):
        x = args[0]
        weight = module.weight
        random_part = torch.nn.functional.linear(x[..., designed_cols:], weight[:, designed_cols:])
        rms = random_part[..., reserved_until:].pow(2).mean().sqrt().item()
        factor = target / rms if rms > 0 else 0.0
        weight[:, designed_cols:] *= factor
        return output - random_part * (1.0 - factor)

    handles = []
    for i, layer in enumerate(layers):
        cols = head_dim if i == 0 else 0  # layer 0's head 0 is the mechanism
        handles.append(
            layer.self_attn.o_proj.register_forward_hook(
                lambda m, a, out, cols=cols: hook(m, a, out, cols)
            )
        )
        handles.append(layer.mlp.down_proj.register_forward_hook(hook))
    try:
        vocab = model.config.vocab_size
        ids = torch.randint(1, vocab, (2, 256), generator=gen).to(model.device)
        model(ids)
    finally:
        for handle in handles:
            handle.remove()


def peaked_greedy(model_dir: str | Path, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    """The greedy tokens of a `save_peaked_llama` model, from its mechanism alone.

    Each step: L = the highest trigger level among the prompt and the tokens so far; the next
    token is live[group(last token), L].
    """
    mechanism = json.loads((Path(model_dir) / PEAKED_MECHANISM_FILE).read_text())
    group_of, level_of, live = mechanism["group_of"], mechanism["level_of"], mechanism["live"]
    level = max((level_of[t] for t in prompt_ids), default=0)
    last, out = prompt_ids[-1], []
    for _ in range(max_new_tokens):
        last = live[group_of[last]][level]
        level = max(level, level_of[last])
        out.append(last)
    return out


def greedy_margins(
    model_dir: str | Path,
    prompts: list[list[int]],
    max_new_tokens: int = 64,
    dtype: torch.dtype = torch.bfloat16,
    device: str = "cpu",
    batch_size: int = 64,
) -> tuple[list[list[int]], float]:
    """transformers' greedy tokens and the smallest top-1 minus top-2 logit gap over all steps.

    Args:
        model_dir: an HF model folder.
        prompts: token id lists (left-padded into batches of `batch_size`).
        max_new_tokens: tokens generated per prompt (end of sequence ignored).
        dtype, device: where transformers runs the model.

    Returns:
        (generated ids per prompt, minimum gap in logits of `dtype`).
    """
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()
    out: list[list[int]] = []
    min_gap = float("inf")
    for first in range(0, len(prompts), batch_size):
        batch = prompts[first : first + batch_size]
        width = max(len(p) for p in batch)
        ids = torch.zeros(len(batch), width, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, p in enumerate(batch):
            ids[row, width - len(p) :] = torch.tensor(p)
            mask[row, width - len(p) :] = 1
        with torch.inference_mode():
            result = model.generate(
                ids.to(device),
                attention_mask=mask.to(device),
                max_new_tokens=max_new_tokens,
                min_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=0,
                output_logits=True,
                return_dict_in_generate=True,
            )
        top2 = torch.stack(result.logits, dim=1).topk(2, dim=-1).values.float()
        min_gap = min(min_gap, (top2[..., 0] - top2[..., 1]).min().item())
        out += result.sequences[:, width:].tolist()
    return out, min_gap
