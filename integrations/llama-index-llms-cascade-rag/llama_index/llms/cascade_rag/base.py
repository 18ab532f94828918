"""LlamaIndex LLM over a local cascade-rag engine.

`CascadeRAG` hands LlamaIndex chat messages to `CascadeEngine` as chat messages: the engine
applies the model's chat template and reuses the KV of text it has seen before (a repeated
system prompt, a retrieved context that comes back), so each reply reports how many prompt
tokens came from that cache. The async methods await the engine itself; concurrent awaits are
served together in one engine batch.

It is a function-calling LLM: `chat_with_tools`, `predict_and_call`, `FunctionAgent`,
`structured_predict` and `as_structured_llm` work, and each tool call is decoded under a
grammar of the tools' schemas, so it names a given tool with valid arguments. It does not read
images or other non-text content, or retrieve documents (see
`llama-index-retrievers-cascade-rag`).
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from llama_index.core.base.llms.types import (
    CachePoint,
    ChatMessage,
    ChatResponse,
    ChatResponseAsyncGen,
    ChatResponseGen,
    CompletionResponse,
    CompletionResponseAsyncGen,
    CompletionResponseGen,
    LLMMetadata,
    MessageRole,
    TextBlock,
    ToolCallBlock,
)
from llama_index.core.bridge.pydantic import Field, PrivateAttr
from llama_index.core.callbacks import CallbackManager
from llama_index.core.llms.callbacks import llm_chat_callback, llm_completion_callback
from llama_index.core.llms.function_calling import FunctionCallingLLM
from llama_index.core.llms.llm import ToolSelection
from llama_index.core.types import BaseOutputParser, PydanticProgramMode
from llama_index.llms.cascade_rag import _tools

from cascade_rag.arguments import unknown_arguments_error
from cascade_rag.llm import CascadeEngine
from cascade_rag.outputs import GenerationOutput
from cascade_rag.sampling import SamplingParams

# Per-call keyword arguments accepted by every generation method (fields of SamplingParams).
SAMPLING_KWARGS = (
    "max_tokens",
    "temperature",
    "top_p",
    "top_k",
    "seed",
    "stop",
    "stop_token_ids",
    "ignore_eos",
    "include_stop_str_in_output",
)
# LlamaIndex `LLM` fields that turn messages into a raw-text prompt; a chat model never uses
# them, so accepting them would ignore them.
_PROMPT_FORMATTING_HINTS = {
    name: "CascadeRAG renders prompts with the model's chat template; pass complete(prompt, "
    "formatted=True) to send text as it is"
    for name in ("messages_to_prompt", "completion_to_prompt", "query_wrapper_prompt")
}
# LlamaIndex roles the chat template does not know, as the role it does.
_ROLE_ALIASES = {
    MessageRole.DEVELOPER: "system",
    MessageRole.CHATBOT: "assistant",
    MessageRole.MODEL: "assistant",
}


class CascadeRAG(FunctionCallingLLM):
    """A local cascade-rag engine as a LlamaIndex LLM (chat model).

    Args:
        engine: a running `CascadeEngine` to use (shared, not closed by this LLM). Leave it
            None to build one from `model` and `engine_kwargs`.
        model: model folder / `.safetensors` / `.gguf` path or a `LoadedModel`, used only when
            `engine` is None; None is the default SmolLM2-135M-Instruct.
        engine_kwargs: `EngineConfig` fields for the engine built here, e.g.
            `{"kv_cache_tokens": 8192, "device": "cuda"}`.
        max_tokens: most tokens to generate per call (also `metadata.num_output`).
        temperature: 0 for greedy decoding, > 0 to sample.
        top_p: nucleus sampling threshold, 1.0 for off.
        top_k: keep the k most likely tokens, 0 for off.
        seed: per-request seed for reproducible sampling; None uses torch's global RNG.
        stop: stop strings; the reply is cut before the first one generated.
        system_prompt: prepended as a system message to `complete` prompts.
        passage_chunks: make each passage registered with the engine (`CascadeEmbedding(
            engine=...)`) that a prompt contains a chunk of its own, so its KV is reused
            where it comes back, as in a stock `VectorStoreIndex(...).as_query_engine(llm=
            ...)` (see `cascade_rag.passages`; the prompt's token ids do not change). Only
            active once the engine has passages.
        callback_manager: LlamaIndex callbacks (e.g. `TokenCountingHandler`).
        output_parser, pydantic_program_mode, rate_limiter: as for any LlamaIndex `LLM`.

    Any other constructor argument raises `TypeError` naming it (server-client arguments such
    as `base_url` or `api_key` included: this class runs the engine in-process).

    Every generation method also takes per-call sampling overrides as keyword arguments: the
    options above and `stop_token_ids`, `ignore_eos`, `include_stop_str_in_output` (the names
    in `SAMPLING_KWARGS`); any other keyword raises `TypeError`.

    Each response carries the request's token usage twice: `raw["usage"]` (the shape
    LlamaIndex's `TokenCountingHandler` reads) and the flat `additional_kwargs`, both with
    `prompt_tokens`, `completion_tokens`, `total_tokens`, `cached_tokens` (prompt tokens
    whose KV came from the engine's chunk cache) and `recomputed_tokens` (with
    `chunk_reuse="anywhere"`, tokens of reused chunks computed again in this prompt's context).
    A stream carries them on its last response.

    Example:
        >>> from cascade_rag.llm import CascadeEngine
        >>> from llama_index.core.llms import ChatMessage
        >>> llm = CascadeRAG(CascadeEngine(kv_cache_tokens=8192), max_tokens=64)
        >>> reply = llm.chat([
        ...     ChatMessage(role="system", content="Answer in one sentence."),
        ...     ChatMessage(role="user", content="What is the capital of France?"),
        ... ])
        >>> reply.message.content, reply.additional_kwargs["cached_tokens"]
    """

    model: str = Field(description="The engine's model identity (name and weight digest).")
    max_tokens: int = Field(default=256, gt=0, description="Most tokens to generate per call.")
    temperature: float = Field(default=0.0, ge=0.0, description="0 is greedy, > 0 samples.")
    top_p: float = Field(default=1.0, gt=0.0, le=1.0, description="Nucleus sampling threshold.")
    top_k: int = Field(default=0, ge=0, description="Top-k sampling, 0 for off.")
    seed: int | None = Field(default=None, description="Per-request sampling seed.")
    stop: list[str] = Field(default_factory=list, description="Stop strings.")
    passage_chunks: bool = Field(
        default=True, description="Compose registered passages found in prompts as chunks."
    )

    _engine: CascadeEngine = PrivateAttr()
    _owns_engine: bool = PrivateAttr(default=False)

    def __init__(
        self,
        engine: CascadeEngine | None = None,
        *,
        model: str | Path | Any | None = None,
        engine_kwargs: dict[str, Any] | None = None,
        max_tokens: int = 256,
        temperature: float = 0.0,
        top_p: float = 1.0,
        top_k: int = 0,
        seed: int | None = None,
        stop: Sequence[str] | None = None,
        system_prompt: str | None = None,
        passage_chunks: bool = True,
        callback_manager: CallbackManager | None = None,
        output_parser: BaseOutputParser | None = None,
        pydantic_program_mode: PydanticProgramMode = PydanticProgramMode.DEFAULT,
        rate_limiter: Any | None = None,
        **unknown: Any,
    ) -> None:
        if unknown:
            raise unknown_arguments_error(
                "CascadeRAG",
                unknown,
                [name for name in inspect.signature(CascadeRAG.__init__).parameters][1:-1],
                "runs the cascade-rag engine",
                "Pick the model with model= (a path) or pass a CascadeEngine; to call a server "
                "that speaks the OpenAI API, use an OpenAI-compatible LLM, e.g. "
                "llama_index.llms.openai_like.OpenAILike(api_base=..., api_key=...).",
                _PROMPT_FORMATTING_HINTS,
            )
        if engine is not None:
            if not isinstance(engine, CascadeEngine):
                raise TypeError(
                    f"engine must be a CascadeEngine, got {type(engine).__name__}; pass a model "
                    "path as model=... to build one"
                )
            if model is not None or engine_kwargs:
                raise ValueError(
                    "pass either a running engine or model/engine_kwargs to build one, not both"
                )
        if isinstance(stop, str):
            stop = [stop]
        super().__init__(
            model="",
            max_tokens=max_tokens,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            seed=seed,
            stop=list(stop or []),
            passage_chunks=passage_chunks,
            system_prompt=system_prompt,
            callback_manager=callback_manager or CallbackManager([]),
            output_parser=output_parser,
            pydantic_program_mode=pydantic_program_mode,
            rate_limiter=rate_limiter,
        )
        self._sampling({})  # SamplingParams checks the options before an engine is built
        if engine is None:
            engine = CascadeEngine(model, **(engine_kwargs or {}))
            self._owns_engine = True
        self._engine = engine
        self.model = engine.model_name

    @classmethod
    def class_name(cls) -> str:
        return "CascadeRAG"

    @property
    def engine(self) -> CascadeEngine:
        """The engine this LLM generates with (share it with a `CascadeRAGRetriever`)."""
        return self._engine

    @property
    def metadata(self) -> LLMMetadata:
        """The engine's real context window, `max_tokens` as the output budget, chat model."""
        return LLMMetadata(
            context_window=self._engine.max_model_len,
            num_output=self.max_tokens,
            is_chat_model=True,
            is_function_calling_model=True,
            model_name=self._engine.model_name,
            system_role=MessageRole.SYSTEM,
        )

    def close(self) -> None:
        """Stop the engine if this LLM built it; a shared engine is left running."""
        if self._owns_engine:
            self._engine.close()

    # ---- completion --------------------------------------------------------------------

    @llm_completion_callback()
    def complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        """Complete a prompt, sent as a user turn of the chat template (after `system_prompt`).

        With `formatted=True` the prompt is taken as the model's full input text and sent
        without a chat template.
        """
        output = self._engine.generate(
            self._completion_prompt(prompt, formatted), self._sampling(kwargs)
        )
        return CompletionResponse(
            text=output.text, raw=_raw(output), additional_kwargs=_usage(output)
        )

    @llm_completion_callback()
    def stream_complete(
        self, prompt: str, formatted: bool = False, **kwargs: Any
    ) -> CompletionResponseGen:
        """Stream `complete`: each response has the text so far and the new `delta`."""
        engine_prompt = self._completion_prompt(prompt, formatted)
        params = self._sampling(kwargs)

        def gen() -> CompletionResponseGen:
            text = ""
            for delta in self._engine.stream(engine_prompt, params):
                text += delta.text
                yield _completion_response(text, delta.text, delta.output)

        return gen()

    @llm_completion_callback()
    async def acomplete(
        self, prompt: str, formatted: bool = False, **kwargs: Any
    ) -> CompletionResponse:
        """Async `complete`; concurrent awaits share engine steps."""
        output = await self._engine.agenerate(
            self._completion_prompt(prompt, formatted), self._sampling(kwargs)
        )
        return CompletionResponse(
            text=output.text, raw=_raw(output), additional_kwargs=_usage(output)
        )

    @llm_completion_callback()
    async def astream_complete(
        self, prompt: str, formatted: bool = False, **kwargs: Any
    ) -> CompletionResponseAsyncGen:
        """Async `stream_complete`."""
        engine_prompt = self._completion_prompt(prompt, formatted)
        params = self._sampling(kwargs)

        async def gen() -> CompletionResponseAsyncGen:
            text = ""
            async for delta in self._engine.astream(engine_prompt, params):
                text += delta.text
                yield _completion_response(text, delta.text, delta.output)

        return gen()

    # ---- chat --------------------------------------------------------------------------

    @llm_chat_callback()
    def chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        """Reply to chat messages, formatted by the model's chat template.

        With `tools=` (OpenAI tool dicts, as `chat_with_tools` passes them) the reply is text
        or tool calls (`ToolCallBlock`s), decoded under a grammar of the tools' schemas.
        """
        prompt, params, plan = self._chat_request(messages, kwargs)
        output = self._engine.generate(prompt, params)
        return _chat_response(output.text, None, output, plan)

    @llm_chat_callback()
    def stream_chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponseGen:
        """Stream `chat`: each response has the reply so far and the new `delta`."""
        prompt, params, plan = self._chat_request(messages, kwargs)

        def gen() -> ChatResponseGen:
            text = ""
            parser = plan.stream_parser() if plan is not None else None
            for delta in self._engine.stream(prompt, params):
                text += delta.text
                yield _chat_response(text, _shown(parser, delta.text), delta.output, plan)

        return gen()

    @llm_chat_callback()
    async def achat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        """Async `chat`; concurrent awaits share engine steps."""
        prompt, params, plan = self._chat_request(messages, kwargs)
        output = await self._engine.agenerate(prompt, params)
        return _chat_response(output.text, None, output, plan)

    @llm_chat_callback()
    async def astream_chat(
        self, messages: Sequence[ChatMessage], **kwargs: Any
    ) -> ChatResponseAsyncGen:
        """Async `stream_chat`."""
        prompt, params, plan = self._chat_request(messages, kwargs)

        async def gen() -> ChatResponseAsyncGen:
            text = ""
            parser = plan.stream_parser() if plan is not None else None
            async for delta in self._engine.astream(prompt, params):
                text += delta.text
                yield _chat_response(text, _shown(parser, delta.text), delta.output, plan)

        return gen()

    # ---- function calling --------------------------------------------------------------

    def _prepare_chat_with_tools(
        self,
        tools: Sequence[Any],
        user_msg: str | ChatMessage | None = None,
        chat_history: list[ChatMessage] | None = None,
        verbose: bool = False,
        allow_parallel_tool_calls: bool = False,
        tool_required: bool = False,
        tool_choice: str | dict | None = None,
        **kwargs: Any,
    ) -> dict[str, Any]:
        """`chat` arguments for a turn with tools: 'required' when `tool_required`, else
        'auto' (or `tool_choice`: a tool name, 'none', ...)."""
        messages = list(chat_history or [])
        if isinstance(user_msg, str):
            user_msg = ChatMessage(role=MessageRole.USER, content=user_msg)
        if user_msg is not None:
            messages.append(user_msg)
        if tool_choice is None:
            tool_choice = "required" if tool_required else "auto"
        return {
            "messages": messages,
            "tools": _tools.tool_specs(tools),
            "tool_choice": tool_choice,
            "parallel_tool_calls": allow_parallel_tool_calls,
            **kwargs,
        }

    def get_tool_calls_from_response(
        self, response: ChatResponse, error_on_no_tool_call: bool = True, **kwargs: Any
    ) -> list[ToolSelection]:
        """The `ToolSelection`s of a reply (its `ToolCallBlock`s)."""
        selections = _tools.tool_selections(response.message)
        if not selections and error_on_no_tool_call:
            raise ValueError(
                f"the model answered without a tool call: {response.message.content!r:.200}"
            )
        return selections

    # ---- internals ---------------------------------------------------------------------

    def _sampling(self, overrides: dict[str, Any]) -> SamplingParams:
        unknown = sorted(set(overrides) - set(SAMPLING_KWARGS))
        if unknown:
            raise TypeError(
                f"CascadeRAG does not take {unknown}; per-call options are {SAMPLING_KWARGS}"
            )
        options = {
            "max_tokens": self.max_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "seed": self.seed,
            "stop": tuple(self.stop),
        }
        options.update(overrides)
        if options["stop"] is None:
            options["stop"] = ()
        return SamplingParams(**options)

    def _chat_request(self, messages: Sequence[ChatMessage], kwargs: dict[str, Any]):
        """(engine prompt, SamplingParams, chat plan or None) of a chat call."""
        kwargs = dict(kwargs)
        tool_kwargs = {k: kwargs.pop(k) for k in _tools.TOOL_KWARGS if k in kwargs}
        params = self._sampling(kwargs)
        turns = _engine_messages(messages)
        if not tool_kwargs.get("tools") and not any(_tools.is_tool_turn(m) for m in messages):
            return self._engine_prompt(turns), params, None
        from dataclasses import replace

        from cascade_rag.openai_tools import prepare_chat

        for turn, message in zip(turns, messages):
            if message.role == MessageRole.TOOL:
                turn.update(_tools.tool_message_fields(message))
            elif calls := _tools.message_calls(message):
                turn["tool_calls"] = calls
        plan = prepare_chat(
            self._engine,
            turns,
            tools=tool_kwargs.get("tools") or None,
            tool_choice=tool_kwargs.get("tool_choice") if tool_kwargs.get("tools") else None,
            parallel_tool_calls=bool(tool_kwargs.get("parallel_tool_calls")),
        )
        if plan.constraint is not None:
            params = replace(params, constraint=plan.constraint)
        return plan.prompt, params, plan

    def _completion_prompt(self, prompt: str, formatted: bool):
        if not isinstance(prompt, str):
            raise TypeError(f"prompt must be a str, got {type(prompt).__name__}")
        if formatted:
            return self._engine_prompt(prompt)
        messages = [{"role": "user", "content": prompt}]
        if self.system_prompt:
            messages.insert(0, {"role": "system", "content": self.system_prompt})
        return self._engine_prompt(messages)

    def _engine_prompt(self, prompt):
        """The prompt with the engine's registered passages as chunks (a `PreparedPrompt`),
        or the prompt itself (`passage_chunks` off, or no passages registered)."""
        if not self.passage_chunks:
            return prompt
        from cascade_rag.passages import compose_prompt

        return compose_prompt(self._engine, prompt)


def _engine_messages(messages: Sequence[ChatMessage]) -> list[dict[str, str]]:
    """LlamaIndex messages as the engine's {"role", "content"} chat messages (text only)."""
    if isinstance(messages, (str, ChatMessage)) or not messages:
        raise TypeError("messages must be a non-empty list of ChatMessage")
    out = []
    for message in messages:
        if not isinstance(message, ChatMessage):
            raise TypeError(f"messages must be ChatMessage objects, got {type(message).__name__}")
        texts = []
        for block in message.blocks:
            if isinstance(block, TextBlock):
                texts.append(block.text)
            elif not isinstance(block, (CachePoint, ToolCallBlock)):  # calls: see _tools
                raise TypeError(
                    f"CascadeRAG reads text only; a {message.role.value} message has a "
                    f"{type(block).__name__}"
                )
        role = _ROLE_ALIASES.get(message.role, message.role.value)
        out.append({"role": role, "content": "\n".join(texts)})
    return out


def _usage(output: GenerationOutput) -> dict[str, int]:
    usage = output.usage
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens,
        "cached_tokens": usage.cached_tokens,
        "recomputed_tokens": usage.recomputed_tokens,
    }


def _raw(output: GenerationOutput) -> dict[str, Any]:
    return {
        "usage": _usage(output),
        "finish_reason": output.finish_reason,
        "stop_reason": output.stop_reason,
        "token_ids": list(output.token_ids),
    }


def _completion_response(
    text: str, delta: str, output: GenerationOutput | None
) -> CompletionResponse:
    if output is None:
        return CompletionResponse(text=text, delta=delta)
    return CompletionResponse(
        text=text, delta=delta, raw=_raw(output), additional_kwargs=_usage(output)
    )


def _chat_response(
    text: str, delta: str | None, output: GenerationOutput | None, plan=None
) -> ChatResponse:
    if output is not None and plan is not None:
        message = _tools.reply_message(plan, text, output.finish_reason)
    else:
        message = ChatMessage(role=MessageRole.ASSISTANT, content=text)
    if output is None:
        return ChatResponse(message=message, delta=delta)
    return ChatResponse(
        message=message, delta=delta, raw=_raw(output), additional_kwargs=_usage(output)
    )


def _shown(parser, text: str) -> str:
    """The part of a streamed piece to show: a tool call is not streamed as text."""
    if parser is None:
        return text
    return "".join(d["content"] for d in parser.feed(text))
