"""`CascadeRAGLLM`: a LangChain completion model (text in, text out) on a local `CascadeEngine`.

A batch of prompts is one engine batch (`BaseLLM` hands `_generate` all prompts at once).
Prompts are sent as raw text, without the chat template, and repeated prefixes reuse their KV.

It does not apply a chat template to plain prompts (use `ChatCascadeRAG` for chat), and does
not return log-probabilities.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from typing import Any

from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.language_models import BaseLLM, LangSmithParams
from langchain_core.outputs import Generation, GenerationChunk, LLMResult
from typing_extensions import override

from langchain_cascade_rag._engine import (
    CascadeEngineParams,
    composition_chunks,
    split_call_kwargs,
    token_usage,
)


class CascadeRAGLLM(BaseLLM, CascadeEngineParams):
    """Completion model on a local cascade-rag engine (chunk-cached KV, cascade attention).

    Args:
        engine: an existing `CascadeEngine` to share; or
        model: a path or `LoadedModel` to build one from, with `engine_kwargs`.
        max_tokens, temperature, top_p, top_k, seed, stop: default sampling; each call may
            override them.
        streaming: generate through the streaming path (token callbacks fire); prompts of a
            batch then run one after another.

    Example:
        ```python
        from langchain_cascade_rag import CascadeRAGLLM

        llm = CascadeRAGLLM(engine=engine, max_tokens=64, stop=["\\n\\n"])
        llm.invoke("The capital of France is")
        llm.batch(["1 + 1 =", "2 + 2 ="])  # one engine batch
        result = llm.generate(["Once upon a time"])
        result.generations[0][0].generation_info["token_usage"]  # cached_tokens, ...
        ```

    Retrieved chunks: `llm.invoke(question, chunks=docs)` composes
    `[chat template's system turn | chunk 1 | ... | chunk k | question]` (see `ChatCascadeRAG`).
    """

    @property
    def _llm_type(self) -> str:
        return "cascade-rag"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {"model_name": self.model_name, **self._default_params}

    @override
    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any) -> LangSmithParams:
        return LangSmithParams(**self._ls_params("llm", stop, kwargs))

    def _requests(self, prompts: list[str], stop: list[str] | None, kwargs: dict):
        """(engine prompts, SamplingParams) of one call."""
        overrides, chunks = split_call_kwargs(type(self).__name__, kwargs)
        sampling = self.sampling_params(stop, **overrides)
        if chunks is None:
            return [self._engine_prompt(p) for p in prompts], sampling
        from cascade_rag.composition import Composition

        items = composition_chunks(self.engine, chunks)
        return [Composition(query=p, chunks=items) for p in prompts], sampling

    def _result(self, generations: list[Generation]) -> LLMResult:
        keys = ("prompt_tokens", "cached_tokens", "recomputed_tokens", "completion_tokens")
        total = dict.fromkeys((*keys, "total_tokens"), 0)
        for generation in generations:
            for key, value in generation.generation_info["token_usage"].items():
                total[key] += value
        return LLMResult(
            generations=[[g] for g in generations],
            llm_output={"token_usage": total, "model_name": self.model_name},
        )

    def _generate(
        self,
        prompts: list[str],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> LLMResult:
        if self.streaming:
            generations = []
            for prompt in prompts:
                final: GenerationChunk | None = None
                for chunk in self._stream(prompt, stop, run_manager, **kwargs):
                    final = chunk if final is None else final + chunk
                generations.append(final)
            return self._result(generations)
        engine_prompts, sampling = self._requests(prompts, stop, kwargs)
        outputs = self.engine.generate(engine_prompts, sampling)  # one engine batch
        return self._result([_generation(o) for o in outputs])

    async def _agenerate(
        self,
        prompts: list[str],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> LLMResult:
        if self.streaming:
            generations = []
            for prompt in prompts:
                final: GenerationChunk | None = None
                async for chunk in self._astream(prompt, stop, run_manager, **kwargs):
                    final = chunk if final is None else final + chunk
                generations.append(final)
            return self._result(generations)
        engine_prompts, sampling = self._requests(prompts, stop, kwargs)
        # submitted together, so the engine serves them in one running batch
        outputs = await asyncio.gather(
            *(self.engine.agenerate(p, sampling) for p in engine_prompts)
        )
        return self._result([_generation(o) for o in outputs])

    def _stream(
        self,
        prompt: str,
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[GenerationChunk]:
        (engine_prompt,), sampling = self._requests([prompt], stop, kwargs)
        for delta in self.engine.stream(engine_prompt, sampling):
            chunk = _chunk(delta)
            if chunk is None:
                continue
            if run_manager:
                run_manager.on_llm_new_token(chunk.text, chunk=chunk)
            yield chunk

    async def _astream(
        self,
        prompt: str,
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[GenerationChunk]:
        (engine_prompt,), sampling = self._requests([prompt], stop, kwargs)
        async for delta in self.engine.astream(engine_prompt, sampling):
            chunk = _chunk(delta)
            if chunk is None:
                continue
            if run_manager:
                await run_manager.on_llm_new_token(chunk.text, chunk=chunk)
            yield chunk


def _generation_info(output) -> dict[str, Any]:
    return {
        "finish_reason": output.finish_reason,
        "stop_reason": output.stop_reason,
        "token_usage": token_usage(output.usage),
    }


def _generation(output) -> Generation:
    return Generation(text=output.text, generation_info=_generation_info(output))


def _chunk(delta) -> GenerationChunk | None:
    """A streamed piece; the last one (always yielded) carries finish reason and usage."""
    if delta.output is None:
        return GenerationChunk(text=delta.text) if delta.text else None
    return GenerationChunk(text=delta.text, generation_info=_generation_info(delta.output))
