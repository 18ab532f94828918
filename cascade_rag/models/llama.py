"""Llama-family decoder (Llama, SmolLM2, Qwen2, Qwen3) over a flat, ragged token batch.

Parameter names equal Hugging Face's, so an HF state dict loads with `load_state_dict`.
Numerics follow transformers' modeling code op for op (RMSNorm in float32, RoPE cos/sin from
a float32 `inv_freq`, separate q/k/v projections, SiLU-gated MLP), so that greedy decoding on
CPU in float32 matches transformers token for token.

`LlamaForCausalLM.fuse_for_speed` switches to the fused GPU path (bf16 tolerance, not exact):
q/k/v and gate/up in one matmul each, the residual stream carried beside the hidden states so
that each residual add runs inside the next RMSNorm, SiLU-and-mul in one kernel, and RoPE
applied in place to q and k from one cos/sin table. Its kernels are FlashInfer's on CUDA
(`fused_add_rmsnorm`, `rmsnorm`, `silu_and_mul`, `apply_rope_with_cos_sin_cache_inplace`) and
the same operations in PyTorch elsewhere (`TorchKernels`, also the reference in tests).

This module does not own the KV cache and does not compute attention: every layer rotates
q and k at their positions in the request (`cascade_rag.attention.rope`, shared with the
backends, which shift the rotation of reused chunks) and hands them to the attention backend
(`cascade_rag.attention`), which writes the cache pages and attends. It has no sampling,
batching or scheduling logic.
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Callable, Mapping
from typing import Protocol, Self

import torch
import torch.nn.functional as F
from torch import nn

from cascade_rag.attention import AttentionBackend
from cascade_rag.attention.rope import apply_rotary, rotate_from_table
from cascade_rag.models.config import ModelConfig


class FusedKernels(Protocol):
    """The operations of the fused path (`LlamaForCausalLM.fuse_for_speed`)."""

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor: ...

    def add_rms_norm_(
        self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
    ) -> None:
        """In place: residual += x, then x = rms_norm(residual)."""

    def silu_and_mul(self, x: torch.Tensor) -> torch.Tensor:
        """[n, 2 * d] -> [n, d]: silu(x[:, :d]) * x[:, d:]."""

    def rope_(
        self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos_sin: torch.Tensor
    ) -> None:
        """In place: rotate q [n, hq, d] and k [n, hk, d] (views are fine) at `positions`;
        cos_sin [max_positions, d] float32 holds cos of the d // 2 angles, then their sin."""


class TorchKernels:
    """The fused path's operations in PyTorch (any device; the CPU reference of the GPU path)."""

    name = "torch"

    def rms_norm(self, x, weight, eps):
        return F.rms_norm(x, weight.shape, weight, eps)

    def add_rms_norm_(self, x, residual, weight, eps):
        residual.add_(x)
        x.copy_(F.rms_norm(residual, weight.shape, weight, eps))

    def silu_and_mul(self, x):
        gate, up = x.chunk(2, dim=-1)
        return F.silu(gate) * up

    def rope_(self, positions, q, k, cos_sin):
        for x in (q, k):
            x.copy_(rotate_from_table(x, positions, cos_sin))


class FlashInferKernels:
    """The fused path's operations as FlashInfer's CUDA kernels (one launch each)."""

    name = "flashinfer"

    def __init__(self) -> None:
        import flashinfer

        self._fi = flashinfer

    def rms_norm(self, x, weight, eps):
        return self._fi.rmsnorm(x, weight, eps)

    def add_rms_norm_(self, x, residual, weight, eps):
        self._fi.fused_add_rmsnorm(x, residual, weight, eps)

    def silu_and_mul(self, x):
        return self._fi.silu_and_mul(x)

    def rope_(self, positions, q, k, cos_sin):
        self._fi.apply_rope_with_cos_sin_cache_inplace(
            positions, q, k, q.shape[-1], cos_sin, is_neox=True
        )


def make_kernels(kind: str, device: torch.device) -> FusedKernels:
    """ "flashinfer", "torch", or "auto" (FlashInfer on CUDA where it is installed)."""
    if kind == "auto":
        has_flashinfer = importlib.util.find_spec("flashinfer") is not None
        kind = "flashinfer" if device.type == "cuda" and has_flashinfer else "torch"
    if kind == "flashinfer":
        return FlashInferKernels()
    if kind == "torch":
        return TorchKernels()
    raise ValueError(f"kernels={kind!r} is not 'auto', 'flashinfer' or 'torch'")


