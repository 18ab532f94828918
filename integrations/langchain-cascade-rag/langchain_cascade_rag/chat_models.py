"""`ChatCascadeRAG`: a LangChain chat model running on a local `CascadeEngine`.

Messages become the engine's chat prompt (system/human/ai to system/user/assistant, rendered
with the model's chat template). The engine caches repeated prompt prefixes on its own, so a
chain that stuffs the same documents or system prompt into every prompt reuses their KV with
no cascade-specific code; `chunks=` passes retrieved documents explicitly as cascade chunks.

It does not call tools, produce structured output or read images, audio or files.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any

from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.language_models import BaseChatModel, LangSmithParams, LanguageModelInput
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage, ChatMessage
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
from langchain_core.runnables import RunnableConfig
from langchain_core.runnables.config import get_config_list
from typing_extensions import override

from langchain_cascade_rag import _batch
from langchain_cascade_rag._engine import (
    CascadeEngineParams,
    composition_chunks,
    split_call_kwargs,
    usage_metadata,
)

_ROLES = {"system": "system", "human": "user", "ai": "assistant", "tool": "tool"}


class ChatCascadeRAG(BaseChatModel, CascadeEngineParams):
    """Chat model on a local cascade-rag engine (chunk-cached KV, cascade attention).

    Setup:
        ```bash
        pip install -e integrations/langchain-cascade-rag
        ```

    Args:
        engine: an existing `CascadeEngine` to share (with its chunk cache); or
        model: a model folder / `.safetensors` / `.gguf` path or a `LoadedModel` to build one
            from, with `engine_kwargs` (`EngineConfig` fields); None is the default
            SmolLM2-135M-Instruct.
        max_tokens, temperature, top_p, top_k, seed, stop: default sampling; each call may
            override them (`model.invoke(msgs, temperature=0.7, stop=["\\n"])`).
        streaming: route `invoke` through the streaming path (token callbacks fire).

    Instantiate:
        ```python
        from cascade_rag.llm import CascadeEngine
        from langchain_cascade_rag import ChatCascadeRAG

        engine = CascadeEngine(kv_cache_tokens=8192)
        llm = ChatCascadeRAG(engine=engine, max_tokens=128)
        ```

    Invoke:
        ```python
        msg = llm.invoke([("system", "Answer briefly."), ("human", "What is KV caching?")])
        msg.content, msg.usage_metadata, msg.response_metadata["finish_reason"]
        ```

    Stream and async:
        ```python
        for chunk in llm.stream("Hello"):
            print(chunk.content, end="")
        msg = await llm.ainvoke("Hello")  # concurrent awaits share the engine's batch
        ```

    Batch (all inputs go to the engine as one batch):
        ```python
        llm.batch(["What is RAG?", "What is a KV cache?"])
        ```

    Chunk cache: a prompt that starts like an earlier one (same system prompt, same stuffed
    documents) reuses that prefix's KV; `usage_metadata["input_token_details"]["cache_read"]`
    counts the reused input tokens.

    Retrieved chunks: pass documents explicitly as cascade chunks, composed as
    `[system | chunk 1 | ... | chunk k | query]`; a chunk's KV is reused by later prompts with
    the same system prompt and chunks before it, and requests sharing chunks are served with
    cascade attention. The messages must then be system messages followed by one human
    message, the query:
        ```python
        docs = retriever.invoke("What is the capital of Zorbia?")
        llm.invoke([("system", "Answer from the context."), ("human", question)], chunks=docs)
        ```
        `chunks` items may be LangChain `Document`s (those from `CascadeRAGRetriever` reuse
        their registered chunk), cascade `Chunk`s, `ChunkId`s, or plain text.
    """

    @property
    def _llm_type(self) -> str:
        return "cascade-rag-chat"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {"model_name": self.model_name, **self._default_params}

    @override
    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any) -> LangSmithParams:
        return LangSmithParams(**self._ls_params("chat", stop, kwargs))

    # ---- requests ----------------------------------------------------------------------

    def _request(self, messages: list[BaseMessage], stop: list[str] | None, kwargs: dict):
        """(engine prompt, SamplingParams) of one call."""
        overrides, chunks = split_call_kwargs(type(self).__name__, kwargs)
        sampling = self.sampling_params(stop, **overrides)
        turns = [_to_turn(m) for m in messages]
        if chunks is None:
            return turns, sampling
        from cascade_rag.composition import Composition

        system = [t["content"] for t in turns if t["role"] == "system"]
        rest = [t for t in turns if t["role"] != "system"]
        if len(rest) != 1 or rest[0]["role"] != "user":
            raise ValueError(
                "with chunks=, the messages must be system messages followed by one human "
                f"message (the query); got roles {[t['role'] for t in turns]}. Put earlier "
                "turns into the query text, or call without chunks= (prefixes are cached anyway)"
            )
        return Composition(
            query=rest[0]["content"],
            chunks=composition_chunks(self.engine, chunks),
            system="\n\n".join(system) if system else None,
        ), sampling

    def _result(self, output) -> ChatResult:
        info = _response_metadata(self.model_name, output)
        message = AIMessage(
            content=output.text,
            usage_metadata=usage_metadata(output.usage),
            response_metadata=info,
        )
        return ChatResult(generations=[ChatGeneration(message=message, generation_info=info)])

    def _chunk(self, delta) -> ChatGenerationChunk | None:
        if delta.output is None:
            if not delta.text:
                return None
            return ChatGenerationChunk(message=AIMessageChunk(content=delta.text))
        info = _response_metadata(self.model_name, delta.output)
        message = AIMessageChunk(
            content=delta.text,
            usage_metadata=usage_metadata(delta.output.usage),
            response_metadata=info,
            chunk_position="last",
        )
        return ChatGenerationChunk(message=message, generation_info=info)

    # ---- LangChain hooks ---------------------------------------------------------------

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        prompt, sampling = self._request(messages, stop, kwargs)
        return self._result(_batch.generate(self.engine, prompt, sampling))

    def _stream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[ChatGenerationChunk]:
        prompt, sampling = self._request(messages, stop, kwargs)
        _batch.release(self.engine)  # a streamed request does not wait for a batch
        for delta in self.engine.stream(prompt, sampling):
            chunk = self._chunk(delta)
            if chunk is None:
                continue
            if run_manager:
                run_manager.on_llm_new_token(delta.text, chunk=chunk)
            yield chunk

    async def _agenerate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        prompt, sampling = self._request(messages, stop, kwargs)
        return self._result(await self.engine.agenerate(prompt, sampling))

    async def _astream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[ChatGenerationChunk]:
        prompt, sampling = self._request(messages, stop, kwargs)
        async for delta in self.engine.astream(prompt, sampling):
            chunk = self._chunk(delta)
            if chunk is None:
                continue
            if run_manager:
                await run_manager.on_llm_new_token(delta.text, chunk=chunk)
            yield chunk

    @override
    def batch(
        self,
        inputs: list[LanguageModelInput],
        config: RunnableConfig | Sequence[RunnableConfig] | None = None,
        *,
        return_exceptions: bool = False,
        **kwargs: Any,
    ) -> list[BaseMessage]:
        """Invoke on every input, the engine running all their requests as one batch.

        Callbacks, LangChain's cache and output formatting are those of `invoke`; up to the
        engine's `max_num_seqs` inputs (or `max_concurrency`) share one engine call.
        """
        if len(inputs) < 2:
            return super().batch(inputs, config, return_exceptions=return_exceptions, **kwargs)
        return _batch.gated_batch(
            self.invoke,
            self.engine,
            list(inputs),
            get_config_list(config, len(inputs)),
            return_exceptions=return_exceptions,
            kwargs=kwargs,
        )


def _to_turn(message: BaseMessage) -> dict[str, str]:
    """One `{"role", "content"}` chat turn of the engine."""
    if isinstance(message, ChatMessage):
        role = message.role
    elif message.type in _ROLES:
        role = _ROLES[message.type]
    else:
        raise ValueError(
            f"ChatCascadeRAG cannot send a {type(message).__name__} (type {message.type!r}); "
            "use system, human, ai, tool or ChatMessage"
        )
    return {"role": role, "content": _text(message)}


def _text(message: BaseMessage) -> str:
    if isinstance(message.content, str):
        return message.content
    parts = []
    for block in message.content:
        if isinstance(block, str):
            parts.append(block)
        elif block.get("type") == "text":
            parts.append(block.get("text", ""))
        elif block.get("type") in ("reasoning", "thinking"):
            continue  # an earlier turn's hidden reasoning is not replayed
        else:
            raise ValueError(
                f"ChatCascadeRAG takes text only; got a {block.get('type')!r} content block in "
                f"a {type(message).__name__}"
            )
    return "".join(parts)


def _response_metadata(model_name: str, output) -> dict[str, Any]:
    return {
        "model_name": model_name,
        "finish_reason": output.finish_reason,
        "stop_reason": output.stop_reason,
    }
