"""ModelConfig: the shape and numerics of a Llama-family decoder, mapped from Hugging Face configs.

Covers Llama (incl. SmolLM2 and llama3-style RoPE scaling), Qwen2 (q/k/v bias) and Qwen3
(per-head RMSNorm on q and k). It does not cover sliding-window attention, RoPE types other
than "default" and "llama3", MLP biases or activations other than SiLU: `from_hf` rejects
such configs with a ValueError instead of silently computing something else.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

ARCHITECTURES = ("llama", "qwen2", "qwen3")
_LLAMA3_SCALING_KEYS = (
    "factor",
    "low_freq_factor",
    "high_freq_factor",
    "original_max_position_embeddings",
)


@dataclass
class ModelConfig:
    """Architecture of a Llama-family causal LM, independent of any weights.

    Attributes:
        architecture: "llama", "qwen2" or "qwen3".
        vocab_size, hidden_size, intermediate_size, num_layers: model sizes.
        num_qo_heads, num_kv_heads, head_dim: attention heads (GQA: num_qo_heads is a
            multiple of num_kv_heads); head_dim need not equal hidden_size // num_qo_heads.
        rms_norm_eps: epsilon of every RMSNorm.
        rope_theta: RoPE base.
        rope_scaling: None, or llama3-style scaling
            {"factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"}.
        max_position_embeddings: the context window in tokens.
        tie_word_embeddings: lm_head shares the embedding matrix.
        attention_bias: q/k/v projections have a bias (Qwen2; Llama/Qwen3 with attention_bias).
        o_proj_bias: the output projection has a bias (Llama/Qwen3 with attention_bias; never
            Qwen2).
        qk_norm: RMSNorm over head_dim on q and k before RoPE (Qwen3).
        bos_token_id: None or the BOS id.
        eos_token_id: None, one id, or a list of ids that end generation.

    Example:
        >>> cfg = ModelConfig(architecture="llama", vocab_size=128, hidden_size=64,
        ...     intermediate_size=128, num_layers=2, num_qo_heads=4, num_kv_heads=2, head_dim=16)
        >>> cfg.num_qo_heads // cfg.num_kv_heads
        2
    """

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_qo_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict[str, float] | None = None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    o_proj_bias: bool = False
    qk_norm: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None

    def __post_init__(self) -> None:
        if self.architecture not in ARCHITECTURES:
            raise ValueError(
                f"architecture={self.architecture!r} is not supported; use one of {ARCHITECTURES}"
            )
        for name in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_layers",
            "num_qo_heads",
            "num_kv_heads",
            "head_dim",
            "max_position_embeddings",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name}={value!r} must be a positive int")
        if self.num_qo_heads % self.num_kv_heads:
            raise ValueError(
                f"num_qo_heads={self.num_qo_heads} must be a multiple of "
                f"num_kv_heads={self.num_kv_heads}"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even for RoPE")
        if not self.rms_norm_eps > 0:
            raise ValueError(f"rms_norm_eps={self.rms_norm_eps!r} must be > 0")
        if not self.rope_theta > 0:
            raise ValueError(f"rope_theta={self.rope_theta!r} must be > 0")
        if self.rope_scaling is not None:
            self.rope_scaling = _check_llama3_scaling(self.rope_scaling)
        if isinstance(self.eos_token_id, (list, tuple)):
            self.eos_token_id = [int(t) for t in self.eos_token_id]

    @property
    def eos_token_ids(self) -> list[int]:
        """The end-of-sequence ids as a list (empty when the config names none)."""
        if self.eos_token_id is None:
            return []
        if isinstance(self.eos_token_id, list):
            return list(self.eos_token_id)
        return [self.eos_token_id]

    @classmethod
    def from_hf(cls, hf_config: Any) -> ModelConfig:
        """Map a Hugging Face config (a `PretrainedConfig` or a config.json dict) to ModelConfig.

        Supports model_type "llama" (incl. SmolLM2), "qwen2" and "qwen3". A dict is first
        turned into transformers' config class so that keys it omits get transformers' defaults
        (save_pretrained writes only keys that differ from them). RoPE settings are read from
        `rope_parameters` (transformers 5) or `rope_theta` / `rope_scaling` (older configs).

        Raises:
            ValueError: unsupported model_type, RoPE type, activation, MLP bias or sliding window.

        Example:
            >>> ModelConfig.from_hf(json.loads(Path("model/config.json").read_text()))
        """
        if isinstance(hf_config, dict):
            hf_config = _hf_config_from_dict(hf_config)
        model_type = getattr(hf_config, "model_type", None)
        if model_type not in ARCHITECTURES:
            raise ValueError(
                f"model_type={model_type!r} is not supported; supported: {ARCHITECTURES}"
            )
        g = hf_config
        hidden_act = getattr(g, "hidden_act", "silu")
        if hidden_act != "silu":
            raise ValueError(f"hidden_act={hidden_act!r} is not supported; only 'silu'")
        if getattr(g, "mlp_bias", False):
            raise ValueError("mlp_bias=True is not supported")
        layer_types = getattr(g, "layer_types", None) or []
        if any(t != "full_attention" for t in layer_types):
            raise ValueError(
                f"layer_types={sorted(set(layer_types))} is not supported; "
                "only full attention (no sliding window)"
            )
        num_qo_heads = g.num_attention_heads
        num_kv_heads = getattr(g, "num_key_value_heads", None) or num_qo_heads
        head_dim = getattr(g, "head_dim", None) or g.hidden_size // num_qo_heads
        rope_theta, rope_scaling = _rope_settings(g)
        if model_type == "qwen2":  # Qwen2 always has q/k/v bias and never an o_proj bias
            attention_bias, o_proj_bias = True, False
        else:
            attention_bias = o_proj_bias = bool(getattr(g, "attention_bias", False))
        return cls(
            architecture=model_type,
            vocab_size=g.vocab_size,
            hidden_size=g.hidden_size,
            intermediate_size=g.intermediate_size,
            num_layers=g.num_hidden_layers,
            num_qo_heads=num_qo_heads,
            num_kv_heads=num_kv_heads,
            head_dim=head_dim,
            rms_norm_eps=float(g.rms_norm_eps),
            rope_theta=float(rope_theta),
            rope_scaling=rope_scaling,
            max_position_embeddings=g.max_position_embeddings,
            tie_word_embeddings=bool(getattr(g, "tie_word_embeddings", False)),
            attention_bias=attention_bias,
            o_proj_bias=o_proj_bias,
            qk_norm=model_type == "qwen3",
            bos_token_id=getattr(g, "bos_token_id", None),
            eos_token_id=getattr(g, "eos_token_id", None),
        )


def _hf_config_from_dict(config: dict[str, Any]) -> Any:
    model_type = config.get("model_type")
    if model_type not in ARCHITECTURES:
        raise ValueError(f"model_type={model_type!r} is not supported; supported: {ARCHITECTURES}")
    from transformers import AutoConfig

    kwargs = {k: v for k, v in config.items() if k != "model_type"}
    return AutoConfig.for_model(model_type, **kwargs)


def _rope_settings(g: Any) -> tuple[float, dict[str, float] | None]:
    """(rope_theta, llama3 scaling or None) from `rope_parameters` or legacy attributes."""
    params = dict(getattr(g, "rope_parameters", None) or getattr(g, "rope_scaling", None) or {})
    if any(isinstance(v, dict) for v in params.values()):
        raise ValueError(f"per-layer-type rope_parameters are not supported: {params}")
    theta = params.get("rope_theta") or getattr(g, "rope_theta", None) or 10000.0
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type == "default":
        return theta, None
    if rope_type != "llama3":
        raise ValueError(f"rope_type={rope_type!r} is not supported; only 'default' and 'llama3'")
    scaling = {k: params[k] for k in _LLAMA3_SCALING_KEYS if k in params}
    scaling.setdefault("original_max_position_embeddings", g.max_position_embeddings)
    return theta, scaling


def _check_llama3_scaling(scaling: dict[str, Any]) -> dict[str, float]:
    missing = [k for k in _LLAMA3_SCALING_KEYS if k not in scaling]
    if missing:
        raise ValueError(
            f"rope_scaling={scaling!r} lacks {missing}; llama3 scaling needs {_LLAMA3_SCALING_KEYS}"
        )
    out = {k: scaling[k] for k in _LLAMA3_SCALING_KEYS}
    if not (out["factor"] > 0 and out["original_max_position_embeddings"] > 0):
        raise ValueError(f"rope_scaling={scaling!r}: factor and original context must be > 0")
    if not out["high_freq_factor"] > out["low_freq_factor"] > 0:
        raise ValueError(f"rope_scaling={scaling!r}: need high_freq_factor > low_freq_factor > 0")
    return out