class RMSNorm(nn.Module):
    """RMSNorm as transformers computes it: statistics in float32, scale in the input dtype."""

    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        input_dtype = x.dtype
        x = x.to(torch.float32)
        variance = x.pow(2).mean(-1, keepdim=True)
        x = x * torch.rsqrt(variance + self.eps)
        return self.weight * x.to(input_dtype)


def compute_inv_freq(config: ModelConfig) -> torch.Tensor:
    """[head_dim // 2] float32 RoPE inverse frequencies on CPU, incl. llama3 scaling.

    Same expressions as transformers' `_compute_default_rope_parameters` and
    `_compute_llama3_parameters`, so the values are bitwise equal.
    """
    dim = config.head_dim
    exponents = torch.arange(0, dim, 2, dtype=torch.int64, device="cpu").to(torch.float32) / dim
    inv_freq = 1.0 / (config.rope_theta**exponents)
    if config.rope_scaling is None:
        return inv_freq
    s = config.rope_scaling
    factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    old_context_len = s["original_max_position_embeddings"]
    low_freq_wavelen = old_context_len / low
    high_freq_wavelen = old_context_len / high
    wavelen = 2 * math.pi / inv_freq
    # long wavelengths are divided by factor, short ones kept, the band between interpolated
    inv_freq_llama = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth_factor = (old_context_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth_factor) * inv_freq_llama / factor + smooth_factor * inv_freq_llama
    is_medium_freq = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium_freq, smoothed, inv_freq_llama)


class RotaryEmbedding(nn.Module):
    """cos/sin tables at arbitrary positions, computed once per forward and shared by all layers.

    `inv_freq` stays float32 when the model is cast to another dtype (as in transformers);
    only its device follows the model.
    """

    inv_freq: torch.Tensor

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self._inv_freq_cpu = compute_inv_freq(config)
        self.register_buffer("inv_freq", self._inv_freq_cpu.clone(), persistent=False)

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> Self:
        super()._apply(fn, recurse)
        if self.inv_freq.device.type != "meta":
            self.inv_freq = self._inv_freq_cpu.to(self.inv_freq.device)
        return self

    def forward(
        self, positions: torch.Tensor, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # freqs: [num_tokens, head_dim // 2]; cos, sin: [num_tokens, head_dim]
        freqs = positions[:, None].float() * self.inv_freq.to(positions.device)
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)


