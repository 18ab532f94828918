"""GPU checks of the front end: dtype "auto", device errors, failure isolation on CUDA.

Skipped without a GPU and FlashInfer.
"""

from __future__ import annotations

import asyncio
import random

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)
pytest.importorskip("flashinfer", reason="needs the gpu extra (flashinfer-python)")

from cascade_rag.attention.flashinfer_backend import FlashInferAttention  # noqa: E402
from cascade_rag.engine.sequence import PreparedPrompt
from cascade_rag.llm import CascadeEngine
from cascade_rag.sampling import SamplingParams


def _prompts(engine, n: int, seed: int = 0):
    rng = random.Random(seed)
    vocab = engine.model_config.vocab_size
    doc = engine.register_token_chunk([rng.randrange(1, vocab) for _ in range(70)])
    return [
        PreparedPrompt((doc,), tuple(rng.randrange(1, vocab) for _ in range(rng.randint(3, 9))))
        for _ in range(n)
    ]


def test_auto_dtype_is_bfloat16_with_flashinfer(llama_dir):
    with CascadeEngine(str(llama_dir), device="cuda", kv_cache_tokens=4096) as engine:
        assert engine.config.resolved_dtype == "bfloat16"
        assert engine.model.model.dtype == torch.bfloat16
        assert isinstance(engine._core.runner.attn, FlashInferAttention)
        out = engine.generate(_prompts(engine, 1)[0], SamplingParams(max_tokens=4))
        assert len(out.token_ids) == 4


def test_device_errors_name_the_fix(llama_dir):
    with pytest.raises(ValueError, match="float32"):
        CascadeEngine(
            str(llama_dir), device="cuda", dtype="float32", attention_backend="flashinfer"
        )
    with pytest.raises(ValueError, match="visible"):
        CascadeEngine(str(llama_dir), device=f"cuda:{torch.cuda.device_count()}")


def test_a_failing_request_fails_alone_on_cuda(llama_dir, monkeypatch):
    with CascadeEngine(str(llama_dir), device="cuda", kv_cache_tokens=8192) as engine:
        prompts = _prompts(engine, 4, seed=3)
        params = SamplingParams(max_tokens=8, ignore_eos=True)
        solo = [engine.generate(p, params).token_ids for p in prompts]
        core = engine._core
        original = core.runner.run
        victim = prompts[1].tail_ids

        def run(batch, rows=None):
            if any(tuple(e.seq.prompt.tail_ids) == victim for e in batch):
                raise RuntimeError("injected")
            return original(batch, rows)

        monkeypatch.setattr(core.runner, "run", run)

        async def main():  # one batch: all four are submitted before the worker steps
            return await asyncio.gather(
                *(engine.agenerate(p, params) for p in prompts), return_exceptions=True
            )

        outs = asyncio.run(main())
        assert isinstance(outs[1], RuntimeError)
        for i in (0, 2, 3):
            assert outs[i].token_ids == solo[i]
        monkeypatch.undo()
        assert engine.generate(prompts[1], params).token_ids == solo[1]
