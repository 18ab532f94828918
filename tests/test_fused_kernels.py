"""The fused model path on the CPU: with FlashInfer's kernels (through the PyTorch stand-in of
tests/flashinfer_stand_in.py, which follows their in-place contracts) and with PyTorch's, the
model computes the reference path's function (float32, random weights, three architectures).
tests/gpu/test_cuda_graph_gpu.py runs the real kernels in bf16."""

from __future__ import annotations

import copy
import sys

import pytest
import torch
from flashinfer_stand_in import stand_in_module

from cascade_rag.models.config import ModelConfig
from cascade_rag.models.llama import LlamaForCausalLM, TorchKernels, make_kernels


class _Dense:
    """Causal softmax attention over the flat batch (one sequence); ignores the caches."""

    def forward(self, q, k, v, k_cache, v_cache):
        rep = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        n = q.shape[0]
        scores = torch.einsum("qhd,khd->hqk", q, k) * q.shape[-1] ** -0.5
        scores = scores.masked_fill(~torch.ones(n, n, dtype=torch.bool).tril(), float("-inf"))
        return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v)


@pytest.mark.parametrize("kernels", ["flashinfer", "torch"])
@pytest.mark.parametrize(
    "arch,extra",
    [("llama", {}), ("qwen2", dict(attention_bias=True)), ("qwen3", dict(qk_norm=True))],
)
def test_fused_path_equals_reference(monkeypatch, kernels, arch, extra):
    monkeypatch.setitem(sys.modules, "flashinfer", stand_in_module())
    cfg = ModelConfig(
        architecture=arch, vocab_size=100, hidden_size=64, intermediate_size=96, num_layers=3,
        num_qo_heads=4, num_kv_heads=2, head_dim=16, max_position_embeddings=64, **extra,
    )  # fmt: skip
    torch.manual_seed(0)
    ref = LlamaForCausalLM(cfg)
    for name, p in ref.named_parameters():
        if "norm" in name:
            p.data.uniform_(0.5, 1.5)
        else:
            p.data.normal_(0, 0.3)
    fused = copy.deepcopy(ref)
    fused.fuse_for_speed(kernels)
    assert fused.model.kernels.name == kernels
    assert fused.model.cos_sin.shape == (64, 16) and fused.model.cos_sin.dtype == torch.float32
    ids = torch.randint(0, 100, (11,))
    pos = torch.arange(20, 31)  # positions away from 0: the table lookup matters
    caches = [(None, None)] * cfg.num_layers
    with torch.inference_mode():
        a = ref(ids, pos, caches, _Dense())
        b = fused(ids, pos, caches, _Dense())
    err = (a - b).abs()
    assert err.max() < 1e-4, f"max {err.max():.3g} mean {err.mean():.3g}"
    logits = fused.compute_logits(b)
    out = torch.full_like(logits, float("nan"))
    assert fused.compute_logits(b, out=out) is out and torch.equal(out, logits)


def test_kernel_choice(monkeypatch):
    assert isinstance(make_kernels("auto", torch.device("cpu")), TorchKernels)
    with pytest.raises(ValueError, match="kernels="):
        make_kernels("triton", torch.device("cpu"))