class LlamaAttention(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.num_qo_heads = config.num_qo_heads
        self.num_kv_heads = config.num_kv_heads
        self.head_dim = config.head_dim
        q_size = config.num_qo_heads * config.head_dim
        kv_size = config.num_kv_heads * config.head_dim
        bias = config.attention_bias
        self.q_proj = nn.Linear(config.hidden_size, q_size, bias=bias)
        self.k_proj = nn.Linear(config.hidden_size, kv_size, bias=bias)
        self.v_proj = nn.Linear(config.hidden_size, kv_size, bias=bias)
        self.o_proj = nn.Linear(q_size, config.hidden_size, bias=config.o_proj_bias)
        if config.qk_norm:  # Qwen3: per-head RMSNorm over head_dim, before RoPE
            self.q_norm = RMSNorm(config.head_dim, config.rms_norm_eps)
            self.k_norm = RMSNorm(config.head_dim, config.rms_norm_eps)
        else:
            self.q_norm = self.k_norm = None

    def forward(
        self,
        x: torch.Tensor,  # [num_tokens, hidden_size]
        cos: torch.Tensor,  # [num_tokens, head_dim]
        sin: torch.Tensor,
        kv_cache: tuple[torch.Tensor, torch.Tensor],
        attn: AttentionBackend,
    ) -> torch.Tensor:
        num_tokens = x.shape[0]
        q = self.q_proj(x).view(num_tokens, self.num_qo_heads, self.head_dim)
        k = self.k_proj(x).view(num_tokens, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(num_tokens, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q = self.q_norm(q)
            k = self.k_norm(k)
        q = apply_rotary(q, cos, sin)
        k = apply_rotary(k, cos, sin)
        k_cache, v_cache = kv_cache
        out = attn.forward(q, k, v, k_cache, v_cache)  # [num_tokens, num_qo_heads, head_dim]
        return self.o_proj(out.reshape(num_tokens, self.num_qo_heads * self.head_dim))

    qkv_weight: torch.Tensor | None = None
    qkv_bias: torch.Tensor | None = None

    def fuse(self) -> None:
        """Put q/k/v weights in one matrix (the q/k/v_proj weights become views of it)."""
        w = torch.cat([self.q_proj.weight, self.k_proj.weight, self.v_proj.weight])
        self.qkv_weight = w
        sizes = [self.q_proj.out_features, self.k_proj.out_features, self.v_proj.out_features]
        for proj, part in zip((self.q_proj, self.k_proj, self.v_proj), w.split(sizes)):
            proj.weight = nn.Parameter(part, requires_grad=False)
        if self.q_proj.bias is not None:
            b = torch.cat([self.q_proj.bias, self.k_proj.bias, self.v_proj.bias])
            self.qkv_bias = b
            for proj, part in zip((self.q_proj, self.k_proj, self.v_proj), b.split(sizes)):
                proj.bias = nn.Parameter(part, requires_grad=False)

    def forward_fused(
        self,
        x: torch.Tensor,  # [num_tokens, hidden_size], normed
        positions: torch.Tensor,
        cos_sin: torch.Tensor,
        kv_cache: tuple[torch.Tensor, torch.Tensor],
        attn: AttentionBackend,
        kernels: FusedKernels,
    ) -> torch.Tensor:
        # one projection; q and k rotated in place inside it; attention gets views of it
        n, hq, hk, d = x.shape[0], self.num_qo_heads, self.num_kv_heads, self.head_dim
        qkv = F.linear(x, self.qkv_weight, self.qkv_bias).view(n, hq + 2 * hk, d)
        q, k, v = qkv[:, :hq], qkv[:, hq : hq + hk], qkv[:, hq + hk :]
        if self.q_norm is not None:  # per-head norms before RoPE
            q = kernels.rms_norm(q.reshape(n * hq, d), self.q_norm.weight, self.q_norm.eps)
            k = kernels.rms_norm(k.reshape(n * hk, d), self.k_norm.weight, self.k_norm.eps)
            q, k = q.view(n, hq, d), k.view(n, hk, d)
        k_cache, v_cache = kv_cache
        rope_and_attend = getattr(attn, "rope_and_attend", None)  # a decode graph's fused op
        if rope_and_attend is not None:
            out = rope_and_attend(positions, cos_sin, q, k, v, k_cache, v_cache)
        else:
            kernels.rope_(positions, q, k, cos_sin)
            out = attn.forward(q, k, v, k_cache, v_cache)
        return self.o_proj(out.reshape(n, hq * d))


class LlamaMLP(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    gate_up_weight: torch.Tensor | None = None

    def fuse(self) -> None:
        """Put gate and up weights in one matrix (gate/up_proj weights become views of it)."""
        w = torch.cat([self.gate_proj.weight, self.up_proj.weight])
        self.gate_up_weight = w
        gate, up = w.split(self.gate_proj.out_features)
        self.gate_proj.weight = nn.Parameter(gate, requires_grad=False)
        self.up_proj.weight = nn.Parameter(up, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))

    def forward_fused(self, x: torch.Tensor, kernels: FusedKernels) -> torch.Tensor:
        return self.down_proj(kernels.silu_and_mul(F.linear(x, self.gate_up_weight)))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.self_attn = LlamaAttention(config)
        self.mlp = LlamaMLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        kv_cache: tuple[torch.Tensor, torch.Tensor],
        attn: AttentionBackend,
    ) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, kv_cache, attn)
        return x + self.mlp(self.post_attention_layernorm(x))

    def forward_fused(
        self,
        h: torch.Tensor,
        residual: torch.Tensor | None,
        positions: torch.Tensor,
        cos_sin: torch.Tensor,
        kv_cache: tuple[torch.Tensor, torch.Tensor],
        attn: AttentionBackend,
        kernels: FusedKernels,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(h, residual) -> (mlp output, residual): the previous layer's output h is added
        to the residual inside this layer's first norm (the first layer's h is the input)."""
        norm = self.input_layernorm
        if residual is None:
            residual = h
            h = kernels.rms_norm(h, norm.weight, norm.eps)
        else:
            kernels.add_rms_norm_(h, residual, norm.weight, norm.eps)
        h = self.self_attn.forward_fused(h, positions, cos_sin, kv_cache, attn, kernels)
        norm = self.post_attention_layernorm
        kernels.add_rms_norm_(h, residual, norm.weight, norm.eps)
        return self.mlp.forward_fused(h, kernels), residual


class LlamaModel(nn.Module):
    """The decoder stack without the LM head (HF's `model.` prefix)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        # Embedding's own init (normal_) on the meta device of `from_state_dict` costs a
        # one-time ~0.4 s import of torch's Python decompositions: init only real tensors
        weight = torch.empty(config.vocab_size, config.hidden_size)
        if weight.device.type != "meta":
            nn.init.normal_(weight)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, _weight=weight)
        self.layers = nn.ModuleList(LlamaDecoderLayer(config) for _ in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config)
        # the fused path (LlamaForCausalLM.fuse_for_speed): its kernels and RoPE table
        self.kernels: FusedKernels | None = None
        self.cos_sin: torch.Tensor | None = None  # [max_positions, head_dim] float32

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
        attn: AttentionBackend,
    ) -> torch.Tensor:
        if self.kernels is not None:
            return self._forward_fused(input_ids, positions, kv_caches, attn)
        x = self.embed_tokens(input_ids)
        cos, sin = self.rotary_emb(positions, x.dtype)  # once per forward, shared by all layers
        for layer, kv_cache in zip(self.layers, kv_caches, strict=True):
            x = layer(x, cos, sin, kv_cache, attn)
        return self.norm(x)

    def _forward_fused(self, input_ids, positions, kv_caches, attn) -> torch.Tensor:
        kernels, cos_sin = self.kernels, self.cos_sin
        h, residual = self.embed_tokens(input_ids), None
        for layer, kv_cache in zip(self.layers, kv_caches, strict=True):
            h, residual = layer.forward_fused(
                h, residual, positions, cos_sin, kv_cache, attn, kernels
            )
        kernels.add_rms_norm_(h, residual, self.norm.weight, self.norm.eps)
        return h

    def rope_table(self, max_positions: int) -> torch.Tensor:
        """[max_positions, head_dim] float32 on the model's device: cos of the angles
        position * inv_freq, then their sin (the same float32 angles as `rotary_emb`)."""
        inv_freq = self.rotary_emb.inv_freq
        positions = torch.arange(max_positions, device=inv_freq.device)
        freqs = positions[:, None].float() * inv_freq
        return torch.cat((freqs.cos(), freqs.sin()), dim=-1)


