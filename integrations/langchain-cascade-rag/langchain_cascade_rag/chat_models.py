"""`ChatCascadeRAG`: a LangChain chat model running on a local `CascadeEngine`.

Messages become the engine's chat prompt (system/human/ai to system/user/assistant, rendered
with the model's chat template). The engine caches repeated prompt prefixes on its own, so a
chain that stuffs the same documents or system prompt into every prompt reuses their KV with
no cascade-specific code; `chunks=` passes retrieved documents explicitly as cascade chunks.

Tools (`bind_tools`) and structured output (`with_structured_output`) run under the engine's
grammar-constrained decoding: a tool call always names a bound tool with arguments valid
against its schema, and structured output always parses (unless cut by `max_tokens`).

It does not run tools or read images, audio or files.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from operator import itemgetter
from typing import Any, Literal

from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.language_models import BaseChatModel, LangSmithParams, LanguageModelInput
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage, ChatMessage
from langchain_core.output_parsers import JsonOutputParser, PydanticOutputParser
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
from langchain_core.runnables import Runnable, RunnableConfig, RunnableMap, RunnablePassthrough
from langchain_core.runnables.config import get_config_list
from pydantic import BaseModel
from typing_extensions import override

from langchain_cascade_rag import _batch, _tools
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

    Tool calling (the call is decoded under a grammar of the bound tools' schemas):
        ```python
        llm_tools = llm.bind_tools([get_weather], tool_choice="any")  # or "auto", a name
        msg = llm_tools.invoke("What is the weather in Plum?")
        msg.tool_calls  # [{"name": "get_weather", "args": {"city": "Plum"}, "id": ...}]
        ```
        Feed results back as `ToolMessage`s after the `AIMessage`. SmolLM2's chat template
        takes no tools, so they are described in the system prompt
        (`cascade_rag.tools.DEFAULT_TOOL_PROMPT`); one call per answer unless
        `parallel_tool_calls=True`.

    Structured output (json_schema: the answer is decoded under the schema; function_calling:
    a forced tool call; json_mode: any JSON object):
        ```python
        class Person(BaseModel):
            name: str
            age: int
        llm.with_structured_output(Person).invoke("Invent a person.")  # Person(...)
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
        """(engine prompt, SamplingParams, chat plan or None) of one call."""
        kwargs = dict(kwargs)
        tool_kwargs = {k: kwargs.pop(k) for k in _tools.TOOL_FIELDS if k in kwargs}
        kwargs.pop("ls_structured_output_format", None)  # LangChain's tracing hint
        overrides, chunks = split_call_kwargs(type(self).__name__, kwargs)
        sampling = self.sampling_params(stop, **overrides)
        turns = [_to_turn(m) for m in messages]
        if _tools.needs_plan(tool_kwargs, messages):
            if chunks is not None:
                raise ValueError(
                    "chunks= cannot be combined with tools, tool messages or a response format; "
                    "put the documents in the messages (their prefix KV is cached anyway)"
                )
            plan = _tools.plan(self.engine, turns, tool_kwargs)
            if plan.constraint is not None:
                from dataclasses import replace

                sampling = replace(sampling, constraint=plan.constraint)
            return plan.prompt, sampling, plan
        if chunks is None:
            prompt = [{"role": t["role"], "content": t["content"]} for t in turns]
            return self._engine_prompt(prompt), sampling, None
        from cascade_rag.composition import Composition

        system = [t["content"] for t in turns if t["role"] == "system"]
        rest = [t for t in turns if t["role"] != "system"]
        if len(rest) != 1 or rest[0]["role"] != "user":
            raise ValueError(
                "with chunks=, the messages must be system messages followed by one human "
                f"message (the query); got roles {[t['role'] for t in turns]}. Put earlier "
                "turns into the query text, or call without chunks= (prefixes are cached anyway)"
            )
        return (
            Composition(
                query=rest[0]["content"],
                chunks=composition_chunks(self.engine, chunks),
                system="\n\n".join(system) if system else None,
            ),
            sampling,
            None,
        )

    def _result(self, output, plan=None) -> ChatResult:
        info = _response_metadata(self.model_name, output)
        extra = {"usage_metadata": usage_metadata(output.usage), "response_metadata": info}
        if plan is not None:
            message = _tools.ai_message(plan, output.text, output.finish_reason, **extra)
            info = message.response_metadata
        else:
            message = AIMessage(content=output.text, **extra)
        return ChatResult(generations=[ChatGeneration(message=message, generation_info=info)])

    def _chunk(self, delta, parser=None) -> ChatGenerationChunk | None:
        if delta.output is None:
            text = delta.text
            if parser is not None:
                text = "".join(d["content"] for d in parser.feed(delta.text))
            if not text:
                return None
            return ChatGenerationChunk(message=AIMessageChunk(content=text))
        info = _response_metadata(self.model_name, delta.output)
        extra = {
            "usage_metadata": usage_metadata(delta.output.usage),
            "response_metadata": info,
            "chunk_position": "last",
        }
        if parser is not None:
            head = "".join(d["content"] for d in parser.feed(delta.text))
            message = _tools.stream_end(parser, delta.output.finish_reason, **extra)
            message.content = head + message.content
            info = message.response_metadata
        else:
            message = AIMessageChunk(content=delta.text, **extra)
        return ChatGenerationChunk(message=message, generation_info=info)

    # ---- LangChain hooks ---------------------------------------------------------------

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        prompt, sampling, plan = self._request(messages, stop, kwargs)
        return self._result(_batch.generate(self.engine, prompt, sampling), plan)

    def _stream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[ChatGenerationChunk]:
        prompt, sampling, plan = self._request(messages, stop, kwargs)
        _batch.release(self.engine)  # a streamed request does not wait for a batch
        parser = plan.stream_parser() if plan is not None else None
        for delta in self.engine.stream(prompt, sampling):
            chunk = self._chunk(delta, parser)
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
        prompt, sampling, plan = self._request(messages, stop, kwargs)
        return self._result(await self.engine.agenerate(prompt, sampling), plan)

    async def _astream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[ChatGenerationChunk]:
        prompt, sampling, plan = self._request(messages, stop, kwargs)
        parser = plan.stream_parser() if plan is not None else None
        async for delta in self.engine.astream(prompt, sampling):
            chunk = self._chunk(delta, parser)
            if chunk is None:
                continue
            if run_manager:
                await run_manager.on_llm_new_token(delta.text, chunk=chunk)
            yield chunk

    # ---- tools and structured output ---------------------------------------------------

    @override
    def bind_tools(
        self,
        tools: Sequence[dict[str, Any] | type | Callable | Any],
        *,
        tool_choice: str | dict | bool | None = None,
        parallel_tool_calls: bool | None = None,
        **kwargs: Any,
    ) -> Runnable[LanguageModelInput, AIMessage]:
        """Bind tools; the model then answers with text or calls of them (under a grammar).

        Args:
            tools: LangChain tools, pydantic models, typed functions or OpenAI tool dicts.
            tool_choice: "auto" (default: text or calls), "any" / "required" / True (at least
                one call), a tool's name or `{"type": "function", "function": {"name": ...}}`
                (exactly that tool), "none" / False (no call).
            parallel_tool_calls: allow several calls in one answer (default: one).
        """
        bound: dict[str, Any] = {"tools": _tools.format_tools(tools)}
        if tool_choice is not None:
            bound["tool_choice"] = tool_choice
        if parallel_tool_calls is not None:
            bound["parallel_tool_calls"] = parallel_tool_calls
        return self.bind(**bound, **kwargs)

    @override
    def with_structured_output(
        self,
        schema: dict | type,
        *,
        method: Literal["json_schema", "function_calling", "json_mode"] = "json_schema",
        include_raw: bool = False,
        strict: bool | None = None,
        **kwargs: Any,
    ) -> Runnable[LanguageModelInput, dict | Any]:
        """A runnable whose output follows `schema` (a pydantic model, TypedDict or JSON
        schema dict).

        Args:
            schema: the output schema (ignored for json_mode except for parsing into it).
            method: "json_schema" (default): the answer is decoded under the schema;
                "function_calling": a forced call of a tool with the schema as arguments;
                "json_mode": any JSON object (say in the prompt what it should hold).
            include_raw: return `{"raw": AIMessage, "parsed": ..., "parsing_error": ...}`.
            strict: accepted for compatibility; decoding is always strict here.
        """
        if kwargs:
            raise TypeError(f"with_structured_output got unexpected arguments {sorted(kwargs)}")
        if method == "function_calling":
            return super().with_structured_output(schema, include_raw=include_raw)
        is_model = isinstance(schema, type) and issubclass(schema, BaseModel)
        if method == "json_schema":
            tool = _tools.format_tools([schema])[0]["function"]
            response_format = {
                "type": "json_schema",
                # strict: the answer holds the schema's keys only (see close_objects)
                "json_schema": {"name": tool["name"], "schema": tool["parameters"], "strict": True},
            }
        elif method == "json_mode":
            response_format = {"type": "json_object"}
        else:
            raise ValueError(
                f"method={method!r}; use 'json_schema', 'function_calling' or 'json_mode'"
            )
        llm = self.bind(
            response_format=response_format,
            ls_structured_output_format={"kwargs": {"method": method}, "schema": schema},
        )
        parser = PydanticOutputParser(pydantic_object=schema) if is_model else JsonOutputParser()
        if not include_raw:
            return llm | parser
        parsed = RunnablePassthrough.assign(
            parsed=itemgetter("raw") | parser, parsing_error=lambda _: None
        )
        fallback = RunnablePassthrough.assign(parsed=lambda _: None)
        return RunnableMap(raw=llm) | parsed.with_fallbacks(
            [fallback], exception_key="parsing_error"
        )

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


def _to_turn(message: BaseMessage) -> dict[str, Any]:
    """One chat turn of the engine: `{"role", "content"}`, with tool calls / results."""
    if isinstance(message, ChatMessage):
        role = message.role
    elif message.type in _ROLES:
        role = _ROLES[message.type]
    else:
        raise ValueError(
            f"ChatCascadeRAG cannot send a {type(message).__name__} (type {message.type!r}); "
            "use system, human, ai, tool or ChatMessage"
        )
    return _tools.to_message(message, _text(message), role)


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
        elif block.get("type") in ("tool_use", "tool_call", "function_call"):
            continue  # the message's tool_calls carry the call
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
        # chunk_reuse="anywhere": tokens of reused chunks computed again in this context
        "recomputed_tokens": output.usage.recomputed_tokens,
    }