def _gemm_writes_float32(lm_head: nn.Linear) -> bool:
    """Whether the LM head's half-precision GEMM can write float32 logits itself (CUDA, no bias,
    torch's `mm(..., out_dtype=float32)`): one kernel instead of a bf16 GEMM and a cast of all
    vocabulary-wide rows. Checked once, on a few rows, against the GEMM-then-cast result."""
    weight = lm_head.weight
    if weight.device.type != "cuda" or lm_head.bias is not None or weight.dtype == torch.float32:
        return False
    x = torch.randn(4, weight.shape[1], device=weight.device, dtype=weight.dtype)
    try:
        got = torch.mm(x, weight.t(), out_dtype=torch.float32)
    except (RuntimeError, TypeError, NotImplementedError):
        return False
    want = lm_head(x).float()
    return bool(torch.allclose(got, want, rtol=1e-2, atol=1e-2 * float(want.abs().max())))


class LlamaForCausalLM(nn.Module):
    """Llama-family causal LM over a flat token batch; parameter names equal Hugging Face's.

    Inference only: parameters do not require grad. RoPE is applied here; the attention
    backend writes the KV cache and attends (see `cascade_rag.attention.AttentionBackend`).

    Args:
        config: the architecture. Weights are randomly initialized; use `from_state_dict`
            or `cascade_rag.models.loader.load_model` to get trained weights.

    Example:
        >>> model = LlamaForCausalLM.from_state_dict(config, hf_model.state_dict())
        >>> attn.plan(metadata)  # once per step
        >>> hidden = model(input_ids, positions, kv_caches, attn)  # [num_tokens, hidden_size]
        >>> logits = model.compute_logits(hidden[last_rows])  # [rows, vocab_size] float32
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.model = LlamaModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.tie_weights()
        self.requires_grad_(False)

    def fuse_for_speed(self, kernels: str = "auto") -> None:
        """Switch to the fused GPU path (see the module docstring): q/k/v and gate/up
        matmuls fused (same parameters, shared storage), residual adds inside the norms,
        SiLU-and-mul and in-place RoPE from a float32 table of `max_position_embeddings` rows,
        made here on the model's device (call it after moving the model).

        Args:
            kernels: "auto" (FlashInfer's on CUDA where installed, else PyTorch),
                "flashinfer" or "torch".

        Outputs equal the reference path within rounding, not bit for bit, so the CPU float32
        path that must match transformers token for token keeps the reference ops.
        """
        if self.model.layers[0].self_attn.qkv_weight is None:
            for layer in self.model.layers:
                layer.self_attn.fuse()
                layer.mlp.fuse()
        self.model.kernels = make_kernels(kernels, self.device)
        self.model.cos_sin = self.model.rope_table(self.config.max_position_embeddings)
        self._logits_in_gemm = _gemm_writes_float32(self.lm_head)

    @property
    def dtype(self) -> torch.dtype:
        return self.model.embed_tokens.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device

    def tie_weights(self) -> None:
        """Make lm_head share the embedding matrix when the config ties them."""
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
        attn: AttentionBackend,
    ) -> torch.Tensor:
        """Run the decoder over one step's flat token batch.

        Args:
            input_ids: [num_tokens] int64, the step's tokens of all sequences concatenated.
            positions: [num_tokens] int64, each token's position in its whole request (RoPE).
            kv_caches: one (k_cache, v_cache) per layer, each
                [num_pages, page_size, num_kv_heads, head_dim]; passed through to `attn`.
            attn: the attention backend, already planned for this step.

        Returns:
            [num_tokens, hidden_size] hidden states after the final norm, in the model dtype.
        """
        if input_ids.dim() != 1 or positions.shape != input_ids.shape:
            raise ValueError(
                f"input_ids {tuple(input_ids.shape)} and positions {tuple(positions.shape)} "
                "must both be [num_tokens] (flatten the batch)"
            )
        if len(kv_caches) != self.config.num_layers:
            raise ValueError(
                f"got {len(kv_caches)} kv_caches, need one (k_cache, v_cache) per layer "
                f"({self.config.num_layers})"
            )
        return self.model(input_ids, positions, kv_caches, attn)

    def compute_logits(self, hidden: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """[rows, hidden_size] hidden states -> [rows, vocab_size] float32 logits (written to
        `out` [rows, vocab_size] float32 if given, e.g. a CUDA graph's static buffer)."""
        if getattr(self, "_logits_in_gemm", False):  # fused path: float32 out of the GEMM
            weight = self.lm_head.weight.t()
            if out is not None:
                return torch.mm(hidden, weight, out_dtype=torch.float32, out=out)
            return torch.mm(hidden, weight, out_dtype=torch.float32)
        if out is not None:
            return out.copy_(self.lm_head(hidden))
        return self.lm_head(hidden).float()

    @classmethod
    def from_state_dict(
        cls,
        config: ModelConfig,
        state_dict: Mapping[str, torch.Tensor],
        *,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
    ) -> LlamaForCausalLM:
        """Build the model directly from an HF-named state dict, without random init.

        Accepts checkpoints that omit `lm_head.weight` when embeddings are tied and drops
        stale `rotary_emb.inv_freq` buffers of old checkpoints; every other key must match
        exactly (strict loading).

        Raises:
            ValueError: tied embeddings but a different `lm_head.weight`, or missing /
                unexpected keys.
        """
        sd = {k: v for k, v in state_dict.items() if not k.endswith("rotary_emb.inv_freq")}
        if config.tie_word_embeddings:
            embed = sd.get("model.embed_tokens.weight")
            head = sd.get("lm_head.weight")
            if head is not None and embed is not None and not torch.equal(head, embed):
                raise ValueError(
                    "tie_word_embeddings=True but lm_head.weight differs from "
                    "model.embed_tokens.weight; fix the config or the checkpoint"
                )
            if embed is not None:
                sd["lm_head.weight"] = embed
        with torch.device("meta"):
            model = cls(config)
        try:
            model.load_state_dict(sd, strict=True, assign=True)
        except RuntimeError as e:  # torch reports key mismatches as RuntimeError
            raise ValueError(f"state dict does not fit {config}: {e}") from e
        model.tie_weights()
        return model.to(device=device, dtype=dtype)
